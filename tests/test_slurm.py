"""slurm_train.sh as SLURM runs it (issue 10), with srun and scontrol stood in by scripts: the
job trains under torchrun (2 gloo processes, c10d rendezvous), SIGTERM before the time limit
saves a checkpoint and requeues the job, and the requeued job resumes it in the same run folder
and is not requeued once finished."""
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, saved_iteration

import checkpoints

SCRIPT = os.path.join(REPO, 'slurm_train.sh')
# srun runs its command (its own options dropped); scontrol knows one host and logs requeues.
SRUN = '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n'
SCONTROL = ('#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then echo localhost; exit 0; fi\n'
            'echo "$*" >> "$SCONTROL_LOG"\n')


def free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def slurm_env(tmp_path):
    stubs = tmp_path / 'bin'
    stubs.mkdir(exist_ok=True)
    for name, body in (('srun', SRUN), ('scontrol', SCONTROL)):
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    submit = tmp_path / 'submit'
    submit.mkdir(exist_ok=True)
    return submit, dict(os.environ, PATH=f'{stubs}:{os.environ["PATH"]}', OMP_NUM_THREADS='1',
                        SLURM_JOB_ID='4242', SLURM_SUBMIT_DIR=str(submit), TIRG_REPO=REPO,
                        TIRG_PYTHON=sys.executable, GPUS_PER_NODE='2', MASTER_PORT=str(free_port()),
                        SCONTROL_LOG=str(tmp_path / 'scontrol.log'))


def saved_checkpoint(submit):
    found = glob.glob(os.path.join(str(submit), 'runs', '*_slurm4242', 'latest_checkpoint.pth'))
    return found[0] if found and (saved_iteration(found[0]) or 0) > 0 else None


@pytest.mark.slow
def test_sigterm_requeues_and_the_requeued_job_resumes_in_the_same_run_folder(css_root, tmp_path):
    submit, env = slurm_env(tmp_path)
    flags = TINY + [f'--dataset_path={css_root}', '--batch_size=8', '--seed=3']
    job = subprocess.Popen(['bash', SCRIPT] + flags + ['--num_iters=100000'], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline, path = time.time() + 180, None
    while path is None and time.time() < deadline and job.poll() is None:
        path = saved_checkpoint(submit)
        time.sleep(0.2)
    assert path is not None, job.communicate(timeout=60)
    os.killpg(job.pid, signal.SIGTERM)  # SLURM signals every process of the job
    stdout, stderr = job.communicate(timeout=120)
    it = checkpoints.load(path)['it']
    assert job.returncode != 0 and 0 < it < 100000, stderr[-3000:]
    assert f'slurm_train.sh: stopped at iteration {it} of 100000' in stdout
    assert (tmp_path / 'scontrol.log').read_text() == 'requeue 4242\n'

    # The requeued job: same id, same command (here with a nearer end).
    env['MASTER_PORT'] = str(free_port())
    again = subprocess.run(['bash', SCRIPT] + flags + ['--num_iters=100000', f'--num_iters={it + 4}'],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f'slurm_train.sh: job 4242 (restart 0) resumes from runs/' in again.stdout
    assert checkpoints.load(path)['it'] == it + 4
    assert len(glob.glob(os.path.join(str(submit), 'runs', '*'))) == 1
    assert (tmp_path / 'scontrol.log').read_text() == 'requeue 4242\n'  # finished: not requeued


# srun standing in for a session stopped (exit 143, SIGTERM) with its checkpoint at the end:
# FINISHED=0 as when stopped during the final evaluation, FINISHED=1 after it.
SRUN_STOPPED_AT_THE_END = """#!/bin/bash
"$TIRG_PYTHON" - <<'PY'
import argparse, os, torch
os.makedirs('runs/x_slurm4242', exist_ok=True)
torch.save({'it': 5, 'opt': argparse.Namespace(num_iters=5), 'model_state_dict': {},
            'finished': os.environ['FINISHED'] == '1'}, 'runs/x_slurm4242/latest_checkpoint.pth')
PY
exit 143
"""


def test_a_job_stopped_during_its_final_evaluation_is_requeued_to_redo_it(tmp_path):
    """Issue 23 item 1: a preempted job must always complete; its checkpoint is at the last
    iteration, but the run is unfinished until its final test is logged."""
    for finished, requeued in (('1', False), ('0', True)):
        job = tmp_path / f'finished{finished}'
        job.mkdir()
        submit, env = slurm_env(job)
        stub_srun(job, env, SRUN_STOPPED_AT_THE_END)
        env['FINISHED'] = finished
        result = subprocess.run(['bash', SCRIPT, '--num_iters=5'], cwd=job, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 143, result.stderr
        log = job / 'scontrol.log'
        assert log.exists() == requeued, (finished, result.stdout)
        if requeued:
            assert 'slurm_train.sh: stopped at iteration 5 of 5 (exit 143); requeueing job 4242' in result.stdout
            assert log.read_text() == 'requeue 4242\n'


def test_outside_sbatch_it_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
    result = subprocess.run(['bash', SCRIPT, '--num_iters=1'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert 'run it with sbatch (SLURM_JOB_ID is not set)' in result.stderr


# Issue 18 item 15: an unreadable latest checkpoint is named, with what to do; no traceback.
SRUN_LOGGED = '#!/bin/bash\necho "$*" >> "$SRUN_LOG"\nexit 0\n'
SRUN_CORRUPTING = ('#!/bin/bash\nmkdir -p "runs/x_slurm4242"\n'
                   'echo "not a checkpoint" > runs/x_slurm4242/latest_checkpoint.pth\nexit 3\n')


def stub_srun(tmp_path, env, body):
    (tmp_path / 'bin' / 'srun').write_text(body)
    env['SRUN_LOG'] = str(tmp_path / 'srun.log')


@pytest.mark.slow
def test_an_unreadable_latest_checkpoint_is_named_before_training(tmp_path):
    submit, env = slurm_env(tmp_path)
    stub_srun(tmp_path, env, SRUN_LOGGED)
    run_dir = submit / 'runs' / '2026_host_slurm4242'
    run_dir.mkdir(parents=True)
    (run_dir / 'latest_checkpoint.pth').write_bytes(b'PK\x03\x04 cut short')
    result = subprocess.run(['bash', SCRIPT, '--num_iters=5'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    assert lines[0].startswith('slurm_train.sh: error: runs/2026_host_slurm4242/latest_checkpoint.pth: '
                               'not a readable checkpoint (')
    assert lines[0].endswith('move it away (this job then starts a new run folder) or put a readable '
                             'checkpoint in its place, then submit the job again')
    assert not (tmp_path / 'srun.log').exists()  # nothing trained on it
    assert not (tmp_path / 'scontrol.log').exists()


@pytest.mark.slow
def test_a_checkpoint_unreadable_after_training_is_named_and_not_requeued(tmp_path):
    submit, env = slurm_env(tmp_path)
    stub_srun(tmp_path, env, SRUN_CORRUPTING)
    result = subprocess.run(['bash', SCRIPT, '--num_iters=5'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3  # the training's own exit status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    assert lines[0].startswith('slurm_train.sh: error: runs/x_slurm4242/latest_checkpoint.pth: ')
    assert lines[0].endswith('job 4242 is not requeued: move it away or put a readable checkpoint '
                             'in its place, then submit the job again')
    assert not (tmp_path / 'scontrol.log').exists()


def test_the_resume_flags_expand_under_set_u_in_bash_before_4_4():
    """Bash 4.2/4.3 (common on clusters) call "${empty[@]}" an unbound variable under set -u;
    only bash 5 runs here, so the script's expansions of the array are checked as text."""
    with open(SCRIPT) as f:
        script = ''.join(line for line in f if not line.lstrip().startswith('#'))
    expansions = script.count('${resume[@]')
    assert expansions == script.count('${resume[@]+"${resume[@]}"}') * 2 and expansions > 0
