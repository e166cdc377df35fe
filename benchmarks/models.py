"""models: one training iteration (soft-triplet loss, backward, SGD step) of every --model (the
reference's five, the paper's other methods, TIRG's ablations) at embed_dim 512, batch
--batch_size at --model_image_size px (default 224, the photo datasets' crop), random images in
memory, --img_weights=none; median over --model_iters rounds that time every model once each, as
a ratio to TIRG's; and each model's peak resident memory during its first iteration, in a forked
child (CPU): the process holds all the models, so the peak is an upper bound of one model's."""
import statistics

import torch

import model_registry
from benchmarks.common import autocast, fmt_seconds, timed
from benchmarks.peak_memory import peak_memory


MODEL_TEXTS = ['make top-left red cube blue', 'add small gray sphere', 'remove middle object']
MODEL_CAPTIONS = ['ripe apple', 'sliced apple', 'dried fig', 'ripe fig']  # attribute_operator's


def model_training_step(name, args, device):
    """One SGD iteration of the soft-triplet loss (main.py's) of --model=`name`, random images
    already on the device: the composer's cost, not the data's."""
    torch.manual_seed(args.seed)
    captions = MODEL_CAPTIONS if name == 'attribute_operator' else MODEL_TEXTS
    model = model_registry.MODELS[name](captions, 512, pretrained=False).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed)
    size, b = args.model_image_size, args.batch_size
    source, target = (torch.randn(b, 3, size, size, generator=g).to(device) for _ in range(2))
    words = [c.split()[0] for c in captions] if name == 'attribute_operator' else captions
    texts = [words[i % len(words)] for i in range(b)]

    def step():
        with autocast(args.amp, device):
            loss = model(source, texts, target, soft_triplet_loss=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure(args, device, tmp):
    """Each model's peak resident memory during one iteration, in a forked child (CPU); then every
    model's iteration, timed in rounds (each round times every model once, so that the machine's
    load hits all alike), median over rounds."""
    names = list(model_registry.MODELS)
    steps = {name: model_training_step(name, args, device) for name in names}
    memory = {}
    if device.type == 'cpu' and not args.skip_model_memory:
        # Before any iteration here: each child's first iteration allocates its activations,
        # gradients and momentum afresh instead of reusing what this process freed.
        memory = {name: peak_memory(steps[name]) for name in names}
    times = {name: [] for name in names}
    for r in range(1 + args.model_iters):  # the first round warms up
        for name in names:
            seconds, _ = timed(steps[name], device)
            if r:
                times[name].append(seconds)
    base = statistics.median(times['tirg'])
    lines, result = [], {'image_size': args.model_image_size, 'batch_size': args.batch_size,
                         'iters': args.model_iters, 'models': {}}
    for name in names:
        t = statistics.median(times[name])
        entry = {'median_s': t, 'times_s': times[name], 'vs_tirg': t / base}
        line = (f'models {name}: one training iteration, batch {args.batch_size} at '
                f'{args.model_image_size}x{args.model_image_size}: {fmt_seconds(t)}, '
                f'{t / base:.2f}x TIRG')
        if name in memory:
            peak, start = memory[name]['peak_bytes'], memory[name]['start_bytes']
            entry.update(peak_bytes=peak, start_bytes=start)
            line += f', peak resident {peak / 2 ** 30:.2f} GiB'
            if start is not None:
                line += f' (+{(peak - start) / 2 ** 30:.2f} GiB for the iteration)'
        result['models'][name] = entry
        lines.append(line)
    return lines, result
