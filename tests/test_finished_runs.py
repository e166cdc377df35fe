"""Finished means finished (issue 23 item 1, SPEC 10), and what a run records at its start to be
tabulated with the right runs (items 3 and 4): real runs, really interrupted, read by
results_table.py."""
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import REPO, TINY, metrics_lines, only_run_folder, write_css_fixture

import checkpoints
import data_identity
import main
import results_table


def iterations_tested(run_dir):
    return [line['it'] for line in metrics_lines(run_dir) if any(k.startswith('test ') for k in line)]


def table(folder):
    """results_table.py's command line, in this process (test_tables.py runs the script itself):
    (exit code, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = results_table.main_cli([folder])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def finished_run(css_root, tmp_path, monkeypatch):
    """A run finished at iteration 4 (tested there), and the command that made it."""
    monkeypatch.chdir(tmp_path)
    command = TINY + [f'--dataset_path={css_root}', '--num_iters=4', '--seed=3', '--comment=_fin']
    assert main.main(command) == 0
    run_dir = only_run_folder(tmp_path, '_fin')
    path = os.path.join(run_dir, 'latest_checkpoint.pth')
    assert checkpoints.load(path)['finished'] is True and iterations_tested(run_dir) == [4]
    return command, run_dir, path


def stop_at(monkeypatch, name, iteration, position):
    """SIGTERM, as SLURM sends it, to this process when main.`name` is called at `iteration`
    (`position` says which argument holds it)."""
    real = getattr(main, name)

    def stopped(*args, **kwargs):
        if args[position] == iteration:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(main, name, stopped)
    return real


@pytest.mark.slow
def test_a_resumed_run_stopped_in_its_final_evaluation_finishes_with_its_printed_command(
        finished_run, tmp_path, monkeypatch, capsys):
    command, run_dir, path = finished_run
    capsys.readouterr()
    real_evaluate = stop_at(monkeypatch, 'evaluate', 6, position=4)
    assert main.main(command + ['--num_iters=6', f'--resume={path}']) == 128 + signal.SIGTERM
    ckpt = checkpoints.load(path)
    assert ckpt['it'] == 6 and ckpt['finished'] is False
    assert iterations_tested(run_dir) == [4]  # no test line at 6
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    assert printed == f'  {shlex.quote(sys.executable)} {os.path.join(REPO, "main.py")} --resume={path}'
    code, out, err = table(str(tmp_path / 'runs'))
    assert code == 1 and f'left out {run_dir}: unfinished: its last checkpoint is at iteration 6 of 6' in err

    monkeypatch.setattr(main, 'evaluate', real_evaluate)
    again = subprocess.run(shlex.split(printed), cwd=tmp_path, capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert again.returncode == 0, again.stderr[-3000:]
    ckpt = checkpoints.load(path)
    assert ckpt['it'] == 6 and ckpt['finished'] is True
    assert iterations_tested(run_dir) == [4, 6]  # the final test redone at its iteration
    code, out, err = table(str(tmp_path / 'runs'))
    assert code == 0, err
    final = metrics_lines(run_dir)[-1]['test recall_top1_correct_composition']
    assert f'| tirg | {100 * final:.1f} (1 run) |' in out


def test_a_resumed_run_stopped_during_training_is_not_finished(finished_run, tmp_path, monkeypatch, capsys):
    command, run_dir, path = finished_run
    stop_at(monkeypatch, 'decay_learning_rate', 6, position=2)  # called as iteration 6 ends
    assert main.main(command + ['--num_iters=8', f'--resume={path}']) == 128 + signal.SIGTERM
    ckpt = checkpoints.load(path)
    assert ckpt['it'] == 6 and ckpt['finished'] is False
    capsys.readouterr()
    code, out, err = table(str(tmp_path / 'runs'))
    assert code == 1 and f'left out {run_dir}: unfinished: its last checkpoint is at iteration 6 of 8' in err
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main.main([f'--resume={path}']) == 0
    ckpt = checkpoints.load(path)
    assert ckpt['it'] == 8 and ckpt['finished'] is True and iterations_tested(run_dir) == [4, 8]


@pytest.mark.slow
def test_a_fresh_run_holds_its_folders_lock_and_is_left_out_of_tables_while_it_trains(
        css_root, tmp_path, monkeypatch):
    """Issue 23 item 20 (deleting run_lock.acquire for a new run folder passed every test) and
    item 2: results_table.py, in another process, sees the run training."""
    monkeypatch.chdir(tmp_path)
    real_evaluate = main.evaluate
    seen = []

    def evaluate(*args, **kwargs):  # results_table.py in another process (forked) looks
        from conftest import ForkedProcess
        look = ForkedProcess(lambda: results_table.main_cli([str(tmp_path / 'runs')]), str(tmp_path))
        out, err = look.communicate(timeout=120)
        seen.append((look.returncode, out, err))
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(main, 'evaluate', evaluate)
    assert main.main(TINY + [f'--dataset_path={css_root}', '--num_iters=2', '--comment=_lock']) == 0
    run_dir = only_run_folder(tmp_path, '_lock')
    ((code, out, err),) = seen
    assert code == 1 and out == ''
    assert f'left out {run_dir}: training: held by {socket.gethostname()}, pid {os.getpid()}\n' in err
    code, out, err = table(str(tmp_path / 'runs'))
    assert code == 0 and '| tirg |' in out and 'training' not in err


def options_record(run_dir):
    with open(os.path.join(run_dir, 'options.json')) as f:
        return json.load(f)


@pytest.mark.slow
def test_a_run_records_its_data_and_starting_weights_and_tables_pool_on_them(tmp_path, monkeypatch):
    """The same data at two paths pools into one row; other data, and a start from another
    checkpoint's weights, never do."""
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / 'css')
    write_css_fixture(root)
    moved = str(tmp_path / 'moved' / 'css')
    shutil.copytree(root, moved)
    other = str(tmp_path / 'other')
    write_css_fixture(other, num_scenes=13)
    for comment, path in [('_a', root), ('_b', moved), ('_other', other)]:
        assert main.main(TINY + [f'--dataset_path={path}', '--num_iters=2', '--seed=1',
                                 f'--comment={comment}']) == 0
    records = {c: options_record(only_run_folder(tmp_path, c)) for c in ('_a', '_b', '_other')}
    assert records['_a']['data'] == data_identity.identify('css3d', root)
    assert records['_b']['data'] == records['_a']['data']
    assert records['_other']['data']['digest'] != records['_a']['data']['digest']
    assert records['_a']['initial_checkpoint'] is None

    start = os.path.join(only_run_folder(tmp_path, '_a'), 'latest_checkpoint.pth')
    assert main.main(TINY + [f'--dataset_path={root}', '--num_iters=2', '--seed=2', '--comment=_from',
                             f'--checkpoint={start}']) == 0
    from_dir = only_run_folder(tmp_path, '_from')
    expected = {'path': start, 'digest': hashlib.sha256(open(start, 'rb').read()).hexdigest()}
    assert options_record(from_dir)['initial_checkpoint'] == expected
    assert 'initial_checkpoint' not in options_record(from_dir)['options']
    # Continued in a new folder (from its best checkpoint): still a run from those weights.
    assert main.main([f'--resume={os.path.join(from_dir, "best_checkpoint.pth")}', '--num_iters=3',
                      '--comment=_cont']) == 0
    assert options_record(only_run_folder(tmp_path, '_cont'))['initial_checkpoint'] == expected

    code, out, err = table(str(tmp_path / 'runs'))
    assert code == 0, err
    tables = [line for line in out.splitlines() if line.startswith(('### ', 'data: '))]
    short = data_identity.short
    assert f'data: {short(records["_a"]["data"]["digest"])} ({root}, {moved})' in tables
    assert f'data: {short(records["_other"]["data"]["digest"])} ({other})' in tables
    titles = sorted(line for line in tables if line.startswith('### '))
    assert titles == sorted([
        '### css3d, --checkpoint=content ' + short(expected['digest']) + ' (2 iterations; final test recalls, in %)',
        '### css3d, --checkpoint=content ' + short(expected['digest']) + ' (3 iterations; final test recalls, in %)',
        '### css3d, no --checkpoint (2 iterations; final test recalls, in %)',
        '### css3d, no --checkpoint (2 iterations; final test recalls, in %)'])  # two data
    same_data = out.split(f'data: {short(records["_a"]["data"]["digest"])} ({root}, {moved})')[1]
    assert '(2 runs)' in same_data.split('###')[0]
