"""Several processes under torchrun (SPEC section 9): process group set-up, which process writes,
and gathering features across processes.  Without torchrun's environment every function here is
the single-process identity, so main.py has one code path."""
import os

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
    return device


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
