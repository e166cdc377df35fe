"""Checkpoint files: the reference format (`it`, `opt`, `model_state_dict`) plus what a run needs to
continue exactly and to stand alone (SPEC section 7)."""
import argparse
import contextlib
import os
import pickle
import random
import re
import secrets
import warnings

import numpy as np
import torch

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
