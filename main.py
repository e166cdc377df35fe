"""Train and test TIRG and its baselines (SPEC sections 1, 5 and 7).

    python main.py                                   # TIRG on the synthetic CSS data (generated)
    python main.py --dataset=css3d --dataset_path=DIR --num_iters=160000 --model=tirg
    python main.py --test_only --checkpoint=runs/.../latest_checkpoint.pth --dataset_path=DIR
    python main.py --resume=runs/.../latest_checkpoint.pth
"""
import argparse
import contextlib
import json
import os
import random
import shlex
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import datasets
import img_text_composition_models
import test_retrieval
import text_model

DEFAULT_DATASET_PATH = os.path.join('.', 'data', 'css_synth')
TRACKED_METRIC = 'test recall_top1_correct_composition'


class UserError(Exception):
    """A mistake in the command line or the data: reported as one line, no traceback."""


def get_args_parser():
    p = argparse.ArgumentParser(description='Train and test TIRG (CVPR 2019) and its baselines.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-f', type=str, default='', help='ignored (lets the script run in a notebook)')
    p.add_argument('--comment', type=str, default='test_notebook', help='suffix of the run folder name')
    p.add_argument('--dataset', type=str, default='css3d', choices=['css3d', 'fashion200k', 'mitstates'],
                   help='dataset')
    p.add_argument('--dataset_path', type=str, default=DEFAULT_DATASET_PATH,
                   help='dataset root; the default folder is filled with synthetic CSS data when empty')
    p.add_argument('--model', type=str, default='tirg', choices=list(img_text_composition_models.MODELS),
                   help='composition model')
    p.add_argument('--embed_dim', type=int, default=512, help='joint embedding, word embedding and LSTM size')
    p.add_argument('--learning_rate', type=float, default=1e-2, help='base learning rate')
    p.add_argument('--learning_rate_decay_frequency', type=int, default=9999999,
                   help='multiply every learning rate by 0.1 each time this many iterations pass')
    p.add_argument('--batch_size', type=int, default=32, help='training and test batch size')
    p.add_argument('--weight_decay', type=float, default=1e-6, help='SGD weight decay')
    p.add_argument('--num_iters', type=int, default=210000, help='training iterations')
    p.add_argument('--loss', type=str, default='soft_triplet', choices=['soft_triplet', 'batch_based_classification'],
                   help='training loss')
    p.add_argument('--loader_num_workers', type=int, default=4, help='DataLoader worker processes')
    # Beyond the reference.
    p.add_argument('--device', type=str, default='auto',
                   help='auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps')
    p.add_argument('--seed', type=int, default=None, help='random seed (default: drawn at random and recorded)')
    p.add_argument('--img_weights', type=str, default='imagenet',
                   help="ResNet-18 initialisation: 'imagenet' (torchvision's cache under TORCH_HOME), "
                        "'none', or a path to a ResNet-18 state dict")
    p.add_argument('--checkpoint', type=str, default=None,
                   help='load model weights from this checkpoint (ours or the released format) first')
    p.add_argument('--resume', type=str, default=None,
                   help='continue the run that wrote this checkpoint, in its own run folder')
    p.add_argument('--test_only', action='store_true', help='run the retrieval test once and exit')
    p.add_argument('--test_split', type=str, default='test', choices=['train', 'test'],
                   help='split evaluated by --test_only')
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
    return opt


def check_opt(opt):
    for name in ('batch_size', 'embed_dim', 'num_iters', 'learning_rate_decay_frequency'):
        if getattr(opt, name) < 1:
            raise UserError(f'--{name}={getattr(opt, name)}: expected a positive integer')
    if opt.loader_num_workers < 0:
        raise UserError(f'--loader_num_workers={opt.loader_num_workers}: expected 0 or more')
    if opt.loss == 'soft_triplet' and opt.batch_size < 2:
        raise UserError('--batch_size=1: the soft triplet loss needs at least 2 examples a batch')
    if opt.img_weights not in ('imagenet', 'none') and not os.path.isfile(opt.img_weights):
        raise UserError(f"--img_weights={opt.img_weights}: no such file (expected 'imagenet', "
                        f"'none' or a path to a ResNet-18 state dict)")
    for name in ('checkpoint', 'resume'):
        path = getattr(opt, name)
        if path is not None and not os.path.isfile(path):
            raise UserError(f'--{name}={path}: no such file')


def select_device(name):
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'--device={name}: expected auto, cpu, cuda, cuda:N or mps') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device={name}: CUDA is not available on this machine')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f'--device={name}: MPS is not available on this machine')
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def ensure_default_dataset(opt):
    """Generate the synthetic CSS data when the default dataset folder is empty."""
    path = opt.dataset_path
    if opt.dataset != 'css3d' or os.path.normpath(path) != os.path.normpath(DEFAULT_DATASET_PATH):
        return
    if os.path.isfile(os.path.join(path, datasets.CSS_DATA_FILE)):
        return
    import make_css_dataset
    print(f'No dataset in {path}: generating synthetic CSS data there (make_css_dataset.py)')
    make_css_dataset.generate_css_dataset(path)


def load_dataset(opt):
    if not os.path.isdir(opt.dataset_path):
        raise UserError(f'--dataset_path={opt.dataset_path}: no such folder')
    print('Reading dataset', opt.dataset)
    if opt.dataset == 'css3d':
        transform, cls = datasets.css_transform(), datasets.CSSDataset
    else:
        transform = datasets.photo_transform()
        cls = {'fashion200k': datasets.Fashion200k, 'mitstates': datasets.MITStates}[opt.dataset]
    extra = {} if opt.dataset == 'css3d' else {'fast_decode': opt.fast_decode}
    trainset = cls(path=opt.dataset_path, split='train', transform=transform, **extra)
    testset = cls(path=opt.dataset_path, split='test', transform=transform, **extra)
    for dataset in (trainset, testset):
        print('  ' + dataset.summary())
    return trainset, testset


def create_model(opt, texts, vocab=None):
    weights = {'imagenet': True, 'none': False}.get(opt.img_weights, opt.img_weights)
    print('Creating model', opt.model)
    try:
        model = img_text_composition_models.MODELS[opt.model](
            texts, opt.embed_dim, pretrained=weights, vocab=vocab)
    except img_text_composition_models.WeightsUnavailableError as e:
        raise UserError(str(e)) from None
    return model


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


def train_one_iteration(opt, model, optimizer, batch, device):
    memory_format = torch.channels_last if opt.channels_last else torch.contiguous_format
    source = batch['source_img_data'].to(device, non_blocking=True, memory_format=memory_format)
    target = batch['target_img_data'].to(device, non_blocking=True, memory_format=memory_format)
    with autocast(opt, device):
        loss = model.compute_loss(source, batch['mod_str'], target,
                                  soft_triplet_loss=opt.loss == 'soft_triplet')
    loss_value = float(loss.detach())
    if not np.isfinite(loss_value):
        raise TrainingStopped(f'the {opt.loss} loss is {loss_value} at this iteration; '
                              f'try a lower --learning_rate (now {opt.learning_rate})')
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {opt.loss: loss_value, 'total training loss': loss_value}


class TrainingStopped(Exception):
    pass


class InterruptFlag:
    """First Ctrl-C: finish the iteration, save and exit 130.  Second: abort at once.

    Inside `interruptible()` (a retrieval test, which changes no state and may take minutes) the
    first Ctrl-C stops at once with KeyboardInterrupt, and the caller saves."""

    def __init__(self):
        self.raised = False
        self.immediate = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    @contextlib.contextmanager
    def interruptible(self):
        self.immediate = True
        try:
            yield
        finally:
            self.immediate = False

    def _handle(self, signum, frame):
        if self.raised or self.immediate:
            self.raised = True
            raise KeyboardInterrupt
        self.raised = True
        print('\nInterrupted: finishing this iteration, then saving (Ctrl-C again to abort)',
              file=sys.stderr, flush=True)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled full batches (drop_last), the order fixed by (seed, epoch) so that a resumed run
    continues an epoch exactly where it stopped."""

    def __init__(self, size, batch_size, seed):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.start_batch = 0, 0

    def batches_per_epoch(self):
        return self.size // self.batch_size

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.batches_per_epoch() - self.start_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for b in range(self.start_batch, self.batches_per_epoch()):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


def make_train_loader(opt, trainset, sampler, device):
    workers = opt.loader_num_workers
    return torch.utils.data.DataLoader(
        trainset, batch_sampler=sampler, num_workers=workers,
        collate_fn=datasets.collate_training_batch, worker_init_fn=datasets.worker_init_fn,
        pin_memory=device.type == 'cuda', persistent_workers=workers > 0,
        # Worker seeds come from this generator, not the global one, so that the number of
        # loaders created (fresh run or resume) does not change the global random stream.
        generator=torch.Generator().manual_seed(opt.seed))


RESUMABLE_FLAGS = {'resume', 'num_iters', 'loader_num_workers', 'device', 'dataset_path', 'amp',
                   'channels_last', 'fast_decode'}


def options_for_resume(opt, ckpt):
    """The run's own options, except the few flags that may change between sessions."""
    if 'optimizer_state_dict' not in ckpt:
        raise UserError(f'--resume={opt.resume}: this checkpoint holds only model weights '
                        f'(released format?); use --checkpoint to start a new run from it')
    fixed = sorted(set(opt.explicit_flags) - RESUMABLE_FLAGS)
    if fixed:
        raise UserError(f'--{fixed[0]} cannot change when resuming; only '
                        f'{", ".join("--" + f for f in sorted(RESUMABLE_FLAGS - {"resume"}))} can')
    resumed = argparse.Namespace(**vars(ckpt['opt']))
    for flag in opt.explicit_flags:
        setattr(resumed, flag, getattr(opt, flag))
    resumed.resume, resumed.checkpoint, resumed.test_only = opt.resume, None, False
    resumed.explicit_flags = opt.explicit_flags
    return resumed


def adopt_checkpoint_architecture(opt, ckpt):
    """Take --model and --embed_dim from the checkpoint's options unless given on the command line."""
    saved = ckpt.get('opt')
    for name in ('model', 'embed_dim'):
        if name not in opt.explicit_flags and hasattr(saved, name):
            setattr(opt, name, getattr(saved, name))


def checkpoint_vocabulary(opt, ckpt, path, trainset):
    """The checkpoint's own vocabulary, or (released checkpoints) the sorted vocabulary of the
    dataset's training texts, which must have as many words as the checkpoint's embedding."""
    if 'vocab' in ckpt:
        return text_model.SimpleVocab(ckpt['vocab'])
    texts = trainset.get_all_texts()
    vocab = text_model.SimpleVocab.from_texts(texts)
    rows = ckpt['model_state_dict'].get('text_model.embedding_layer.weight')
    if rows is not None and rows.shape[0] != vocab.get_size():
        raise UserError(
            f'{path}: its word embedding has {rows.shape[0]} words, but the vocabulary built from '
            f'the {len(texts)} {opt.dataset} training texts in {opt.dataset_path} has '
            f'{vocab.get_size()}; the checkpoint carries no vocabulary, so evaluate it with the '
            f'exact training data it was trained on')
    return vocab


def load_model_weights(model, ckpt, path):
    mismatch = checkpoints.describe_state_dict_mismatch(model, ckpt['model_state_dict'])
    if mismatch:
        saved = ckpt.get('opt')
        hint = (f' (it was trained with --model={saved.model} --embed_dim={saved.embed_dim})'
                if hasattr(saved, 'model') and hasattr(saved, 'embed_dim') else '')
        raise UserError(f'{path}: does not fit --model={model_name(model)}: {mismatch}{hint}')
    model.load_state_dict(ckpt['model_state_dict'], strict=True)


def model_name(model):
    return {cls: name for name, cls in img_text_composition_models.MODELS.items()}[type(model)]


def open_run(opt):
    """The run folder is tensorboardX's default `runs/<date>_<time>_<host><comment>`; a resumed
    run keeps writing in its own folder, dropping any events logged after its checkpoint."""
    from tensorboardX import SummaryWriter
    if opt.resume:
        run_dir = os.path.dirname(os.path.abspath(opt.resume))
        logger = SummaryWriter(logdir=run_dir, purge_step=opt.resume_it + 1)
    else:
        logger = SummaryWriter(comment=opt.comment)
        run_dir = logger.logdir
        for key, value in sorted(vars(opt).items()):
            logger.add_text(key, str(value))
    print('Run folder:', run_dir)
    return logger, run_dir


def log_scalar(logger, tag, value, step):
    """`add_scalar` without tensorboardX's tag clean-up, which would turn the reference's names
    ('test recall_top1_correct_composition', 'total training loss') into underscored ones."""
    from tensorboardX.proto.summary_pb2 import Summary
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
    logger._get_file_writer().add_summary(summary, step)


def append_metrics_line(run_dir, record):
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


def log_retrieval_examples(logger, dataset, features, it, count=4, k=5):
    """Tensorboard image 'retrieval examples': `count` fixed, evenly spaced test queries, one row
    each (source image and text), then their top-k results, the correct ones framed in green.
    It reuses the retrieval test's features and draws from no random generator."""
    import retrieval_grid
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import make_image
    queries = dataset.get_test_queries()
    ids = sorted({i * len(queries) // count for i in range(count)})
    exclude = None if features['exclude'] is None else features['exclude'][ids]
    scores, neighbours = test_retrieval.top_k_with_scores(features['query'][ids],
                                                          features['gallery'], k, exclude)
    rows = [retrieval_grid.result_row(
        dataset, retrieval_grid.display_image(dataset, queries[i]['source_img_id']),
        queries[i]['mod']['str'], scores[r].tolist(), neighbours[r].tolist(),
        queries[i]['target_caption'], f'target: {queries[i]["target_caption"]}')
        for r, i in enumerate(ids)]
    picture = np.asarray(retrieval_grid.draw_rows(rows).convert('RGB'))  # HxWx3 uint8
    # Written directly, as log_scalar does, so that the tag keeps its space.
    summary = Summary(value=[Summary.Value(tag='retrieval examples', image=make_image(picture))])
    logger._get_file_writer().add_summary(summary, it)


def evaluate(opt, model, named_sets, logger, it, epoch, run_dir):
    metrics = {}
    for split, dataset in named_sets:
        features = {} if split == 'test' and dataset.get_test_queries() else None
        for name, value in test_retrieval.test(opt, model, dataset, features=features):
            metrics[f'{split} {name}'] = value
        if features:
            log_retrieval_examples(logger, dataset, features, it)
    for name, value in metrics.items():
        log_scalar(logger, name, value, it)
        print('    ', name, round(value, 4))
    append_metrics_line(run_dir, {'it': it, 'epoch': epoch, **metrics})
    return metrics


def build_checkpoint(opt, model, optimizer, trainset, progress):
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
        'rng': checkpoints.rng_states(),
        'dataset_sampler_state': trainset.get_sampler_state(),
    }


def save_checkpoint(opt, model, optimizer, trainset, progress, run_dir, name='latest_checkpoint.pth'):
    path = os.path.join(run_dir, name)
    checkpoints.save_atomic(build_checkpoint(opt, model, optimizer, trainset, progress), path)
    return path


def log_epoch_losses(progress, logger, optimizer, it):
    for name, values in progress['losses'].items():
        print('    Loss', name, round(float(np.mean(values)), 4))
        log_scalar(logger, name, np.mean(values), it)
    log_scalar(logger, 'learning_rate', optimizer.param_groups[0]['lr'], it)


def checkpoint_and_evaluate(opt, model, optimizer, trainset, testset, logger, run_dir, progress,
                            test_now, interrupt):
    """The reference's start-of-epoch block: losses, retrieval test, checkpoint."""
    log_epoch_losses(progress, logger, optimizer, progress['it'])
    if test_now:
        with interrupt.interruptible():
            metrics = evaluate(opt, model, [('train', trainset), ('test', testset)], logger,
                               progress['it'], progress['epoch'], run_dir)
        recall = metrics.get(TRACKED_METRIC)
        if recall is not None and (progress['best_recall'] is None or recall > progress['best_recall']):
            progress['best_recall'] = recall
            save_checkpoint(opt, model, optimizer, trainset, progress, run_dir, 'best_checkpoint.pth')
    save_checkpoint(opt, model, optimizer, trainset, progress, run_dir)
    logger.flush()


def train_one_epoch(opt, model, optimizer, loader, device, progress, interrupt):
    bar = tqdm(loader, desc=f'Training for epoch {progress["epoch"]}', dynamic_ncols=True,
               mininterval=1.0, disable=None)
    for batch in bar:
        try:
            losses = train_one_iteration(opt, model, optimizer, batch, device)
        except TrainingStopped as e:
            raise TrainingStopped(f'iteration {progress["it"] + 1}: {e}') from None
        progress['it'] += 1
        progress['batches_done'] += 1
        for name, value in losses.items():
            progress['losses'].setdefault(name, []).append(value)
        decay_learning_rate(opt, optimizer, progress['it'])
        if progress['it'] % 10 == 1:
            bar.set_postfix(loss=f'{losses[opt.loss]:.4f}', refresh=False)
        if interrupt.raised or progress['it'] >= opt.num_iters:
            break
    bar.close()


def train(opt, model, optimizer, trainset, testset, logger, run_dir, device, progress, interrupt):
    sampler = EpochBatchSampler(len(trainset), opt.batch_size, opt.seed)
    per_epoch = sampler.batches_per_epoch()
    if per_epoch == 0:
        raise UserError(f'--batch_size={opt.batch_size} is larger than the {len(trainset)} '
                        f'training images')
    loader = make_train_loader(opt, trainset, sampler, device)
    print('Begin training')
    tic = time.time()
    while progress['it'] < opt.num_iters:
        if progress['batches_done'] >= per_epoch:
            progress['epoch'] += 1
            progress['batches_done'] = 0
            print('It', progress['it'], 'epoch', progress['epoch'], 'Elapsed time',
                  round(time.time() - tic, 4), opt.comment)
            tic = time.time()
            try:
                checkpoint_and_evaluate(opt, model, optimizer, trainset, testset, logger, run_dir,
                                        progress, progress['epoch'] % 3 == 1, interrupt)
            except KeyboardInterrupt:
                # Stopped inside the retrieval test: a resumed run redoes this epoch's start.
                progress['epoch'] -= 1
                progress['batches_done'] = per_epoch
                break
            progress['losses'] = {}
        if interrupt.raised:
            break
        model.train()
        sampler.set_epoch(progress['epoch'], progress['batches_done'])
        train_one_epoch(opt, model, optimizer, loader, device, progress, interrupt)
        if interrupt.raised:
            break
    if interrupt.raised:
        return save_after_interrupt(opt, model, optimizer, trainset, progress, run_dir)
    print('Finished training at iteration', progress['it'])
    try:
        checkpoint_and_evaluate(opt, model, optimizer, trainset, testset, logger, run_dir,
                                progress, True, interrupt)
    except KeyboardInterrupt:
        return save_after_interrupt(opt, model, optimizer, trainset, progress, run_dir)
    return 0


def save_after_interrupt(opt, model, optimizer, trainset, progress, run_dir):
    path = os.path.abspath(save_checkpoint(opt, model, optimizer, trainset, progress, run_dir))
    print(f'Saved {path} at iteration {progress["it"]}. To continue:\n'
          f'  {shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))} '
          f'--resume={shlex.quote(path)}', file=sys.stderr)
    return 130


def test_only(opt, model, trainset, testset, logger, run_dir):
    dataset = testset if opt.test_split == 'test' else trainset
    it = getattr(opt, 'checkpoint_it', 0)
    metrics = evaluate(opt, model, [(opt.test_split, dataset)], logger, it, None, run_dir)
    print(f'{"metric":<45} {"recall":>8}')
    for name, value in metrics.items():
        print(f'{name:<45} {100 * value:>7.2f}%')
    results = {'checkpoint': opt.checkpoint, 'dataset': opt.dataset,
               'dataset_path': opt.dataset_path, 'split': opt.test_split, 'model': opt.model,
               'it': it, 'metrics': metrics}
    path = os.path.join(run_dir, 'test_results.json')
    with open(path, 'w') as f:
        json.dump(results, f, indent=1)
    print('Wrote', path)
    return 0


def initial_progress():
    return {'it': 0, 'epoch': -1, 'batches_done': float('inf'), 'losses': {}, 'best_recall': None}


def restore_progress(ckpt):
    return {'it': int(ckpt['it']), 'epoch': int(ckpt['epoch']),
            'batches_done': int(ckpt['batches_done']),
            'losses': {k: list(v) for k, v in ckpt.get('losses', {}).items()},
            'best_recall': ckpt.get('best_recall')}


def run(opt):
    check_opt(opt)
    resume_ckpt = checkpoints.load(opt.resume) if opt.resume else None
    if resume_ckpt is not None:
        opt = options_for_resume(opt, resume_ckpt)
        opt.resume_it = int(resume_ckpt['it'])
    if opt.seed is None:
        opt.seed = random.SystemRandom().randrange(2 ** 31)
        print('Seed', opt.seed)
    seed_everything(opt.seed)
    device = select_device(opt.device)
    ensure_default_dataset(opt)
    trainset, testset = load_dataset(opt)

    init_ckpt, init_path = resume_ckpt, opt.resume
    if init_ckpt is None and opt.checkpoint:
        init_ckpt, init_path = checkpoints.load(opt.checkpoint), opt.checkpoint
    vocab = None
    if init_ckpt is not None:
        adopt_checkpoint_architecture(opt, init_ckpt)
        vocab = checkpoint_vocabulary(opt, init_ckpt, init_path, trainset)
        opt.checkpoint_it = int(init_ckpt.get('it', 0))
        opt.img_weights = 'none'  # every weight comes from the checkpoint
    model = create_model(opt, trainset.get_all_texts(), vocab)
    if init_ckpt is not None:
        load_model_weights(model, init_ckpt, init_path)
    model = model.to(device)
    if opt.channels_last:
        model = model.to(memory_format=torch.channels_last)

    logger, run_dir = open_run(opt)
    try:
        if opt.test_only:
            return test_only(opt, model, trainset, testset, logger, run_dir)
        optimizer = create_optimizer(opt, model)
        progress = initial_progress()
        if resume_ckpt is not None:
            optimizer.load_state_dict(resume_ckpt['optimizer_state_dict'])
            progress = restore_progress(resume_ckpt)
            checkpoints.set_rng_states(resume_ckpt['rng'])
            trainset.set_sampler_state(resume_ckpt.get('dataset_sampler_state'))
            print(f'Resuming at iteration {progress["it"]}, epoch {progress["epoch"]}')
        with InterruptFlag() as interrupt:
            return train(opt, model, optimizer, trainset, testset, logger, run_dir, device,
                         progress, interrupt)
    finally:
        logger.close()


def main(argv=None):
    opt = parse_opt(argv)
    try:
        return run(opt)
    except (UserError, datasets.DatasetError, checkpoints.CheckpointError, TrainingStopped) as e:
        print(f'main.py: error: {e}', file=sys.stderr)
        return 1
    except OSError as e:  # a folder that cannot be written, a full disk: not a bug to trace
        print(f'main.py: error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('\nAborted.', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
