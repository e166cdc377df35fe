"""amp: --amp against float32 on this device, side by side in one run: main.train_one_iteration
(TIRG, soft triplet, SGD, --img_weights=none, 2B random images) and feature extraction
(extract_img_feature on B images, eval, inference mode, as the retrieval test computes them), at
each of --amp_sizes, in float32 and in bfloat16 autocast, each also with --channels_last, the
four interleaved so that load on the machine hits them alike.  Ratios against float32.

On a CPU the section says whether the processor has native bfloat16 (amp.py's detection).
Without it --amp runs float32, so bfloat16 is not timed, unless TIRG_CPU_BF16=1 asks for the
emulated path (then said so: it is many times slower there)."""
import contextlib
import io
import statistics

import torch

import amp
import experiment
import main
from benchmarks.common import fmt_seconds, timed

ROUNDS, QUICK_ROUNDS = 3, 1  # timed rounds (every variant once a round) after one warm-up round

TEXTS = ['make top-left red object blue', 'add small gray sphere', 'remove the circle',
         'is more blue and has short sleeves']
# (precision, channels_last), float32 first: the ratios are against it.
VARIANTS = ((amp.FLOAT32, False), (amp.BFLOAT16, False), (amp.FLOAT32, True), (amp.BFLOAT16, True))


def variant_name(precision, channels_last):
    return precision + (' channels_last' if channels_last else '')


def processor_line(device):
    """(line, bfloat16 is timed, what the processor has)."""
    if device.type != 'cpu':
        return f'amp processor: {device.type}, bfloat16 autocast', True, {'device': device.type}
    native = amp.cpu_has_native_bf16()
    forced = amp.cpu_bf16_override()
    found = {'device': 'cpu', 'native_bf16': native, 'TIRG_CPU_BF16': forced}
    if native and forced is not False:
        return 'amp processor: native bfloat16 (--amp trains and tests in bfloat16 here)', True, found
    if forced:
        return ('amp processor: no native bfloat16; TIRG_CPU_BF16=1: bfloat16 timed on the '
                'emulated path (--amp would run float32 here)'), True, found
    why = 'TIRG_CPU_BF16=0' if forced is False else 'no native bfloat16'
    return (f'amp processor: {why}: --amp runs float32 here, so bfloat16 is not timed '
            f'(TIRG_CPU_BF16=1 times the emulated path)'), False, found


def build(args, device, channels_last, precision):
    flags = ['--dataset=fashion200k', '--model=tirg', '--img_weights=none', '--loss=soft_triplet',
             f'--batch_size={args.batch_size}', f'--device={device}']
    flags += ['--channels_last'] * channels_last
    opt = main.parse_opt(flags)
    opt.precision = precision
    torch.manual_seed(args.seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = experiment.create_model(opt, TEXTS).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return opt, model, main.create_optimizer(opt, model)


def measure(args, device, tmp):
    line, bf16_timed, processor = processor_line(device)
    variants = [v for v in VARIANTS if bf16_timed or v[0] == amp.FLOAT32]
    lines, result = [line], {'processor': processor, 'sizes': {}}
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    for size in args.amp_sizes:
        generator = torch.Generator().manual_seed(args.seed)
        batch = {'source_img_data': torch.randn(args.batch_size, 3, size, size, generator=generator),
                 'target_img_data': torch.randn(args.batch_size, 3, size, size, generator=generator),
                 'mod_str': [TEXTS[i % len(TEXTS)] for i in range(args.batch_size)]}
        runs = {v: build(args, device, v[1], v[0]) for v in variants}

        def train_step(variant):
            opt, model, optimizer = runs[variant]
            model.train()
            return main.train_one_iteration(opt, model, optimizer, batch, device)

        def extract(variant):
            opt, model, _ = runs[variant]
            model.eval()
            memory_format = torch.channels_last if variant[1] else torch.contiguous_format
            imgs = batch['source_img_data'].to(device, memory_format=memory_format)
            with torch.inference_mode(), amp.autocast(opt.precision, device.type):
                return model.extract_img_feature(imgs).float()

        times = {(kind, v): [] for kind in ('train', 'extract') for v in variants}
        for i in range(1 + rounds):
            for v in variants:
                for kind, fn in (('train', train_step), ('extract', extract)):
                    seconds, _ = timed(lambda: fn(v), device)
                    if i >= 1:
                        times[kind, v].append(seconds)
        means = {key: statistics.mean(values) for key, values in times.items()}
        entry = {}
        for kind, title in (('train', f'train iteration batch {args.batch_size} (TIRG, '
                                      f'2x{args.batch_size} images)'),
                            ('extract', f'feature extraction batch {args.batch_size} (eval)')):
            base = means[kind, VARIANTS[0]]
            parts = [f'{variant_name(*v)} {fmt_seconds(means[kind, v])} '
                     f'({means[kind, v] / base:.2f}x)' for v in variants]
            lines.append(f'amp {title} at {size}x{size}: ' + ', '.join(parts)
                         + f' (means of {rounds} after a warm-up round)')
            entry[kind] = {variant_name(*v): {'mean_s': means[kind, v], 'ratio': means[kind, v] / base,
                                              'times_s': times[kind, v]} for v in variants}
        result['sizes'][str(size)] = entry
    result.update(batch_size=args.batch_size, rounds=rounds)
    return lines, result
