"""data: images per second of the Fashion200k image pipeline (datasets.open_photo, then
datasets.photo_transform: Resize(224), CenterCrop(224), ToTensor, Normalize) on generated JPEGs,
with 0 and N DataLoader workers, fast decode off and on; then training triplets per second of
the FashionIQ, CIRR and Shoes loaders (training's sampling.make_train_loader over
fashioniq.FashionIQ / cirr.CIRR / shoes.Shoes train, batch --batch_size), 0 against N workers, on
generated trees in their layouts (FashionIQ and Shoes JPEGs, CIRR PNGs) or on real ones given with
--fiq_path / --cirr_path / --shoes_path."""
import contextlib
import io
import math
import os
import statistics
import time

import torch

import datasets
import experiment
import main
import sampling
from benchmarks.common import endless_batches
from benchmarks.fixtures import write_jpegs, write_triplet_tree


class PhotoList(torch.utils.data.Dataset):
    """What Fashion200k.get_img does per image: open_photo, then photo_transform; index i reads
    file i % len(paths), so one long pass can cycle over a few files."""

    def __init__(self, paths, fast_decode, length):
        self.paths, self.fast_decode, self.length = paths, fast_decode, length
        self.transform = datasets.photo_transform()

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.transform(datasets.open_photo(self.paths[i % len(self.paths)], self.fast_decode))


def images_per_second(paths, fast_decode, workers, passes, batch_size=8):
    """One pass of a DataLoader over `passes + 1` cycles of the files; the first batches (worker
    start, file cache, libjpeg set-up: at least one cycle of the files) are not timed."""
    warmup_batches = max(2 * workers + 1, math.ceil(len(paths) / batch_size))
    timed_batches = max(1, math.ceil(passes * len(paths) / batch_size))
    length = (warmup_batches + timed_batches) * batch_size
    loader = torch.utils.data.DataLoader(
        PhotoList(paths, fast_decode, length), batch_size=batch_size, num_workers=workers)
    count, start = 0, None
    for b, batch in enumerate(loader):
        if b == warmup_batches - 1:
            start = time.perf_counter()
        elif b >= warmup_batches:
            count += batch.shape[0]
    return count / (time.perf_counter() - start)


def measure(args, device, tmp):
    width, height = args.image_size
    paths = write_jpegs(os.path.join(tmp, 'jpegs'), args.data_images, width, height, args.seed)
    kb = statistics.mean(os.path.getsize(p) for p in paths) / 1024
    label = f'data {width}x{height} JPEG q90 ({kb:.0f} KB) -> 224x224'
    lines, result = [], {'image_size': [width, height], 'images': len(paths), 'mean_kb': kb}
    rates = {}
    for fast in (False, True):
        for workers in (0, args.workers):
            rates[fast, workers] = images_per_second(paths, fast, workers, args.data_passes)
        r0, rn = rates[fast, 0], rates[fast, args.workers]
        lines.append(f'{label}, fast_decode {"on" if fast else "off"}: 0 workers {r0:.1f} img/s, '
                     f'{args.workers} workers {rn:.1f} img/s, speed-up {rn / r0:.2f}x')
        result[f'fast_decode_{"on" if fast else "off"}'] = {
            'workers_0_img_per_s': r0, f'workers_{args.workers}_img_per_s': rn}
    for workers in (0, args.workers):
        off, on = rates[False, workers], rates[True, workers]
        lines.append(f'data fast_decode on vs off ({workers} workers): {on:.1f} vs {off:.1f} img/s, '
                     f'speed-up {on / off:.2f}x')
    # How much fast decoding changes the network's input (normalised units; 1/255 of a pixel
    # level is about 0.017 of them).
    transform = datasets.photo_transform()
    diffs = [(transform(datasets.open_photo(p, False)) - transform(datasets.open_photo(p, True)))
             .abs().mean().item() for p in paths]
    lines.append(f'pixels fast_decode vs exact: mean |difference| = {statistics.mean(diffs):.4f} '
                 f'(normalised input units, {statistics.mean(diffs) * 0.226 * 255:.2f} of 255 levels)')
    result['fast_decode_mean_abs_diff'] = statistics.mean(diffs)
    # What a training iteration at the default batch (2 x 32 images) needs from the pipeline.
    best = max(rates.values())
    lines.append(f'data images for one Fashion200k iteration (2x32): {64 / best:.3f} s at the best '
                 f'rate above ({best:.1f} img/s)')
    for name, flag in TREE_FLAGS.items():
        tree = getattr(args, flag)
        generated = tree is None
        if generated:
            tree = write_triplet_tree(name, os.path.join(tmp, name), paths)
        line, result[name] = measure_triplet_loader(args, name, tree, generated)
        lines.append(line)
    return lines, result


# The flag giving a real tree of each dataset the section times a loader of.
TREE_FLAGS = {'fashioniq': 'fiq_path', 'cirr': 'cirr_path', 'shoes': 'shoes_path'}


def load_train_split(args, dataset_name, root):
    """(main.py's options, train split) of the tree at `root`; a bad tree is a one-line exit
    naming the bench flag that gave it (not main.py's --dataset_path)."""
    flag = TREE_FLAGS[dataset_name]
    if not os.path.isdir(root):
        raise SystemExit(f'bench.py: --{flag}={root}: no such folder')
    opt = main.parse_opt([f'--dataset={dataset_name}', f'--dataset_path={root}',
                          f'--batch_size={args.batch_size}', f'--seed={args.seed}',
                          '--img_weights=none', '--fiq_category=all'])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            trainset, _ = experiment.load_dataset(opt, 'train')
            sampling.fit_batch_size(opt, trainset)  # a tree smaller than the batch: one batch an epoch
    except (experiment.UserError, datasets.DatasetError) as e:
        raise SystemExit(f'bench.py: --{flag}: {e}') from None
    return opt, trainset


def check_given_trees(args):
    """Every real tree given to the data section is read before any section times anything, so
    a wrong path ends the run at once rather than after minutes of other measurements."""
    if 'data' not in args.sections:
        return
    for name, flag in TREE_FLAGS.items():
        if getattr(args, flag) is not None:
            load_train_split(args, name, getattr(args, flag))


def triplets_per_second(opt, trainset, batches):
    """Training examples (2 images each) per second through training's loader; the
    first batches (worker start, file cache) are not timed."""
    sampler = sampling.EpochBatchSampler(sampling.num_training_examples(trainset), opt.batch_size, opt.seed)
    loader = sampling.make_train_loader(opt, trainset, sampler, torch.device('cpu'))
    warmup = 2 * opt.loader_num_workers + 1
    count, start = 0, None
    for b, batch in enumerate(endless_batches(loader, sampler)):
        if b == warmup - 1:
            start = time.perf_counter()
        elif b >= warmup:
            count += batch['source_img_data'].shape[0]
            if count >= batches * opt.batch_size:
                break
    return count / (time.perf_counter() - start)


def measure_triplet_loader(args, dataset_name, root, generated):
    opt, trainset = load_train_split(args, dataset_name, root)
    rates = {}
    for workers in (0, args.workers):
        opt.loader_num_workers = workers
        rates[workers] = triplets_per_second(opt, trainset, args.data_batches)
    r0, rn = rates[0], rates[args.workers]
    source = 'generated' if generated else root
    line = (f'data {dataset_name} train loader ({sampling.num_training_examples(trainset)} triplets, '
            f'{len(trainset.imgs)} images, {source}), batch {opt.batch_size}: 0 workers '
            f'{r0:.1f} triplets/s, {args.workers} workers {rn:.1f} triplets/s, speed-up '
            f'{rn / r0:.2f}x')
    return line, {'triplets': sampling.num_training_examples(trainset), 'images': len(trainset.imgs),
                  'workers_0_triplets_per_s': r0, f'workers_{args.workers}_triplets_per_s': rn}
