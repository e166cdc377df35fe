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

from conftest import REPO, TINY

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
    try:
        return found[0] if found and checkpoints.load(found[0])['it'] > 0 else None
    except checkpoints.CheckpointError:  # being written
        return None


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


def test_outside_sbatch_it_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
    result = subprocess.run(['bash', SCRIPT, '--num_iters=1'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert 'run it with sbatch (SLURM_JOB_ID is not set)' in result.stderr
