"""main.py end to end on tiny CSS data: run folder, checkpoints, resume, evaluation-only, errors."""
import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, fork_main, read_scalars, run_main, saved_iteration, write_css_fixture

import checkpoints
import datasets
import experiment
import img_text_composition_models
import main
import model_registry
import text_model


def run_folders(cwd, comment):
    return glob.glob(os.path.join(str(cwd), 'runs', f'*{comment}'))


def load_full(path):
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.mark.slow
def test_cli_end_to_end_creates_run_folder_checkpoint_and_scalars(css_root, tmp_path):
    result = run_main(['--dataset=css3d', f'--dataset_path={css_root}', '--num_iters=7',
                       '--batch_size=4', '--embed_dim=32', '--loader_num_workers=0',
                       '--img_weights=none', '--comment=_x'], cwd=tmp_path, subprocess=True)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_folders(tmp_path, '_x')
    assert re.fullmatch(r'[A-Z][a-z]{2}\d{2}_\d{2}-\d{2}-\d{2}_.+_x', os.path.basename(run_dir))
    ckpt = load_full(os.path.join(run_dir, 'latest_checkpoint.pth'))
    assert ckpt['it'] == 7
    assert isinstance(ckpt['opt'], argparse.Namespace) and ckpt['opt'].embed_dim == 32
    assert 'model_state_dict' in ckpt
    scalars = read_scalars(run_dir)
    # The names tensorboardX's add_scalar stores, as in the reference's event files (SPEC 7).
    for tag in ('soft_triplet', 'total_training_loss', 'learning_rate',
                'test_recall_top1_correct_composition', 'train_recall_top1_correct_composition'):
        assert tag in scalars, tag
    assert not any(' ' in tag for tag in scalars)
    assert scalars['test_recall_top1_correct_composition'][-1][0] == 7
    assert scalars['learning_rate'][0][1] == pytest.approx(0.01)
    lines = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl'))]
    assert lines[-1]['it'] == 7
    assert lines[-1]['test recall_top1_correct_composition'] == pytest.approx(
        scalars['test_recall_top1_correct_composition'][-1][1])
    assert os.path.isfile(os.path.join(run_dir, 'best_checkpoint.pth'))


def test_missing_dataset_path_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / 'nowhere')
    result = run_main(TINY + [f'--dataset_path={missing}', '--num_iters=1'], cwd=tmp_path)
    assert result.returncode != 0
    assert missing in result.stderr and 'Traceback' not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('args, fragment', [
    (['--model=tirgg'], "invalid choice: 'tirgg'"),
    (['--loss=hinge'], "invalid choice: 'hinge'"),
    (['--dataset=coco'], "invalid choice: 'coco'"),
])
def test_unknown_choice_is_a_usage_error(tmp_path, args, fragment):
    result = run_main(args, cwd=tmp_path)
    assert result.returncode == 2 and fragment in result.stderr


def test_data_folder_without_css_file_names_the_file(tmp_path):
    result = run_main(TINY + [f'--dataset_path={tmp_path}', '--num_iters=1'], cwd=tmp_path)
    assert result.returncode == 1
    assert datasets.CSS_DATA_FILE in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_a_straight_run(css_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = TINY + [f'--dataset_path={css_root}', '--seed=5']
    assert main.main(common + ['--num_iters=12', '--comment=_straight']) == 0
    assert main.main(common + ['--num_iters=5', '--comment=_cut']) == 0
    (cut_dir,) = run_folders(tmp_path, '_cut')
    cut = os.path.join(cut_dir, 'latest_checkpoint.pth')
    assert load_full(cut)['it'] == 5
    assert main.main([f'--resume={cut}', '--num_iters=12']) == 0
    (straight_dir,) = run_folders(tmp_path, '_straight')
    straight = load_full(os.path.join(straight_dir, 'latest_checkpoint.pth'))
    resumed = load_full(cut)
    assert resumed['it'] == straight['it'] == 12
    for key, value in straight['model_state_dict'].items():
        diff = (value.float() - resumed['model_state_dict'][key].float()).abs().max()
        assert diff <= 1e-5, key
    assert straight['losses'].keys() == resumed['losses'].keys()
    for name, values in straight['losses'].items():
        assert values == pytest.approx(resumed['losses'][name], abs=1e-5)
    # The resumed run logs into its own folder, each step once.
    steps = [s for s, _ in read_scalars(cut_dir)['learning_rate']]
    assert steps == sorted(set(steps))


def test_resume_refuses_a_weights_only_checkpoint(css_root, tmp_path):
    path = str(tmp_path / 'released.pth')
    model = img_text_composition_models.TIRG(['make red'], 16, pretrained=False)
    torch.save({'it': 3, 'opt': argparse.Namespace(model='tirg', embed_dim=16),
                'model_state_dict': model.state_dict()}, path)
    result = run_main([f'--resume={path}'], cwd=tmp_path)
    assert result.returncode == 1 and '--checkpoint' in result.stderr


def released_checkpoint(path, texts, embed_dim=16, model_name='tirg'):
    """The released format: it, an argparse Namespace and the weights, no vocabulary."""
    model = model_registry.MODELS[model_name](texts, embed_dim, pretrained=False)
    opt = argparse.Namespace(f='', comment='released', dataset='css3d', dataset_path='x',
                             model=model_name, embed_dim=embed_dim, learning_rate=0.01,
                             learning_rate_decay_frequency=9999999, batch_size=32,
                             weight_decay=1e-6, num_iters=160000, loss='soft_triplet',
                             loader_num_workers=4)
    torch.save({'it': 160000, 'opt': opt, 'model_state_dict': model.state_dict()}, path)
    return model


def test_released_checkpoint_evaluates_with_test_only(css_root, tmp_path):
    texts = datasets.CSSDataset(css_root, 'train').get_all_texts()
    path = str(tmp_path / 'released.pth')
    released_checkpoint(path, texts)
    result = run_main(['--test_only', f'--checkpoint={path}', f'--dataset_path={css_root}',
                       '--batch_size=8', '--loader_num_workers=0', '--comment=_eval'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'test recall_top1_correct_composition' in result.stdout
    (run_dir,) = run_folders(tmp_path, '_eval')
    results = json.load(open(os.path.join(run_dir, 'test_results.json')))
    assert results['it'] == 160000 and results['model'] == 'tirg'
    assert set(results['metrics']) == {f'test recall_top{k}_correct_composition' for k in (1, 5, 10, 50, 100)}


def test_released_checkpoint_with_other_vocabulary_is_a_clear_error(css_root, tmp_path):
    path = str(tmp_path / 'released.pth')
    released_checkpoint(path, ['some other words entirely'])
    result = run_main(['--test_only', f'--checkpoint={path}', f'--dataset_path={css_root}',
                       '--loader_num_workers=0'], cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'has 5 words' in result.stderr and 'training texts' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_checkpoint_of_another_model_names_the_difference(css_root, tmp_path):
    texts = datasets.CSSDataset(css_root, 'train').get_all_texts()
    path = str(tmp_path / 'concat.pth')
    released_checkpoint(path, texts, model_name='concat')
    result = run_main(['--test_only', f'--checkpoint={path}', f'--dataset_path={css_root}',
                       '--model=tirg', '--loader_num_workers=0'], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (f'main.py: error: --model=tirg: {path} records --model=concat; '
                             f'leave --model out to use the checkpoint\'s\n')
    # A checkpoint that records no model may be told one: its weights must then fit it.
    ckpt = torch.load(path, weights_only=False)
    del ckpt['opt'].model
    torch.save(ckpt, path)
    result = run_main(['--test_only', f'--checkpoint={path}', f'--dataset_path={css_root}',
                       '--model=tirg', '--loader_num_workers=0'], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f'main.py: error: {path}: does not fit --model=tirg: ')
    assert 'missing' in result.stderr


@pytest.mark.slow
def test_test_only_uses_the_checkpoint_vocabulary_after_texts_change(tmp_path, monkeypatch):
    root = str(tmp_path / 'css')
    write_css_fixture(root)
    monkeypatch.chdir(tmp_path)
    assert main.main(TINY + [f'--dataset_path={root}', '--num_iters=3', '--comment=_v']) == 0
    (run_dir,) = run_folders(tmp_path, '_v')
    ckpt_path = os.path.join(run_dir, 'latest_checkpoint.pth')
    vocab_before = load_full(ckpt_path)['vocab']
    # New training texts with new words: a vocabulary rebuilt from them would not fit.
    data = np.load(os.path.join(root, datasets.CSS_DATA_FILE), allow_pickle=True).item()
    for mod in data['train']['mods']:
        mod['to_str'] += ' quickly and brightly'
    np.save(os.path.join(root, datasets.CSS_DATA_FILE), np.array(data, dtype=object), allow_pickle=True)
    assert len(text_model.SimpleVocab.from_texts(
        datasets.CSSDataset(root, 'train').get_all_texts())) != len(vocab_before) + 1
    assert main.main(['--test_only', f'--checkpoint={ckpt_path}', f'--dataset_path={root}',
                      '--loader_num_workers=0', '--comment=_v2']) == 0
    (eval_dir,) = run_folders(tmp_path, '_v2')
    assert os.path.isfile(os.path.join(eval_dir, 'test_results.json'))


@pytest.mark.slow
def test_checkpoint_holds_everything_to_continue(css_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main.main(TINY + [f'--dataset_path={css_root}', '--num_iters=2', '--comment=_c']) == 0
    (run_dir,) = run_folders(tmp_path, '_c')
    path = os.path.join(run_dir, 'latest_checkpoint.pth')
    ckpt = checkpoints.load(path)  # weights_only: no unrestricted pickle needed
    assert ckpt['format_version'] == checkpoints.FORMAT_VERSION
    for key in ('vocab', 'optimizer_state_dict', 'epoch', 'batches_done', 'rng', 'best_recall'):
        assert key in ckpt, key
    assert set(ckpt['rng']) >= {'python', 'numpy', 'torch'}
    assert ckpt['opt'].seed is not None


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / 'latest_checkpoint.pth')
    checkpoints.save_atomic({'it': 1, 'model_state_dict': {}}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        checkpoints.save_atomic({'it': 2, 'model_state_dict': {}}, path)
    monkeypatch.undo()
    assert checkpoints.load(path)['it'] == 1
    assert os.listdir(tmp_path) == ['latest_checkpoint.pth']


def test_corrupt_checkpoint_is_a_one_line_error(css_root, tmp_path):
    path = tmp_path / 'broken.pth'
    path.write_bytes(b'not a checkpoint')
    result = run_main(['--test_only', f'--checkpoint={path}', f'--dataset_path={css_root}'], cwd=tmp_path)
    assert result.returncode == 1 and str(path) in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize('workers', [0, 2])
def test_sigint_saves_prints_the_resume_command_and_exits_130(css_root, tmp_path, workers):
    # A terminal's Ctrl-C signals the whole process group, DataLoader workers included.
    args = TINY[:-2] + [f'--loader_num_workers={workers}', '--img_weights=none']
    proc = fork_main(args + [f'--dataset_path={css_root}', '--num_iters=100000', '--comment=_int'],
                      tmp_path, new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not run_folders(tmp_path, '_int'):
        time.sleep(0.2)
    (run_dir,) = run_folders(tmp_path, '_int')
    ckpt_path = os.path.join(run_dir, 'latest_checkpoint.pth')
    # Wait for the checkpoint of epoch 1 (it > 0), so the test holds however loaded the machine is.
    while time.time() < deadline and not (saved_iteration(ckpt_path) or 0) > 0:
        time.sleep(0.2)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert 'Traceback' not in stderr
    assert f'--resume={ckpt_path}' in stderr
    assert checkpoints.load(ckpt_path)['it'] > 0


@pytest.mark.slow
def test_sigint_during_a_retrieval_test_saves_at_once_and_resume_redoes_it(css_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real_test = main.test_retrieval.test
    calls = []

    def interrupted_test(opt, model, dataset, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the epoch-1 test (it 9): Ctrl-C in the middle of it
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt before this ends
        return real_test(opt, model, dataset, **kwargs)
    monkeypatch.setattr(main.test_retrieval, 'test', interrupted_test)
    started = time.time()
    assert main.main(TINY + [f'--dataset_path={css_root}', '--num_iters=20', '--seed=1',
                             '--comment=_evalint']) == 130
    assert time.time() - started < 60
    (run_dir,) = run_folders(tmp_path, '_evalint')
    path = os.path.join(run_dir, 'latest_checkpoint.pth')
    ckpt = checkpoints.load(path)
    assert ckpt['it'] == 9 and ckpt['epoch'] == 0 and ckpt['batches_done'] == 9
    assert '--resume=' in capsys.readouterr().err
    monkeypatch.setattr(main.test_retrieval, 'test', real_test)
    assert main.main([f'--resume={path}']) == 0
    lines = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl'))]
    assert [l['it'] for l in lines] == [9, 20]  # the interrupted test is redone, then the final one


def test_nan_loss_stops_with_a_clear_message():
    class NanModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, source, texts, target, soft_triplet_loss=True):
            return self.w * float('nan')
    opt = main.parse_opt(['--img_weights=none'])
    opt.precision = 'float32'  # main.run decides it (choose_precision)
    model = NanModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {'source_img_data': torch.zeros(2, 3, 8, 8), 'target_img_data': torch.zeros(2, 3, 8, 8),
             'mod_str': ['a', 'b']}
    with pytest.raises(main.TrainingStopped, match='nan'):
        main.train_one_iteration(opt, model, optimizer, batch, torch.device('cpu'))
    assert model.w.item() == 1.0  # no step taken with a NaN loss


def test_learning_rate_decay_schedule():
    opt = main.parse_opt(['--learning_rate_decay_frequency=3', '--learning_rate=1.0'])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = []
    for it in range(1, 10):
        main.decay_learning_rate(opt, optimizer, it)
        lrs.append(optimizer.param_groups[0]['lr'])
    assert lrs == pytest.approx([1, 1, .1, .1, .1, .01, .01, .01, .001])


@pytest.mark.parametrize('dataset', ['css3d', 'fashion200k', 'mitstates'])
def test_parameter_groups(dataset):
    opt = main.parse_opt([f'--dataset={dataset}', '--learning_rate=0.5'])
    model = img_text_composition_models.TIRG(['make it red'], 16, pretrained=False)
    optimizer = main.create_optimizer(opt, model)
    seen = [id(p) for g in optimizer.param_groups for p in g['params']]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    if dataset == 'css3d':
        assert [g['lr'] for g in optimizer.param_groups] == [0.5]
    else:
        fc, backbone, rest = optimizer.param_groups
        assert (fc['lr'], backbone['lr'], rest['lr']) == (0.5, pytest.approx(0.05), 0.5)
        assert {id(p) for p in fc['params']} == {id(p) for p in model.img_model.fc.parameters()}
        assert len(backbone['params']) == len(list(model.img_model.parameters())) - 2
    assert optimizer.defaults['momentum'] == 0.9


def test_imagenet_weights_unavailable_is_a_clear_error(monkeypatch, tmp_path):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError('network is unreachable')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 'get_state_dict', offline)
    with pytest.raises(img_text_composition_models.WeightsUnavailableError, match='--img_weights=none'):
        img_text_composition_models.load_resnet18(True)


def test_img_weights_from_a_local_file(tmp_path):
    import torchvision
    reference = torchvision.models.resnet18(weights=None)
    path = str(tmp_path / 'resnet18.pth')
    torch.save(reference.state_dict(), path)
    loaded = img_text_composition_models.load_resnet18(path)
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)
    bad = tmp_path / 'bad.pth'
    torch.save({'x': torch.zeros(1)}, str(bad))
    with pytest.raises(img_text_composition_models.WeightsUnavailableError, match='bad.pth'):
        img_text_composition_models.load_resnet18(str(bad))


def test_default_dataset_path_is_generated_when_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    import make_css_dataset
    monkeypatch.setattr(make_css_dataset, 'generate_css_dataset',
                        lambda path, **kw: calls.append(path) or write_css_fixture(path))
    opt = main.parse_opt([])
    experiment.ensure_default_dataset(opt)
    assert calls == [os.path.abspath(main.DEFAULT_DATASET_PATH)]
    experiment.ensure_default_dataset(opt)
    assert len(calls) == 1  # already there: not regenerated


@pytest.mark.parametrize('flags', [['--test_only'], []])
def test_test1_split_is_only_for_cirr_test_only(css_root, tmp_path, capsys, monkeypatch, flags):
    import main
    monkeypatch.chdir(tmp_path)
    # A CIRR checkpoint needs no --dataset=cirr (tests/test_fiq_cirr_cli.py); CSS is refused.
    code = main.main(TINY + [f'--dataset_path={css_root}', '--test_split=test1'] + flags)
    err = capsys.readouterr().err
    assert code == 1 and err.startswith('main.py: error: --test_split=test1: only with '
                                        '--dataset=cirr --test_only'), err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / 'runs')
