"""--amp: which precision a run computes in, and what runs in bfloat16 (amp.py).

bfloat16 on a CPU without native support (this project's CI) is emulated and ~20x slower than
float32, so the model checks use a ResNet-18 on a few small images."""
import types

import pytest
import torch

import amp
import img_text_composition_models
import test_retrieval

# /proc/cpuinfo excerpts (flags trimmed).
ZEN2_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme de pse sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
bugs\t\t: sysret_ss_attrs spectre_v1
"""
ZEN4 = ZEN2_AVX2.replace('sha_ni', 'sha_ni avx512f avx512bw avx512_bf16 avx512vnni')
SAPPHIRE_RAPIDS = ZEN2_AVX2.replace('sha_ni', 'sha_ni avx512f amx_bf16 amx_tile amx_int8')
SKYLAKE_AVX512 = ZEN2_AVX2.replace('sha_ni', 'sha_ni avx512f avx512bw avx512vl')
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve i8mm bf16 dgh rng
CPU implementer\t: 0x41
"""
GRAVITON2 = GRAVITON3.replace(' i8mm bf16', '')
# 'bf16' outside the flag lines (a model name) says nothing.
NAMED_ONLY = 'model name\t: Example bf16 avx512_bf16 Processor\nflags\t\t: fpu sse2 avx2\n'


@pytest.mark.parametrize('text, native', [
    (ZEN2_AVX2, False), (ZEN4, True), (SAPPHIRE_RAPIDS, True), (SKYLAKE_AVX512, False),
    (GRAVITON3, True), (GRAVITON2, False), (NAMED_ONLY, False), ('', False)])
def test_cpuinfo_flags_of_native_bfloat16(text, native):
    assert amp.cpuinfo_has_native_bf16(text) is native


def test_native_bfloat16_through_what_the_system_publishes(tmp_path, monkeypatch):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text(ZEN4)
    assert amp.cpu_has_native_bf16('linux', str(cpuinfo)) is True
    cpuinfo.write_text(ZEN2_AVX2)
    assert amp.cpu_has_native_bf16('linux', str(cpuinfo)) is False
    assert amp.cpu_has_native_bf16('linux', str(tmp_path / 'absent')) is False
    assert amp.cpu_has_native_bf16('win32', str(cpuinfo)) is False

    asked = []

    def sysctl(answer, code=0):
        def run(args, **kwargs):
            asked.append(args)
            return types.SimpleNamespace(returncode=code, stdout=answer)
        return run
    monkeypatch.setattr(amp.subprocess, 'run', sysctl('1\n'))
    assert amp.cpu_has_native_bf16('darwin') is True
    assert asked[-1] == ['sysctl', '-n', 'hw.optional.arm.FEAT_BF16']
    monkeypatch.setattr(amp.subprocess, 'run', sysctl('0\n'))
    assert amp.cpu_has_native_bf16('darwin') is False
    # An Intel Mac has no such key: sysctl fails.
    monkeypatch.setattr(amp.subprocess, 'run', sysctl('', code=1))
    assert amp.cpu_has_native_bf16('darwin') is False


def test_the_environment_override():
    assert amp.cpu_bf16_override({}) is None
    assert amp.cpu_bf16_override({'TIRG_CPU_BF16': ''}) is None
    assert amp.cpu_bf16_override({'TIRG_CPU_BF16': '1'}) is True
    assert amp.cpu_bf16_override({'TIRG_CPU_BF16': ' 0 '}) is False
    with pytest.raises(amp.PrecisionSettingError) as error:
        amp.cpu_bf16_override({'TIRG_CPU_BF16': 'yes'})
    assert str(error.value) == ('TIRG_CPU_BF16=yes: expected 1 (bfloat16 autocast on the CPU '
                                'under --amp) or 0 (float32)')


NO_NATIVE = ('--amp: this processor has no native bfloat16 (bfloat16 would be slower than '
             'float32 here): computing in float32')


@pytest.mark.parametrize('amp_flag, device, environ, native, expected', [
    (False, 'cpu', {}, True, ('float32', None)),
    (False, 'cuda', {'TIRG_CPU_BF16': '1'}, False, ('float32', None)),
    (True, 'cuda', {}, False, ('bfloat16', None)),
    (True, 'cuda', {'TIRG_CPU_BF16': '0'}, False, ('bfloat16', None)),  # a CPU setting
    (True, 'cpu', {}, True, ('bfloat16', None)),
    (True, 'cpu', {}, False, ('float32', NO_NATIVE)),
    (True, 'cpu', {'TIRG_CPU_BF16': '1'}, False,
     ('bfloat16', '--amp: TIRG_CPU_BF16=1: bfloat16 autocast on a CPU without native bfloat16 '
                  '(emulated: slower than float32)')),
    (True, 'cpu', {'TIRG_CPU_BF16': '1'}, True, ('bfloat16', None)),
    (True, 'cpu', {'TIRG_CPU_BF16': '0'}, True,
     ('float32', '--amp: TIRG_CPU_BF16=0: computing in float32 on the CPU')),
    (True, 'mps', {}, True,
     ('float32', '--amp: bfloat16 autocast runs on CUDA and on CPUs with native bfloat16, not '
                 'on mps: computing in float32')),
])
def test_the_precision_a_run_computes_in(amp_flag, device, environ, native, expected):
    assert amp.choose(amp_flag, device, environ, native) == expected


def test_without_amp_the_processor_is_not_asked(monkeypatch):
    monkeypatch.setattr(amp, 'cpu_has_native_bf16', lambda: pytest.fail('detected'))
    assert amp.choose(False, 'cpu', {}) == ('float32', None)


def test_the_default_detection_on_linux_reads_proc_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.setattr(amp, 'cpu_has_native_bf16', lambda: False)
    assert amp.choose(True, 'cpu', {}) == ('float32', NO_NATIVE)
    monkeypatch.setattr(amp, 'cpu_has_native_bf16', lambda: True)
    assert amp.choose(True, 'cpu', {}) == ('bfloat16', None)


# ---------------------------------------------------------------------------------------------
# What runs in bfloat16.

TEXTS = ['make top-left red object blue', 'add a small gray circle', 'remove', '',
         'make middle-center cyan object purple']


def tiny_tirg(seed=3):
    torch.manual_seed(seed)
    model = img_text_composition_models.TIRG(TEXTS, embed_dim=24, pretrained=False)
    return model


def images(seed, count=2):
    # Awkward: not square, not a power of two.
    return torch.randn(count, 3, 40, 56, generator=torch.Generator().manual_seed(seed))


def loss_and_dtypes(model, precision):
    """(loss, {where: dtype}) of one training loss under `precision`, as main.py computes it."""
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            output = output[0] if isinstance(output, tuple) else output  # the LSTM's (out, state)
            seen.setdefault(name, (inputs[0].dtype, output.dtype))
        return hook
    handles = [model.normalization_layer.register_forward_hook(record('normalization')),
               model.text_model.lstm.register_forward_hook(record('lstm')),
               model.img_model.conv1.register_forward_hook(record('conv1')),
               model.img_model.fc.register_forward_hook(record('fc'))]
    original = model.soft_triplet_loss.forward

    def loss_forward(x, triplets):
        seen['loss input'] = x.dtype
        return original(x, triplets)
    model.soft_triplet_loss.forward = loss_forward
    try:
        torch.manual_seed(11)  # the same triplets and dropout masks under either precision
        with amp.autocast(precision, 'cpu'):
            loss = model(images(1), TEXTS[:2], images(2))
        return loss, seen
    finally:
        for handle in handles:
            handle.remove()
        del model.soft_triplet_loss.forward


def test_bfloat16_runs_the_encoders_and_the_loss_gets_float32():
    model = tiny_tirg()
    loss32, seen32 = loss_and_dtypes(model, 'float32')
    loss16, seen16 = loss_and_dtypes(model, 'bfloat16')
    assert seen32['conv1'] == seen32['fc'] == (torch.float32, torch.float32)
    # The image encoder computes in bfloat16 from float32 images...
    assert seen16['conv1'] == (torch.float32, torch.bfloat16)
    assert seen16['fc'] == (torch.bfloat16, torch.bfloat16)
    # ...the LSTM in float32 (oneDNN's bfloat16 LSTM needs native bfloat16 instructions)...
    assert seen16['lstm'] == (torch.float32, torch.float32)
    # ...and the normalisation and the loss in float32.
    assert seen16['normalization'] == (torch.float32, torch.float32)
    assert seen16['loss input'] == torch.float32
    assert loss16.dtype == loss32.dtype == torch.float32
    # Computed in bfloat16 (8 bits of mantissa): close to float32's loss, not the same.
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05)
    assert loss16.item() != loss32.item()


@pytest.mark.slow
def test_weights_gradients_and_optimizer_state_stay_float32_under_bfloat16():
    model = tiny_tirg()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss, _ = loss_and_dtypes(model, 'bfloat16')
    loss.backward()
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    optimizer.step()
    assert {v.dtype for v in model.state_dict().values() if v.is_floating_point()} == {torch.float32}
    assert {s['momentum_buffer'].dtype for s in optimizer.state.values()} == {torch.float32}


class TwoImages:
    """The dataset API the feature extraction reads: three images and two queries."""

    def __init__(self):
        self.imgs = [{'captions': [f'image {i}']} for i in range(3)]

    def get_img(self, idx, raw_img=False):
        return images(10 + idx, count=1)[0]


def test_features_leave_the_extraction_in_float32_computed_in_bfloat16():
    model = tiny_tirg().eval()
    dataset = TwoImages()
    queries = [{'source_img_id': 2, 'mod': {'str': TEXTS[0]}}, {'source_img_id': 0, 'mod': {'str': ''}}]
    features = {}
    for precision in ('float32', 'bfloat16'):
        gallery = test_retrieval.compute_gallery_features(model, dataset, 2, precision=precision)
        query = test_retrieval.compute_query_features(model, dataset, queries, 2, 0, precision)
        assert gallery.dtype == query.dtype == torch.float32
        assert gallery.shape == (3, 24) and query.shape == (2, 24)
        features[precision] = gallery, query
    for f32, bf16 in zip(features['float32'], features['bfloat16']):
        assert torch.allclose(bf16, f32, rtol=0.05, atol=0.05 * float(f32.abs().max()))
        assert not torch.equal(bf16, f32)


def test_the_retrieval_test_ranks_float32_features_in_its_options_precision(monkeypatch):
    model = tiny_tirg()
    dataset = TwoImages()
    dataset.get_test_queries = lambda: [{'source_img_id': 1, 'mod': {'str': TEXTS[1]},
                                         'target_caption': 'image 2'}]
    extracted, ranked = [], []
    original_gallery = test_retrieval.compute_gallery_features

    def gallery_features(*args, precision='float32', **kwargs):
        extracted.append(precision)
        return original_gallery(*args, precision=precision, **kwargs)
    original_ranking = test_retrieval.nearest_neighbours

    def nearest_neighbours(queries, gallery, *args, **kwargs):
        ranked.append((queries.dtype, gallery.dtype))
        return original_ranking(queries, gallery, *args, **kwargs)
    monkeypatch.setattr(test_retrieval, 'compute_gallery_features', gallery_features)
    monkeypatch.setattr(test_retrieval, 'nearest_neighbours', nearest_neighbours)
    opt = types.SimpleNamespace(batch_size=2, loader_num_workers=0, dataset='css3d',
                                precision='bfloat16')
    metrics = dict(test_retrieval.test(opt, model, dataset))
    assert extracted == ['bfloat16']
    assert ranked == [(torch.float32, torch.float32)]
    assert set(metrics) == {f'recall_top{k}_correct_composition' for k in (1, 5, 10, 50, 100)}
    # Without a precision (a caller that predates --amp): float32.
    del opt.precision
    test_retrieval.test(opt, model, dataset)
    assert extracted == ['bfloat16', 'float32']


# ---------------------------------------------------------------------------------------------
# main.py --amp on a CPU.  The fixture is small (4 scenes: 12 images and 8 queries a split) and
# the batch 2: emulated bfloat16 costs ~10 s a training iteration here.

def amp_command(root, *flags):
    return ['--dataset=css3d', f'--dataset_path={root}', '--batch_size=2', '--embed_dim=16',
            '--loader_num_workers=0', '--img_weights=none', '--seed=5'] + list(flags)


def read_json(path):
    import json
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def autocast_calls(monkeypatch):
    """The precision of every amp.autocast context entered (training and feature extraction)."""
    calls = []
    original = amp.autocast

    def recording(precision, device_type):
        calls.append(precision)
        return original(precision, device_type)
    monkeypatch.setattr(amp, 'autocast', recording)
    return calls


@pytest.fixture
def small_css(tmp_path):
    from conftest import write_css_fixture
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=4)
    return root


def test_amp_without_native_bfloat16_says_so_once_and_trains_in_float32(small_css, tmp_path, monkeypatch,
                                                                        autocast_calls):
    import os
    from conftest import only_run_folder, run_main
    monkeypatch.delenv('TIRG_CPU_BF16', raising=False)
    monkeypatch.setattr(amp, 'cpu_has_native_bf16', lambda: False)
    result = run_main(amp_command(small_css, '--amp', '--num_iters=1', '--comment=_fallback'),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    notices = [line for line in (result.stdout + result.stderr).splitlines() if 'bfloat16' in line]
    assert notices == [NO_NATIVE]
    run_dir = only_run_folder(tmp_path, '_fallback')
    options = read_json(os.path.join(run_dir, 'options.json'))['options']
    assert (options['amp'], options['precision']) == (True, 'float32')
    # One training iteration and the evaluations of both splits, all in float32.
    assert len(autocast_calls) > 3 and set(autocast_calls) == {'float32'}

    # Its float32 checkpoint tests in bfloat16 (the path forced).
    monkeypatch.setenv('TIRG_CPU_BF16', '1')
    del autocast_calls[:]
    tested = run_main(['--test_only', f'--checkpoint={run_dir}/latest_checkpoint.pth', '--amp',
                       f'--dataset_path={small_css}', '--batch_size=4', '--loader_num_workers=0',
                       '--comment=_bf16test'], cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    results = read_json(os.path.join(only_run_folder(tmp_path, '_bf16test'), 'test_results.json'))
    assert results['precision'] == 'bfloat16'
    assert all(0 <= v <= 1 for v in results['metrics'].values())
    assert autocast_calls and set(autocast_calls) == {'bfloat16'}


def test_a_bad_cpu_bfloat16_setting_is_one_line_and_no_run_folder(small_css, tmp_path, monkeypatch):
    import os
    from conftest import run_main
    monkeypatch.setenv('TIRG_CPU_BF16', 'true')
    result = run_main(amp_command(small_css, '--amp', '--num_iters=1'), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'main.py: error: TIRG_CPU_BF16=true: expected 1 (bfloat16 autocast on the CPU under '
        '--amp) or 0 (float32)']
    assert not os.path.exists(tmp_path / 'runs') or not os.listdir(tmp_path / 'runs')


@pytest.mark.slow
def test_amp_on_the_bfloat16_path_trains_resumes_and_tests_with_float32_weights(small_css, tmp_path,
                                                                                monkeypatch, autocast_calls):
    import math
    import os
    import checkpoints
    from conftest import metrics_lines, only_run_folder, run_main
    monkeypatch.setenv('TIRG_CPU_BF16', '1')
    monkeypatch.setattr(amp, 'cpu_has_native_bf16', lambda: False)
    result = run_main(amp_command(small_css, '--amp', '--num_iters=2', '--comment=_bf16'), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('TIRG_CPU_BF16=1: bfloat16 autocast on a CPU without native') == 1
    # Two training iterations, then the evaluation of both splits.
    assert len(autocast_calls) > 3 and set(autocast_calls) == {'bfloat16'}
    run_dir = only_run_folder(tmp_path, '_bf16')
    assert read_json(os.path.join(run_dir, 'options.json'))['options']['precision'] == 'bfloat16'
    latest = os.path.join(run_dir, 'latest_checkpoint.pth')
    ckpt = checkpoints.load(latest)
    # Autocast casts on the fly: what is stored (weights, batch-norm statistics, momentum) is float32.
    assert {v.dtype for v in ckpt['model_state_dict'].values() if v.is_floating_point()} == {torch.float32}
    momentum = [s['momentum_buffer'] for s in ckpt['optimizer_state_dict']['state'].values()]
    assert momentum and {m.dtype for m in momentum} == {torch.float32}
    assert ckpt['opt'].precision == 'bfloat16'
    final = metrics_lines(run_dir)[-1]
    assert final['it'] == 2
    recalls = [v for k, v in final.items() if k.startswith('test recall')]
    assert recalls and all(0 <= v <= 1 for v in recalls)
    losses = ckpt['losses']['soft_triplet'] if ckpt['losses'] else [1.0]
    assert all(math.isfinite(v) for v in losses)

    # Resuming in float32 would mix precisions in one run: refused, nothing written.
    before = (os.path.getmtime(latest), len(metrics_lines(run_dir)))
    monkeypatch.setenv('TIRG_CPU_BF16', '0')
    refused = run_main([f'--resume={latest}', '--num_iters=3'], cwd=tmp_path)
    assert refused.returncode == 1
    (message,) = refused.stderr.strip().splitlines()
    assert message.startswith(f'main.py: error: --resume={latest}: the run computed in bfloat16')
    assert (os.path.getmtime(latest), len(metrics_lines(run_dir))) == before

    # In bfloat16 it continues.
    monkeypatch.setenv('TIRG_CPU_BF16', '1')
    resumed = run_main([f'--resume={latest}', '--num_iters=3'], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoints.load(latest)['it'] == 3
    assert metrics_lines(run_dir)[-1]['it'] == 3

    # Its checkpoint tests in float32 (no --amp): a new folder says so.
    monkeypatch.delenv('TIRG_CPU_BF16')
    tested = run_main(['--test_only', f'--checkpoint={latest}', f'--dataset_path={small_css}',
                       '--batch_size=2', '--loader_num_workers=0', '--comment=_f32test'], cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    results = read_json(os.path.join(only_run_folder(tmp_path, '_f32test'), 'test_results.json'))
    assert results['precision'] == 'float32'
    assert all(0 <= v <= 1 for v in results['metrics'].values())


def test_every_process_takes_the_first_process_decision(monkeypatch, capsys):
    """Under torchrun each process decides on its own machine, then all compute as the first."""
    import argparse
    import distributed
    import experiment
    monkeypatch.setattr(amp, 'cpu_has_native_bf16', lambda: False)  # this process: float32
    monkeypatch.delenv('TIRG_CPU_BF16', raising=False)
    sent = []

    def from_first_process(decision):
        sent.append(decision)
        return ('bfloat16', None)  # the first process has native bfloat16
    monkeypatch.setattr(distributed, 'broadcast_object', from_first_process)
    opt = argparse.Namespace(amp=True)
    experiment.choose_precision(opt, torch.device('cpu'))
    assert sent == [('float32', NO_NATIVE)]
    assert opt.precision == 'bfloat16'
    assert capsys.readouterr().out == ''


@pytest.mark.slow
def test_under_torchrun_the_notice_is_one_line_and_the_run_records_its_precision(small_css, tmp_path):
    import glob
    import os
    import subprocess
    import sys
    from conftest import REPO
    env = dict(os.environ, OMP_NUM_THREADS='1', TIRG_CPU_BF16='0')
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(REPO, 'main.py')] + amp_command(small_css, '--amp', '--num_iters=1',
                                                      '--batch_size=4'),
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('--amp: TIRG_CPU_BF16=0: computing in float32 on the CPU') == 1
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), 'runs', '*'))
    record = read_json(os.path.join(run_dir, 'options.json'))
    assert record['processes'] == 2 and record['options']['precision'] == 'float32'
