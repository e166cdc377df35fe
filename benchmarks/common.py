"""What every section shares: wall-clock timers (time.perf_counter, the device synchronised
around every timed region), durations as text, the machine's description, torch's set-up, --amp's
precision and autocast, and batches from a training loader without end."""
import os
import platform
import statistics
import time

import numpy as np
import torch

import amp


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, result) of one call, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def median_time(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        timed(fn, device)
    return statistics.median(timed(fn, device)[0] for _ in range(repeats))


def fmt_seconds(s):
    if s >= 100:
        return f'{s:.0f} s'
    if s >= 1:
        return f'{s:.2f} s'
    if s >= 1e-3:
        return f'{s * 1e3:.2f} ms'
    return f'{s * 1e6:.1f} us'


def device_description(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    name = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def precision(amp_flag, device):
    """What main.py --amp computes in on `device` (bfloat16 or float32; amp.choose)."""
    return amp.choose(amp_flag, device.type)[0]


def autocast(amp_flag, device):
    return amp.autocast(precision(amp_flag, device), device.type)


def endless_batches(loader, sampler):
    """A training loader's batches epoch after epoch, each epoch's order drawn as training does."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def set_up_torch(device, threads, seed):
    """Before any section: exact float32 on CUDA, --threads, and the seeds."""
    if device.type == 'cuda':
        # Exact float32 (the default): the retrieval comparison relies on it.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)


def machine_header(device, amp_flag):
    """What the figures depend on beyond the code: the --json file's 'header'."""
    return {
        'device': str(device), 'device_name': device_description(device),
        'torch': torch.__version__, 'numpy': np.__version__, 'python': platform.python_version(),
        'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
        'amp': precision(amp_flag, device) == amp.BFLOAT16,
        'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
    }


def header_line(header):
    return (f'device {header["device"]} ({header["device_name"]}), torch {header["torch"]}, '
            f'numpy {header["numpy"]}, {header["threads"]} threads, {header["cpu_count"]} CPUs, '
            f'load average {" ".join(f"{v:.2f}" for v in header["load_average"] or [])}'
            + (', bf16 autocast' if header['amp'] else ''))
