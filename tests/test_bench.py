"""bench.py: the quick run end to end, and the exact-arithmetic retrieval features it relies on."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

import bench
import model_registry
from benchmarks import data, loss, retrieval


@pytest.mark.slow
def test_quick_run_prints_every_section_with_ratios(tmp_path, capsys, monkeypatch):
    """In this process (one torch thread, conftest), as `python bench.py --quick --json F`:
    a second interpreter would add its start and nothing tested (the ddp section starts its own
    processes; test_bench_cli_with_a_bad_device_is_one_line_exit_1 runs the command line)."""
    out = tmp_path / 'bench.json'
    monkeypatch.chdir(tmp_path)
    # Each model's peak memory (a forked child each, 12 of them) is tested on two models below.
    assert bench.main_cli(['--quick', '--skip_model_memory', '--json', str(out)]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert re.match(r'device cpu \(.*\), torch \S+, numpy \S+, 1 threads', lines[0]), lines[0]

    def line(prefix, ratio_word):
        found = [x for x in lines if x.startswith(prefix)]
        assert found, f'no line starting with {prefix!r} in:\n{stdout}'
        for x in found:
            assert re.search(ratio_word + r' \d+(\.\d+)?x', x), x
        return found

    line('retrieval 200x2000x64: ours ', 'speed-up')
    line('retrieval estimate Fashion200k 33480x29789', 'speed-up')
    assert 'recalls identical: yes' in lines
    line('loss batch 32 ', 'speed-up')
    line('loss batch 128 ', 'speed-up')
    line('train iteration batch 4 ', 'overhead')
    line('backbones train iteration batch 4 (TIRG, 2x4 images 64x64, ', 'ResNet-50/ResNet-18')
    line('backbones feature extraction batch 4 (64x64, ', 'ResNet-50/ResNet-18')
    line('backbones parameters (TIRG, embed_dim 512): ResNet-18 ', 'ResNet-50/ResNet-18')
    assert len(line('data ', 'speed-up|s at the best rate|on vs off')) >= 4
    assert any(re.match(r'pixels fast_decode vs exact: mean \|difference\| = \d+\.\d+', x) for x in lines)
    # 8 generated images, 2 triplets each (FashionIQ: 2 more, one per other category's file).
    line('data fashioniq train loader (18 triplets, 8 images, generated), batch 4: ', 'speed-up')
    line('data cirr train loader (16 triplets, 8 images, generated), batch 4: ', 'speed-up')
    # Shoes: 6 train images (2 are the eval list), 12 triplets, each listed under both images.
    line('data shoes train loader (24 triplets, 6 images, generated), batch 4: ', 'speed-up')
    line('ddp train iterations, global batch 4 ', 'scaling')
    for name in model_registry.MODELS:  # the reference's five and the new seven
        (found,) = [x for x in lines if x.startswith(f'models {name}: ')]
        assert re.fullmatch(r'models \w+: one training iteration, batch 4 at 64x64: \S+ \S+, \d+\.\d\dx TIRG',
                            found), found

    results = json.loads(out.read_text())
    assert results['retrieval']['recalls_identical'] is True
    assert 0 < results['retrieval']['recalls']['recall_top1_correct_composition'] < 1
    assert set(results['loss']) >= {'32', '128'}
    assert results['train']['overhead'] > 0
    backbones = results['backbones']
    assert backbones['train_ratio'] == pytest.approx(
        backbones['resnet50']['train_mean_s'] / backbones['resnet18']['train_mean_s'])
    assert backbones['extract_ratio'] > 0
    # ResNet-50's layers less ResNet-18's (23,508,032 - 11,176,512), and fc 2048 -> 512 for 512 -> 512.
    parameters = backbones['parameters']
    assert parameters['resnet50'] - parameters['resnet18'] == 12331520 + 1536 * 512
    assert results['data']['fast_decode_on']['workers_0_img_per_s'] > 0
    for name in ('fashioniq', 'cirr', 'shoes'):
        assert results['data'][name]['workers_2_triplets_per_s'] > 0
    models = results['models']['models']
    assert list(models) == list(model_registry.MODELS)
    assert models['tirg']['vs_tirg'] == 1.0
    assert models['relationship']['vs_tirg'] == pytest.approx(
        models['relationship']['median_s'] / models['tirg']['median_s'])
    assert any(x.startswith('amp processor: ') for x in lines), stdout
    assert any(re.match(r'amp train iteration batch 4 \(TIRG, 2x4 images\) at 32x32: float32 \S+ \S+ '
                        r'\(1\.00x\), .*float32 channels_last \S+ \S+ \(\d+\.\d\dx\)', x) for x in lines)
    assert results['amp']['sizes']['32']['train']['float32']['ratio'] == 1.0
    ddp = results['ddp']['runs']
    assert ddp['1']['processes'] == 1 and ddp['2']['processes'] == 2, ddp
    assert results['ddp']['scaling'] == pytest.approx(ddp['2']['img_per_s'] / ddp['1']['img_per_s'])


def test_the_models_section_measures_each_models_peak_memory_in_a_child(tmp_path, monkeypatch):
    """What the quick run above skips, on two models: TIRG (the ratios' base) and
    attribute_operator (its own captions)."""
    from benchmarks import models
    monkeypatch.setattr(model_registry, 'MODELS', {name: model_registry.MODELS[name]
                                                   for name in ('attribute_operator', 'tirg')})
    args = bench.parse_args(['--quick', '--only', 'models'])
    lines, result = models.measure(args, torch.device('cpu'), str(tmp_path))
    assert list(result['models']) == ['attribute_operator', 'tirg']
    for line, (name, entry) in zip(lines, result['models'].items()):
        assert 0 < entry['start_bytes'] < entry['peak_bytes'], (name, entry)
        peak, more = entry['peak_bytes'] / 2 ** 30, (entry['peak_bytes'] - entry['start_bytes']) / 2 ** 30
        assert line.endswith(f'x TIRG, peak resident {peak:.2f} GiB (+{more:.2f} GiB for the iteration)'), line
        assert line.startswith(f'models {name}: one training iteration, batch 4 at 64x64: ')


def test_only_selects_sections(capsys):
    results = bench.run(bench.parse_args(['--quick', '--only', 'loss', '--loss_batches', '4']))
    body = capsys.readouterr().out.splitlines()[1:]
    assert len(body) == 1 and body[0].startswith('loss batch 4 '), body
    assert set(results) == {'header', 'args', 'loss'}
    with pytest.raises(SystemExit):
        bench.parse_args(['--only', 'gpu'])
    assert 'unknown section' in capsys.readouterr().err


@pytest.mark.parametrize('forced', [None, '1'])
def test_the_amp_section_times_bfloat16_only_where_amp_computes_in_it(forced, capsys, monkeypatch):
    import amp
    monkeypatch.setattr(amp, 'cpu_has_native_bf16', lambda: False)
    if forced:
        monkeypatch.setenv('TIRG_CPU_BF16', forced)
    else:
        monkeypatch.delenv('TIRG_CPU_BF16', raising=False)
    results = bench.run(bench.parse_args(['--quick', '--only', 'amp', '--batch_size', '2',
                                          '--amp_sizes', '24']))
    lines = capsys.readouterr().out.splitlines()[1:]
    sizes = results['amp']['sizes']
    assert list(sizes) == ['24'] and set(sizes['24']) == {'train', 'extract'}
    variants = ['float32', 'float32 channels_last']
    if forced:
        variants[1:1] = ['bfloat16']
        variants.append('bfloat16 channels_last')
        assert lines[0] == ('amp processor: no native bfloat16; TIRG_CPU_BF16=1: bfloat16 timed on '
                            'the emulated path (--amp would run float32 here)')
    else:
        assert lines[0] == ('amp processor: no native bfloat16: --amp runs float32 here, so '
                            'bfloat16 is not timed (TIRG_CPU_BF16=1 times the emulated path)')
    for kind in ('train', 'extract'):
        timed = sizes['24'][kind]
        assert list(timed) == variants
        base = timed['float32']['mean_s']
        for entry in timed.values():
            assert entry['ratio'] == pytest.approx(entry['mean_s'] / base)
    assert lines[1].startswith('amp train iteration batch 2 (TIRG, 2x2 images) at 24x24: float32 ')
    assert lines[1].count('x)') == len(variants)
    assert lines[2].startswith('amp feature extraction batch 2 (eval) at 24x24: float32 ')
    assert results['amp']['processor'] == {'device': 'cpu', 'native_bf16': False,
                                           'TIRG_CPU_BF16': True if forced else None}


def test_four_squares():
    for n in list(range(300)) + [2 ** 24, 3 * 4 ** 8, 2 ** 24 - 1, 7 * 4 ** 5, 12345677]:
        assert sum(v * v for v in retrieval.four_squares(n)) == n


def test_retrieval_features_give_exact_scores_and_no_ties_across_captions():
    gallery, query, captions, queries = retrieval.make_retrieval_problem(40, 600, 32, seed=3)
    for features in (gallery, query):
        assert torch.equal(features, features.round())
        assert ((features.double() ** 2).sum(1) == retrieval.NORM2).all()
    g = torch.nn.functional.normalize(gallery, dim=1)
    q = torch.nn.functional.normalize(query, dim=1)
    scores = q @ g.t()
    exact = query.double() @ gallery.double().t() / retrieval.NORM2
    assert torch.equal(scores.double(), exact)  # float32 scores are exact
    per_query = np.stack([q[i:i + 1].numpy().dot(g.numpy().T)[0] for i in range(len(q))])
    assert np.array_equal(per_query, scores.numpy())
    caption_ids = torch.tensor([int(c.split()[1]) for c in captions])
    for row in scores:
        values, order = row.sort()
        tied = values[1:] == values[:-1]
        assert torch.equal(caption_ids[order[1:]][tied], caption_ids[order[:-1]][tied])
    assert len({x['target_caption'] for x in queries}) > 1


@pytest.mark.parametrize('flag', ['fiq_path', 'cirr_path', 'shoes_path'])
def test_a_missing_real_tree_is_a_one_line_exit_naming_its_flag_before_anything_is_timed(
        tmp_path, capsys, monkeypatch, flag):
    """Issue 23 item 19: it named main.py's --dataset_path, after timing the other loaders."""
    missing = str(tmp_path / 'nonexistent')
    timed = []
    for module in (retrieval, data):
        monkeypatch.setattr(module, 'measure', lambda *a: timed.append(1) or ([], {}))
    with pytest.raises(SystemExit) as info:
        bench.run(bench.parse_args(['--quick', '--only', 'retrieval,data', f'--{flag}', missing]))
    assert str(info.value) == f'bench.py: --{flag}={missing}: no such folder'
    assert timed == [] and capsys.readouterr().out == ''
    # Given to no section that reads it, the path is not looked at.
    bench.run(bench.parse_args(['--quick', '--only', 'retrieval', f'--{flag}', missing]))
    assert timed == [1]


def test_a_bad_real_tree_is_a_one_line_exit_before_anything_is_timed(tmp_path, capsys, monkeypatch):
    from shoes_fixtures import small_lists, write_shoes
    root = str(tmp_path / 'shoes')
    write_shoes(root, *small_lists())
    os.remove(os.path.join(root, 'relative_captions_shoes.json'))
    monkeypatch.setattr(retrieval, 'measure', lambda *a: pytest.fail('timed before the tree was read'))
    with pytest.raises(SystemExit) as info:
        bench.run(bench.parse_args(['--quick', '--only', 'retrieval,data', '--shoes_path', root]))
    assert str(info.value).startswith(f'bench.py: --shoes_path: {root}/relative_captions_shoes.json: ')
    assert capsys.readouterr().out == ''


@pytest.mark.parametrize('flags, expected', [
    (['--device=bogus'], 'bench.py: --device=bogus: expected cpu or cuda[:N]'),
    (['--device=mps'], 'bench.py: --device=mps: expected cpu or cuda[:N]'),
    (['--json={tmp}/missing/dir/x.json'], 'bench.py: --json={tmp}/missing/dir/x.json: no such '
                                          'folder {tmp}/missing/dir'),
    (['--json={tmp}'], 'bench.py: --json={tmp}: is a folder, expected a file name'),
])
def test_a_bad_device_or_json_path_exits_in_one_line_before_measuring(tmp_path, capsys, monkeypatch,
                                                                      flags, expected):
    """Issue 18 item 16: a traceback, or an error only after the benchmark ran."""
    measured = []
    monkeypatch.setattr(loss, 'measure', lambda *a: measured.append(1) or ([], {}))
    flags = [f.replace('{tmp}', str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as info:
        bench.run(bench.parse_args(['--quick', '--only', 'loss'] + flags))
    assert str(info.value) == expected.replace('{tmp}', str(tmp_path))
    assert measured == [] and capsys.readouterr().out == ''


def test_the_json_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.setattr(loss, 'measure', lambda *a: (['loss line'], {'ratio': 2.0}))
    path = tmp_path / 'out.json'
    path.write_text('{"earlier": 1}')
    bench.run(bench.parse_args(['--quick', '--only', 'loss', f'--json={path}']))
    assert json.loads(path.read_text())['loss']['ratio'] == 2.0
    assert os.listdir(str(tmp_path)) == ['out.json']


@pytest.mark.slow
def test_bench_cli_with_a_bad_device_is_one_line_exit_1():
    result = subprocess.run([sys.executable, os.path.join(REPO, 'bench.py'), '--device=bogus'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ''
    assert result.stderr == 'bench.py: --device=bogus: expected cpu or cuda[:N]\n'


@pytest.mark.slow
def test_a_real_shoes_tree_is_timed_and_a_bad_one_is_a_one_line_exit(tmp_path, capsys):
    from shoes_fixtures import small_lists, write_shoes
    train, evaluation, triplets = small_lists()
    root = str(tmp_path / 'shoes')
    write_shoes(root, train, evaluation, triplets, layout='images')
    args = bench.parse_args(['--quick', '--only', 'data', '--workers', '1', '--shoes_path', root])
    # The generated trees' loaders are timed as well; the Shoes tree is the fixture's.
    results = bench.run(args)
    assert results['data']['shoes']['triplets'] == 9 and results['data']['shoes']['images'] == 5
    assert f'data shoes train loader (9 triplets, 5 images, {root}), batch 4: ' in capsys.readouterr().out
    os.remove(os.path.join(root, 'train_im_names.txt'))
    with pytest.raises(SystemExit) as info:
        bench.run(args)
    assert str(info.value).startswith(f'bench.py: --shoes_path: {root}/train_im_names.txt: Shoes image list not found')
