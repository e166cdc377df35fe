"""Several processes under torchrun (SPEC section 9): process group set-up, which process writes,
and gathering features across processes.  Without torchrun's environment every function here is
the single-process identity, so main.py has one code path."""
import os
import socket

import torch
import torch.distributed as dist


def launched_by_torchrun():
    return all(name in os.environ for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_initialized() else 0


def world_size():
    return dist.get_world_size() if is_initialized() else 1


def local_rank():
    return int(os.environ.get('LOCAL_RANK', 0))


def is_main_process():
    return rank() == 0


def print0(*args, **kwargs):
    """print() on the first process only: the others print nothing but errors."""
    if is_main_process():
        print(*args, **kwargs)


def device_for_process(device):
    """Initialise the process group when torchrun started this process: one CUDA device per
    process (cuda:LOCAL_RANK) with nccl, or gloo on CPU.  Returns the device to use."""
    if not launched_by_torchrun() or is_initialized():
        return device
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank())
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        dist.init_process_group('gloo')
    _processes[:] = [None] * world_size()
    dist.all_gather_object(_processes, (socket.gethostname(), os.getpid()))
    return device


_processes = []  # (host, pid) of every process, by rank, gathered when the group is set up

# How a collective fails when another process is gone (gloo; nccl's watchdog aborts instead).
LOST_PEER_MESSAGES = ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe',
                      'Connection refused')


def describe_lost_process(error):
    """One line saying which process ended, when `error` is a collective that failed because
    another process is gone (killed, crashed); None for any other error."""
    if not is_initialized() or not isinstance(error, RuntimeError):
        return None
    host = socket.gethostname()
    lost = [(r, pid) for r, (h, pid) in enumerate(_processes)
            if h == host and r != rank() and _process_ended(pid)]
    if lost:
        r, pid = lost[0]
        return (f'process {r} of {world_size()} (pid {pid} on {host}) ended unexpectedly (killed '
                f'or crashed), so the training stopped')
    if any(message in str(error) for message in LOST_PEER_MESSAGES):
        return (f'a process on another machine ended unexpectedly (killed or crashed), so the '
                f'training stopped ({error.__class__.__name__}: connection lost)')
    return None


def _process_ended(pid):
    """Gone, or a zombie that its launcher has not reaped yet."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] in ('Z', 'X')
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False


def cleanup():
    if is_initialized():
        dist.destroy_process_group()


def barrier():
    if is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """The first process's `obj` on every process."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def any_process(flag, device):
    """True on every process when `flag` is true on any of them."""
    if not is_initialized():
        return bool(flag)
    if dist.get_backend() != 'nccl':
        device = torch.device('cpu')
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_buffers(model):
    """The first process's BatchNorm running statistics on every process: each process updated
    its own during training (from its slice of the batch), and the checkpoint holds the first's,
    so a sharded evaluation must use those to equal a single-process test of the checkpoint."""
    if not is_initialized():
        return
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def shard_range(n):
    """This process's contiguous share of `n` items.  Concatenated in rank order the shares are
    0 .. n-1 in order, so gathered results come out in the single-process order."""
    return range(n * rank() // world_size(), n * (rank() + 1) // world_size())


def slice_rows(batch_size):
    """Rows of every process's slice of a global batch, in rank order (sampling.EpochBatchSampler's
    cut: as even as the batch allows)."""
    world = world_size()
    return [batch_size * (r + 1) // world - batch_size * r // world for r in range(world)]


def gather_with_grad(x, rows=None):
    """Every process's `x` concatenated along dim 0 (rank order), differentiable: the backward of
    torch.distributed.nn's all_gather sums every process's gradient for this process's rows.
    `rows`: every process's row count, where they differ (a batch fitted to a training set
    smaller than --batch_size need not divide by the processes)."""
    if not is_initialized():
        return x
    import torch.distributed.nn.functional as dist_nn  # only needed with a process group
    if rows is None or len(set(rows)) == 1:
        return torch.cat(dist_nn.all_gather(x), dim=0)
    # all_gather needs equal shapes: pad every share to the longest, then trim.
    padded = torch.cat([x, x.new_zeros((max(rows) - x.shape[0],) + tuple(x.shape[1:]))])
    return torch.cat([part[:count] for part, count in zip(dist_nn.all_gather(padded), rows)])


def gather_rows(x):
    """Every process's rows of `x` in rank order, for shares of unequal length (evaluation
    features).  A process with an empty share may pass any tensor with no rows."""
    if not is_initialized():
        return x
    shapes = [None] * world_size()
    dist.all_gather_object(shapes, tuple(x.shape))
    rows = [shape[0] for shape in shapes]
    if max(rows) == 0:
        return x
    row_shape = next(shape[1:] for shape in shapes if shape[0] > 0)
    # all_gather needs equal shapes: pad every share to the longest, then trim.
    padded = x.new_zeros((max(rows),) + row_shape)
    if x.shape[0]:
        padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, rows)])


def from_first_process(x):
    """The first process's `x` on every process, in place.  The loss's random triplets must be
    the same on every process; each draws them (so that its stream advances as in a single
    process) and the first one's are used, whatever each device's generator holds."""
    if is_initialized():
        dist.broadcast(x, src=0)
    return x
