"""Peak resident memory of a function, measured in a forked child (Linux: exact start and peak)."""
import sys

import torch


def _resident_kb(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise OSError(f'/proc/self/status has no {field}')


def _fix_malloc_mmap_threshold():
    """glibc raises its mmap threshold after each large block freed, so that later image-sized
    blocks come from the heap, whose holes can grow it by ~1 MB a batch with 0 workers (a real
    ResNet's larger activations break that pattern; it is not memory held).  A fixed threshold
    (glibc's initial 128 KB) makes the figure measure what the code holds."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _measure_in_child(fn, warmup, conn):
    import resource
    torch.set_num_threads(1)  # as DataLoader workers do after a fork
    _fix_malloc_mmap_threshold()
    try:
        if warmup is not None:
            warmup()
        try:  # Linux: reset the high-water mark to the current resident size
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            start_kb = _resident_kb('VmRSS')
        except OSError:
            start_kb = None
        fn()
        if start_kb is not None:
            start, peak = start_kb * 1024, _resident_kb('VmHWM') * 1024
        else:  # inherited from the parent's peak: an upper bound of the start
            scale = 1 if sys.platform == 'darwin' else 1024
            start, peak = None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        conn.send({'start_bytes': start, 'peak_bytes': peak})
    except BaseException as e:  # noqa: B036 - reported to the parent, which raises
        conn.send({'error': f'{type(e).__name__}: {e}'})
    finally:
        conn.close()


def peak_memory(fn, warmup=None):
    """{'start_bytes', 'peak_bytes'}: resident memory of a forked child at the start of fn() and
    at its peak while fn() runs; the parent's own memory is left as it was.  `warmup()` runs
    first, unmeasured: a forked child maps the parent's library code again as it first runs it."""
    import multiprocessing
    context = multiprocessing.get_context('fork')
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_measure_in_child, args=(fn, warmup, send))
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {'error': 'the measuring process died (out of memory?)'}
    child.join()
    if 'error' in result:
        raise RuntimeError(f'peak_memory: {result["error"]}')
    return result
