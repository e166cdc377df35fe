"""Checkpoint files: the reference format (`it`, `opt`, `model_state_dict`) plus what a run needs to
continue exactly and to stand alone (SPEC section 7)."""
import argparse
import contextlib
import os
import pickle
import random
import re
import secrets
import stat
import warnings

import numpy as np
import torch

import amp
import distributed

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used, reported to the user as one line."""


class CheckpointWriteError(OSError):
    """A checkpoint (or feature cache) that could not be written, in one line naming the file;
    the file it would have replaced is left as it was."""


class _WriteRecorder:
    """What torch.save writes to.  torch turns a failing write (a full disk) into a RuntimeError
    that does not say why ('unexpected pos 704 vs 598'), so the OSError is kept here."""

    def __init__(self, f):
        self.f = f
        self.error = None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def _temporary_name(path):
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.{base}.{os.getpid()}-{secrets.token_hex(4)}.tmp')


def remove_leftover_temporaries(path):
    """Temporary files of saves of `path` that were killed before their rename (this module's
    names, and mkstemp's of earlier versions)."""
    folder, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(r'\.' + re.escape(base) + r'(\.\d+-[0-9a-f]{8}|[a-z0-9_]{8})\.tmp')
    for name in os.listdir(folder):
        if pattern.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


def save_atomic(state, path):
    """Write to a temporary file in the same folder, then rename: a crash, a kill or a full disk
    during the save never leaves a truncated checkpoint behind.  A failed write is a
    CheckpointWriteError (an OSError); the file has the permissions the umask gives."""
    def write(f):
        recorder = _WriteRecorder(f)
        try:
            torch.save(state, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise  # not a failed write: a bug, to be seen whole
            raise recorder.error from None
    _write_atomic(path, 'wb', write)


def write_text_atomic(text, path):
    """save_atomic for a text file (UTF-8), such as the JSON files an evaluation server takes."""
    _write_atomic(path, 'w', lambda f: f.write(text))


def _write_atomic(path, mode, write):
    tmp = _temporary_name(path)
    try:
        remove_leftover_temporaries(path)
        # os.open applies the umask (mkstemp made checkpoints 0600, unlike every other file).
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), mode,
                       **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            kept = 'the previous file is unchanged' if os.path.exists(path) else 'nothing written'
            raise CheckpointWriteError(f'{path}: cannot write ({e.strerror or e}); {kept}') from None
        raise


def load(path):
    """Tensors, containers and the argparse Namespace only: never an unrestricted pickle."""
    check_regular_file(path)
    try:
        # warnings: torch's about plain pickles would come before the one-line error.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: no such file') from None
    except pickle.UnpicklingError as e:
        if is_unsafe_pickle_error(e):
            raise CheckpointError(f'{path}: not loaded: {describe_unsafe_content(path, e)}') from None
        raise CheckpointError(f'{path}: not a readable checkpoint ({first_line(e)})') from None
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f'{path}: not a readable checkpoint ({first_line(e)})') from None
    if not isinstance(ckpt, dict) or 'model_state_dict' not in ckpt:
        raise CheckpointError(f'{path}: not a TIRG checkpoint (no model_state_dict)')
    check_format_version(ckpt, path)
    state = ckpt['model_state_dict']
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f'{path}: model_state_dict is not a dict of named tensors')
    if not is_count(ckpt.get('it', 0)):
        raise CheckpointError(f'{path}: "it" is not an iteration number')
    vocab = ckpt.get('vocab', [])
    if not isinstance(vocab, (list, tuple)) or not all(isinstance(w, str) for w in vocab):
        raise CheckpointError(f'{path}: "vocab" is not a list of words (a {type(vocab).__name__})')
    return ckpt


def check_regular_file(path):
    """A FIFO named as a checkpoint would make torch.load wait for a writer for ever; a folder or
    a device is no checkpoint either."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # torch.load names what is wrong
    if not stat.S_ISREG(mode):
        kind = ('a folder' if stat.S_ISDIR(mode) else 'a FIFO' if stat.S_ISFIFO(mode)
                else 'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 'not a file')
        raise CheckpointError(f'{path}: not a checkpoint file ({kind})')


def is_count(value, least=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_format_version(ckpt, path):
    """A checkpoint written by a newer version of this code may hold what this one misreads."""
    version = ckpt.get('format_version', FORMAT_VERSION)  # released checkpoints carry none
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f'{path}: format_version {version!r} is not a version number')
    if version > FORMAT_VERSION:
        raise CheckpointError(f'{path}: checkpoint format version {version}, newer than this code '
                              f'reads (version {FORMAT_VERSION}); update the code to use it')


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_unsafe_pickle_error(error):
    """torch's weights_only refusal of a file that holds more than tensors and containers."""
    return 'Weights only load failed' in str(error)


def describe_unsafe_content(path, error):
    """What an unsafe file holds, said without torch's advice to load it with weights_only=False:
    that advice is the one thing not to follow for a file one does not trust."""
    names = re.findall(r'GLOBAL (\S+) was not an allowed global', str(error))
    if not names:
        with contextlib.suppress(Exception):  # plain pickles are not zip archives
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    if names:
        shown = ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
        what = f'Python objects besides tensors ({shown})'
    else:
        operand = re.search(r'Unsupported operand \d+', str(error))
        what = 'pickle instructions the safe loader does not run' + (
            f' ({operand.group(0)})' if operand else '')
    return (f'it holds {what}, and unpickling them could run code (only tensors, numbers, strings '
            f'and containers are read)')


def check_resumable(ckpt, path):
    """What --resume reads beyond the weights, checked before anything is written."""
    for key, kind in (('optimizer_state_dict', dict), ('rng', dict)):
        if not isinstance(ckpt.get(key), kind):
            raise CheckpointError(f'{path}: cannot resume from it: "{key}" is missing or not a '
                                  f'{kind.__name__}')
    for key, least in (('epoch', -1), ('batches_done', 0)):
        if not is_count(ckpt.get(key), least):
            raise CheckpointError(f'{path}: cannot resume from it: "{key}" is missing or not an '
                                  f'integer of {least} or more')
    missing = [k for k in ('python', 'numpy', 'torch') if k not in ckpt['rng']]
    if missing:
        raise CheckpointError(f'{path}: cannot resume from it: no {missing[0]} random state')
    check_rng_states(ckpt['rng'], path)


def check_rng_states(states, path):
    """Malformed random states are found by the setters themselves, tried here and undone."""
    current = rng_states()
    try:
        set_rng_states(states)
    except Exception as e:  # TypeError, ValueError, RuntimeError, ... by part and by fault
        raise CheckpointError(f'{path}: cannot resume from it: its random state is malformed '
                              f'({first_line(e)})') from None
    finally:
        set_rng_states(current)


def rng_states():
    states = {
        'python': random.getstate(),
        'numpy': _numpy_state_to_safe(np.random.get_state()),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(_as_python_state(states['python']))
    np.random.set_state(_numpy_state_from_safe(states['numpy']))
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


def _numpy_state_to_safe(state):
    name, keys, pos, has_gauss, cached = state
    return {'name': name, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
            'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)}


def _numpy_state_from_safe(state):
    return (state['name'], state['keys'].numpy().astype(np.uint32), state['pos'],
            state['has_gauss'], state['cached_gaussian'])


def _as_python_state(state):
    version, internal, gauss = state
    return version, tuple(internal), gauss


def describe_state_dict_mismatch(model, state_dict):
    """What differs between a model and a state dict, in one line, or None when they match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)} here'
              for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    parts = []
    if missing:
        parts.append(f'{len(missing)} keys missing (e.g. {missing[0]})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys (e.g. {unexpected[0]})')
    if shapes:
        parts.append(f'{len(shapes)} shapes differ (e.g. {shapes[0]})')
    return '; '.join(parts) or None


# ---------------------------------------------------------------------------------------------
# What a run's checkpoint holds besides the weights, and resuming from it.  The flags are
# main.py's: its parser and defaults are passed in, so that this module never imports main.py.

# What the best checkpoint tracks, per dataset (SPEC 2.4, 2.5, 2.6; recall@1 for the reference's three).
TRACKED_METRICS = {'fashioniq': 'test recall_mean', 'cirr': 'test recall_avg', 'shoes': 'test recall_mean'}
DEFAULT_TRACKED_METRIC = 'test recall_top1_correct_composition'


def tracked_metric(dataset):
    return TRACKED_METRICS.get(dataset, DEFAULT_TRACKED_METRIC)


def build(opt, model, optimizer, progress):
    """A run's checkpoint: the reference's keys, then what a resumed run needs to go on exactly."""
    return {
        'it': progress['it'],
        'opt': opt,
        'model_state_dict': model.state_dict(),
        'format_version': FORMAT_VERSION,
        'vocab': model.text_model.vocab.words(),
        'optimizer_state_dict': optimizer.state_dict(),
        'epoch': progress['epoch'],
        'batches_done': progress['batches_done'],
        'losses': progress['losses'],
        'best_recall': progress['best_recall'],
        'finished': progress.get('finished', False),
        'rng': rng_states(),
    }


def initial_progress():
    return {'it': 0, 'epoch': -1, 'batches_done': float('inf'), 'losses': {}, 'best_recall': None,
            'finished': False}


def restore_progress(ckpt):
    """A resumed run is unfinished until its own final evaluation is logged, whatever the
    checkpoint it continues says (a finished run resumes only to train further): stopped during
    training or during that evaluation, its checkpoint says unfinished, and resuming it again
    goes on or redoes the final test."""
    return {'it': int(ckpt['it']), 'epoch': int(ckpt['epoch']),
            'batches_done': int(ckpt['batches_done']),
            'losses': {k: list(v) for k, v in ckpt.get('losses', {}).items()},
            'best_recall': ckpt.get('best_recall'), 'finished': False}


def restore_training_state(optimizer, ckpt, seed):
    """The progress a resumed run starts from.  The checkpoint holds the first process's
    generators; the others draw their own dropout masks, from (seed, rank, iteration).  The
    examples need no state: they are keyed by position.  (A `dataset_sampler_state` of earlier
    checkpoints, a pending pair, is not needed.)"""
    optimizer.load_state_dict(ckpt['optimizer_state_dict'])
    progress = restore_progress(ckpt)
    set_rng_states(ckpt['rng'])
    rank = distributed.rank()
    if rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank, progress['it']])
                              .generate_state(1)[0]))
    distributed.print0(f'Resuming at iteration {progress["it"]}, epoch {progress["epoch"]}')
    return progress


# Flags that may differ between the sessions of one run: where, how fast and how long it runs,
# not what it computes (--amp only where the precision stays: check_resume_precision).
RESUMABLE_FLAGS = {'resume', 'num_iters', 'loader_num_workers', 'device', 'dataset_path', 'amp',
                   'channels_last', 'fast_decode', 'sync_bn', 'comment', 'f'}


def options_for_resume(opt, ckpt, defaults):
    """The run's own options (`defaults`: every flag's default).  A flag given again with the
    run's value is fine (the original command plus --resume works); a real change of a flag that
    shapes the experiment is refused."""
    saved = ckpt.get('opt')
    if 'optimizer_state_dict' not in ckpt or not isinstance(saved, argparse.Namespace):
        raise CheckpointError(f'--resume={opt.resume}: this checkpoint holds only model weights '
                              f'(released format?); use --checkpoint to start a new run from it')
    check_resumable(ckpt, opt.resume)
    if opt.checkpoint is not None:
        raise CheckpointError('--checkpoint starts a new run from weights; --resume continues one: '
                              'give one of them')
    for flag in opt.explicit_flags:
        if flag in RESUMABLE_FLAGS or not hasattr(defaults, flag):
            continue
        before, given = getattr(saved, flag, getattr(defaults, flag)), getattr(opt, flag)
        if flag == 'batch_size' and given == getattr(saved, 'requested_batch_size', None):
            continue  # the original command on a training set smaller than its batch
        if given != before:
            changeable = ', '.join('--' + f for f in sorted(RESUMABLE_FLAGS - {'resume', 'f'}))
            raise CheckpointError(f'--{flag}={given}: the run in {opt.resume} used --{flag}={before}; '
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
            raise CheckpointError(f'--resume={opt.resume}: the run\'s dataset folder '
                                  f'{resumed.dataset_path} is not there; give --dataset_path=DIR')
    return resumed


def check_resume_target(opt, ckpt):
    it = int(ckpt['it'])
    if opt.num_iters < it or (opt.num_iters == it and ckpt.get('finished', False)):
        raise CheckpointError(f'--num_iters={opt.num_iters}: the run in {opt.resume} is already at '
                              f'iteration {it}; give a larger --num_iters to train further')


def check_resume_precision(opt, ckpt):
    """A run computes in one precision (opt.precision, main.choose_precision) for its whole life,
    so that its recalls are a float32 or a bfloat16 result, which results_table.py keeps apart,
    never a mix of the two."""
    before = getattr(ckpt['opt'], 'precision', None)  # None: saved before the CPU's --amp
    if before is None or before == opt.precision:
        return
    if before == amp.BFLOAT16:
        how = f'{amp.CPU_BF16_ENV}=1 continues it in bfloat16 on a CPU without native bfloat16 (slower)'
    else:
        how = f'resume it without --amp ({amp.CPU_BF16_ENV}=0 on a CPU)'
    raise CheckpointError(f'--resume={opt.resume}: the run computed in {before}, and this session '
                          f'would compute in {opt.precision}; one run\'s results would mix the two: '
                          f'{how}, or start a new run from its weights with --checkpoint={opt.resume}')


# Options a checkpoint stores that say how that session was started, not what it trains.
UNCHECKED_SAVED_OPTIONS = {'f', 'resume', 'checkpoint', 'test_only'}
TYPE_NAMES = {int: 'an integer', float: 'a number', str: 'a text'}


def refuse_stored_options(path, message):
    raise CheckpointError(f'{path}: its stored options are not valid flags: {message}')


def parse_stored_options(ckpt, path, parser):
    """The options a checkpoint stores, parsed exactly as the same flags on the command line by
    `parser` (a new main.get_args_parser(): types and choices), or None when it stores none;
    the caller then checks them as it checks the command line's.  Flags added to the parser are
    covered without a list here.  Options the parser does not know are left alone."""
    saved = ckpt.get('opt')
    if saved is None:
        return None
    if not isinstance(saved, argparse.Namespace):
        raise CheckpointError(f'{path}: its options ("opt") are a '
                              f'{type(saved).__name__}, not an argparse Namespace')

    def refuse(message):
        refuse_stored_options(path, message)
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
    return parsed
