"""train: one iteration of main.py's training loop (next batch from make_train_loader with 0
workers over a synthetic CSS dataset drawn at 64x64, then main.train_one_iteration: TIRG,
--img_weights=none, soft triplet, SGD) against a bare ResNet-18 forward + backward + SGD step on
the same 2B images already in memory: overhead ratio."""
import contextlib
import io
import os
import statistics

import torch

import datasets
import experiment
import main
import sampling
from benchmarks.common import autocast, fmt_seconds, precision, synchronize, timed
from benchmarks.fixtures import write_css_tree


class BareResNet18Step:
    """ResNet-18 (fc 512 -> embed_dim, as the model's image encoder) forward + backward + SGD on a
    batch already on the device; loss = mean square of the output."""

    def __init__(self, embed_dim, device, opt):
        import torchvision
        net = torchvision.models.resnet18(weights=None)
        net.fc = torch.nn.Linear(512, embed_dim)
        self.net = net.to(device).train()
        if opt.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=opt.learning_rate, momentum=0.9,
                                         weight_decay=opt.weight_decay)
        self.amp, self.device = opt.amp, device

    def __call__(self, imgs):
        with autocast(self.amp, self.device):
            loss = self.net(imgs).float().pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def measure(args, device, tmp):
    data_dir = os.path.join(tmp, 'css')
    write_css_tree(data_dir)
    flags = ['--dataset=css3d', f'--dataset_path={data_dir}', '--model=tirg',
             '--img_weights=none', '--loss=soft_triplet', '--loader_num_workers=0',
             f'--batch_size={args.batch_size}', f'--seed={args.seed}', f'--device={device}']
    flags += ['--amp'] * args.amp + ['--channels_last'] * args.channels_last
    opt = main.parse_opt(flags)
    opt.precision = precision(opt.amp, device)
    experiment.seed_everything(opt.seed)
    trainset = datasets.CSSDataset(opt.dataset_path, split='train', transform=datasets.css_transform())
    with contextlib.redirect_stdout(io.StringIO()):
        model = experiment.create_model(opt, trainset.get_all_texts()).to(device)
    if opt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = main.create_optimizer(opt, model)
    sampler = sampling.EpochBatchSampler(len(trainset), opt.batch_size, opt.seed)
    loader = sampling.make_train_loader(opt, trainset, sampler, device)
    bare = BareResNet18Step(opt.embed_dim, device, opt)
    model.train()

    state = {'epoch': 0, 'it': iter(loader)}

    def next_batch():
        try:
            return next(state['it'])
        except StopIteration:
            state['epoch'] += 1
            sampler.set_epoch(state['epoch'])
            state['it'] = iter(loader)
            return next(state['it'])

    def loop_iteration():
        batch = next_batch()
        main.train_one_iteration(opt, model, optimizer, batch, device)
        return batch

    loop_times, bare_times = [], []
    for i in range(args.warmup + args.iters):
        seconds, batch = timed(loop_iteration, device)
        # The same 2B images, already tensors on the device.
        imgs = torch.cat([batch['source_img_data'], batch['target_img_data']]).to(device)
        synchronize(device)
        bare_seconds, _ = timed(lambda: bare(imgs), device)
        if i >= args.warmup:  # interleaved, so that load on the machine hits both alike
            loop_times.append(seconds)
            bare_times.append(bare_seconds)
    loop_mean, bare_mean = statistics.mean(loop_times), statistics.mean(bare_times)
    ratio = loop_mean / bare_mean
    line = (f'train iteration batch {opt.batch_size} (TIRG, 2x{opt.batch_size} CSS images 64x64, '
            f'0 workers): main.py loop {fmt_seconds(loop_mean)}, bare ResNet-18 step '
            f'{fmt_seconds(bare_mean)}, overhead {ratio:.2f}x  (medians '
            f'{fmt_seconds(statistics.median(loop_times))} / '
            f'{fmt_seconds(statistics.median(bare_times))}, {args.iters} iterations after '
            f'{args.warmup} warm-up)')
    result = {'batch_size': opt.batch_size, 'iters': args.iters, 'warmup': args.warmup,
              'loop_mean_s': loop_mean, 'bare_mean_s': bare_mean, 'overhead': ratio,
              'loop_times_s': loop_times, 'bare_times_s': bare_times}
    return [line], result
