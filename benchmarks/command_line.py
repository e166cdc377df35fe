"""What bench.py's command line reads and writes, apart from its flags: the types of its list
and size flags, --device and --json checked before anything is measured (a one-line exit, no
traceback), and the --json file written whole or not at all."""
import argparse
import json
import os

import torch


def parse_size(text):
    try:
        w, h = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: expected WIDTHxHEIGHT, e.g. 1000x750') from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f'{text!r}: at least 16x16')
    return w, h


def parse_batches(text):
    try:
        sizes = [int(v) for v in text.split(',')]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f'{text!r}: expected batch sizes of at least 2, e.g. 32,128')
    return sizes


def parse_counts(text):
    try:
        counts = [int(v) for v in text.split(',')]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: expected positive counts, e.g. 300,3000')
    return counts


def check_numbers(parser, args, ddp_processes):
    """The sizes and counts the sections need, checked as argparse's own errors are; the ddp
    section splits the batch over ddp_processes."""
    for name in ('queries', 'gallery', 'dim', 'repeats', 'loss_repeats', 'iters', 'data_images',
                 'data_passes', 'data_batches', 'backbone_size', 'model_image_size', 'model_iters'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1')
    if args.batch_size < 2:
        parser.error('--batch_size must be at least 2 (soft triplet loss)')
    if 'ddp' in args.sections and args.batch_size % ddp_processes:
        parser.error(f'--batch_size={args.batch_size}: the ddp section splits the batch over '
                     f'{ddp_processes} processes; give a multiple of {ddp_processes}')
    if args.workers < 1:
        parser.error('--workers must be at least 1 (0 workers is always measured)')
    if args.warmup < 0 or args.threads < 0:
        parser.error('--warmup and --threads must be 0 or more')


def check_device(name):
    """The torch device --device names; a one-line exit before anything is measured."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise SystemExit(f'bench.py: --device={name}: expected cpu or cuda[:N]')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'bench.py: --device={name} but CUDA is not available')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f'bench.py: --device={name}: this machine has {torch.cuda.device_count()} '
                         f'CUDA devices')
    return device


def check_json_path(path):
    """--json, when given, must be writable before the minutes of measuring, not after them."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f'bench.py: --json={path}: no such folder {folder}')
    if os.path.isdir(path):
        raise SystemExit(f'bench.py: --json={path}: is a folder, expected a file name')
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise SystemExit(f'bench.py: --json={path}: cannot write there (permission denied)')


def write_json(path, results):
    """Through a temporary file: a failed write leaves an earlier file of that name whole."""
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        with open(tmp, 'w') as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f'bench.py: --json={path}: cannot write ({e.strerror or e}); the '
                         f'results are printed above') from None
