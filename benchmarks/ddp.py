"""ddp: training throughput (images/s) of main.py's path under torchrun with 2 gloo processes on
the CPU (DistributedDataParallel, gathered loss, each process its slice of the global
--batch_size) against 1 plain process, the same threads in all, shared out.  Each process is
bench.py run again with --ddp_worker (hidden flags), which calls worker() here."""
import contextlib
import io
import json
import os
import subprocess
import sys
import time

import torch

import amp
import datasets
import distributed
import experiment
import main
import sampling
from benchmarks.common import endless_batches, fmt_seconds
from benchmarks.fixtures import write_css_tree

BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench.py')
PROCESSES = 2


def worker(args):
    """One process of the ddp section (bench.py run again, under torchrun or alone): main.py's
    training path (seeding, DDP wrapping, sliced sampler, loader, iteration) on the CSS set in
    --ddp_data; the first process writes the timing of args.iters iterations after the warm-up."""
    torch.set_num_threads(args.threads)
    device = distributed.device_for_process(torch.device('cpu'))
    rank, world = distributed.rank(), distributed.world_size()
    opt = main.parse_opt(['--dataset=css3d', f'--dataset_path={args.ddp_data}', '--model=tirg',
                          '--img_weights=none', '--loss=soft_triplet', '--loader_num_workers=0',
                          f'--batch_size={args.batch_size}', f'--seed={args.seed}', '--device=cpu'])
    opt.precision = amp.FLOAT32
    experiment.seed_process(opt, rank)
    trainset = datasets.CSSDataset(opt.dataset_path, split='train', transform=datasets.css_transform())
    with contextlib.redirect_stdout(io.StringIO()):
        model = experiment.create_model(opt, trainset.get_all_texts()).to(device)
    train_model = main.wrap_for_training(opt, model, device)
    optimizer = main.create_optimizer(opt, model)
    sampler = sampling.EpochBatchSampler(len(trainset), opt.batch_size, opt.seed, rank, world)
    loader = sampling.make_train_loader(opt, trainset, sampler, device, rank)
    model.train()
    batches = endless_batches(loader, sampler)
    for _ in range(args.warmup):
        main.train_one_iteration(opt, train_model, optimizer, next(batches), device)
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(args.iters):
        main.train_one_iteration(opt, train_model, optimizer, next(batches), device)
    seconds = time.perf_counter() - start  # the last step's gradient all-reduce has completed
    if distributed.is_main_process():
        with open(args.ddp_worker, 'w') as f:
            json.dump({'processes': world, 'threads_per_process': torch.get_num_threads(),
                       'seconds': seconds, 'iters': args.iters}, f)
    distributed.cleanup()
    return 0


def measure(args, device, tmp):
    data_dir = os.path.join(tmp, 'css_ddp')
    write_css_tree(data_dir)
    total_threads = torch.get_num_threads()
    runs = {}
    for processes in (1, PROCESSES):
        out = os.path.join(tmp, f'ddp_{processes}.json')
        threads = max(1, total_threads // processes)  # the same cores, shared out
        worker = [BENCH_SCRIPT, f'--ddp_worker={out}', f'--ddp_data={data_dir}',
                  f'--batch_size={args.batch_size}', f'--iters={args.iters}',
                  f'--warmup={args.warmup}', f'--seed={args.seed}', f'--threads={threads}']
        # One process: the plain single-process path, no launcher and no process group.
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, '-m', 'torch.distributed.run', '--standalone',
            f'--nproc_per_node={processes}']
        result = subprocess.run(launcher + worker, capture_output=True, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if result.returncode != 0:
            raise RuntimeError(f'ddp section, {processes} process(es) failed:\n{result.stderr[-3000:]}')
        with open(out) as f:
            runs[processes] = json.load(f)
        runs[processes]['img_per_s'] = 2 * args.batch_size * args.iters / runs[processes]['seconds']
    one, many = runs[1], runs[PROCESSES]
    ratio = many['img_per_s'] / one['img_per_s']
    line = (f'ddp train iterations, global batch {args.batch_size} (TIRG, CSS 64x64, gloo on CPU, '
            f'{total_threads} threads in all): 1 process {one["img_per_s"]:.1f} img/s '
            f'({fmt_seconds(one["seconds"] / args.iters)}/it), {PROCESSES} processes under '
            f'torchrun {many["img_per_s"]:.1f} img/s ({fmt_seconds(many["seconds"] / args.iters)}/it, '
            f'{many["threads_per_process"]} threads each), scaling {ratio:.2f}x  '
            f'({args.iters} iterations after {args.warmup} warm-up)')
    return [line], {'batch_size': args.batch_size, 'runs': {str(k): v for k, v in runs.items()},
                    'scaling': ratio}
