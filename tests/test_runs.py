"""Run folders, resuming with the original command, and bad input refused before anything is
written (issue 9 items 3, 5, 6; issue 12 items 2, 3, 5, 7, 9, 11, 13)."""
import argparse
import datetime
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import REPO, TINY, fork_main, read_scalars, run_main, saved_iteration, write_css_fixture

import checkpoints
import datasets
import experiment
import img_text_composition_models
import main
import run_folder
import sampling
import text_model


def run_folders(cwd, comment):
    return sorted(glob.glob(os.path.join(str(cwd), 'runs', f'*{comment}')))


def one_line_error(result, *fragments):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# Resume with the original command (issue 9.3), abbreviations (12.11), relative paths (12.7).

@pytest.mark.slow
def test_original_command_plus_resume_continues_and_a_real_change_names_both_values(css_root, tmp_path):
    command = TINY + [f'--dataset_path={css_root}', '--seed=3', '--comment=_orig', '--num_iters=4',
                      '--learning_rate=0.02', '--weight_decay=1e-5']
    assert run_main(command, cwd=tmp_path).returncode == 0
    (run_dir,) = run_folders(tmp_path, '_orig')
    ckpt = os.path.join(run_dir, 'latest_checkpoint.pth')
    longer = [a for a in command if not a.startswith('--num_iters')] + ['--num_iters=6']
    result = run_main(longer + [f'--resume={ckpt}'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert checkpoints.load(ckpt)['it'] == 6
    assert run_folders(tmp_path, '_orig') == [run_dir]
    changed = [a.replace('--learning_rate=0.02', '--learning_rate=0.05') for a in longer]
    result = run_main(changed + ['--num_iters=8', f'--resume={ckpt}'], cwd=tmp_path)
    one_line_error(result, '--learning_rate=0.05', '--learning_rate=0.02')
    assert checkpoints.load(ckpt)['it'] == 6


def test_abbreviated_flags_are_refused(css_root, tmp_path):
    result = run_main(TINY + [f'--dataset_path={css_root}', '--num_it=3'], cwd=tmp_path)
    assert result.returncode == 2 and 'unrecognized arguments: --num_it=3' in result.stderr
    assert not os.path.exists(tmp_path / 'runs')


@pytest.mark.slow
def test_checkpoint_stores_the_absolute_dataset_path_and_resume_works_from_elsewhere(tmp_path):
    root = tmp_path / 'work'
    write_css_fixture(str(root / 'data' / 'css'))
    result = run_main(TINY + ['--dataset_path=data/css', '--num_iters=2', '--comment=_rel'], cwd=root)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_folders(root, '_rel')
    ckpt_path = os.path.join(run_dir, 'latest_checkpoint.pth')
    assert checkpoints.load(ckpt_path)['opt'].dataset_path == str(root / 'data' / 'css')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    result = run_main([f'--resume={ckpt_path}', '--num_iters=4'], cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert checkpoints.load(ckpt_path)['it'] == 4
    # The data moved away: asked for, never replaced by another dataset.
    shutil.move(str(root / 'data'), str(tmp_path / 'moved'))
    result = run_main([f'--resume={ckpt_path}', '--num_iters=6'], cwd=elsewhere)
    one_line_error(result, str(root / 'data' / 'css'), '--dataset_path')
    result = run_main([f'--resume={ckpt_path}', '--num_iters=6',
                       f'--dataset_path={tmp_path / "moved" / "css"}'], cwd=elsewhere)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Run folders (issue 12.2, 12.3, 12.13).

def test_run_folders_are_unique_when_the_name_is_taken(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class FixedTime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 28, 12, 0, 0)
    monkeypatch.setattr(run_folder.datetime, 'datetime', FixedTime)
    first = run_folder.create_run_folder('_same')
    second = run_folder.create_run_folder('_same')
    assert first != second
    assert os.path.basename(first) == f'Nov28_12-00-00_{socket.gethostname()}_same'
    assert os.path.basename(second) == f'Nov28_12-00-00_{socket.gethostname()}.2_same'


@pytest.mark.slow
def test_two_runs_started_together_never_share_a_folder(css_root, tmp_path):
    # Folders for the next seconds already exist (another run's): a new run must not write there.
    host = socket.gethostname()
    now = datetime.datetime.now()
    taken = []
    for s in range(0, 40):
        name = (now + datetime.timedelta(seconds=s)).strftime('%b%d_%H-%M-%S') + f'_{host}_twin'
        path = tmp_path / 'runs' / name
        path.mkdir(parents=True, exist_ok=True)
        (path / 'metrics.jsonl').write_text('{"it": 999}\n')
        taken.append(path)
    args = TINY + [f'--dataset_path={css_root}', '--num_iters=3', '--comment=_twin']
    procs = [fork_main(args, tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for path in taken:
        assert os.listdir(path) == ['metrics.jsonl']
        assert path.joinpath('metrics.jsonl').read_text() == '{"it": 999}\n'
    new = [d for d in run_folders(tmp_path, '_twin') if d not in map(str, taken)]
    assert len(new) == 2
    for run_dir in new:
        lines = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl'))]
        assert [l['it'] for l in lines] == [3]
        assert checkpoints.load(os.path.join(run_dir, 'latest_checkpoint.pth'))['it'] == 3


@pytest.mark.slow
def test_resume_from_best_checkpoint_continues_in_a_new_folder(css_root, tmp_path):
    # 36 training images, batch 4: 9 iterations an epoch, tests at it 9 and at the end.
    base = TINY + [f'--dataset_path={css_root}', '--seed=2', '--comment=_best']
    assert run_main(base + ['--num_iters=12'], cwd=tmp_path).returncode == 0
    (run_dir,) = run_folders(tmp_path, '_best')
    latest = os.path.join(run_dir, 'latest_checkpoint.pth')
    best = os.path.join(run_dir, 'best_checkpoint.pth')
    before = {name: open(os.path.join(run_dir, name), 'rb').read() for name in os.listdir(run_dir)}
    result = run_main([f'--resume={best}', '--num_iters=15'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    after = {name: open(os.path.join(run_dir, name), 'rb').read() for name in os.listdir(run_dir)}
    assert after == before  # nothing of the run written over, no event purged
    (new_dir,) = [d for d in run_folders(tmp_path, '_best') if d != run_dir]
    assert checkpoints.load(os.path.join(new_dir, 'latest_checkpoint.pth'))['it'] == 15
    assert 'new run folder' in result.stdout


@pytest.mark.slow
def test_num_iters_below_the_checkpoint_is_an_error(css_root, tmp_path):
    assert run_main(TINY + [f'--dataset_path={css_root}', '--num_iters=5', '--comment=_lo'],
                    cwd=tmp_path).returncode == 0
    (run_dir,) = run_folders(tmp_path, '_lo')
    ckpt = os.path.join(run_dir, 'latest_checkpoint.pth')
    metrics_before = open(os.path.join(run_dir, 'metrics.jsonl')).read()
    for num_iters in (3, 5):  # below, and equal to a finished run's
        result = run_main([f'--resume={ckpt}', f'--num_iters={num_iters}'], cwd=tmp_path)
        one_line_error(result, f'--num_iters={num_iters}', 'iteration 5')
    assert open(os.path.join(run_dir, 'metrics.jsonl')).read() == metrics_before


@pytest.mark.parametrize('flag, fragment', [
    ('--learning_rate=-0.1', '--learning_rate=-0.1'),
    ('--weight_decay=-1e-6', '--weight_decay=-1e-06'),
    ('--seed=9200000000000', '--seed=9200000000000'),
    ('--seed=-1', '--seed=-1'),
    ('--device=meta', '--device=meta'),
    ('--batch_size=0', '--batch_size=0'),
    # Issue 18, item 13: beyond float32, and an embedding no machine holds.
    ('--learning_rate=1e39', '--learning_rate=1e+39: expected a number from 0 to 3.403e+38'),
    ('--weight_decay=1e308', '--weight_decay=1e+308: expected a number from 0 to 3.403e+38'),
    ('--embed_dim=200000', '--embed_dim=200000: expected at most 4096'),
    # Item 18: the comment ends the folder's name.
    ('--comment=a/b', "--comment=a/b: it ends the run folder's name, so it cannot hold '/'"),
    ('--comment=_' + 'x' * 240, "the run folder's name would be"),
])
def test_bad_flags_are_one_line_errors_and_leave_no_run_folder(css_root, tmp_path, flag, fragment):
    result = run_main(TINY + [f'--dataset_path={css_root}', '--num_iters=2', flag], cwd=tmp_path)
    one_line_error(result, fragment)
    assert not os.path.exists(tmp_path / 'runs')


@pytest.mark.slow
def test_a_read_only_working_folder_is_named_before_any_data_is_read(css_root, tmp_path):
    """Issue 18, item 18.  root ignores permissions: it runs without the capability to."""
    work = tmp_path / 'readonly'
    work.mkdir()
    command = [sys.executable, os.path.join(REPO, 'main.py')] + TINY + [
        f'--dataset_path={css_root}', '--num_iters=2']
    if os.geteuid() == 0:
        if not shutil.which('setpriv'):
            pytest.skip('running as root without setpriv to drop the permission override')
        command = ['setpriv', '--bounding-set', '-dac_override,-dac_read_search'] + command
    work.chmod(0o555)
    try:
        result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, OMP_NUM_THREADS='1'))
    finally:
        work.chmod(0o755)
    one_line_error(result, f'{work} is not a writable folder', 'runs/')
    assert 'Reading dataset' not in result.stdout
    assert os.listdir(work) == []


@pytest.mark.parametrize('content', [b'', b'just some text\n', 'checkpoint'])
def test_img_weights_that_are_not_a_resnet18_state_dict(css_root, tmp_path, content):
    path = tmp_path / 'weights.pth'
    if content == 'checkpoint':
        model = img_text_composition_models.TIRG(['make red'], 16, pretrained=False)
        torch.save({'it': 1, 'model_state_dict': model.state_dict()}, path)
    else:
        path.write_bytes(content)
    result = run_main(TINY[:-1] + [f'--dataset_path={css_root}', '--num_iters=2',
                                   f'--img_weights={path}'], cwd=tmp_path)
    one_line_error(result, f'--img_weights={path}')
    assert not os.path.exists(tmp_path / 'runs')


def crafted(tmp_path, css_root, **changes):
    """A real checkpoint of ours with some entries replaced."""
    result = run_main(TINY + [f'--dataset_path={css_root}', '--num_iters=2', '--comment=_src'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_folders(tmp_path, '_src')
    ckpt = torch.load(os.path.join(run_dir, 'latest_checkpoint.pth'), weights_only=False)
    for key, value in changes.items():
        if value is None:
            del ckpt[key]
        else:
            ckpt[key] = value
    path = tmp_path / 'crafted.pth'
    torch.save(ckpt, path)
    shutil.rmtree(tmp_path / 'runs')
    return path


@pytest.mark.slow
def test_crafted_checkpoints_are_one_line_errors(css_root, tmp_path):
    path = crafted(tmp_path, css_root, rng=None)
    one_line_error(run_main([f'--resume={path}', '--num_iters=4'], cwd=tmp_path), str(path), 'rng')
    path = crafted(tmp_path, css_root, model_state_dict=torch.zeros(3))
    one_line_error(run_main([f'--resume={path}', '--num_iters=4'], cwd=tmp_path), str(path), 'model_state_dict')
    one_line_error(run_main(['--test_only', f'--checkpoint={path}', f'--dataset_path={css_root}'],
                            cwd=tmp_path), str(path))
    assert not os.path.exists(tmp_path / 'runs')


# ---------------------------------------------------------------------------------------------
# A failing evaluation keeps the training done (issue 12.5).

def corrupt_png(path):
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)


@pytest.mark.slow
def test_corrupt_test_image_saves_the_checkpoint_then_stops_with_one_line(tmp_path):
    root = str(tmp_path / 'css')
    write_css_fixture(root, pngs=True)
    corrupt_png(os.path.join(root, 'images', 'css_test_000005.png'))
    result = run_main(TINY + [f'--dataset_path={root}', '--num_iters=20', '--comment=_bad'],
                      cwd=tmp_path)
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr and 'css_test_000005.png' in result.stderr
    (run_dir,) = run_folders(tmp_path, '_bad')
    ckpt = checkpoints.load(os.path.join(run_dir, 'latest_checkpoint.pth'))
    assert ckpt['it'] == 9  # the first test, at the start of epoch 1, failed
    # Repaired, the resumed run redoes that epoch start's test, then goes on.
    img = (datasets.draw_css_2d_image(datasets.CSSDataset(root, 'test', use_2d=True).imgs[5]['objects'])
           * 255).round().astype(np.uint8)
    PIL.Image.fromarray(img).save(os.path.join(root, 'images', 'css_test_000005.png'))
    result = run_main([f'--resume={run_dir}/latest_checkpoint.pth', '--num_iters=10'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl'))]
    assert [l['it'] for l in lines] == [9, 10]


# ---------------------------------------------------------------------------------------------
# Vocabulary order of checkpoints without a vocabulary (issue 9.5).

def released(path, vocab, dataset_path, embed_dim=16):
    torch.manual_seed(0)
    model = img_text_composition_models.TIRG([], embed_dim, pretrained=False, vocab=vocab)
    opt = argparse.Namespace(f='', comment='released', dataset='css3d', dataset_path=dataset_path,
                             model='tirg', embed_dim=embed_dim, learning_rate=0.01,
                             learning_rate_decay_frequency=9999999, batch_size=32,
                             weight_decay=1e-6, num_iters=160000, loss='soft_triplet',
                             loader_num_workers=4)
    torch.save({'it': 160000, 'opt': opt, 'model_state_dict': model.state_dict()}, path)


def test_checkpoint_without_vocabulary_uses_first_seen_order_and_says_how_to_try_sorted(css_root, tmp_path, monkeypatch):
    texts = datasets.CSSDataset(css_root, 'train').get_all_texts()
    first_seen = text_model.SimpleVocab.from_texts(texts, 'first_seen')
    assert first_seen.words() != text_model.SimpleVocab.from_texts(texts).words()
    path = str(tmp_path / 'released.pth')
    released(path, first_seen, css_root)
    monkeypatch.chdir(tmp_path)
    built = []
    real_create = experiment.create_model

    def spy(opt, texts, vocab=None):
        built.append(vocab.words())
        return real_create(opt, texts, vocab)
    monkeypatch.setattr(experiment, 'create_model', spy)
    common = ['--test_only', f'--checkpoint={path}', f'--dataset_path={css_root}', '--loader_num_workers=0']
    assert main.main(common + ['--comment=_fs']) == 0
    assert main.main(common + ['--vocab_order=sorted', '--comment=_so']) == 0
    assert built == [first_seen.words(), sorted(first_seen.words())]
    metrics = [json.load(open(os.path.join(run_folders(tmp_path, c)[0], 'test_results.json')))['metrics']
               for c in ('_fs', '_so')]
    assert metrics[0] != metrics[1]


def test_vocabulary_order_message(css_root, tmp_path):
    texts = datasets.CSSDataset(css_root, 'train').get_all_texts()
    path = str(tmp_path / 'released.pth')
    released(path, text_model.SimpleVocab.from_texts(texts, 'first_seen'), css_root)
    result = run_main(['--test_only', f'--checkpoint={path}', f'--dataset_path={css_root}',
                       '--loader_num_workers=0'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'first_seen order' in result.stdout and '--vocab_order=sorted' in result.stdout


def test_fashion200k_label_order_sets_the_first_seen_vocabulary(tmp_path):
    from test_fashion200k import write_fashion_fixture
    root = write_fashion_fixture(str(tmp_path / 'f200k'))
    default = datasets.Fashion200k(root, 'train')
    reordered = datasets.Fashion200k(root, 'train', label_order=[
        'top_train_detect_all.txt', 'dress_train_detect_all.txt', 'skirt_test_detect_all.txt'])
    assert default.imgs[0]['file_path'].startswith('women/dresses')
    assert reordered.imgs[0]['file_path'].startswith('women/tops')
    words = [text_model.SimpleVocab.from_texts(d.get_all_texts(), 'first_seen').words()
             for d in (default, reordered)]
    assert words[0][0] == 'red' and words[1][0] == 'black'
    with pytest.raises(datasets.DatasetError, match='dress_train_detect_all.txt'):
        datasets.Fashion200k(root, 'train', label_order=['top_train_detect_all.txt'])
    with pytest.raises(datasets.DatasetError, match='nope.txt'):
        datasets.Fashion200k(root, 'train', label_order=['nope.txt'])


# ---------------------------------------------------------------------------------------------
# DataLoader workers (issue 9.6).

@pytest.mark.slow
def test_more_workers_than_cpus_is_capped_with_one_line_and_no_warning(css_root, tmp_path):
    result = run_main(TINY[:-2] + ['--loader_num_workers=64', '--img_weights=none',
                                   f'--dataset_path={css_root}', '--num_iters=3'], cwd=tmp_path,
                      subprocess=True)  # a warning only reaches stderr in a fresh process
    assert result.returncode == 0, result.stderr
    cpus = len(os.sched_getaffinity(0))
    assert result.stdout.count(f'Using {cpus} DataLoader workers') == 1
    assert 'Warning' not in result.stderr and 'warn' not in result.stderr.lower()


# ---------------------------------------------------------------------------------------------
# SIGTERM (cluster schedulers, torchrun) is handled like the first Ctrl-C (issue 10).

def wait_for_checkpoint(run_dir_glob, deadline):
    while time.time() < deadline:
        found = glob.glob(os.path.join(run_dir_glob, 'latest_checkpoint.pth'))
        if found and (saved_iteration(found[0]) or 0) > 0:
            return found[0]
        time.sleep(0.2)
    raise AssertionError('no checkpoint with it > 0 in time')


@pytest.mark.slow
def test_sigterm_saves_within_the_grace_period_and_the_run_resumes(css_root, tmp_path):
    import signal
    proc = fork_main(TINY + [f'--dataset_path={css_root}', '--num_iters=100000', '--comment=_term',
                              '--seed=4'], tmp_path)
    wait_for_checkpoint(os.path.join(str(tmp_path), 'runs', '*_term'), time.time() + 120)
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - sent < 30  # torchrun's default grace period
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert 'Traceback' not in stderr and 'SIGTERM' in stderr
    (run_dir,) = run_folders(tmp_path, '_term')
    path = os.path.join(run_dir, 'latest_checkpoint.pth')
    it = checkpoints.load(path)['it']
    assert it > 0 and f'--resume={path}' in stderr
    result = run_main([f'--resume={path}', f'--num_iters={it + 4}'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert checkpoints.load(path)['it'] == it + 4


@pytest.mark.slow
def test_sigterm_during_a_retrieval_test_says_it_stops_and_the_resumed_run_redoes_it(
        css_root, tmp_path, monkeypatch, capsys):
    """Issue 23 item 19: it said "finishing this iteration", but the test stops at once, the
    checkpoint is saved without it, and resuming redoes it.  (The final test is item 1's.)"""
    monkeypatch.chdir(tmp_path)
    real_evaluate = main.evaluate
    calls = []

    def terminated_during_the_first(*args, **kwargs):
        calls.append(args[4])  # the iteration
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler ends this at once
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(main, 'evaluate', terminated_during_the_first)
    command = TINY + [f'--dataset_path={css_root}', '--num_iters=12', '--comment=_evalterm']
    assert main.main(command) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert ('Terminated (SIGTERM): stopping the retrieval test and saving now; the resumed run '
            'redoes the test') in err
    assert 'finishing this iteration' not in err and 'Traceback' not in err
    (run_dir,) = run_folders(tmp_path, '_evalterm')
    path = os.path.join(run_dir, 'latest_checkpoint.pth')
    assert checkpoints.load(path)['it'] == 9  # the test at the start of epoch 1 (9 batches)
    assert main.main(command + [f'--resume={path}']) == 0
    assert calls == [9, 9, 12]  # the interrupted test redone, then the final one
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        tested = [record['it'] for record in map(json.loads, f) if any(k.startswith('test ') for k in record)]
    assert tested == [9, 12]


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_keeps_what_was_written(css_root, tmp_path):
    """Issue 12.8: torch raises RuntimeError (not OSError) when a checkpoint write fails.  A real
    write error from the kernel: files past 1 MB fail as on a full disk (a checkpoint is ~45 MB)."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    process = fork_main(TINY + [f'--dataset_path={css_root}', '--num_iters=3', '--comment=_full'],
                         tmp_path, prepare=limit_file_size)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 1, stderr[-3000:]
    (line,) = stderr.strip().splitlines()
    assert line.startswith('main.py: error: ') and 'checkpoint.pth: cannot write (File too large)' in line
    (run_dir,) = run_folders(tmp_path, '_full')
    left = os.listdir(run_dir)
    assert not [name for name in left if name.endswith('.tmp') or name.endswith('.pth')], left
    assert [name for name in left if name.startswith('events.out.tfevents')]  # the run's log stays


@pytest.mark.slow
def test_a_training_set_smaller_than_the_batch_trains_one_batch_an_epoch_and_resumes(css_root, tmp_path):
    """A smoke test on a small tree with the default --batch_size: drop_last batches would leave
    every epoch empty.  The 36 fixture images make one batch of 36; the original command resumes."""
    command = TINY[:1] + TINY[2:] + [f'--dataset_path={css_root}', '--batch_size=40', '--comment=_fit']
    result = run_main(command + ['--num_iters=2'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('--batch_size=40 is larger than the 36 training examples: using '
                               '--batch_size=36 (one batch an epoch)') == 1
    (run_dir,) = run_folders(tmp_path, '_fit')
    path = os.path.join(run_dir, 'latest_checkpoint.pth')
    ckpt = checkpoints.load(path)
    # Iterations 0 and 1 were epochs 0 and 1, one batch each.
    assert ckpt['it'] == 2 and (ckpt['epoch'], ckpt['batches_done']) == (1, 1)
    assert ckpt['opt'].batch_size == 36
    result = run_main(command + ['--num_iters=3', f'--resume={path}'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert checkpoints.load(path)['it'] == 3


@pytest.mark.parametrize('count, processes, loss, expected', [
    (18, 1, 'soft_triplet', 18), (18, 4, 'soft_triplet', 18), (5, 2, 'soft_triplet', 5),
    (40, 4, 'soft_triplet', 32), (4, 4, 'soft_triplet', 4), (3, 4, 'soft_triplet', None),
    (1, 1, 'soft_triplet', None), (1, 1, 'batch_based_classification', 1)])
def test_the_fitted_batch_is_the_whole_set_for_any_number_of_processes(monkeypatch, capsys, count,
                                                                       processes, loss, expected):
    """Issue 17.2: the same batch for every number of processes (slices may differ by one)."""
    import distributed
    monkeypatch.setattr(distributed, 'world_size', lambda: processes)
    opt = argparse.Namespace(batch_size=32, loss=loss)
    trainset = argparse.Namespace(num_training_examples=lambda: count)
    if expected is None:
        with pytest.raises(main.UserError, match=f'the training split has only {count} examples'):
            sampling.fit_batch_size(opt, trainset)
        return
    sampling.fit_batch_size(opt, trainset)
    assert opt.batch_size == expected
    assert getattr(opt, 'requested_batch_size', 32) == 32
