#!/usr/bin/env bash
# --amp on a CPU with native bfloat16 (issue 25), measured in one go on a machine with 16 cores:
#
#   1. the processor: model, bfloat16 flags, what amp.py detects, and a bfloat16-vs-float32
#      convolution timing (a processor whose flags are hidden, as in some sandboxes, still shows
#      native bfloat16 there: then TIRG_CPU_BF16=1 is set for the --amp runs, and said so);
#   2. timing: the same Fashion200k run (224 px, batch 32, 16 iterations, final test included)
#      without and with --amp, both at once, each pinned to its own 2 cores (taskset, 2 threads),
#      on a generated Fashion200k tree;
#   3. parity: TIRG on synthetic CSS, seeds 1 2 3, without and with --amp, the 6 runs at once,
#      each on its own 2 cores, 0 loader workers; then results_table.py over them, and the test
#      R@1 of every iteration all runs evaluated (so runs stopped at the deadline still compare);
#   4. bench.py --only amp, if this checkout has that section, once the timing runs are done.
#
#   OUT=/some/folder scripts/amp_parity.sh
#
# Python packages the machine lacks (tensorboardX on a bare GPU image) are installed from wheels in
# .whl/ when that folder holds any (pip download --no-deps tensorboardX==2.6.5 -d .whl).
#
# Everything goes to $OUT: summary.md (read this) and logs.tar.gz (every log, options.json and
# metrics.jsonl).  Settings (environment, defaults in brackets):
#   PYTHON [python3]  PARITY_ITERS [400]  PARITY_BASE_SCENES [150]  PARITY_SEEDS [1 2 3]
#   TIMING_ITERS [16]  F200K_TRAIN [600]  F200K_TEST [300]  F200K_SAMPLED [256] (train-split
#   examples the final test samples)  DEADLINE_S [500]: runs still going then are interrupted
#   (they save and stop) so that the summary is written in time.  BENCH_AMP_ARGS: more flags for
#   bench.py --only amp (--amp_sizes 32 for a smoke run).  AMP_WORK: scratch folder.
#
# Estimated on a 2-core CPU with native bfloat16 (issue 25's step times, TIRG's 1.2x over a bare
# ResNet-18): a float32 parity run is ~0.47 s an iteration plus ~36 s per evaluation of both
# 150-base-scene splits (at iterations 89, 356, ... and the last); 400 iterations: ~5 min.
# The default dataset (1000 base scenes, 37,000 images a split) at 1,200 iterations would take
# ~18 min in float32 (two evaluations of 148,000 images), so it is not the default here.
set -u

OUT=${OUT:?set OUT to the folder the results go to}
PYTHON=${PYTHON:-python3}
PARITY_ITERS=${PARITY_ITERS:-400}
PARITY_BASE_SCENES=${PARITY_BASE_SCENES:-150}
PARITY_SEEDS=${PARITY_SEEDS:-1 2 3}
TIMING_ITERS=${TIMING_ITERS:-16}
F200K_TRAIN=${F200K_TRAIN:-600}
F200K_TEST=${F200K_TEST:-300}
F200K_SAMPLED=${F200K_SAMPLED:-256}
DEADLINE_S=${DEADLINE_S:-500}
BENCH_AMP_ARGS=${BENCH_AMP_ARGS:-}

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${AMP_WORK:-$(mktemp -d /tmp/amp_parity.XXXXXX)}
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS" "$WORK/timing" "$WORK/parity"
SUMMARY=$OUT/summary.md
START=$(date +%s)
CORES=$(nproc)
export PYTHONUNBUFFERED=1

say() { echo "$@" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }

# Cores 2k and 2k+1 (modulo the cores there are, so that a small machine can try the script).
core_pair() { echo "$(( (2 * $1) % CORES )),$(( (2 * $1 + 1) % CORES ))"; }

pinned() {  # (pinned CORES COMMAND...): the command on those cores, with 2 threads.  It execs,
    # so that the process signalled (a pid from `pinned ... &`) is the command itself: call it in
    # a subshell or in the background.
    local cores=$1; shift
    export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
    if command -v taskset >/dev/null; then
        exec taskset -c "$cores" "$@"
    fi
    exec "$PYTHON" -c 'import os, sys
os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
os.execvp(sys.argv[2], sys.argv[2:])' "$cores" "$@"
}

pack_logs() {
    for run in "$WORK"/timing/runs/* "$WORK"/parity/runs/*; do
        [ -d "$run" ] || continue
        mkdir -p "$LOGS/runs/$(basename "$run")"
        cp "$run"/options.json "$run"/metrics.jsonl "$run"/test_results.json "$LOGS/runs/$(basename "$run")/" 2>/dev/null
    done
    tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs
}

: > "$SUMMARY"
say "# --amp on this CPU ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
say ""
say "Settings: PARITY_ITERS=$PARITY_ITERS PARITY_BASE_SCENES=$PARITY_BASE_SCENES PARITY_SEEDS='$PARITY_SEEDS' TIMING_ITERS=$TIMING_ITERS F200K_TRAIN=$F200K_TRAIN F200K_TEST=$F200K_TEST F200K_SAMPLED=$F200K_SAMPLED DEADLINE_S=$DEADLINE_S; $CORES cores"

# ---------------------------------------------------------------------------------------------
# 1. The processor.
cd "$REPO" || exit 1
# Packages the machine lacks (tensorboardX on a bare GPU image), carried as wheels in .whl/.
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
        && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$("$PYTHON" -c 'import importlib.util as u
print(" ".join(m for m in ("torch", "torchvision", "numpy", "PIL", "tqdm", "tensorboardX") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
    say "Missing Python packages: $missing (carry them as wheels); stopping."
    exit 1
fi
say ""
say "## Processor"
say ""
say '```'
(pinned "$(core_pair 0)" "$PYTHON" -) <<'EOF' 2>&1 | tee -a "$SUMMARY"
import platform
import time

import torch

import amp

model = 'unknown'
flags = set()
try:
    with open('/proc/cpuinfo') as f:
        for line in f:
            key, _, value = line.partition(':')
            if key.strip() == 'model name' and model == 'unknown':
                model = value.strip()
            if key.strip() in ('flags', 'Features'):
                flags |= set(value.split())
except OSError:
    pass
print('model:', model, '|', platform.machine(), '| torch', torch.__version__)
print('bfloat16 flags:', ' '.join(sorted(f for f in flags if 'bf16' in f or f.startswith('amx'))) or 'none')
print('amp.cpu_has_native_bf16():', amp.cpu_has_native_bf16())
torch.set_num_threads(2)
conv = torch.nn.Conv2d(64, 64, 3, padding=1)
x = torch.randn(32, 64, 56, 56)


def best(precision):
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.inference_mode(), amp.autocast(precision, 'cpu'):
            conv(x)
        times.append(time.perf_counter() - start)
    return min(times[1:])


f32, bf16 = best('float32'), best('bfloat16')
print(f'3x3 conv, 32x64x56x56, 2 threads: float32 {1000 * f32:.1f} ms, bfloat16 autocast '
      f'{1000 * bf16:.1f} ms ({bf16 / f32:.2f}x)')
with open('/tmp/amp_parity_bf16_fast', 'w') as f:
    f.write('1' if bf16 < 0.8 * f32 else '0')
EOF
say '```'
AMP_ENV=()
if [ "$("$PYTHON" -c 'import amp; print(int(amp.cpu_has_native_bf16()))')" != 1 ]; then
    if [ "$(cat /tmp/amp_parity_bf16_fast 2>/dev/null)" = 1 ]; then
        AMP_ENV=(TIRG_CPU_BF16=1)
        say "amp.py finds no native bfloat16 flag, yet bfloat16 convolutions are fast here: the --amp runs set TIRG_CPU_BF16=1."
    else
        say "No native bfloat16 here: --amp runs fall back to float32 (their logs say so); the ratios below then say nothing about bfloat16."
    fi
fi

# ---------------------------------------------------------------------------------------------
# Data, generated before any timed run.
"$PYTHON" make_css_dataset.py "$WORK/css" --base_scenes "$PARITY_BASE_SCENES" > "$LOGS/make_css.log" 2>&1 \
    || { say "make_css_dataset.py failed (logs.tar.gz: logs/make_css.log)"; pack_logs; exit 1; }
"$PYTHON" - "$WORK/f200k" "$F200K_TRAIN" "$F200K_TEST" <<'EOF' > "$LOGS/make_f200k.log" 2>&1 \
    || { say "the Fashion200k tree could not be written (logs/make_f200k.log)"; pack_logs; exit 1; }
"""A Fashion200k tree: captions '<colour> <pattern> <category>', so that many images differ by
one word; test queries are test pairs that differ in colour.  tests/test_fashion200k.py writes it
(tiny 40x30 JPEGs: decoding is a small share of a step at 224 px)."""
import random
import sys

sys.path.insert(0, 'tests')
from test_fashion200k import write_fashion_fixture  # noqa: E402

root, train_count, test_count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
colors = ['black', 'white', 'red', 'blue', 'green', 'pink', 'grey', 'beige']
patterns = ['lace', 'floral', 'striped', 'silk', 'denim', 'knit']
categories = [('dress', 'dresses'), ('top', 'tops'), ('skirt', 'skirts')]
rng = random.Random(0)


def images(split, count, first):
    out = []
    for n in range(count):
        single, plural = categories[n % 3]
        caption = f'{rng.choice(colors)} {rng.choice(patterns)} {single}'
        out.append((f'{single}_{split}_detect_all.txt',
                    f'women/{plural}/c{n % 40:02d}/{first + n}/{first + n}_0.jpeg', caption))
    return out


train, test = images('train', train_count, 100000), images('test', test_count, 500000)
queries = []
for i, (_, path, caption) in enumerate(test):
    others = [p for _, p, c in test if c.split()[1:] == caption.split()[1:] and c != caption]
    if others:
        queries.append((path, rng.choice(others)))
write_fashion_fixture(root, train, test, queries)
print(f'{root}: {len(train)} train and {len(test)} test images, {len(queries)} test queries')
EOF
say ""
say "Data: CSS $(grep -h '^t[a-z]*: ' "$LOGS/make_css.log" | tr '\n' ' '); Fashion200k $(tail -1 "$LOGS/make_f200k.log")"

# ---------------------------------------------------------------------------------------------
# 2. and 3.: every run at once, each on its own two cores.
declare -A PIDS
launch() {  # launch NAME CORES FOLDER VAR=VALUE... -- FLAGS...: main.py in FOLDER, in the background
    local name=$1 cores=$2 folder=$3; shift 3
    local env=()
    while [ "$1" != -- ]; do env+=("$1"); shift; done
    shift
    (
        cd "$folder" || exit 1
        [ ${#env[@]} -gt 0 ] && export "${env[@]}"
        date +%s.%N > "$LOGS/$name.start"
        pinned "$cores" "$PYTHON" "$REPO/main.py" "$@" > "$LOGS/$name.log" 2>&1 &
        echo $! > "$LOGS/$name.pid"
        wait $!
        code=$?
        date +%s.%N > "$LOGS/$name.end"
        echo $code > "$LOGS/$name.rc"
    ) &
    PIDS[$name]=$!
}

TIMING_FLAGS=(--dataset=fashion200k "--dataset_path=$WORK/f200k" "--num_iters=$TIMING_ITERS"
              --batch_size=32 --img_weights=none --loader_num_workers=0 --device=cpu --seed=0)
launch timing_float32 "$(core_pair 0)" "$WORK/timing" TIRG_NUM_SAMPLED_TRAIN_EXAMPLES=$F200K_SAMPLED -- \
    "${TIMING_FLAGS[@]}" --comment=_timing_float32
launch timing_amp "$(core_pair 1)" "$WORK/timing" TIRG_NUM_SAMPLED_TRAIN_EXAMPLES=$F200K_SAMPLED "${AMP_ENV[@]}" -- \
    "${TIMING_FLAGS[@]}" --amp --comment=_timing_amp

slot=2
PARITY=()
for seed in $PARITY_SEEDS; do
    for variant in float32 amp; do
        flags=(--dataset=css3d "--dataset_path=$WORK/css" "--num_iters=$PARITY_ITERS" --batch_size=32
               --img_weights=none --loader_num_workers=0 --device=cpu --model=tirg "--seed=$seed"
               "--comment=_parity_${variant}_s$seed")
        env=(PARITY=1)
        if [ $variant = amp ]; then flags+=(--amp); env+=("${AMP_ENV[@]}"); fi
        launch "parity_${variant}_s$seed" "$(core_pair $slot)" "$WORK/parity" "${env[@]}" -- "${flags[@]}"
        PARITY+=("parity_${variant}_s$seed")
        slot=$((slot + 1))
    done
done
if [ $((2 * slot)) -gt "$CORES" ]; then
    say "Only $CORES cores: $((2 * slot)) were meant, so runs share cores (timings are not comparable)."
fi

finished() { [ -f "$LOGS/$1.rc" ]; }
seconds() { "$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$(cat "$LOGS/$1.start")" "$(cat "$LOGS/$1.end")"; }

bench_done=0
while :; do
    if [ $bench_done = 0 ] && finished timing_float32 && finished timing_amp; then
        bench_done=1
        if "$PYTHON" bench.py --help 2>/dev/null | grep -q -- "--amp_sizes"; then
            # shellcheck disable=SC2086  # BENCH_AMP_ARGS: words
            (pinned "$(core_pair 0)" "$PYTHON" bench.py --only amp --device cpu --threads 2 $BENCH_AMP_ARGS \
                > "$LOGS/bench_amp.log" 2>&1 &
             echo $! > "$LOGS/bench_amp.pid"; wait $!; echo $? > "$LOGS/bench_amp.rc") &
            PIDS[bench_amp]=$!
        fi
    fi
    running=0
    for name in "${!PIDS[@]}"; do finished "$name" || running=$((running + 1)); done
    [ $running = 0 ] && break
    if [ "$(elapsed)" -ge "$DEADLINE_S" ]; then
        say ""
        say "Deadline ($DEADLINE_S s): interrupting the runs still going (they save and stop):"
        for name in "${!PIDS[@]}"; do
            if ! finished "$name"; then
                say "- $name"
                # main.py itself (taskset execs it): it finishes the iteration, saves and exits.
                [ -f "$LOGS/$name.pid" ] && kill -INT "$(cat "$LOGS/$name.pid")" 2>/dev/null
            fi
        done
        for _ in $(seq 60); do
            running=0
            for name in "${!PIDS[@]}"; do finished "$name" || running=1; done
            [ $running = 0 ] && break
            sleep 1
        done
        break
    fi
    sleep 2
done

# ---------------------------------------------------------------------------------------------
# The summary.
say ""
say "## Timing: Fashion200k, 224 px, batch 32, $TIMING_ITERS iterations, final test included (2 cores each, both at once)"
say ""
say "| run | exit | wall time (s) |"
say "| --- | --- | --- |"
for name in timing_float32 timing_amp; do
    if finished $name; then
        say "| $name | $(cat "$LOGS/$name.rc") | $(seconds $name) |"
    else
        say "| $name | unfinished | - |"
    fi
done
if finished timing_float32 && finished timing_amp; then
    say ""
    say "Ratio --amp / float32: $("$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) / float(sys.argv[1]):.2f}')" "$(seconds timing_float32)" "$(seconds timing_amp)")"
fi
say ""
say "Final test of each (from its log):"
say '```'
for name in timing_float32 timing_amp; do
    grep -h -- "--amp\|test recall_top1_correct_composition\|train recall_top1_correct_composition\|error" "$LOGS/$name.log" 2>/dev/null | sed "s/^/$name: /" | tee -a "$SUMMARY"
done
say '```'

say ""
say "## Parity: TIRG, synthetic CSS ($PARITY_BASE_SCENES base scenes a split), $PARITY_ITERS iterations, batch 32"
say ""
for name in "${PARITY[@]}"; do
    if finished "$name"; then say "- $name: exit $(cat "$LOGS/$name.rc"), $(seconds "$name") s"; else say "- $name: unfinished"; fi
done
say ""
"$PYTHON" results_table.py "$WORK/parity/runs" --format=markdown > "$LOGS/results_table.md" 2> "$LOGS/results_table.err"
tee -a "$SUMMARY" < "$LOGS/results_table.md"
sed 's/^/    /' "$LOGS/results_table.err" | tee -a "$SUMMARY"
say ""
say "Test R@1 (%) at every iteration each run evaluated, mean ± std over the seeds:"
say ""
"$PYTHON" - "$WORK/parity/runs" <<'EOF' | tee -a "$SUMMARY"
import glob
import json
import os
import statistics
import sys

metric = 'test recall_top1_correct_composition'
by_variant = {}
for folder in sorted(glob.glob(os.path.join(sys.argv[1], '*_parity_*'))):
    variant = folder.rsplit('_parity_', 1)[1].split('_s')[0]
    with open(os.path.join(folder, 'options.json')) as f:
        precision = json.load(f)['options'].get('precision', '?')
    lines = {}
    if os.path.isfile(os.path.join(folder, 'metrics.jsonl')):
        with open(os.path.join(folder, 'metrics.jsonl')) as f:
            for line in f:
                record = json.loads(line)
                if metric in record:
                    lines[record['it']] = 100 * record[metric]
    by_variant.setdefault(f'{variant} ({precision})', []).append(lines)
print('| iteration | ' + ' | '.join(by_variant) + ' |')
print('| --- |' + ' --- |' * len(by_variant))
iterations = sorted({it for runs in by_variant.values() for lines in runs for it in lines})
for it in iterations:
    cells = []
    for runs in by_variant.values():
        values = [lines[it] for lines in runs if it in lines]
        std = f' ± {statistics.stdev(values):.1f}' if len(values) > 1 else ''
        cells.append(f'{statistics.fmean(values):.1f}{std} ({len(values)})' if values else '-')
    print(f'| {it} | ' + ' | '.join(cells) + ' |')
EOF

if [ -f "$LOGS/bench_amp.log" ]; then
    say ""
    say "## bench.py --only amp (cores $(core_pair 0), after the timing runs, beside the parity runs)"
    say ""
    say '```'
    tail -40 "$LOGS/bench_amp.log" | tee -a "$SUMMARY"
    say '```'
fi
say ""
say "Total: $(elapsed) s"
pack_logs
