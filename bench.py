"""Speed of this implementation against the reference's algorithms, side by side in one run.

    python bench.py                       # CPU, default sizes (a few minutes on a small machine)
    python bench.py --device cuda         # the same on a GPU
    python bench.py --quick               # tiny sizes (the test suite runs this)
    python bench.py --only retrieval,loss --queries 300 --gallery 3000 --json out.json
    python bench.py --only ddp             # 1 process against 2 under torchrun (gloo)
    python bench.py --only backbones       # ResNet-18 against ResNet-50 (--backbone_size 224)
    python bench.py --only models          # every --model's training iteration against TIRG's

One line per figure: both timings, measured in the same run, and their ratio (on a machine shared
with other work, compare the two columns of a line).  Each section is a module of benchmarks/.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.abspath(__file__))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import backbones, bfloat16, data, ddp, loss, memory, models, retrieval, train  # noqa: E402
from benchmarks.command_line import (check_device, check_json_path, check_numbers,  # noqa: E402
                                     parse_batches, parse_counts, parse_size, write_json)
from benchmarks.common import header_line, machine_header, set_up_torch  # noqa: E402

# The sections in the order they run.  Each module's measure(args, device, tmp) returns the
# lines to print and the section's entry in --json; tmp is a folder removed after the run.
SECTIONS = {'retrieval': retrieval, 'loss': loss, 'train': train, 'backbones': backbones,
            'data': data, 'memory': memory, 'ddp': ddp, 'models': models, 'amp': bfloat16}


def get_args_parser():
    p = argparse.ArgumentParser(description='Benchmark this TIRG implementation against the '
                                            "reference's algorithms.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    p.add_argument('--queries', type=int, default=3000, help='retrieval: test queries')
    p.add_argument('--gallery', type=int, default=30000, help='retrieval: gallery images')
    p.add_argument('--dim', type=int, default=512, help='retrieval: feature dimension')
    p.add_argument('--repeats', type=int, default=3, help='retrieval: timed runs of ours (median)')
    p.add_argument('--loss_batches', type=parse_batches, default='32,128',
                   help='loss: comma-separated batch sizes (features 2B x 512)')
    p.add_argument('--loss_repeats', type=int, default=50, help='loss: timed runs of ours (median)')
    p.add_argument('--batch_size', type=int, default=32, help='train: batch size B')
    p.add_argument('--iters', type=int, default=10, help='train: timed iterations')
    p.add_argument('--warmup', type=int, default=2, help='train: warm-up iterations')
    p.add_argument('--backbone_size', type=int, default=224,
                   help='backbones: image size (square) for both backbones')
    p.add_argument('--workers', type=int, default=2, help='data: DataLoader workers (vs 0)')
    p.add_argument('--image_size', type=parse_size, default='1000x750',
                   help='data: generated JPEG size, WIDTHxHEIGHT')
    p.add_argument('--data_images', type=int, default=48, help='data: JPEG files generated')
    p.add_argument('--data_passes', type=int, default=2, help='data: timed passes over them')
    p.add_argument('--data_batches', type=int, default=6,
                   help='data: timed training batches of the FashionIQ, CIRR and Shoes loaders')
    p.add_argument('--fiq_path', default=None,
                   help='data: a FashionIQ tree to time instead of a generated one')
    p.add_argument('--cirr_path', default=None,
                   help='data: a CIRR tree to time instead of a generated one')
    p.add_argument('--shoes_path', default=None,
                   help='data: a Shoes tree to time instead of a generated one (--shoes_protocol=val)')
    p.add_argument('--memory_counts', type=parse_counts, default='300,3000',
                   help='memory: comma-separated numbers of sampled training examples')
    p.add_argument('--threads', type=int, default=0,
                   help="torch CPU threads (0: torch's default, which follows OMP_NUM_THREADS); "
                        'on a machine shared with other work, 1 avoids OpenMP threads thrashing')
    p.add_argument('--amp', action='store_true', help='train, backbones, models: as main.py --amp')
    p.add_argument('--channels_last', action='store_true',
                   help='train: channels-last memory format for both the loop and the bare step')
    p.add_argument('--model_image_size', type=int, default=224,
                   help='models: square image size (224: the photo datasets\' crop)')
    p.add_argument('--model_iters', type=int, default=2,
                   help='models: timed rounds (every model once a round, after one warm-up round)')
    p.add_argument('--skip_model_memory', action='store_true',
                   help='models: skip the peak-memory measurement (default: measured on CPU)')
    p.add_argument('--amp_sizes', type=parse_counts, default='64,224', help='amp: image sizes (square)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quick', action='store_true', help='tiny sizes (seconds; for tests)')
    p.add_argument('--only', default=','.join(SECTIONS), help='comma-separated sections: ' + ','.join(SECTIONS))
    p.add_argument('--json', default=None, metavar='FILE', help='also write the results here')
    # The ddp section runs this file again, once per process: what to do there.
    p.add_argument('--ddp_worker', default=None, help=argparse.SUPPRESS)
    p.add_argument('--ddp_data', default=None, help=argparse.SUPPRESS)
    return p


QUICK = {'queries': 200, 'gallery': 2000, 'dim': 64, 'repeats': 1, 'loss_repeats': 10,
         'batch_size': 4, 'iters': 2, 'warmup': 1, 'backbone_size': 64, 'image_size': (320, 240),
         'data_images': 8, 'data_passes': 1, 'data_batches': 2, 'memory_counts': [20, 200],
         'model_image_size': 64, 'model_iters': 1, 'amp_sizes': [32]}


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.quick:
        given = {a.split('=')[0].lstrip('-') for a in (sys.argv[1:] if argv is None else argv)
                 if a.startswith('--')}
        for name, value in QUICK.items():
            if name not in given:
                setattr(args, name, value)
    args.sections = [s.strip() for s in args.only.split(',') if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f'--only: unknown section(s) {", ".join(unknown)} (choose from {", ".join(SECTIONS)})')
    check_numbers(parser, args, ddp.PROCESSES)
    return args


def run(args):
    device = check_device(args.device)
    check_json_path(args.json)
    data.check_given_trees(args)  # a wrong tree ends the run before anything is timed
    set_up_torch(device, args.threads, args.seed)
    header = machine_header(device, args.amp)
    print(header_line(header), flush=True)
    results = {'header': header, 'args': dict(vars(args))}
    tmp = tempfile.mkdtemp(prefix='tirg_bench_')
    try:
        for section, module in SECTIONS.items():
            if section not in args.sections:
                continue
            start = time.perf_counter()
            lines, result = module.measure(args, device, tmp)
            result['section_wall_s'] = time.perf_counter() - start
            results[section] = result
            for line in lines:
                print(line, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        write_json(args.json, results)
        print('Wrote', args.json)
    return results


def main_cli(argv=None):
    args = parse_args(argv)
    if args.ddp_worker:
        return ddp.worker(args)
    run(args)
    return 0


if __name__ == '__main__':
    sys.exit(main_cli())
