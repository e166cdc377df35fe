"""backbones: --img_backbone=resnet18 against resnet50 in TIRG: one training iteration
(main.train_one_iteration, soft triplet, SGD with the photo datasets' parameter groups) on the
same 2B random images at --backbone_size, and feature extraction (extract_img_feature, eval,
inference mode) on B of them, interleaved; then the parameter counts and a training iteration's
peak memory beyond its start (CUDA: the allocator's; CPU: a forked process's resident memory).
Ratios ResNet-50/ResNet-18."""
import contextlib
import io
import statistics

import torch

import experiment
import img_text_composition_models
import main
from benchmarks.common import autocast, fmt_seconds, precision, synchronize, timed
from benchmarks.peak_memory import peak_memory


BACKBONE_TEXTS = ['make top-left red cube blue', 'add small gray sphere', 'remove the circle',
                  'is more blue and has short sleeves']


def backbone_model(args, device, backbone):
    """main.py's TIRG on `backbone` (--img_weights=none) with its optimiser (the SPEC 5 groups
    of the photo datasets), ready to train."""
    flags = ['--dataset=fashioniq', '--model=tirg', '--img_weights=none', '--loss=soft_triplet',
             f'--img_backbone={backbone}', f'--batch_size={args.batch_size}', f'--device={device}']
    flags += ['--amp'] * args.amp + ['--channels_last'] * args.channels_last
    opt = main.parse_opt(flags)
    opt.precision = precision(opt.amp, device)
    torch.manual_seed(args.seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = experiment.create_model(opt, BACKBONE_TEXTS).to(device)
    if opt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return opt, model, main.create_optimizer(opt, model)


def training_memory_growth(step, device):
    """Bytes a training iteration holds at its peak beyond what is held before it (activations,
    gradients): on CUDA the allocator's peak, on the CPU a forked child's resident peak."""
    if device.type == 'cuda':
        step()
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    measured = peak_memory(step, warmup=step)
    return None if measured['start_bytes'] is None else measured['peak_bytes'] - measured['start_bytes']


def measure(args, device, tmp):
    """ResNet-18 against ResNet-50 in TIRG: main.train_one_iteration on the same 2B random
    images, and extract_img_feature (eval, inference mode) on B of them, interleaved."""
    size, batch_size = args.backbone_size, args.batch_size
    generator = torch.Generator().manual_seed(args.seed)
    batch = {'source_img_data': torch.randn(batch_size, 3, size, size, generator=generator),
             'target_img_data': torch.randn(batch_size, 3, size, size, generator=generator),
             'mod_str': [BACKBONE_TEXTS[i % len(BACKBONE_TEXTS)] for i in range(batch_size)]}
    imgs = batch['source_img_data'].to(device)
    if args.channels_last:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    names = ('resnet18', 'resnet50')
    titles = {name: img_text_composition_models.BACKBONES[name].title for name in names}
    runs = {name: backbone_model(args, device, name) for name in names}

    def train_step(name):
        opt, model, optimizer = runs[name]
        model.train()
        return main.train_one_iteration(opt, model, optimizer, batch, device)

    def extract(name):
        model = runs[name][1]
        model.eval()
        with torch.inference_mode(), autocast(args.amp, device):
            return model.extract_img_feature(imgs)

    # Memory first: a forked child reuses the heap its parent freed (after the timed iterations,
    # an iteration's activations fit in it), and that grows no resident memory.
    memory = {name: training_memory_growth(lambda: train_step(name), device) for name in names}
    times = {(kind, name): [] for kind in ('train', 'extract') for name in names}
    for i in range(args.warmup + args.iters):
        for name in names:  # interleaved, so that load on the machine hits both alike
            for kind, fn in (('train', train_step), ('extract', extract)):
                seconds, _ = timed(lambda: fn(name), device)
                if i >= args.warmup:
                    times[kind, name].append(seconds)
    mean = {key: statistics.mean(values) for key, values in times.items()}
    params = {name: sum(p.numel() for p in runs[name][1].parameters()) for name in names}

    def compare(what, values, show):
        ratio = values['resnet50'] / values['resnet18']
        return (f'backbones {what}: {titles["resnet18"]} {show(values["resnet18"])}, '
                f'{titles["resnet50"]} {show(values["resnet50"])}, ResNet-50/ResNet-18 {ratio:.2f}x')

    where = f'{args.iters} iterations after {args.warmup} warm-up'
    lines = [
        compare(f'train iteration batch {batch_size} (TIRG, 2x{batch_size} images {size}x{size}, '
                f'soft triplet, SGD; means of {where})',
                {n: mean['train', n] for n in names}, fmt_seconds),
        compare(f'feature extraction batch {batch_size} ({size}x{size}, eval; means of {where})',
                {n: mean['extract', n] for n in names},
                lambda s: f'{fmt_seconds(s)} ({batch_size / s:.1f} img/s)'),
        compare(f'parameters (TIRG, embed_dim {runs["resnet18"][0].embed_dim})', params,
                lambda n: f'{n / 1e6:.1f} M'),
    ]
    if all(memory.values()):  # None: no /proc to measure with
        lines.append(compare(f'training memory, peak over the start of an iteration ('
                             f'{"CUDA allocator" if device.type == "cuda" else "resident, forked process"})',
                             memory, lambda b: f'{b / 2 ** 20:.0f} MB'))
    result = {'batch_size': batch_size, 'image_size': size, 'iters': args.iters,
              'warmup': args.warmup, 'parameters': params, 'train_memory_growth_bytes': memory}
    for name in names:
        result[name] = {'train_mean_s': mean['train', name], 'extract_mean_s': mean['extract', name],
                        'train_times_s': times['train', name],
                        'extract_times_s': times['extract', name]}
    result['train_ratio'] = mean['train', 'resnet50'] / mean['train', 'resnet18']
    result['extract_ratio'] = mean['extract', 'resnet50'] / mean['extract', 'resnet18']
    return lines, result
