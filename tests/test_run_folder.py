"""A run folder is one run's (issue 18): the run holds an exclusive lock on it for its whole life,
so a second process that wants the folder refuses in one line naming the holder, before writing
anything, and a killed run leaves no stale lock (item 1); a run resumed after a kill -9 writes
each evaluation once in metrics.jsonl (item 4)."""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, fork_main, read_scalars, run_main, saved_iteration

import checkpoints
import main
import run_folder
import run_lock

ENV = dict(os.environ, OMP_NUM_THREADS='1')


def latest_it(path):
    return saved_iteration(path)  # None while it is being replaced


def folder_state(run_dir):
    return {name: os.path.getsize(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}


@pytest.mark.slow
def test_two_resumes_of_one_run_at_once_one_trains_the_other_names_it(css_root, tmp_path):
    base = TINY + [f'--dataset_path={css_root}', '--seed=5', '--comment=_lock']
    assert run_main(base + ['--num_iters=2'], cwd=tmp_path).returncode == 0
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), 'runs', '*_lock'))
    path = os.path.join(run_dir, 'latest_checkpoint.pth')
    command = base + ['--num_iters=100000', f'--resume={path}']
    procs = [fork_main(command, tmp_path) for _ in range(2)]
    try:
        deadline = time.time() + 120
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.1)
        (refused,) = [p for p in procs if p.poll() is not None]
        (holder,) = [p for p in procs if p is not refused]
        out, err = refused.communicate()
        assert refused.returncode == 1, err
        assert err == (f'main.py: error: {run_dir}: this run folder is in use by process '
                       f'{holder.pid} on {socket.gethostname()}; two processes never write into '
                       f'one run: wait for it to end (or stop it), then resume\n')
        assert 'Run folder' not in out and 'Reading dataset' not in out
        # A resume while the run still trains is refused the same way (here, in this process),
        # and writes nothing into the folder.
        while latest_it(path) in (None, 2) and holder.poll() is None:
            time.sleep(0.1)
        holder.send_signal(signal.SIGSTOP)  # no save between the two looks at the folder
        before = folder_state(run_dir)
        result = run_main(base + ['--num_iters=100000', f'--resume={path}'], cwd=tmp_path)
        assert result.returncode == 1 and f'process {holder.pid} on' in result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert folder_state(run_dir) == before
        holder.send_signal(signal.SIGCONT)
        holder.send_signal(signal.SIGTERM)  # the holder saves and exits
        stdout, stderr = holder.communicate(timeout=60)
        assert holder.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # The holder's run is whole: its checkpoint, one metrics line per evaluation in order, and
    # events of one writer (every scalar step once).
    it = checkpoints.load(path)['it']
    assert it > 2
    lines = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl'))]
    its = [l['it'] for l in lines]
    assert its == sorted(set(its)) and its[-1] <= it
    steps = [step for step, _ in read_scalars(run_dir)['learning_rate']]
    assert steps == sorted(set(steps))
    assert not [n for n in os.listdir(run_dir) if n.endswith('.tmp')]
    # The lock ended with the holder: the run resumes.
    result = run_main(base + [f'--num_iters={it + 1}', f'--resume={path}'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert checkpoints.load(path)['it'] == it + 1


def test_a_killed_holder_leaves_no_stale_lock_and_forked_children_do_not_keep_it(tmp_path):
    folder = str(tmp_path)
    holder = subprocess.Popen([sys.executable, '-c', (
        'import os, sys, time; sys.path.insert(0, sys.argv[1]); import run_lock\n'
        'run_lock.acquire(sys.argv[2])\n'
        'child = os.fork()\n'
        'if child == 0:\n    print("forked", flush=True)\n    time.sleep(60)\n    os._exit(0)\n'
        'print(child, flush=True); time.sleep(60)'), REPO, folder],
        stdout=subprocess.PIPE, text=True)
    # Both lines: the child runs (its at-fork handlers done) before its parent is killed; on a
    # busy machine it may not have been scheduled yet when the parent prints.
    lines = {holder.stdout.readline().strip() for _ in range(2)}
    (child,) = [int(line) for line in lines if line != 'forked']
    try:
        with pytest.raises(run_lock.FolderInUse, match=f'in use by process {holder.pid} on '):
            run_lock.acquire(folder)
        holder.kill()  # SIGKILL; its forked child lives on, and must not hold the lock
        holder.wait()
        run_lock.acquire(folder)
        with open(os.path.join(folder, run_lock.LOCK_FILE)) as f:
            assert f.read() == f'{socket.gethostname()} {os.getpid()}\n'
    finally:
        run_lock.release(folder)
        os.kill(child, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# metrics.jsonl after a kill -9 (item 4)

KILLED_AT = {
    # SIGKILL right after the metrics line of the first evaluation (it 9), before its save.
    'after a metrics line': (
        'real = run_folder.append_metrics_line\n'
        'def hook(*args):\n    real(*args)\n    os.kill(os.getpid(), signal.SIGKILL)\n'
        'run_folder.append_metrics_line = hook\n'),
    # SIGKILL between the two saves that end a run: the checkpoint at the last iteration is not
    # marked finished, so the resumed run redoes the final evaluation.
    'before the finished save': (
        'real = main.save_checkpoint\n'
        'def hook(run, progress, *args):\n'
        '    if progress.get("finished"):\n        os.kill(os.getpid(), signal.SIGKILL)\n'
        '    return real(run, progress, *args)\n'
        'main.save_checkpoint = hook\n'),
}


@pytest.mark.slow
@pytest.mark.parametrize('moment, num_iters, logged, saved_it, final', [
    ('after a metrics line', 12, [9], 0, [9, 12]), ('before the finished save', 5, [5], 5, [5])])
def test_a_resume_after_kill_9_writes_each_evaluation_once(css_root, tmp_path, moment, num_iters,
                                                           logged, saved_it, final):
    args = TINY + [f'--dataset_path={css_root}', '--seed=3', '--comment=_k9', f'--num_iters={num_iters}']
    killed = fork_main(args, tmp_path, prepare=lambda: exec(KILLED_AT[moment], {
        'os': os, 'signal': signal, 'main': main, 'run_folder': run_folder}))
    stderr = killed.communicate(timeout=300)[1]
    assert killed.returncode == -signal.SIGKILL, stderr[-2000:]
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), 'runs', '*_k9'))
    metrics = os.path.join(run_dir, 'metrics.jsonl')
    path = os.path.join(run_dir, 'latest_checkpoint.pth')
    assert [json.loads(l)['it'] for l in open(metrics)] == logged
    assert checkpoints.load(path)['it'] == saved_it
    result = run_main(args + [f'--resume={path}'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'dropped 1 lines logged after the checkpoint' in result.stdout
    assert [json.loads(l)['it'] for l in open(metrics)] == final
    assert not [n for n in os.listdir(run_dir) if n.endswith('.tmp')]


def test_only_the_lines_after_the_checkpoint_are_dropped(tmp_path):
    import run_folder
    lines = ['{"it": 9, "epoch": 1}\n', 'a line someone added\n', '{"it": 18, "epoch": 2}\n',
             '{"it": 27, "epoch": 3}\n', '{"it": 30, "ep']  # the last write was torn by a kill
    (tmp_path / 'metrics.jsonl').write_text(''.join(lines))
    run_folder.drop_metrics_after_checkpoint(str(tmp_path), {'it': 18}, evaluates_first=False)
    assert (tmp_path / 'metrics.jsonl').read_text() == ''.join(lines[:3])
    run_folder.drop_metrics_after_checkpoint(str(tmp_path), {'it': 18}, evaluates_first=True)
    assert (tmp_path / 'metrics.jsonl').read_text() == ''.join(lines[:2])


# ---------------------------------------------------------------------------------------------
# A completely full disk (item 10)

@pytest.mark.slow
def test_a_full_disk_from_the_start_is_one_line_naming_the_events_file(css_root, tmp_path):
    """Files past 1000 bytes fail as on a full disk: the first writes of the tensorboard events
    fail, in tensorboardX's writer thread, its flush and its exit handler."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
    args = [sys.executable, os.path.join(REPO, 'main.py')] + TINY + [
        f'--dataset_path={css_root}', '--num_iters=3', '--comment=_full']
    # No bytecode: a .pyc cut at 1000 bytes would break the next import of the module.
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_file_size, env=dict(ENV, PYTHONDONTWRITEBYTECODE='1'))
    assert result.returncode == 1, result.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), 'runs', '*_full'))
    (events,) = glob.glob(os.path.join(run_dir, 'events.out.tfevents.*'))
    assert result.stderr == (f'main.py: error: {os.path.relpath(events, tmp_path)}: cannot write '
                             f'(File too large); the events written before are kept\n')
