"""Train and test TIRG and its baselines (SPEC sections 1, 5, 7 and 9).

    python main.py                                   # TIRG on the synthetic CSS data (generated)
    python main.py --dataset=css3d --dataset_path=DIR --num_iters=160000 --model=tirg
    python main.py --test_only --checkpoint=runs/.../latest_checkpoint.pth --dataset_path=DIR
    python main.py <the run's flags> --resume=runs/.../latest_checkpoint.pth
    torchrun --nproc_per_node=8 main.py <the same flags>      # one process per GPU, same experiment
"""
import argparse
import os
import random
import shlex
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import amp
import checkpoints
import cirr
import datasets
import distributed
import fashioniq
import img_text_composition_models
import model_registry
import retrieval_grid
import run_folder
import run_lock
import sampling
import shoes
import test_retrieval
from experiment import (DEFAULT_DATASET_PATH, UserError, add_photo_benchmark_flags,
                        adopt_checkpoint_architecture, adopt_checkpoint_dataset,
                        adopt_checkpoint_query_images, build_model, check_architecture_flags,
                        check_css_query_images, check_img_weights, check_model_fits_dataset,
                        choose_precision, load_data, seed_process, select_device)
from interrupts import InterruptFlag

# EpochBatchSampler seeds each epoch with seed * sampling.SEED_STRIDE + epoch, which must fit
# in 64 bits.
MAX_SEED = 2 ** 32 - 1
MAX_EMBED_DIM = 4096
FLOAT32_MAX = float(np.finfo(np.float32).max)


# The flags, and every check that needs no data (the run's checkpoint is input too).
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
    p.add_argument('--amp', action='store_true',
                   help='bfloat16 autocast on CUDA and on CPUs with native bfloat16 (off: exact float32)')
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
    run_folder.check_comment(opt.comment)
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


def load_checkpoint(path):
    """checkpoints.load, then the checkpoint's options checked as flags: they are input too."""
    ckpt = checkpoints.load(path)
    check_checkpoint_options(ckpt, path)
    return ckpt


def check_checkpoint_options(ckpt, path):
    """Each option a checkpoint stores is parsed and checked exactly as the same flag on the
    command line: types and choices by get_args_parser(), then check_opt."""
    parsed = checkpoints.parse_stored_options(ckpt, path, get_args_parser())
    if parsed is None:
        return
    try:
        check_opt(parsed)
    except UserError as e:
        checkpoints.refuse_stored_options(path, str(e))


def prepare_options(opt):
    """Every check that needs no data, before anything is written."""
    check_opt(opt)
    resume_ckpt = load_checkpoint(opt.resume) if opt.resume else None
    if resume_ckpt is not None:
        opt = checkpoints.options_for_resume(opt, resume_ckpt, get_args_parser().parse_args([]))
        opt.resume_it = int(resume_ckpt['it'])
        checkpoints.check_resume_target(opt, resume_ckpt)
    init_ckpt, init_path = resume_ckpt, opt.resume
    if init_ckpt is None and opt.checkpoint:
        init_ckpt, init_path = load_checkpoint(opt.checkpoint), opt.checkpoint
        if not opt.test_only:  # a run from these weights is an experiment of its own
            opt.initial_checkpoint = run_folder.initial_checkpoint(opt.checkpoint)
        adopt_checkpoint_dataset(opt, init_ckpt, init_path)
        adopt_checkpoint_query_images(opt, init_ckpt)
    if init_ckpt is not None:
        check_architecture_flags(opt, init_ckpt, init_path)
        adopt_checkpoint_architecture(opt, init_ckpt)
    check_model_fits_dataset(opt)
    # After the checkpoint's dataset is adopted: a CIRR checkpoint needs no --dataset=cirr.
    if opt.test_split == 'test1' and (opt.dataset != 'cirr' or not opt.test_only):
        raise UserError('--test_split=test1: only with --dataset=cirr --test_only (CIRR\'s '
                        'evaluation-server files)')
    if opt.test_split == 'test1' and opt.skip_missing_images:
        raise UserError(cirr.SKIPPED_TEST1)
    check_css_query_images(opt)
    run_folder.check_writable_folders(opt)
    if init_ckpt is None:
        check_img_weights(opt)
    return opt, resume_ckpt, init_ckpt, init_path


def check_processes(opt):
    if opt.batch_size % distributed.world_size():
        raise UserError(f'--batch_size={opt.batch_size}: the global batch must divide by the '
                        f'{distributed.world_size()} processes')
    if opt.sync_bn and not (distributed.is_initialized() and torch.cuda.is_available()):
        raise UserError('--sync_bn: SyncBatchNorm needs several processes (torchrun) on CUDA')


# The model as it trains (the data and the model are built by experiment.py).
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


# The training loop.
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
    with amp.autocast(opt.precision, device.type):  # as experiment.choose_precision chose
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


def stop_requested(run, progress):
    """Every process stops at the same iteration (torchrun delivers signals at slightly different
    times), so the decision is shared."""
    return distributed.any_process(run['interrupt'].raised, run['device'])


def train_one_epoch(run, loader, progress):
    opt = run['opt']
    bar = tqdm(loader, desc=f'Training for epoch {progress["epoch"]}', dynamic_ncols=True,
               mininterval=1.0, disable=None if distributed.is_main_process() else True)
    record = sampling.RECORD_BATCHES_ENV in os.environ
    for batch in bar:
        if record:
            sampling.record_batch(batch, progress['it'] + 1)
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


def log_epoch_losses(run, progress):
    logger, it = run['logger'], progress['it']
    for name, values in progress['losses'].items():
        distributed.print0('    Loss', name, round(float(np.mean(values)), 4))
        logger.add_scalar(name, np.mean(values), it)
    logger.add_scalar('learning_rate', run['optimizer'].param_groups[0]['lr'], it)


def checkpoint_and_evaluate(run, progress, test_now):
    """The reference's start-of-epoch block: losses, retrieval test, checkpoint."""
    opt = run['opt']
    log_epoch_losses(run, progress)
    if test_now:
        with run['interrupt'].interruptible():
            metrics = evaluate(opt, run['model'], [('train', run['trainset']), ('test', run['testset'])],
                               run['logger'], progress['it'], progress['epoch'], run['dir'])
        recall = metrics.get(checkpoints.tracked_metric(opt.dataset))
        if recall is not None and (progress['best_recall'] is None or recall > progress['best_recall']):
            progress['best_recall'] = recall
            save_checkpoint(run, progress, 'best_checkpoint.pth')
    save_checkpoint(run, progress)
    run['logger'].flush()


def save_checkpoint(run, progress, name='latest_checkpoint.pth'):
    """Written by the first process only; returns the path there (None elsewhere)."""
    if run['dir'] is None:
        return None
    path = os.path.join(run['dir'], name)
    checkpoints.save_atomic(checkpoints.build(run['opt'], run['model'], run['optimizer'], progress), path)
    return path


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


def train(run, progress):
    opt, trainset = run['opt'], run['trainset']
    sampler = sampling.EpochBatchSampler(sampling.num_training_examples(trainset), opt.batch_size,
                                         opt.seed, distributed.rank(), distributed.world_size())
    per_epoch = sampler.batches_per_epoch()
    loader = sampling.make_train_loader(opt, trainset, sampler, run['device'], distributed.rank())
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


# Evaluation.
def evaluate_split(opt, model, dataset, features=None):
    """[(metric name, recall)] of one split, by the dataset's own protocol."""
    if opt.dataset in ('fashioniq', 'cirr', 'shoes') and dataset.get_test_queries():
        protocol = {'fashioniq': fashioniq, 'cirr': cirr, 'shoes': shoes}[opt.dataset]
        return protocol.evaluate(model, dataset, opt.batch_size, opt.loader_num_workers, opt.precision)
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
            retrieval_grid.log_retrieval_examples(logger, dataset, features, it)
    for name, value in metrics.items():
        logger.add_scalar(name, value, it)  # stored as tensorboardX cleans it: test_recall_top1_...
        distributed.print0('    ', name, round(value, 4))
    if run_dir is not None:
        run_folder.append_metrics_line(run_dir, {'it': it, 'epoch': epoch, **metrics})
    return metrics


def test_only(run):
    opt = run['opt']
    dataset = run['testset'] if opt.test_split != 'train' else run['trainset']
    it = getattr(opt, 'checkpoint_it', 0)
    if opt.test_split == 'test1':
        cirr.write_test1_submission(run['model'], dataset, opt.batch_size, opt.loader_num_workers,
                                    run['dir'], opt.precision)
        return 0
    metrics = evaluate(opt, run['model'], [(opt.test_split, dataset)], run['logger'], it, None, run['dir'])
    if run['dir'] is None:
        return 0
    print(f'{"metric":<45} {"recall":>8}')
    for name, value in metrics.items():
        print(f'{name:<45} {100 * value:>7.2f}%')
    run_folder.write_test_results(run['dir'], opt, dataset, it, metrics)
    return 0


# main: the script, from the flags to the exit code.
def run(opt):
    opt, resume_ckpt, init_ckpt, init_path = prepare_options(opt)
    device = distributed.device_for_process(select_device(opt.device))
    choose_precision(opt, device, resume_ckpt)
    run_folder.lock_resumed_run_folder(opt)
    check_processes(opt)
    if opt.seed is None:
        opt.seed = distributed.broadcast_object(random.SystemRandom().randrange(2 ** 31))
        distributed.print0('Seed', opt.seed)
    seed_process(opt, distributed.rank())
    sampling.cap_loader_workers(opt)
    trainset, testset = load_data(opt)
    model = build_model(opt, init_ckpt, init_path, trainset, device)
    if not opt.test_only:
        sampling.fit_batch_size(opt, trainset)
    logger, run_dir = run_folder.open_run(opt)
    if run_dir is not None and resume_ckpt is not None and run_folder.resume_in_place(opt.resume):
        run_folder.drop_metrics_after_checkpoint(run_dir, resume_ckpt,
                                                 run_folder.redoes_final_evaluation(opt, resume_ckpt))
    run = {'opt': opt, 'model': model, 'trainset': trainset, 'testset': testset, 'device': device,
           'logger': logger, 'dir': run_dir, 'optimizer': None}
    try:
        if run_dir is not None:
            run_folder.write_options_file(run_dir, opt, device)
        if opt.test_only:
            return test_only(run)
        run['train_model'] = wrap_for_training(opt, model, device)
        run['optimizer'] = create_optimizer(opt, model)
        progress = checkpoints.initial_progress()
        if resume_ckpt is not None:
            progress = checkpoints.restore_training_state(run['optimizer'], resume_ckpt, opt.seed)
        with InterruptFlag() as interrupt:
            run['interrupt'] = interrupt
            return train(run, progress)
    finally:
        logger.close()


USER_ERRORS = (UserError, datasets.DatasetError, checkpoints.CheckpointError, TrainingStopped,
               run_lock.FolderInUse, OSError)  # OSError: a folder that cannot be written, a full disk: not a bug to trace


def main(argv=None):
    opt = parse_opt(argv)
    try:
        return run(opt)
    except USER_ERRORS as e:
        print(f'main.py: error: {e}', file=sys.stderr)
        return 1
    except run_folder.RefusedByFirstProcess:
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
