"""Train and test TIRG and its baselines (SPEC sections 1, 5, 7 and 9).

    python main.py                                   # TIRG on the synthetic CSS data (generated)
    python main.py --dataset=css3d --dataset_path=DIR --num_iters=160000 --model=tirg
    python main.py --test_only --checkpoint=runs/.../latest_checkpoint.pth --dataset_path=DIR
    python main.py <the run's flags> --resume=runs/.../latest_checkpoint.pth
    torchrun --nproc_per_node=8 main.py <the same flags>      # one process per GPU, same experiment
"""
import argparse
import contextlib
import datetime
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import datasets
import distributed
import img_text_composition_models
import model_registry
import paper_composers
import run_lock
import test_retrieval
import text_model
from experiment import (DEFAULT_DATASET_PATH, UserError, add_photo_benchmark_flags,  # noqa: F401
                        adopt_checkpoint_architecture, adopt_checkpoint_dataset,
                        adopt_checkpoint_query_images, build_vocabulary, check_css_query_images,
                        create_model, ensure_default_dataset, load_dataset, load_model_weights,
                        seed_everything, select_device)

# What the best checkpoint tracks, per dataset (SPEC 2.4, 2.5, 2.6; recall@1 for the reference's three).
TRACKED_METRICS = {'fashioniq': 'test recall_mean', 'cirr': 'test recall_avg', 'shoes': 'test recall_mean'}
DEFAULT_TRACKED_METRIC = 'test recall_top1_correct_composition'
# EpochBatchSampler seeds each epoch with seed * SEED_STRIDE + epoch, which must fit in 64 bits.
SEED_STRIDE = 1000003
MAX_SEED = 2 ** 32 - 1
MAX_EMBED_DIM = 4096
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_FOLDER_NAME = 255  # bytes, on common file systems


def get_args_parser():
    # allow_abbrev=False: an abbreviation (--num_it) would otherwise be accepted for one flag and
    # then compared under its short name on resume.
    p = argparse.ArgumentParser(description='Train and test TIRG (CVPR 2019) and its baselines.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    p.add_argument('-f', type=str, default='', help='ignored (lets the script run in a notebook)')
    p.add_argument('--comment', type=str, default='test_notebook', help='suffix of the run folder name')
    p.add_argument('--dataset', type=str, default='css3d',
                   choices=['css3d', 'fashion200k', 'mitstates', 'fashioniq', 'cirr', 'shoes'], help='dataset')
    p.add_argument('--dataset_path', type=str, default=DEFAULT_DATASET_PATH,
                   help='dataset root; the default folder is filled with synthetic CSS data when empty')
    p.add_argument('--model', type=str, default='tirg', choices=list(model_registry.MODELS),
                   help='composition model')
    p.add_argument('--embed_dim', type=int, default=512, help='joint embedding, word embedding and LSTM size')
    p.add_argument('--learning_rate', type=float, default=1e-2, help='base learning rate')
    p.add_argument('--learning_rate_decay_frequency', type=int, default=9999999,
                   help='multiply every learning rate by 0.1 each time this many iterations pass')
    p.add_argument('--batch_size', type=int, default=32,
                   help='training and test batch size (the global batch under torchrun)')
    p.add_argument('--weight_decay', type=float, default=1e-6, help='SGD weight decay')
    p.add_argument('--num_iters', type=int, default=210000, help='training iterations')
    p.add_argument('--loss', type=str, default='soft_triplet', choices=['soft_triplet', 'batch_based_classification'],
                   help='training loss')
    p.add_argument('--loader_num_workers', type=int, default=4,
                   help='DataLoader workers (at most the CPUs available to the process)')
    # Beyond the reference.
    p.add_argument('--device', type=str, default='auto',
                   help='auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps; under torchrun '
                        'each process takes cuda:LOCAL_RANK')
    p.add_argument('--seed', type=int, default=None, help='random seed (default: drawn at random and recorded)')
    p.add_argument('--img_backbone', type=str, default='resnet18',
                   choices=list(img_text_composition_models.BACKBONES),
                   help="image encoder: resnet18 (the reference's) or resnet50 (most later papers'); "
                        "--checkpoint, --test_only and --resume take the checkpoint's")
    p.add_argument('--img_weights', type=str, default='imagenet',
                   help="image encoder initialisation: 'imagenet' (torchvision's IMAGENET1K_V1 "
                        "file in its cache under TORCH_HOME), 'none', or a path to a state dict "
                        "of the --img_backbone network")
    p.add_argument('--checkpoint', type=str, default=None,
                   help='load model weights from this checkpoint (ours or the released format) first')
    p.add_argument('--resume', type=str, default=None,
                   help="continue the run that wrote this checkpoint: in its run folder when it is "
                        "the run's latest_checkpoint.pth, else in a new run folder")
    p.add_argument('--vocab_order', type=str, default=None, choices=['sorted', 'first_seen'],
                   help='word numbering when the vocabulary is built from the training texts: '
                        'sorted (new runs, SPEC 3) or first_seen (the 2019 code, with which the '
                        'released checkpoints were trained); default: sorted for new runs, '
                        'first_seen for a --checkpoint without a vocabulary')
    p.add_argument('--f200k_label_order', type=str, default=None,
                   help='Fashion200k: comma-separated label-file names giving the order in which '
                        'they are read (default: sorted names)')
    add_photo_benchmark_flags(p, 'all', 'FashionIQ categories trained and tested')
    p.add_argument('--css_query_images', type=str, default='3d', choices=['3d', '2d'],
                   help="CSS: the query (source) images, in training and test: '3d' the rendered "
                        "PNGs, '2d' the 2D drawings of their scenes (the paper's 2D->3D; targets "
                        "and gallery stay the PNGs, so it needs images/)")
    p.add_argument('--test_only', action='store_true', help='run the retrieval test once and exit')
    p.add_argument('--test_split', type=str, default='test', choices=['train', 'test', 'test1'],
                   help="split evaluated by --test_only ('test1': CIRR's evaluation-server files)")
    p.add_argument('--sync_bn', action='store_true',
                   help='under torchrun on CUDA: BatchNorm statistics over the global batch')
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast on CUDA (off: exact float32)')
    p.add_argument('--channels_last', action='store_true', help='channels-last memory format for the CNN')
    p.add_argument('--fast_decode', action='store_true',
                   help='decode JPEGs at reduced size before Resize(224) (faster; changes pixels slightly)')
    return p


def explicit_flags(argv):
    """Names of the flags given on the command line (so a checkpoint's options can fill in the rest)."""
    return sorted({a.split('=')[0].lstrip('-') for a in argv if a.startswith('--')})


def parse_opt(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opt = get_args_parser().parse_args(argv)
    opt.explicit_flags = explicit_flags(argv)
    # Absolute, so that the checkpoint names the same data from any working directory.
    opt.dataset_path = os.path.abspath(opt.dataset_path)
    return opt


def check_opt(opt):
    for name in ('batch_size', 'embed_dim', 'num_iters', 'learning_rate_decay_frequency'):
        if getattr(opt, name) < 1:
            raise UserError(f'--{name}={getattr(opt, name)}: expected a positive integer')
    if opt.embed_dim > MAX_EMBED_DIM:
        raise UserError(f'--embed_dim={opt.embed_dim}: expected at most {MAX_EMBED_DIM} (the paper '
                        f'uses 512; the LSTM alone grows with its square)')
    for name in ('learning_rate', 'weight_decay'):
        value = getattr(opt, name)
        # The model trains in float32: a larger value becomes inf in the optimizer.
        if not np.isfinite(value) or value < 0 or value > FLOAT32_MAX:
            raise UserError(f'--{name}={value}: expected a number from 0 to {FLOAT32_MAX:.4g} '
                            f'(float32)')
    check_comment(opt.comment)
    if opt.loader_num_workers < 0:
        raise UserError(f'--loader_num_workers={opt.loader_num_workers}: expected 0 or more')
    if opt.seed is not None and not 0 <= opt.seed <= MAX_SEED:
        raise UserError(f'--seed={opt.seed}: expected an integer from 0 to {MAX_SEED}')
    if opt.loss == 'soft_triplet' and opt.batch_size < 2:
        raise UserError('--batch_size=1: the soft triplet loss needs at least 2 examples a batch')
    for name in ('checkpoint', 'resume'):
        path = getattr(opt, name)
        if path is not None and not os.path.isfile(path):
            raise UserError(f'--{name}={path}: no such file')
    if opt.resume and opt.test_only:
        raise UserError('--resume continues training; evaluate a checkpoint with --test_only '
                        '--checkpoint=PATH')


def check_comment(comment):
    """The comment ends a folder name: one path component, within the file system's name limit."""
    if os.sep in comment or (os.altsep and os.altsep in comment) or '\0' in comment:
        raise UserError(f'--comment={comment}: it ends the run folder\'s name, so it cannot hold '
                        f'{os.sep!r}; expected a plain name such as _tirg_css')
    longest = len(run_folder_name('Dec31_23-59-59', 999, comment).encode())
    if longest > MAX_FOLDER_NAME:
        raise UserError(f'--comment={comment[:40]}...: the run folder\'s name would be {longest} '
                        f'bytes; expected a comment that keeps it within {MAX_FOLDER_NAME}')


def check_writable_folders(opt):
    """Where the run will write, checked before any data is read: runs/ in the working folder,
    or the folder of a run that continues in place."""
    if opt.resume and resume_in_place(opt.resume):
        folder = os.path.dirname(os.path.abspath(opt.resume))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f'--resume={opt.resume}: its run folder {folder} is not writable; '
                            f'the run continues there, so it must be')
        return
    folder = 'runs' if os.path.exists('runs') else '.'
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f'{os.path.abspath(folder)} is not a writable folder: main.py writes its run '
                        f'folder under runs/ in the working folder; start it from a writable one')


def check_img_weights(opt):
    if opt.img_weights in ('imagenet', 'none'):
        return
    title = img_text_composition_models.BACKBONES[opt.img_backbone].title
    if not os.path.isfile(opt.img_weights):
        what = ('a folder, not a file' if os.path.isdir(opt.img_weights) else
                'not a regular file' if os.path.exists(opt.img_weights) else 'no such file')
        raise UserError(f"--img_weights={opt.img_weights}: {what} (expected 'imagenet', "
                        f"'none' or a path to a {title} state dict)")
    try:
        img_text_composition_models.load_resnet(opt.img_backbone, opt.img_weights)
    except img_text_composition_models.WeightsUnavailableError as e:
        raise UserError(str(e)) from None  # the message already names --img_weights=PATH


def cap_loader_workers(opt):
    """More workers than CPUs only adds contention (and a PyTorch warning per loader)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    if opt.loader_num_workers > cpus:
        distributed.print0(f'Using {cpus} DataLoader workers: --loader_num_workers='
                           f'{opt.loader_num_workers}, but this process has {cpus} CPUs')
        opt.loader_num_workers = cpus


def seed_process(opt, rank):
    """Training examples draw from generators keyed by their position (datasets.DrawKey), not
    from these.  torch's stream (dropout, the loss's triplet negatives) is seed + rank: each
    process's slice of the batch gets its own dropout masks (SPEC 9), and the triplets are the
    first process's on every process (distributed.from_first_process)."""
    seed_everything(opt.seed)
    torch.manual_seed(opt.seed + rank)


def create_optimizer(opt, model):
    """Pretrained layers learn at a tenth of the rate on real images; on CSS everything at lr."""
    if opt.dataset == 'css3d':
        groups = [{'params': list(model.parameters())}]
    else:
        fc = list(model.img_model.fc.parameters())
        fc_ids = {id(p) for p in fc}
        backbone = [p for p in model.img_model.parameters() if id(p) not in fc_ids]
        img_ids = {id(p) for p in model.img_model.parameters()}
        rest = [p for p in model.parameters() if id(p) not in img_ids]
        groups = [{'params': fc, 'lr': opt.learning_rate},
                  {'params': backbone, 'lr': 0.1 * opt.learning_rate},
                  {'params': rest}]
    return torch.optim.SGD(groups, lr=opt.learning_rate, momentum=0.9, weight_decay=opt.weight_decay)


def decay_learning_rate(opt, optimizer, it):
    if it >= opt.learning_rate_decay_frequency and it % opt.learning_rate_decay_frequency == 0:
        for group in optimizer.param_groups:
            group['lr'] *= 0.1


def autocast(opt, device):
    if opt.amp and device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrainingStopped(Exception):
    pass


def train_one_iteration(opt, model, optimizer, batch, device):
    """`model` is the composition model, or its DistributedDataParallel wrapper: its forward is the
    loss, which gathers the global batch's features when several processes train."""
    memory_format = torch.channels_last if opt.channels_last else torch.contiguous_format
    source = batch['source_img_data'].to(device, non_blocking=True, memory_format=memory_format)
    target = batch['target_img_data'].to(device, non_blocking=True, memory_format=memory_format)
    # A batch fitted to a small training set may not divide by the processes (fit_batch_size).
    rows = distributed.slice_rows(opt.batch_size)
    uneven = {'slice_rows': rows} if len(set(rows)) > 1 else {}
    with autocast(opt, device):
        loss = model(source, batch['mod_str'], target, soft_triplet_loss=opt.loss == 'soft_triplet',
                     **uneven)
    loss_value = float(loss.detach())
    if not np.isfinite(loss_value):
        raise TrainingStopped(f'the {opt.loss} loss is {loss_value} at this iteration; '
                              f'try a lower --learning_rate (now {opt.learning_rate})')
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {opt.loss: loss_value, 'total training loss': loss_value}


class InterruptFlag:
    """First Ctrl-C or SIGTERM (sent by torchrun and cluster schedulers before they kill): finish
    the iteration, save and exit.  Another signal later than REPEAT_WINDOW seconds: abort at once.
    Signals within the window are one request: under torchrun, or SLURM, a worker receives the
    same request twice at once (from the terminal or scheduler, and forwarded by torchrun).

    Inside `interruptible()` (a retrieval test, which changes no state and may take minutes) the
    first signal stops at once with KeyboardInterrupt, and the caller saves."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_WINDOW = 1.0

    def __init__(self):
        self.received = []
        self.first_time = None
        self.immediate = False
        self.aborted = False

    @property
    def raised(self):
        return bool(self.received)

    def exit_code(self):
        return 128 + int(self.received[0]) if self.received else 130

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    @contextlib.contextmanager
    def interruptible(self):
        self.immediate = True
        try:
            yield
        finally:
            self.immediate = False

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.first_time is None:
            self.first_time = now
            self.received.append(signum)
            name = 'Interrupted' if signum == signal.SIGINT else 'Terminated (SIGTERM)'
            print(f'\n{name}: finishing this iteration, then saving (Ctrl-C again to abort)',
                  file=sys.stderr, flush=True)
            if self.immediate:
                raise KeyboardInterrupt
        elif now - self.first_time > self.REPEAT_WINDOW:
            self.aborted = True
            raise KeyboardInterrupt


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled full batches (drop_last), the order fixed by (seed, epoch) so that a resumed run
    continues an epoch exactly where it stopped.  Under torchrun each process takes its slice of
    every global batch, so the global order does not depend on the number of processes.  It
    yields a datasets.DrawKey per example: the dataset draws the example's random parts from
    generators seeded by the key, so the global batch's contents do not depend on the processes
    or loader workers either (SPEC 9)."""

    def __init__(self, size, batch_size, seed, rank=0, world_size=1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def batches_per_epoch(self):
        return self.size // self.batch_size

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.batches_per_epoch() - self.start_batch

    def local_slice(self):
        """This process's positions within a global batch (as even as the batch allows)."""
        return (self.batch_size * self.rank // self.world_size,
                self.batch_size * (self.rank + 1) // self.world_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        first, last = self.local_slice()
        for b in range(self.start_batch, self.batches_per_epoch()):
            positions = range(b * self.batch_size + first, b * self.batch_size + last)
            yield [datasets.DrawKey(order[p], self.seed, self.epoch, p, order[p - p % 2])
                   for p in positions]


def make_train_loader(opt, trainset, sampler, device, rank=0):
    workers = opt.loader_num_workers
    # Worker seeds come from this generator, not the global one, so that the number of loaders
    # created (fresh run or resume) does not change the global random stream.  No example is
    # drawn from a worker's stream: the sampler's keys decide them.
    loader_seed = opt.seed + rank
    return torch.utils.data.DataLoader(
        trainset, batch_sampler=sampler, num_workers=workers,
        collate_fn=datasets.collate_training_batch, worker_init_fn=datasets.worker_init_fn,
        pin_memory=device.type == 'cuda', persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(loader_seed))


def num_training_examples(dataset):
    """Examples an epoch passes over: triplets for FashionIQ, CIRR and Shoes, images for the others."""
    count = getattr(dataset, 'num_training_examples', None)
    return count() if count is not None else len(dataset)


# ---------------------------------------------------------------------------------------------
# Resuming: the run's own options, and where it goes on.

# Flags that may differ between the sessions of one run: where, how fast and how long it runs,
# not what it computes.
RESUMABLE_FLAGS = {'resume', 'num_iters', 'loader_num_workers', 'device', 'dataset_path', 'amp',
                   'channels_last', 'fast_decode', 'sync_bn', 'comment', 'f'}


def options_for_resume(opt, ckpt):
    """The run's own options.  A flag given again with the run's value is fine (the original
    command plus --resume works); a real change of a flag that shapes the experiment is refused."""
    saved = ckpt.get('opt')
    if 'optimizer_state_dict' not in ckpt or not isinstance(saved, argparse.Namespace):
        raise UserError(f'--resume={opt.resume}: this checkpoint holds only model weights '
                        f'(released format?); use --checkpoint to start a new run from it')
    checkpoints.check_resumable(ckpt, opt.resume)
    defaults = get_args_parser().parse_args([])
    if opt.checkpoint is not None:
        raise UserError('--checkpoint starts a new run from weights; --resume continues one: give one of them')
    for flag in opt.explicit_flags:
        if flag in RESUMABLE_FLAGS or not hasattr(defaults, flag):
            continue
        before, given = getattr(saved, flag, getattr(defaults, flag)), getattr(opt, flag)
        if flag == 'batch_size' and given == getattr(saved, 'requested_batch_size', None):
            continue  # the original command on a training set smaller than its batch
        if given != before:
            changeable = ', '.join('--' + f for f in sorted(RESUMABLE_FLAGS - {'resume', 'f'}))
            raise UserError(f'--{flag}={given}: the run in {opt.resume} used --{flag}={before}; '
                            f'only {changeable} can change when resuming')
    resumed = argparse.Namespace(**{**vars(defaults), **vars(saved)})
    # A batch fitted to a small training set is fitted again (for this number of processes)
    # from the user's own value.
    resumed.batch_size = vars(resumed).pop('requested_batch_size', resumed.batch_size)
    for flag in opt.explicit_flags:
        setattr(resumed, flag, getattr(opt, flag))
    resumed.resume, resumed.checkpoint, resumed.test_only = opt.resume, None, False
    resumed.explicit_flags = opt.explicit_flags
    if 'dataset_path' not in opt.explicit_flags:
        resumed.dataset_path = os.path.abspath(saved.dataset_path)
        if not os.path.isdir(resumed.dataset_path):
            raise UserError(f'--resume={opt.resume}: the run\'s dataset folder {resumed.dataset_path} '
                            f'is not there; give --dataset_path=DIR')
    return resumed


# Options a checkpoint stores that say how that session was started, not what it trains.
UNCHECKED_SAVED_OPTIONS = {'f', 'resume', 'checkpoint', 'test_only'}
TYPE_NAMES = {int: 'an integer', float: 'a number', str: 'a text'}


def load_checkpoint(path):
    """checkpoints.load, then the checkpoint's options checked as flags: they are input too."""
    ckpt = checkpoints.load(path)
    check_checkpoint_options(ckpt, path)
    return ckpt


def check_checkpoint_options(ckpt, path):
    """Each option a checkpoint stores is parsed and checked exactly as the same flag on the
    command line: types and choices by get_args_parser(), then check_opt.  Flags added to the
    parser are covered without a list here.  Options the parser does not know are left alone."""
    saved = ckpt.get('opt')
    if saved is None:
        return
    if not isinstance(saved, argparse.Namespace):
        raise checkpoints.CheckpointError(f'{path}: its options ("opt") are a '
                                          f'{type(saved).__name__}, not an argparse Namespace')

    def refuse(message):
        raise checkpoints.CheckpointError(f'{path}: its stored options are not valid flags: {message}')
    parser = get_args_parser()
    defaults = vars(parser.parse_args([]))
    stored = {name: getattr(saved, name) for name in defaults
              if hasattr(saved, name) and name not in UNCHECKED_SAVED_OPTIONS}
    argv = []
    for name, value in stored.items():
        if isinstance(defaults[name], bool):  # a store_true flag
            if not isinstance(value, bool):
                refuse(f'--{name}={value!r}: expected True or False')
            argv += [f'--{name}'] if value else []
        elif value is None and defaults[name] is None:
            continue
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            argv.append(f'--{name}={value}')
        else:
            refuse(f'--{name}={value!r}: a {type(value).__name__}, not a value a flag can take')
    parser.error = refuse  # argparse's own message: invalid choice, invalid int value, ...
    parsed = parser.parse_args(argv)
    for name, value in stored.items():
        flag_value = getattr(parsed, name)
        same = type(flag_value) is type(value) or (isinstance(flag_value, float) and type(value) is int)
        if value is not None and not same:
            refuse(f'--{name}={value!r}: a {type(value).__name__}, expected '
                   f'{TYPE_NAMES.get(type(flag_value), type(flag_value).__name__)}')
    try:
        check_opt(parsed)
    except UserError as e:
        refuse(str(e))


def check_resume_target(opt, ckpt):
    it = int(ckpt['it'])
    if opt.num_iters < it or (opt.num_iters == it and ckpt.get('finished', False)):
        raise UserError(f'--num_iters={opt.num_iters}: the run in {opt.resume} is already at '
                        f'iteration {it}; give a larger --num_iters to train further')


def resume_in_place(path):
    """Only a run's latest checkpoint continues in its folder: resuming from an older one
    (best_checkpoint.pth) there would overwrite the later work, so it gets a new folder."""
    return os.path.basename(path) == 'latest_checkpoint.pth'


# ---------------------------------------------------------------------------------------------
# Run folder, logs and metrics (written by the first process only).

class NullLogger:
    """What processes other than the first log to: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def run_folder_name(stamp, n, comment):
    return f'{stamp}_{socket.gethostname()}{"" if n == 1 else f".{n}"}{comment}'


def create_run_folder(comment):
    """tensorboardX's `runs/<date>_<time>_<host><comment>`, created atomically: when the name is
    taken (two runs started in the same second), `.2`, `.3`, ... follow the host name."""
    stamp = datetime.datetime.now().strftime('%b%d_%H-%M-%S')
    os.makedirs('runs', exist_ok=True)
    for n in range(1, 1000):
        path = os.path.join('runs', run_folder_name(stamp, n, comment))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise UserError(f'runs/: cannot create a new run folder for {stamp}{comment}')


class RefusedByFirstProcess(Exception):
    """Under torchrun: the first process refused to start and says why; the others exit quietly."""


def lock_resumed_run_folder(opt):
    """A run continuing in its folder holds the folder's lock from before any data is read until
    it exits (a new run folder is locked as it is created).  Under torchrun the first process,
    the only one that writes, takes it, after the process group exists: every process learns the
    outcome from it, so none waits in a collective for a process that has left."""
    if not (opt.resume and resume_in_place(opt.resume)):
        return
    refusal = None
    if distributed.is_main_process():
        try:
            run_lock.acquire(os.path.dirname(os.path.abspath(opt.resume)))
        except run_lock.FolderInUse as e:
            refusal = str(e)
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        raise run_lock.FolderInUse(refusal) if distributed.is_main_process() else RefusedByFirstProcess()


def open_run(opt):
    """The run folder and its tensorboard writer.  A run resumed from its latest checkpoint keeps
    writing in its own folder, dropping any events logged after that checkpoint."""
    from event_log import EventLog
    if not distributed.is_main_process():
        return NullLogger(), None
    if opt.resume and resume_in_place(opt.resume):
        run_dir = os.path.dirname(os.path.abspath(opt.resume))
        logger = EventLog(run_dir, purge_step=opt.resume_it + 1)
    else:
        run_dir = create_run_folder(opt.comment)
        run_lock.acquire(run_dir)
        logger = EventLog(run_dir)
        for key, value in sorted(vars(opt).items()):
            logger.add_text(key, str(value))
        if opt.resume:
            print(f'{opt.resume} is not its run\'s latest checkpoint: continuing in a new run '
                  f'folder, so the later work of that run is kept')
    print('Run folder:', run_dir)
    return logger, run_dir


OPTIONS_FILE = 'options.json'


def project_version(folder=os.path.dirname(os.path.abspath(__file__))):
    """(git commit, whether tracked files differ from it) of the project's folder, or
    (None, None) outside git or without git."""
    def git(*args):
        result = subprocess.run(['git', '-C', folder] + list(args), capture_output=True, text=True,
                                timeout=30)
        return result.stdout.strip() if result.returncode == 0 else None
    try:
        commit = git('rev-parse', 'HEAD')
        changes = git('status', '--porcelain', '--untracked-files=no') if commit else None
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, None if changes is None else bool(changes)


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return device.type


def run_record(opt, device):
    """What options.json holds: every option and what else the numbers depend on."""
    commit, modified = project_version()
    return {'options': {k: v for k, v in sorted(vars(opt).items()) if k != 'explicit_flags'},
            'explicit_flags': getattr(opt, 'explicit_flags', []),
            'seed': opt.seed, 'torch_version': torch.__version__,
            'project_version': commit, 'project_modified': modified,
            'device': str(device), 'device_name': device_name(device),
            'processes': distributed.world_size(), 'host': socket.gethostname(),
            'started': datetime.datetime.now().isoformat(timespec='seconds')}


def write_options_file(run_dir, opt, device):
    """options.json, written once when the run folder is new (a run resumed in its own folder
    keeps the file its start wrote), atomically: never a half-written file."""
    path = os.path.join(run_dir, OPTIONS_FILE)
    if os.path.exists(path):
        return
    # A failed write (a full disk) is one line naming the file.
    checkpoints.write_text_atomic(json.dumps(run_record(opt, device), indent=1, default=str) + '\n',
                                  path)


def redoes_final_evaluation(opt, ckpt):
    """Whether a run resumed from `ckpt` starts by redoing the final evaluation at its iteration
    (the run stopped between that evaluation and the save marking it finished).  An epoch start
    redone after a failed or interrupted evaluation logged nothing at the checkpoint's iteration;
    a finished run's final evaluation stays, as its result."""
    return not ckpt.get('finished', False) and int(ckpt['it']) >= opt.num_iters


def drop_metrics_after_checkpoint(run_dir, ckpt, evaluates_first):
    """metrics.jsonl as it was at the checkpoint, as purge_step does for the tensorboard events:
    an evaluation logged after it (the process was killed before it saved) is written again by
    the resumed run.  Rewritten through a temporary file, so a kill now loses nothing."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    last = int(ckpt['it']) - (1 if evaluates_first else 0)
    kept = [line for n, line in enumerate(lines)
            if not logged_after(line, last, torn=n == len(lines) - 1 and not line.endswith('\n'))]
    if len(kept) < len(lines):
        checkpoints.write_text_atomic(''.join(kept), path)
        print(f'{path}: dropped {len(lines) - len(kept)} lines logged after the checkpoint '
              f'(iteration {ckpt["it"]}); the resumed run writes them again')


def logged_after(line, it, torn=False):
    """A line of an evaluation after iteration `it`, or the torn last line of a killed write."""
    try:
        record = json.loads(line)
    except ValueError:
        return torn  # a line of someone else's stays
    logged = record.get('it') if isinstance(record, dict) else None
    return isinstance(logged, int) and logged > it


def append_metrics_line(run_dir, record):
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


def log_retrieval_examples(logger, dataset, features, it, count=4, k=5):
    """Tensorboard image 'retrieval examples': `count` fixed, evenly spaced test queries, one row
    each (source image and text), then their top-k results, the correct ones framed in green.
    It reuses the retrieval test's features and draws from no random generator."""
    import retrieval_grid
    queries = dataset.get_test_queries()
    ids = sorted({i * len(queries) // count for i in range(count)})
    exclude = None if features['exclude'] is None else features['exclude'][ids]
    scores, neighbours = test_retrieval.top_k_with_scores(features['query'][ids],
                                                          features['gallery'], k, exclude)
    rows = [retrieval_grid.result_row(
        dataset, retrieval_grid.display_query_image(dataset, queries[i]['source_img_id']),
        queries[i]['mod']['str'], scores[r].tolist(), neighbours[r].tolist(),
        queries[i]['target_caption'], f'target: {queries[i]["target_caption"]}')
        for r, i in enumerate(ids)]
    picture = np.asarray(retrieval_grid.draw_rows(rows).convert('RGB'))
    logger.add_image('retrieval examples', picture, it, dataformats='HWC')


def evaluate_split(opt, model, dataset, features=None):
    """[(metric name, recall)] of one split, by the dataset's own protocol."""
    if opt.dataset == 'fashioniq' and dataset.get_test_queries():
        import fashioniq
        return fashioniq.evaluate(model, dataset, opt.batch_size, opt.loader_num_workers)
    if opt.dataset == 'cirr' and dataset.get_test_queries():
        import cirr
        return cirr.evaluate(model, dataset, opt.batch_size, opt.loader_num_workers)
    if opt.dataset == 'shoes' and dataset.get_test_queries():
        import shoes
        return shoes.evaluate(model, dataset, opt.batch_size, opt.loader_num_workers)
    return test_retrieval.test(opt, model, dataset, features=features)


def evaluate(opt, model, named_sets, logger, it, epoch, run_dir):
    """Every process computes (its share of the features); the first one logs."""
    distributed.broadcast_buffers(model)
    metrics = {}
    for split, dataset in named_sets:
        show_examples = (split == 'test' and opt.dataset in ('css3d', 'fashion200k', 'mitstates')
                         and distributed.is_main_process() and bool(dataset.get_test_queries()))
        features = {} if show_examples else None
        for name, value in evaluate_split(opt, model, dataset, features):
            metrics[f'{split} {name}'] = value
        if show_examples:
            log_retrieval_examples(logger, dataset, features, it)
    for name, value in metrics.items():
        logger.add_scalar(name, value, it)  # stored as tensorboardX cleans it: test_recall_top1_...
        distributed.print0('    ', name, round(value, 4))
    if run_dir is not None:
        append_metrics_line(run_dir, {'it': it, 'epoch': epoch, **metrics})
    return metrics


# ---------------------------------------------------------------------------------------------
# Checkpoints.

def build_checkpoint(opt, model, optimizer, progress):
    return {
        'it': progress['it'],
        'opt': opt,
        'model_state_dict': model.state_dict(),
        'format_version': checkpoints.FORMAT_VERSION,
        'vocab': model.text_model.vocab.words(),
        'optimizer_state_dict': optimizer.state_dict(),
        'epoch': progress['epoch'],
        'batches_done': progress['batches_done'],
        'losses': progress['losses'],
        'best_recall': progress['best_recall'],
        'finished': progress.get('finished', False),
        'rng': checkpoints.rng_states(),
    }


def save_checkpoint(run, progress, name='latest_checkpoint.pth'):
    """Written by the first process only; returns the path there (None elsewhere)."""
    if run['dir'] is None:
        return None
    path = os.path.join(run['dir'], name)
    checkpoints.save_atomic(
        build_checkpoint(run['opt'], run['model'], run['optimizer'], progress), path)
    return path


def log_epoch_losses(run, progress):
    logger, it = run['logger'], progress['it']
    for name, values in progress['losses'].items():
        distributed.print0('    Loss', name, round(float(np.mean(values)), 4))
        logger.add_scalar(name, np.mean(values), it)
    logger.add_scalar('learning_rate', run['optimizer'].param_groups[0]['lr'], it)


def tracked_metric(opt):
    return TRACKED_METRICS.get(opt.dataset, DEFAULT_TRACKED_METRIC)


def checkpoint_and_evaluate(run, progress, test_now):
    """The reference's start-of-epoch block: losses, retrieval test, checkpoint."""
    opt = run['opt']
    log_epoch_losses(run, progress)
    if test_now:
        with run['interrupt'].interruptible():
            metrics = evaluate(opt, run['model'], [('train', run['trainset']), ('test', run['testset'])],
                               run['logger'], progress['it'], progress['epoch'], run['dir'])
        recall = metrics.get(tracked_metric(opt))
        if recall is not None and (progress['best_recall'] is None or recall > progress['best_recall']):
            progress['best_recall'] = recall
            save_checkpoint(run, progress, 'best_checkpoint.pth')
    save_checkpoint(run, progress)
    run['logger'].flush()


def save_before_failing(run, progress):
    """An evaluation that fails (a corrupt test image, a full disk) or is interrupted keeps the
    training done so far: save, so that the resumed run redoes this epoch start."""
    try:
        path = save_checkpoint(run, progress)
    except Exception as e:  # the save itself may be what failed: report the first error
        print(f'main.py: could not save a checkpoint either ({e})', file=sys.stderr)
        return
    if path is not None:
        print(f'Saved {os.path.abspath(path)} at iteration {progress["it"]}; fix the problem, '
              f'then continue with --resume={shlex.quote(os.path.abspath(path))}', file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Training.

def stop_requested(run, progress):
    """Every process stops at the same iteration (torchrun delivers signals at slightly different
    times), so the decision is shared."""
    return distributed.any_process(run['interrupt'].raised, run['device'])


# Tests set this to a path: each process appends what every training batch held (ids, texts,
# image checksums) to PATH.rank<r>, one JSON line an iteration.
RECORD_BATCHES_ENV = 'TIRG_RECORD_BATCHES'


def record_batch(batch, it):
    with open(f'{os.environ[RECORD_BATCHES_ENV]}.rank{distributed.rank()}', 'a') as f:
        f.write(json.dumps({
            'it': it, 'source': batch['source_img_id'].tolist(),
            'target': batch['target_img_id'].tolist(), 'mod': batch['mod_str'],
            'pixels': [round(float(x), 3) for x in batch['source_img_data'].flatten(1).sum(1)
                       + batch['target_img_data'].flatten(1).sum(1)]}) + '\n')


def train_one_epoch(run, loader, progress):
    opt = run['opt']
    bar = tqdm(loader, desc=f'Training for epoch {progress["epoch"]}', dynamic_ncols=True,
               mininterval=1.0, disable=None if distributed.is_main_process() else True)
    record = RECORD_BATCHES_ENV in os.environ
    for batch in bar:
        if record:
            record_batch(batch, progress['it'] + 1)
        try:
            losses = train_one_iteration(opt, run['train_model'], run['optimizer'], batch, run['device'])
        except TrainingStopped as e:
            raise TrainingStopped(f'iteration {progress["it"] + 1}: {e}') from None
        progress['it'] += 1
        progress['batches_done'] += 1
        for name, value in losses.items():
            progress['losses'].setdefault(name, []).append(value)
        decay_learning_rate(opt, run['optimizer'], progress['it'])
        if progress['it'] % 10 == 1:
            bar.set_postfix(loss=f'{losses[opt.loss]:.4f}', refresh=False)
        if stop_requested(run, progress) or progress['it'] >= opt.num_iters:
            break
    bar.close()


def start_epoch(run, progress, per_epoch, tic):
    """The epoch-start block; on failure the checkpoint makes a resumed run redo it."""
    progress['epoch'] += 1
    progress['batches_done'] = 0
    distributed.print0('It', progress['it'], 'epoch', progress['epoch'], 'Elapsed time',
                       round(time.time() - tic, 4), run['opt'].comment)
    try:
        checkpoint_and_evaluate(run, progress, progress['epoch'] % 3 == 1)
    except (Exception, KeyboardInterrupt):
        progress['epoch'] -= 1
        progress['batches_done'] = per_epoch
        raise
    progress['losses'] = {}


def train(run, progress):
    opt, trainset = run['opt'], run['trainset']
    sampler = EpochBatchSampler(num_training_examples(trainset), opt.batch_size, opt.seed,
                                distributed.rank(), distributed.world_size())
    per_epoch = sampler.batches_per_epoch()
    loader = make_train_loader(opt, trainset, sampler, run['device'], distributed.rank())
    distributed.print0('Begin training')
    tic = time.time()
    try:
        while progress['it'] < opt.num_iters:
            if progress['batches_done'] >= per_epoch:
                start_epoch(run, progress, per_epoch, tic)
                tic = time.time()
            if stop_requested(run, progress):
                break
            run['train_model'].train()
            sampler.set_epoch(progress['epoch'], progress['batches_done'])
            train_one_epoch(run, loader, progress)
            if stop_requested(run, progress):
                break
        if not stop_requested(run, progress):
            distributed.print0('Finished training at iteration', progress['it'])
            checkpoint_and_evaluate(run, progress, True)
            progress['finished'] = True
            save_checkpoint(run, progress)
            return 0
    except KeyboardInterrupt:
        if run['interrupt'].aborted:
            raise
        # The first signal inside a retrieval test: save at once, below.
    except Exception as e:
        # A failed checkpoint write (a full disk) is not retried: its own message says what is kept.
        if distributed.is_main_process() and not isinstance(e, checkpoints.CheckpointWriteError):
            save_before_failing(run, progress)
        raise
    return save_after_interrupt(run, progress)


def save_after_interrupt(run, progress):
    path = save_checkpoint(run, progress)
    distributed.barrier()
    if path is not None:
        path = os.path.abspath(path)
        launcher = 'torchrun ... ' if distributed.is_initialized() else f'{shlex.quote(sys.executable)} '
        print(f'Saved {path} at iteration {progress["it"]}. To continue, run the same command with '
              f'--resume, or:\n  {launcher}{shlex.quote(os.path.abspath(__file__))} '
              f'--resume={shlex.quote(path)}', file=sys.stderr)
    return run['interrupt'].exit_code()


def test_only(run):
    opt = run['opt']
    dataset = run['testset'] if opt.test_split != 'train' else run['trainset']
    it = getattr(opt, 'checkpoint_it', 0)
    if opt.test_split == 'test1':
        return write_cirr_submission(run, dataset, it)
    metrics = evaluate(opt, run['model'], [(opt.test_split, dataset)], run['logger'], it, None, run['dir'])
    if run['dir'] is None:
        return 0
    print(f'{"metric":<45} {"recall":>8}')
    for name, value in metrics.items():
        print(f'{name:<45} {100 * value:>7.2f}%')
    write_test_results(run, dataset, it, metrics)
    return 0


def write_test_results(run, dataset, it, metrics):
    opt = run['opt']
    results = {'checkpoint': opt.checkpoint, 'dataset': opt.dataset,
               'dataset_path': opt.dataset_path, 'split': opt.test_split, 'model': opt.model,
               'it': it, 'metrics': metrics}
    if opt.dataset == 'fashioniq':
        results.update(fiq_category=opt.fiq_category, fiq_protocol=opt.fiq_protocol)
    if opt.dataset == 'shoes':
        results['shoes_protocol'] = opt.shoes_protocol
    skipped = getattr(dataset, 'skipped', None)
    if skipped:
        results['skipped_missing_images'] = skipped
    path = os.path.join(run['dir'], 'test_results.json')
    checkpoints.write_text_atomic(json.dumps(results, indent=1), path)
    print('Wrote', path)


def write_cirr_submission(run, dataset, it):
    import cirr
    opt = run['opt']
    recall, recall_subset = cirr.test1_submission(run['model'], dataset, opt.batch_size,
                                                  opt.loader_num_workers)
    if run['dir'] is None:
        return 0
    for path in cirr.write_test1_files(run['dir'], recall, recall_subset):
        print('Wrote', path)
    return 0


def initial_progress():
    return {'it': 0, 'epoch': -1, 'batches_done': float('inf'), 'losses': {}, 'best_recall': None,
            'finished': False}


def restore_progress(ckpt):
    return {'it': int(ckpt['it']), 'epoch': int(ckpt['epoch']),
            'batches_done': int(ckpt['batches_done']),
            'losses': {k: list(v) for k, v in ckpt.get('losses', {}).items()},
            'best_recall': ckpt.get('best_recall'), 'finished': bool(ckpt.get('finished', False))}


# ---------------------------------------------------------------------------------------------

def prepare_options(opt):
    """Every check that needs no data, before anything is written."""
    check_opt(opt)
    resume_ckpt = load_checkpoint(opt.resume) if opt.resume else None
    if resume_ckpt is not None:
        opt = options_for_resume(opt, resume_ckpt)
        opt.resume_it = int(resume_ckpt['it'])
        check_resume_target(opt, resume_ckpt)
    init_ckpt, init_path = resume_ckpt, opt.resume
    if init_ckpt is None and opt.checkpoint:
        init_ckpt, init_path = load_checkpoint(opt.checkpoint), opt.checkpoint
        adopt_checkpoint_dataset(opt, init_ckpt, init_path)
        adopt_checkpoint_query_images(opt, init_ckpt)
    # After the checkpoint's dataset is adopted: a CIRR checkpoint needs no --dataset=cirr.
    if opt.test_split == 'test1' and (opt.dataset != 'cirr' or not opt.test_only):
        raise UserError('--test_split=test1: only with --dataset=cirr --test_only (CIRR\'s '
                        'evaluation-server files)')
    if opt.test_split == 'test1' and opt.skip_missing_images:
        import cirr
        raise UserError(cirr.SKIPPED_TEST1)
    check_css_query_images(opt)
    check_writable_folders(opt)
    if init_ckpt is None:
        check_img_weights(opt)
    return opt, resume_ckpt, init_ckpt, init_path


def check_processes(opt):
    if opt.batch_size % distributed.world_size():
        raise UserError(f'--batch_size={opt.batch_size}: the global batch must divide by the '
                        f'{distributed.world_size()} processes')
    if opt.sync_bn and not (distributed.is_initialized() and torch.cuda.is_available()):
        raise UserError('--sync_bn: SyncBatchNorm needs several processes (torchrun) on CUDA')


def build_model(opt, init_ckpt, init_path, trainset, testset, device):
    vocab = None
    if init_ckpt is not None:
        adopt_checkpoint_architecture(opt, init_ckpt)
        opt.checkpoint_it = int(init_ckpt.get('it', 0))
        opt.img_weights = 'none'  # every weight comes from the checkpoint
    check_model_fits_data(opt, testset)
    with contextlib.redirect_stdout(sys.stdout if distributed.is_main_process() else None):
        vocab = build_vocabulary(opt, init_ckpt, init_path, trainset)
        model = create_model(opt, trainset.get_all_texts(), vocab)
    if init_ckpt is not None:
        load_model_weights(model, init_ckpt, init_path)
    model = model.to(device)
    if opt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def check_model_fits_data(opt, testset):
    """Once --model is known (a checkpoint's own) and the data is read: before the model is
    built (ImageNet weights loaded) and before any run folder."""
    try:
        paper_composers.check_dataset(opt.model, opt.dataset, testset)
    except ValueError as e:
        raise UserError(str(e)) from None


def wrap_for_training(opt, model, device):
    """The module whose forward (the loss) training calls: the model itself, or under torchrun
    its DistributedDataParallel wrapper, which averages the gradients over the processes."""
    if not distributed.is_initialized():
        return model
    if opt.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None,
        find_unused_parameters=opt.model in model_registry.UNUSED_PARAMETERS)


def fit_batch_size(opt, trainset):
    """A training set smaller than --batch_size (a smoke test on a small tree): every epoch is
    then one batch of all its examples, whatever the number of processes (their slices differ by
    one example at most), said once.  With the reference's drop_last batches an epoch would be
    empty and training would never advance.  The user's value stays in requested_batch_size, from
    which a resumed run fits again."""
    count = num_training_examples(trainset)
    if count >= opt.batch_size:
        return
    least = max(distributed.world_size(), 2 if opt.loss == 'soft_triplet' else 1)
    if count < least:
        raise UserError(f'--batch_size={opt.batch_size}: the training split has only {count} '
                        f'examples (at least {least} are needed)')
    distributed.print0(f'--batch_size={opt.batch_size} is larger than the {count} training '
                       f'examples: using --batch_size={count} (one batch an epoch)')
    opt.requested_batch_size, opt.batch_size = opt.batch_size, count


def load_data(opt):
    if distributed.is_main_process():
        ensure_default_dataset(opt)
    distributed.barrier()
    with contextlib.redirect_stdout(sys.stdout if distributed.is_main_process() else None):
        trainset, testset = load_dataset(opt, 'test1' if opt.test_split == 'test1' else 'test')
    # --skip_missing_images: what was dropped travels with the run's options (tensorboard text,
    # checkpoints), so no number is reported without its caveat.
    skipped = {d.split: d.skipped for d in (trainset, testset) if getattr(d, 'skipped', None)}
    if skipped:
        opt.skipped_missing_images = skipped
    return trainset, testset


def run(opt):
    opt, resume_ckpt, init_ckpt, init_path = prepare_options(opt)
    device = distributed.device_for_process(select_device(opt.device))
    lock_resumed_run_folder(opt)
    check_processes(opt)
    if opt.seed is None:
        opt.seed = distributed.broadcast_object(random.SystemRandom().randrange(2 ** 31))
        distributed.print0('Seed', opt.seed)
    seed_process(opt, distributed.rank())
    cap_loader_workers(opt)
    trainset, testset = load_data(opt)
    model = build_model(opt, init_ckpt, init_path, trainset, testset, device)
    if not opt.test_only:
        fit_batch_size(opt, trainset)
    logger, run_dir = open_run(opt)
    if run_dir is not None and resume_ckpt is not None and resume_in_place(opt.resume):
        drop_metrics_after_checkpoint(run_dir, resume_ckpt, redoes_final_evaluation(opt, resume_ckpt))
    run = {'opt': opt, 'model': model, 'trainset': trainset, 'testset': testset, 'device': device,
           'logger': logger, 'dir': run_dir, 'optimizer': None}
    try:
        if run_dir is not None:
            write_options_file(run_dir, opt, device)
        if opt.test_only:
            return test_only(run)
        run['train_model'] = wrap_for_training(opt, model, device)
        run['optimizer'] = create_optimizer(opt, model)
        progress = initial_progress()
        if resume_ckpt is not None:
            progress = restore_training_state(run, resume_ckpt)
        with InterruptFlag() as interrupt:
            run['interrupt'] = interrupt
            return train(run, progress)
    finally:
        logger.close()


def restore_training_state(run, ckpt):
    """The checkpoint holds the first process's generators; the others draw their own dropout
    masks, from (seed, rank, iteration).  The examples need no state: they are keyed by position.
    (A `dataset_sampler_state` of earlier checkpoints, a pending pair, is not needed.)"""
    run['optimizer'].load_state_dict(ckpt['optimizer_state_dict'])
    progress = restore_progress(ckpt)
    checkpoints.set_rng_states(ckpt['rng'])
    rank = distributed.rank()
    if rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([run['opt'].seed, rank, progress['it']])
                              .generate_state(1)[0]))
    distributed.print0(f'Resuming at iteration {progress["it"]}, epoch {progress["epoch"]}')
    return progress


USER_ERRORS = (UserError, datasets.DatasetError, checkpoints.CheckpointError, TrainingStopped,
               run_lock.FolderInUse, OSError)  # OSError: a folder that cannot be written, a full disk: not a bug to trace


def main(argv=None):
    opt = parse_opt(argv)
    try:
        return run(opt)
    except USER_ERRORS as e:
        print(f'main.py: error: {e}', file=sys.stderr)
        return 1
    except RefusedByFirstProcess:
        return 1
    except RuntimeError as e:
        lost = distributed.describe_lost_process(e)
        if lost is None:
            raise
        # After the first process saved (save_before_failing): one line, not gloo's traceback.
        print(f'main.py: error: {lost}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('\nAborted.', file=sys.stderr)
        return 130
    finally:
        run_lock.release_all()
        distributed.cleanup()


if __name__ == '__main__':
    sys.exit(main())
