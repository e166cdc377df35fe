#!/bin/bash
# TIRG training on a SLURM cluster: torchrun on every node (multi-node rendezvous), preemptible.
#
#   sbatch slurm_train.sh --dataset=fashioniq --dataset_path=/data/fashioniq --batch_size=256
#   sbatch --nodes=2 --gpus-per-node=4 slurm_train.sh --dataset=cirr --dataset_path=/data/cirr
#
# The arguments are main.py's flags; --batch_size is the global batch (it must divide by the
# number of processes: nodes x GPUS_PER_NODE).  The run folder is runs/<date>_<host>_slurm<JOBID>
# (the --comment is set here).  Before the time limit, or when the job is preempted, SLURM sends
# SIGTERM: main.py finishes its iteration, saves latest_checkpoint.pth and exits; this script
# then requeues the job, which starts again under the same job id and resumes from that
# checkpoint, in the same run folder (stopped during its final evaluation too: it then redoes
# that test).  A session that saved nothing new is not requeued (no endless loop on a failing
# job), nor is a finished run (its final test logged).
#
# Runs go to runs/ in the folder sbatch was called from.  Environment: TIRG_REPO (this
# repository; default: that same folder, since SLURM runs a copy of this script), GPUS_PER_NODE
# (default: the GPUs SLURM gives the node, else 1), MASTER_PORT (default 29500), TIRG_PYTHON
# (default python, with torch installed).
#SBATCH --job-name=tirg
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail

JOB=${SLURM_JOB_ID:?slurm_train.sh: run it with sbatch (SLURM_JOB_ID is not set)}
cd "${SLURM_SUBMIT_DIR:-.}"
REPO=$(cd "${TIRG_REPO:-.}" && pwd)
if [ ! -f "$REPO/main.py" ]; then
    echo "slurm_train.sh: error: no main.py in $REPO; sbatch from the repository or set TIRG_REPO" >&2
    exit 1
fi
PYTHON=${TIRG_PYTHON:-python}
NODES=${SLURM_NNODES:-1}
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
COMMENT="_slurm${JOB}"
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)

# "<it> <num_iters> <finished: 1 or 0>" of a checkpoint, "0 0 0" when there is none yet.  An unreadable one is a line
# on stderr naming it, followed by $2 (what to do), and a failure.
progress() {
    if [ -z "$1" ]; then echo "0 0 0"; return; fi
    PYTHONPATH="$REPO" "$PYTHON" -c '
import sys
try:
    import checkpoints
    c = checkpoints.load(sys.argv[1])
    print(int(c["it"]), int(c["opt"].num_iters), int(c.get("finished") is True))
except Exception as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if not reason.startswith(sys.argv[1]):
        reason = f"{sys.argv[1]}: not a readable checkpoint ({reason})"
    sys.exit(f"slurm_train.sh: error: {reason}; {sys.argv[2]}")
' "$1" "$2"
}
latest_checkpoint() {
    ls -t runs/*"${COMMENT}"/latest_checkpoint.pth 2>/dev/null | head -n 1 || true
}

checkpoint=$(latest_checkpoint)
resume=()
if [ -n "$checkpoint" ]; then
    resume=(--resume="$checkpoint")
    echo "slurm_train.sh: job $JOB (restart ${SLURM_RESTART_COUNT:-0}) resumes from $checkpoint"
fi
if ! now=$(progress "$checkpoint" "move it away (this job then starts a new run folder) or put a readable checkpoint in its place, then submit the job again"); then
    exit 1
fi
read -r start_it _ <<< "$now"

# On preemption SLURM signals this shell too: wait for main.py to save, then decide.
trap 'echo "slurm_train.sh: SIGTERM received; waiting for main.py to save"' TERM
status=0
srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
    --nnodes="$NODES" --nproc_per_node="$GPUS" \
    --rdzv_id="$JOB" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
    "$REPO/main.py" "$@" --comment="$COMMENT" ${resume[@]+"${resume[@]}"} || status=$?
# (${resume[@]+...}: bash before 4.4 calls an empty array unbound under set -u.)

checkpoint=$(latest_checkpoint)
if ! now=$(progress "$checkpoint" "job $JOB is not requeued: move it away or put a readable checkpoint in its place, then submit the job again"); then
    exit $(( status != 0 ? status : 1 ))
fi
read -r it num_iters finished <<< "$now"
if [ "$status" -ne 0 ] && [ -n "$checkpoint" ] && [ "$finished" -eq 0 ] && [ "$it" -gt "$start_it" ]; then
    echo "slurm_train.sh: stopped at iteration $it of $num_iters (exit $status); requeueing job $JOB"
    scontrol requeue "$JOB"
fi
exit "$status"
