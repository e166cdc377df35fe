"""main.py under torchrun with 2 gloo processes on CPU: one experiment, one run folder, the same
recalls as a single process, SIGTERM and resume (issue 10, SPEC 9)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, run_main, saved_iteration

import checkpoints
import data_identity

MAIN = os.path.join(REPO, 'main.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def torchrun(*args):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
            MAIN] + list(args)


def run_folders(cwd):
    return sorted(glob.glob(os.path.join(str(cwd), 'runs', '*')))


@pytest.mark.slow
def test_two_processes_train_one_experiment_and_test_only_gives_the_same_recalls(css_root, tmp_path):
    flags = ['--dataset=css3d', f'--dataset_path={css_root}', '--num_iters=8', '--batch_size=8',
             '--loader_num_workers=0', '--img_weights=none', '--embed_dim=16', '--seed=1']
    result = subprocess.run(torchrun(*flags), cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_folders(tmp_path)
    ckpt_path = os.path.join(run_dir, 'latest_checkpoint.pth')
    assert checkpoints.load(ckpt_path)['it'] == 8
    lines = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl'))]
    # 36 training images, global batch 8: 4 iterations an epoch, a test at epoch 1 and at the end.
    assert [l['it'] for l in lines] == [4, 8]
    # Only the first process prints: each line once.
    assert result.stdout.count('Run folder:') == 1
    assert result.stdout.count('Finished training at iteration 8') == 1
    # options.json: written by the first process alone, recording both processes.
    record = json.load(open(os.path.join(run_dir, 'options.json')))
    assert record['processes'] == 2 and record['seed'] == 1
    assert record['data'] == data_identity.identify('css3d', css_root)  # the first process's
    assert not [n for n in os.listdir(run_dir) if n.endswith('.tmp')]

    single = run_main(['--test_only', f'--checkpoint={ckpt_path}', '--loader_num_workers=0',
                       '--batch_size=8', '--comment=_single'], cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    (eval_dir,) = glob.glob(os.path.join(str(tmp_path), 'runs', '*_single'))
    tested = json.load(open(os.path.join(eval_dir, 'test_results.json')))['metrics']
    final = {k: v for k, v in lines[-1].items() if k.startswith('test ')}
    assert tested.keys() == final.keys() and len(final) == 5
    for name, value in final.items():
        assert tested[name] == pytest.approx(value, abs=1e-9), name


@pytest.mark.slow
def test_batch_size_must_divide_by_the_processes(css_root, tmp_path):
    result = subprocess.run(torchrun(*TINY, f'--dataset_path={css_root}', '--batch_size=5',
                                     '--num_iters=2'),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode != 0
    assert 'main.py: error: --batch_size=5: the global batch must divide by the 2 processes' in result.stderr
    assert not os.path.exists(tmp_path / 'runs')


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_and_torchrun_resumes(css_root, tmp_path):
    flags = TINY + [f'--dataset_path={css_root}', '--seed=6', '--batch_size=8']
    proc = subprocess.Popen(torchrun(*flags, '--num_iters=100000'), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 180
    path = None
    while time.time() < deadline and path is None:
        found = glob.glob(os.path.join(str(tmp_path), 'runs', '*', 'latest_checkpoint.pth'))
        if found and (saved_iteration(found[0]) or 0) > 0:
            path = found[0]
        time.sleep(0.2)
    assert path is not None
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert time.time() - sent < 30, stderr[-3000:]  # within torchrun's grace period
    it = checkpoints.load(path)['it']
    assert it > 0 and f'--resume={path}' in stderr, stderr[-3000:]
    assert 'Traceback' not in stderr.split('Saved')[0]
    result = subprocess.run(torchrun(*flags, f'--resume={path}', f'--num_iters={it + 4}'),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoints.load(path)['it'] == it + 4
    assert len(run_folders(tmp_path)) == 1


@pytest.mark.slow
def test_a_resume_under_torchrun_of_a_run_in_use_is_refused_by_the_first_process(css_root, tmp_path):
    """Issue 18, item 1: the first process takes the run folder's lock after the process group
    exists and tells the others, so every process exits 1 at once and only one line is printed."""
    import socket
    import run_lock
    flags = TINY + [f'--dataset_path={css_root}', '--batch_size=8', '--comment=_held']
    assert run_main(flags + ['--num_iters=2'], cwd=tmp_path).returncode == 0
    (run_dir,) = run_folders(tmp_path)
    run_lock.acquire(run_dir)  # this process holds the run, as a run still training would
    before = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}
    try:
        result = subprocess.run(torchrun(*flags, '--num_iters=4',
                                         f'--resume={run_dir}/latest_checkpoint.pth'),
                                cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    finally:
        run_lock.release(run_dir)
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if 'main.py: error' in l]
    assert errors == [f'main.py: error: {run_dir}: this run folder is in use by process '
                      f'{os.getpid()} on {socket.gethostname()}; two processes never write into '
                      f'one run: wait for it to end (or stop it), then resume'], result.stderr[-3000:]
    assert 'File "' + MAIN not in result.stderr  # no traceback from either process
    assert 'Reading dataset' not in result.stdout
    assert {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)} == before


def child_pids(parent):
    """The processes whose parent is `parent`, from /proc (no procps needed)."""
    children = []
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent:
            children.append(int(entry))
    return children


@pytest.mark.slow
def test_a_process_killed_with_sigkill_is_named_in_one_line_after_the_save(css_root, tmp_path):
    """Issue 18, item 14: the first process saves, then says which process was lost, instead of
    gloo's 'Connection reset by peer' traceback."""
    import socket
    flags = TINY + [f'--dataset_path={css_root}', '--seed=6', '--batch_size=8', '--num_iters=100000']
    proc = subprocess.Popen(torchrun(*flags), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 180
    while time.time() < deadline and not glob.glob(os.path.join(str(tmp_path), 'runs', '*', 'latest_checkpoint.pth')):
        time.sleep(0.2)
    time.sleep(1)  # training
    (second,) = [pid for pid in child_pids(proc.pid)
                 if b'RANK=1' in open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')]
    os.kill(second, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0
    (path,) = glob.glob(os.path.join(str(tmp_path), 'runs', '*', 'latest_checkpoint.pth'))
    saved = f'Saved {path} at iteration {checkpoints.load(path)["it"]}'
    lost = (f'main.py: error: process 1 of 2 (pid {second} on {socket.gethostname()}) ended '
            f'unexpectedly (killed or crashed), so the training stopped')
    assert saved in stderr and lost in stderr, stderr[-3000:]
    assert stderr.index(saved) < stderr.index(lost)
    assert 'Connection reset by peer' not in stderr and '[rank0]' not in stderr, stderr[-3000:]
    assert 'File "' + MAIN not in stderr
