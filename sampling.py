"""The order in which training examples are read (SPEC 9): shuffled full batches fixed by
(seed, epoch), each process's slice of every global batch, and the DataLoader that reads them.
The examples' own random parts are drawn by the datasets from the keys given here
(datasets.DrawKey)."""
import json
import os

import torch

import datasets
import distributed
from experiment import UserError

# EpochBatchSampler seeds each epoch with seed * SEED_STRIDE + epoch, which must fit in 64 bits
# (main.MAX_SEED keeps it so).
SEED_STRIDE = 1000003


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


def cap_loader_workers(opt):
    """More workers than CPUs only adds contention (and a PyTorch warning per loader)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    if opt.loader_num_workers > cpus:
        distributed.print0(f'Using {cpus} DataLoader workers: --loader_num_workers='
                           f'{opt.loader_num_workers}, but this process has {cpus} CPUs')
        opt.loader_num_workers = cpus


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
