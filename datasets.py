"""Datasets with the reference API (SPEC section 2).

Every dataset offers `imgs`, `get_all_texts()`, `get_test_queries()`, `get_img(idx, raw_img)`,
`__len__` (number of images) and `__getitem__` returning one training example as a dict.
Training examples are random draws (a modification, a target, a caption order).  `dataset[key]`
with a `DrawKey` (what main.py's sampler yields) draws from generators seeded by the key's seed,
epoch and position in the epoch's global order: the example at a position is the same whichever
process or DataLoader worker loads it, and after a resume.  `dataset[i]` with a plain int draws
from the global `random` and `numpy.random` generators, as the reference did (the retrieval test's
sample of training examples seeds them and uses this).
"""
import itertools
import os
import pickle
import random
import re
import reprlib
import signal
import sys
from typing import NamedTuple

import numpy as np
import PIL.Image
import torch
import torchvision

from css_scenes import CSS_COLORS, CSS_DATA_FILE, CSS_SHAPES, draw_css_2d_image  # noqa: F401 (datasets.X, as before)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class DatasetError(Exception):
    """A problem with the data on disk, reported to the user as one line.

    Raised inside a DataLoader worker, torch re-raises it in the main process as
    `DatasetError('Caught DatasetError in DataLoader worker process N.\\nOriginal Traceback ...')`;
    the constructor keeps only the original one-line message, so the user never sees a traceback.
    """

    def __init__(self, message='', *args):
        super().__init__(_unwrap_worker_message(message), *args)


def _unwrap_worker_message(message):
    if not isinstance(message, str) or not message.startswith('Caught ') or \
            '\nOriginal Traceback' not in message:
        return message
    lines = [line for line in message.splitlines() if line.strip()]
    match = re.match(r'^[\w.]+: (.*)$', lines[-1])
    return match.group(1) if match else message


class ImageReadError(DatasetError):
    """An image file that is missing, unreadable or corrupt; `path` names it."""

    def __init__(self, message='', path=None):
        super().__init__(message)
        self.path = path


def css_transform():
    return torchvision.transforms.Compose([
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def photo_transform():
    """Fashion200k and MIT-States."""
    return torchvision.transforms.Compose([
        torchvision.transforms.Resize(224),
        torchvision.transforms.CenterCrop(224),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def identity_collate(examples):
    return examples


def collate_training_batch(examples):
    """Stack images into tensors inside the worker, so the main process only moves tensors."""
    batch = {
        'source_img_data': torch.stack([torch.as_tensor(e['source_img_data']) for e in examples]).float(),
        'target_img_data': torch.stack([torch.as_tensor(e['target_img_data']) for e in examples]).float(),
        'mod_str': [str(e['mod']['str']) for e in examples],
    }
    for key in ('source_img_id', 'target_img_id'):
        batch[key] = torch.tensor([int(e[key]) for e in examples])
    return batch


def worker_init_fn(worker_id):
    """The reference let every worker inherit one numpy state, so workers drew the same examples.
    torch gives each worker its own seed (base seed + worker id); derive the others from it."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
    # Ctrl-C reaches the whole process group; the main process decides what it means (finish the
    # iteration and save), so a worker must not die of it mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class DrawKey(NamedTuple):
    """What decides one training example: its place in the epoch's global order.  `index` is the
    dataset index at `position`; CSS and MIT-States draw positions 2k and 2k+1 as a pair (one
    source, two modifications), so `pair_index` is the index at position 2k."""
    index: int
    seed: int
    epoch: int
    position: int
    pair_index: int


def keyed_streams(key, position, attempt=0):
    """(numpy RandomState, Python Random), the same for a (seed, epoch, position, attempt) in any
    process: the generators a keyed example draws from.  `attempt` counts redraws after an
    unreadable image (where one draw cannot simply continue, as for a pair's two positions)."""
    state = np.random.SeedSequence([key.seed, key.epoch, position, attempt]).generate_state(2)
    return np.random.RandomState(int(state[0])), random.Random(int(state[1]))


def global_streams():
    """The reference's generators: numpy's and Python's global streams."""
    return np.random, random


def _plain_ints(value):
    if isinstance(value, (list, tuple)):
        return [_plain_ints(v) for v in value]
    return None if value is None else int(value)


class BaseDataset(torch.utils.data.Dataset):

    def __init__(self):
        super().__init__()
        self.imgs = []
        self.test_queries = []

    def get_loader(self, batch_size, shuffle=False, drop_last=False, num_workers=0,
                   collate_fn=identity_collate, **kwargs):
        return torch.utils.data.DataLoader(
            self, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
            drop_last=drop_last, collate_fn=collate_fn, worker_init_fn=worker_init_fn, **kwargs)

    def get_test_queries(self):
        return self.test_queries

    def get_all_texts(self):
        raise NotImplementedError

    def __len__(self):
        return len(self.imgs)

    def __getitem__(self, idx):
        return self.generate_random_query_target()

    def generate_random_query_target(self):
        raise NotImplementedError

    def get_img(self, idx, raw_img=False):
        raise NotImplementedError

    def get_query_img(self, idx, raw_img=False):
        """Image `idx` as a query's source shows it: the gallery's image, except in CSS 2D->3D."""
        return self.get_img(idx, raw_img)

    # Attributes of a stateful training sampler (ints and lists of ints), saved in checkpoints so
    # that a resumed run draws exactly the examples an uninterrupted one would.
    _sampler_state_attrs = ()

    def get_sampler_state(self):
        return {name: _plain_ints(getattr(self, name)) for name in self._sampler_state_attrs}

    def set_sampler_state(self, state):
        for name, value in (state or {}).items():
            setattr(self, name, value)

    def reset_sampler_state(self):
        """A fresh sampler: every state attribute None (no pending pair)."""
        for name in self._sampler_state_attrs:
            setattr(self, name, None)

    def summary(self):
        """One line describing what was loaded."""
        captions = {img['captions'][0] for img in self.imgs}
        return (f'{type(self).__name__} {getattr(self, "split", "")}: {len(self.imgs)} images, '
                f'{len(captions)} unique captions, {len(self.get_test_queries())} test queries')


# The globals a CSS data file may name (SPEC 2.1): array and scalar reconstruction and dtype, under
# the module names of numpy 1 (`numpy.core`, also what Python 2 wrote) and numpy 2 (`numpy._core`).
CSS_PICKLE_GLOBALS = frozenset(
    [(module, name) for module in ('numpy.core.multiarray', 'numpy._core.multiarray')
     for name in ('_reconstruct', 'scalar')] + [('numpy', 'ndarray'), ('numpy', 'dtype')])


def _latin1_bytes(text, encoding):
    """Python 3 pickles bytes with protocol 2 as `_codecs.encode(text, 'latin1')` (old numpy's
    np.save did so); only that conversion is admitted, not the other codecs."""
    if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
        raise pickle.UnpicklingError(f'refusing _codecs.encode with {encoding!r}')
    return text.encode('latin1')


def _dtype(spec, *args):
    """numpy.dtype as pickles call it, with a type code: numpy's error for anything else quotes
    the whole argument, which never ends for a structure of shared references."""
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f'refusing numpy.dtype of {type(spec).__name__} (expected '
                                     f'a type code)')
    return np.dtype(spec, *args)


class _CSSUnpickler(pickle.Unpickler):
    """np.load(allow_pickle=True) runs whatever a hostile file names; this admits only the
    numpy globals of CSS_PICKLE_GLOBALS (dicts, lists, strings and numbers need none)."""

    def find_class(self, module, name):
        if (module, name) == ('_codecs', 'encode'):
            return _latin1_bytes
        if (module, name) == ('numpy', 'dtype'):
            return _dtype
        if (module, name) not in CSS_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f'refusing {module}.{name}: a CSS data file holds only '
                                         f'dicts, lists, strings, numbers and numpy arrays')
        return super().find_class(module, name)


def _read_css_pickle(data_file):
    """The object a .npy file of one pickled object (a 0-d object array) holds."""
    with open(data_file, 'rb') as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f'.npy format version {version} (expected 1.0 or 2.0)')
        if dtype != np.dtype(object) or shape != ():
            raise ValueError(f'expected one pickled object (a 0-d object array), found an array '
                             f'of shape {shape} and type {dtype}')
        # Python 2 wrote byte strings: latin1 maps every byte to one character, as np.load does.
        obj = _CSSUnpickler(f, encoding='latin1').load()
    return obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj


def load_css_data(path):
    data_file = os.path.join(path, CSS_DATA_FILE)
    if not os.path.isfile(data_file):
        raise DatasetError(f'{data_file}: CSS data file not found (is --dataset_path a CSS3D '
                           f'dataset? make_css_dataset.py generates one)')
    try:
        data = _read_css_pickle(data_file)
    except Exception as e:  # corrupt or foreign files raise many different types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason if len(reason) <= 200 else reason[:197] + '...'
        raise DatasetError(f'{data_file}: cannot read CSS data ({reason})') from None
    if not isinstance(data, dict):
        raise DatasetError(f'{data_file}: expected a dict of splits (train, test), found '
                           f'{_kind(data)}')
    return data


class _BoundedRepr(reprlib.Repr):
    """A repr for messages that quote data: a few levels and items of any structure.  A file of
    shared references makes a list of a few hundred bytes whose full repr never ends."""

    def __init__(self):
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = 4
        self.maxset = self.maxfrozenset = self.maxdeque = 4
        self.maxstring = self.maxlong = self.maxother = 40

    def repr_ndarray(self, x, level):  # numpy's own repr prints every element of an object array
        return f'array(shape={x.shape}, dtype={x.dtype})'


_BOUNDED_REPR = _BoundedRepr()
QUOTE_CHARS = 60


def preview(value):
    """The start of the repr of `value`, in bounded time and length whatever it holds."""
    text = _BOUNDED_REPR.repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS - 3] + '...'


ECHO_CHARS = 80


def echoed(text):
    """A name or line of a user's file as a message shows it: control characters (a line break)
    escaped, and cut after ECHO_CHARS characters, so a 20 MB line is not printed whole."""
    shown = ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text[:ECHO_CHARS])
    return shown + ('...' if len(text) > ECHO_CHARS else '')


def preview_keys(mapping, shown=8):
    """The first keys of a dict (text keys sorted, then the others), for a message."""
    keys = sorted(k for k in mapping if isinstance(k, str))
    keys += [preview(k) for k in itertools.islice((k for k in mapping if not isinstance(k, str)),
                                                  shown + 1)]
    return ', '.join(keys[:shown]) + (', ...' if len(keys) > shown else '')


def _kind(value):
    """What a value is, for an error message: its type and the start of its repr."""
    return f'{type(value).__name__} {preview(value)}'


def _is_sequence(value):
    return isinstance(value, (list, tuple, np.ndarray))


def _is_index(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_css_split(data_file, split, split_data):
    """A DatasetError naming the file and the first problem, where the split's structure is not
    what SPEC 2.1 describes; the sampler would otherwise fail on it mid-training."""
    def fail(problem):
        raise DatasetError(f'{data_file}: split "{split}": {problem}')
    if not isinstance(split_data, dict):
        fail(f'expected a dict with objects_img and mods, found {_kind(split_data)}')
    for key in ('objects_img', 'mods'):
        if key not in split_data:
            fail(f'no "{key}" (it has {preview_keys(split_data) or "nothing"})')
    objects_img, mods = split_data['objects_img'], split_data['mods']
    if not _is_sequence(objects_img):
        fail(f'objects_img: expected a list (one list of objects per image), found {_kind(objects_img)}')
    for i, objects in enumerate(objects_img):
        if not _is_sequence(objects) or not all(isinstance(o, dict) for o in objects):
            fail(f'objects_img[{i}]: expected a list of objects (dicts), found {_kind(objects)}')
    labels = split_data.get('labels')
    if labels is not None and (not _is_sequence(labels) or len(labels) != len(objects_img)):
        fail(f'labels: expected one per image ({len(objects_img)}), found {_kind(labels)}')
    for i, label in enumerate(labels if labels is not None else ()):
        if not _is_index(label):  # an image's caption is str(label)
            fail(f'labels[{i}]: expected an integer, found {_kind(label)}')
    if not _is_sequence(mods):
        fail(f'mods: expected a list, found {_kind(mods)}')
    for m, mod in enumerate(mods):
        _check_css_mod(fail, m, mod, len(objects_img))


def _check_css_mod(fail, m, mod, num_images):
    if not isinstance(mod, dict) or not {'from', 'to', 'to_str'} <= set(mod):
        fail(f'mods[{m}]: expected a dict with from, to and to_str, found {_kind(mod)}')
    if not isinstance(mod['to_str'], str):
        fail(f'mods[{m}]["to_str"]: expected a text, found {_kind(mod["to_str"])}')
    if not (_is_sequence(mod['from']) and _is_sequence(mod['to'])
            and len(mod['from']) == len(mod['to'])):
        fail(f'mods[{m}]: "from" and "to" must be lists of image indices of the same length')
    for key in ('from', 'to'):
        for value in mod[key]:
            if not _is_index(value) or not 0 <= value < num_images:
                fail(f'mods[{m}]["{key}"]: {preview(value)} is not an image index (0 to '
                     f'{num_images - 1})')


def check_css_drawable(data_file, split, objects_img,
                       why='there is no images/ folder, so images are drawn in 2D'):
    """What draw_css_2d_image needs of every object, checked before training draws them."""
    for i, objects in enumerate(objects_img):
        for obj in objects:
            pos = obj.get('pos')
            if (obj.get('shape') not in CSS_SHAPES or not isinstance(obj.get('color'), str)
                    or obj.get('color') not in CSS_COLORS
                    or 'size' not in obj or not _is_sequence(pos) or len(pos) != 2
                    or not all(isinstance(v, (int, float, np.number)) and 0 <= v <= 1
                               for v in pos)):
                raise DatasetError(
                    f'{data_file}: split "{split}": objects_img[{i}]: cannot draw {_kind(obj)} '
                    f'(an object needs shape in {"/".join(CSS_SHAPES)}, color in '
                    f'{"/".join(CSS_COLORS)}, size and pos = (row, column) fractions; {why})')


class CSSDataset(BaseDataset):
    """CSS3D (SPEC 2.1): scenes of coloured objects and their modification texts."""

    _sampler_state_attrs = ('last_from', 'last_mod')

    def __init__(self, path, split='train', transform=None, use_2d=False, query_images='3d'):
        """`use_2d`: every image drawn in 2D.  `query_images='2d'` (2D->3D): the source image of
        every training example and test query is drawn in 2D, targets and gallery are the PNGs."""
        super().__init__()
        if query_images not in ('2d', '3d'):
            raise ValueError(f'query_images={query_images!r}: expected 2d or 3d')
        self.path = path
        self.split = split
        self.transform = transform
        self.query_images = query_images
        data = load_css_data(path)
        data_file = os.path.join(path, CSS_DATA_FILE)
        if split not in data:
            raise DatasetError(f'{data_file}: no "{split}" split (has '
                               f'{preview_keys(data) or "none"})')
        check_css_split(data_file, split, data[split])
        self.data = data
        self.mods = data[split]['mods']
        labels = data[split].get('labels')
        for i, objects in enumerate(data[split]['objects_img']):
            label = labels[i] if labels is not None else i
            self.imgs.append({'objects': objects, 'label': label, 'captions': [str(label)]})

        self.imgid2modtarget = {i: [] for i in range(len(self.imgs))}
        for mod_id, mod in enumerate(self.mods):
            for source, target in zip(mod['from'], mod['to']):
                self.imgid2modtarget[source].append((mod_id, target))
        self.img_path = self._find_image_folder(use_2d)
        if query_images == '2d' and self.img_path is None and not use_2d:
            raise DatasetError(f'{os.path.join(path, "images")}: no such folder; 2D->3D queries '
                               f'need the rendered PNGs as targets and gallery')
        if self.img_path is None:
            check_css_drawable(data_file, split, data[split]['objects_img'])
        elif query_images == '2d':
            check_css_drawable(data_file, split, data[split]['objects_img'],
                               why='query images are drawn in 2D (--css_query_images=2d)')
        self._reported_images = set()
        self.last_from, self.last_mod = None, []
        self.generate_test_queries_()

    def _find_image_folder(self, use_2d):
        """The images/ folder, or None: images drawn in 2D.  Decided once, for the whole split:
        with an images/ folder every PNG the data names must be there (one stat each)."""
        folder = os.path.join(self.path, 'images')
        if use_2d or not os.path.isdir(folder):
            return None
        missing = [i for i in range(len(self.imgs))
                   if not os.path.isfile(self._png_path(folder, i))]
        if missing:
            names = ', '.join(os.path.basename(self._png_path(folder, i)) for i in missing[:3])
            raise DatasetError(
                f'{folder}: {len(missing)} of the {len(self.imgs)} {self.split} images are '
                f'missing ({names}{", ..." if len(missing) > 3 else ""}); without the images/ '
                f'folder every image is drawn in 2D instead')
        return folder

    def _png_path(self, folder, idx):
        return os.path.join(folder, 'css_%s_%06d.png' % (self.split, int(idx)))

    def image_file(self, idx):
        """The PNG of image `idx`, or None when images are drawn in 2D."""
        return None if self.img_path is None else self._png_path(self.img_path, idx)

    def generate_test_queries_(self):
        self.test_queries = [
            {'source_img_id': source,
             'target_caption': self.imgs[target]['captions'][0],
             'target_img_id': target,
             'mod': {'str': mod['to_str']}}
            for mod in self.mods for source, target in zip(mod['from'], mod['to'])]

    def get_all_texts(self):
        return [mod['to_str'] for mod in self.mods]

    def _first_query(self, np_rng):
        mod_id = np_rng.randint(0, len(self.mods))
        mod = self.mods[mod_id]
        j = np_rng.randint(0, len(mod['from']))
        return mod['from'][j], mod_id, mod['to'][j]

    def _other_query(self, py_rng, source, used_mods):
        """The same source with a modification not in `used_mods`, or None when it has none."""
        others = [(m, t) for m, t in self.imgid2modtarget[source] if m not in used_mods]
        if not others:
            return None
        mod_id, target = py_rng.choice(others)
        return source, mod_id, target

    def get_1st_training_query(self):
        source, mod_id, target = self._first_query(np.random)
        self.last_from, self.last_mod = source, [mod_id]
        return source, mod_id, target

    def get_2nd_training_query(self):
        """The same source with another modification.  The reference retried forever when the
        source had no other one; here a fresh first query is drawn instead."""
        query = self._other_query(random, self.last_from, self.last_mod)
        if query is None:
            return self.get_1st_training_query()
        self.last_mod.append(query[1])
        return query

    def _keyed_query(self, key, attempt):
        """Positions 2k and 2k+1 of the global order draw the pair's first query from the same
        generators; 2k+1 goes on to its second (or, when the source has no other modification,
        a fresh first query).  A redraw after an unreadable image moves the pair to its next
        attempt together when the shared source was unreadable."""
        np_rng, py_rng = keyed_streams(key, key.position - key.position % 2, attempt)
        query = self._first_query(np_rng)
        if key.position % 2:
            query = self._other_query(py_rng, query[0], [query[1]]) or self._first_query(np_rng)
        return query

    def __getitem__(self, item):
        """dataset[DrawKey]: the example at that position; dataset[int]: the reference's draw
        (the index is ignored) from the global generators, pairs following call by call."""
        return self.generate_random_query_target(item if isinstance(item, DrawKey) else None)

    def generate_random_query_target(self, key=None):
        """A training example; one whose image cannot be read is reported (once per file) and
        replaced by a fresh pair, since the unreadable image may be the pair's shared source."""
        for attempt in range(MAX_REDRAWS):
            if key is not None:
                source, mod_id, target = self._keyed_query(key, attempt)
            elif self.last_from is not None and len(self.last_mod) < 2:
                source, mod_id, target = self.get_2nd_training_query()
            else:
                source, mod_id, target = self.get_1st_training_query()
            try:
                source_img, target_img = self.get_query_img(source), self.get_img(target)
            except ImageReadError as e:
                last_error = e
                self._report_unreadable(e)
                if key is None:
                    self.last_from, self.last_mod = None, []
                continue
            return {
                'source_img_id': source,
                'source_img_data': source_img,
                'source_caption': self.imgs[source]['captions'][0],
                'target_img_id': target,
                'target_img_data': target_img,
                'target_caption': self.imgs[target]['captions'][0],
                'mod': {'id': mod_id, 'str': self.mods[mod_id]['to_str']},
            }
        raise DatasetError(f'{self.img_path}: {MAX_REDRAWS} training examples in a row had an '
                           f'unreadable image (last: {last_error.path})')

    def _report_unreadable(self, error):
        if error.path not in self._reported_images:
            self._reported_images.add(error.path)
            print(f'warning: {error}; skipping it and drawing another training example',
                  file=sys.stderr, flush=True)

    def get_img(self, idx, raw_img=False, get_2d=False):
        """An unreadable PNG is an ImageReadError (a DatasetError) naming it."""
        if self.img_path is None or get_2d:
            img = draw_css_2d_image(self.imgs[idx]['objects']).astype(np.float32)
        else:
            img = open_photo(self._png_path(self.img_path, idx))
        if raw_img:
            return img
        if self.transform:
            img = self.transform(img)
        return img

    def get_query_img(self, idx, raw_img=False):
        # Through self.get_img, which the retrieval test's sampler may shadow (no decoding).
        return self.get_img(idx, raw_img, get_2d=self.query_images == '2d')

    def summary(self):
        queries = ', query images drawn in 2D (2D->3D)' if self.query_images == '2d' else ''
        return super().summary() + queries


# ---------------------------------------------------------------------------------------------
# Real photographs: Fashion200k and MIT-States (SPEC 2.2, 2.3).

FAST_DECODE_SIZE = 224
# Training examples drawn again in a row, because of unreadable images, before giving up.
MAX_REDRAWS = 100


def open_photo(file_path, fast_decode=False):
    """The RGB image in `file_path`, or ImageReadError naming it.  With `fast_decode`, libjpeg
    decodes at the largest reduced scale (1/2, 1/4, 1/8) that keeps both sides at least
    FAST_DECODE_SIZE, which Resize(224) + CenterCrop(224) then bring to the same size."""
    try:
        with PIL.Image.open(file_path) as f:
            if fast_decode:
                f.draft('RGB', (FAST_DECODE_SIZE, FAST_DECODE_SIZE))
            return f.convert('RGB')
    except FileNotFoundError:
        raise ImageReadError(f'{file_path}: image not found', file_path) from None
    except Exception as e:  # corrupt files raise OSError, SyntaxError, ValueError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason if len(reason) <= 200 else reason[:197] + '...'
        if isinstance(e, PIL.UnidentifiedImageError):  # its message repeats the path
            reason = 'unknown image format or corrupt file'
        raise ImageReadError(f'{file_path}: cannot read image ({reason})', file_path) from None


class PhotoDataset(BaseDataset):
    """What Fashion200k and MIT-States share: image files, their loading, and redrawing a training
    example when one of its images cannot be read."""

    def __init__(self, path, split, transform, fast_decode):
        super().__init__()
        self.path = path
        self.split = split
        self.transform = transform
        self.fast_decode = fast_decode
        self._reported_images = set()
        if not os.path.isdir(path):
            raise DatasetError(f'{path}: no such dataset folder')

    def image_file(self, idx):
        raise NotImplementedError

    def get_img(self, idx, raw_img=False):
        """At test time an unreadable image is an ImageReadError (a DatasetError) naming it.
        `raw_img` returns the full-size PIL image (fast_decode applies to transformed images)."""
        img = open_photo(self.image_file(idx), self.fast_decode and not raw_img)
        if raw_img:
            return img
        if self.transform:
            img = self.transform(img)
        return img

    def get_all_texts(self):
        return [c for img in self.imgs for c in img['captions']]

    def _wrap_index(self, idx):
        """The samplers replace the index anyway; indices past the end (the retrieval test asks for
        10,000 examples of any split) wrap around instead of failing on small datasets."""
        return int(idx) % len(self.imgs)

    def _report_unreadable(self, error):
        """One warning line per file (per process), then the caller draws another example."""
        if error.path not in self._reported_images:
            self._reported_images.add(error.path)
            print(f'warning: {error}; skipping it and drawing another training example',
                  file=sys.stderr, flush=True)

    def _redraw_index(self, np_rng=np.random):
        return np_rng.randint(0, len(self.imgs))


def fashion200k_caption(s):
    """The reference's caption clean-up."""
    return s.strip().replace('.', 'dotmark').replace('?', 'questionmark').replace(
        '&', 'andmark').replace('*', 'starmark')


def get_different_word(source_caption, target_caption):
    """First word of each caption that the other lacks.  Quirk kept from the reference: when every
    word is shared, the loop ends on (and returns) the last word."""
    source_words = source_caption.split()
    target_words = target_caption.split()
    source_word = target_word = ''
    for source_word in source_words:
        if source_word not in target_words:
            break
    for target_word in target_words:
        if target_word not in source_words:
            break
    return source_word, target_word, 'replace ' + source_word + ' with ' + target_word


def caption_parent(caption, word):
    """Quirk kept from the reference: the word is removed by plain substring replacement, so the
    same letters inside other words go too; then double spaces collapse (one pass) and the ends
    are stripped."""
    return caption.replace(word, '').replace('  ', ' ').strip()


def _read_text_lines(file_path):
    try:
        with open(file_path, encoding='utf-8', errors='surrogateescape') as f:
            return f.read().splitlines()
    except OSError as e:
        raise DatasetError(f'{file_path}: cannot read ({e.strerror or e})') from None


def order_label_files(label_path, split, label_order=None):
    """The split's label files (names containing the split word), sorted or in `label_order`: a
    list of names, those of other splits ignored.  The order numbers the images, and so the words
    of a first-seen vocabulary (--f200k_label_order: the 2019 code read the file-system order)."""
    label_files = sorted(f for f in os.listdir(label_path)
                         if split in f and f.endswith('.txt')
                         and os.path.isfile(os.path.join(label_path, f)))
    if not label_files:
        raise DatasetError(f'{label_path}: no label file for the {split} split (*{split}*.txt)')
    if label_order is None:
        return label_files
    unknown = [f for f in label_order if f not in os.listdir(label_path)]
    if unknown:
        raise DatasetError(f'--f200k_label_order: {os.path.join(label_path, unknown[0])}: no such '
                           f'label file (expected comma-separated names of labels/*.txt)')
    ordered = [f for f in label_order if f in label_files]
    missing = [f for f in label_files if f not in ordered]
    if missing or len(set(ordered)) != len(ordered):
        raise DatasetError(f'--f200k_label_order: expected each {split} label file once, in the '
                           f'order to read them; {"missing " + missing[0] if missing else "a name repeats"} '
                           f'(the {split} files: {",".join(label_files)})')
    return ordered


class Fashion200k(PhotoDataset):
    """Fashion200k (SPEC 2.2).

    Images are `<root>/<file_path>` with file paths from the split's label files.  Deliberate fix:
    the reference read the label files in directory-listing order, so image indices depended on
    the file system; here they are read in sorted name order.  Every image of the split is checked
    to exist when the dataset is built.
    """

    def __init__(self, path, split='train', transform=None, fast_decode=False, label_order=None):
        super().__init__(path, split, transform, fast_decode)
        self.img_path = path
        label_path = os.path.join(path, 'labels')
        if not os.path.isdir(label_path):
            raise DatasetError(f'{label_path}: Fashion200k labels folder not found (is '
                               f'--dataset_path={path} a Fashion200k dataset?)')
        label_files = order_label_files(label_path, split, label_order)
        sources = []
        for filename in label_files:
            label_file = os.path.join(label_path, filename)
            for line_no, line in enumerate(_read_text_lines(label_file), 1):
                if not line.strip():
                    continue
                fields = line.split('\t')
                if len(fields) < 3:
                    raise DatasetError(f'{label_file} line {line_no}: expected "image path<TAB>'
                                       f'detection score<TAB>caption", got {line.strip()[:80]!r}')
                self.imgs.append({'file_path': fields[0], 'detection_score': fields[1],
                                  'captions': [fashion200k_caption(fields[2])],
                                  'split': split, 'modifiable': False})
                sources.append((label_file, line_no))
        self._check_images_exist(sources)
        self.caption_indexed = False
        if split == 'train':
            self.caption_index_init_()
            if not any(img['modifiable'] for img in self.imgs):
                raise DatasetError(f'{label_path}: no modifiable training image (no two captions '
                                   f'of the {split} split differ by one word)')
        else:
            self.generate_test_queries_()

    def image_file(self, idx):
        return os.path.join(self.img_path, self.imgs[idx]['file_path'])

    def _check_images_exist(self, sources):
        # One stat per file: about 1 s for the 200k images with a warm cache (faster than
        # listing their ~75k folders).
        files = [self.image_file(i) for i in range(len(self.imgs))]
        missing = [i for i, f in enumerate(files) if not os.path.isfile(f)]
        if missing:
            i = missing[0]
            label_file, line_no = sources[i]
            more = (f'; {len(missing) - 1} more of the {len(files)} {self.split} images missing'
                    if len(missing) > 1 else '')
            raise DatasetError(f'{files[i]}: image not found (listed in {label_file} line '
                               f'{line_no}{more})')

    def generate_test_queries_(self):
        """Every line of test_queries.txt, in file order.  A file listed twice in the labels maps
        to its last index, as in the reference."""
        file2imgid = {img['file_path']: i for i, img in enumerate(self.imgs)}
        queries_file = os.path.join(self.img_path, 'test_queries.txt')
        if not os.path.isfile(queries_file):
            raise DatasetError(f'{queries_file}: Fashion200k test queries file not found')
        self.test_queries = []
        for line_no, line in enumerate(_read_text_lines(queries_file), 1):
            if not line.strip():
                continue
            files = line.split()
            if len(files) != 2:
                raise DatasetError(f'{queries_file} line {line_no}: expected "source_path '
                                   f'target_path", got {line.strip()[:80]!r}')
            for f in files:
                if f not in file2imgid:
                    raise DatasetError(f'{queries_file} line {line_no}: {f}: not an image of the '
                                       f'{self.split} split (labels/*{self.split}*.txt)')
            idx, target_idx = file2imgid[files[0]], file2imgid[files[1]]
            source_caption = self.imgs[idx]['captions'][0]
            target_caption = self.imgs[target_idx]['captions'][0]
            _, _, mod_str = get_different_word(source_caption, target_caption)
            self.test_queries.append({
                'source_img_id': idx, 'source_caption': source_caption,
                'target_img_id': target_idx, 'target_caption': target_caption,
                'mod': {'str': mod_str}})

    def caption_index_init_(self):
        """Captions, their parents (the caption less one word, see caption_parent) and the
        modifiable images (a caption of theirs has a parent with two or more child captions)."""
        caption2imgids = {}
        for i, img in enumerate(self.imgs):
            for c in img['captions']:
                caption2imgids.setdefault(c, []).append(i)
        self.caption2imgids = caption2imgids
        parent2children_captions = {}  # parent -> {child: None}: ordered, fast membership
        for c in caption2imgids:
            for w in c.split():
                parent2children_captions.setdefault(caption_parent(c, w), {})[c] = None
        self.parent2children_captions = parent2children_captions = {
            p: list(children) for p, children in parent2children_captions.items()}
        for img in self.imgs:
            img['modifiable'] = False
            img['parent_captions'] = []
        for p, children in parent2children_captions.items():
            if len(children) >= 2:
                for c in children:
                    for imgid in caption2imgids[c]:
                        self.imgs[imgid]['modifiable'] = True
                        self.imgs[imgid]['parent_captions'].append(p)
        self.caption_indexed = True

    def caption_index_sample_(self, idx, np_rng=np.random, py_rng=random):
        """The reference's sampler: by default with the global `numpy.random` and `random`
        generators, as the reference; a keyed example passes its own (keyed_streams)."""
        while not self.imgs[idx]['modifiable']:
            idx = np_rng.randint(0, len(self.imgs))
        img = self.imgs[idx]
        while True:
            p = py_rng.choice(img['parent_captions'])
            c = py_rng.choice(self.parent2children_captions[p])
            if c not in img['captions']:
                break
        target_idx = py_rng.choice(self.caption2imgids[c])
        source_caption = self.imgs[idx]['captions'][0]
        target_caption = self.imgs[target_idx]['captions'][0]
        source_word, target_word, mod_str = get_different_word(source_caption, target_caption)
        return idx, target_idx, source_word, target_word, mod_str

    def __getitem__(self, item):
        """dataset[DrawKey]: the example at that position, drawn from generators keyed by it;
        dataset[int]: the reference's draw from the global generators."""
        if not self.caption_indexed:  # the reference indexed the train split only
            self.caption_index_init_()
            if not any(img['modifiable'] for img in self.imgs):
                raise DatasetError(f'{self.path}: no modifiable image in the {self.split} split')
        if isinstance(item, DrawKey):
            idx, (np_rng, py_rng) = self._wrap_index(item.index), keyed_streams(item, item.position)
        else:
            idx, (np_rng, py_rng) = self._wrap_index(item), global_streams()
        for _ in range(MAX_REDRAWS):
            idx, target_idx, _, _, mod_str = self.caption_index_sample_(idx, np_rng, py_rng)
            try:
                source_img, target_img = self.get_img(idx), self.get_img(target_idx)
            except ImageReadError as e:
                last_error = e
                self._report_unreadable(e)
                idx = self._redraw_index(np_rng)
                continue
            return {
                'source_img_id': idx,
                'source_img_data': source_img,
                'source_caption': self.imgs[idx]['captions'][0],
                'target_img_id': target_idx,
                'target_caption': self.imgs[target_idx]['captions'][0],
                'target_img_data': target_img,
                'mod': {'str': mod_str},
            }
        raise DatasetError(f'{self.path}: {MAX_REDRAWS} training examples in a row had an '
                           f'unreadable image (last: {last_error.path})')

    def summary(self):
        captions = {img['captions'][0] for img in self.imgs}
        modifiable = (f'{sum(img["modifiable"] for img in self.imgs)} modifiable images, '
                      if self.caption_indexed else '')
        return (f'Fashion200k {self.split}: {len(self.imgs)} images, {len(captions)} unique '
                f'captions, {modifiable}{len(self.test_queries)} test queries')


MITSTATES_TEST_NOUNS = (
    'armor', 'bracelet', 'bush', 'camera', 'candy', 'castle', 'ceramic', 'cheese', 'clock',
    'clothes', 'coffee', 'fan', 'fig', 'fish', 'foam', 'forest', 'fruit', 'furniture', 'garden',
    'gate', 'glass', 'horse', 'island', 'laptop', 'lead', 'lightning', 'mirror', 'orange', 'paint',
    'persimmon', 'plastic', 'plate', 'potato', 'road', 'rubber', 'sand', 'shell', 'sky', 'smoke',
    'steel', 'stream', 'table', 'tea', 'tomato', 'vacuum', 'wax', 'wheel', 'window', 'wool')


class MITStates(PhotoDataset):
    """MIT-States (SPEC 2.3): `<root>/images/<adjective noun>/*.jpg`, split by noun.

    Deliberate fix: the reference iterated os.listdir (file-system order) over the folders and
    their files, so image indices depended on the file system; here both listings are sorted.
    Hidden files (names starting with '.') are ignored; any other non-JPEG file is an error (the
    reference asserted).  The training sampler's pending pair (`saved_item`) is sampler state,
    saved in checkpoints so that a resumed run continues exactly.
    """

    _sampler_state_attrs = ('saved_item',)

    def __init__(self, path, split='train', transform=None, fast_decode=False):
        super().__init__(path, split, transform, fast_decode)
        self.saved_item = None
        test_nouns = set(MITSTATES_TEST_NOUNS)
        images_path = os.path.join(path, 'images')
        if not os.path.isdir(images_path):
            raise DatasetError(f'{images_path}: MIT-States images folder not found (is '
                               f'--dataset_path={path} an MIT-States dataset?)')
        for f in sorted(os.listdir(images_path)):
            folder = os.path.join(images_path, f)
            if ' ' not in f or not os.path.isdir(folder):
                continue
            words = f.split()
            if len(words) != 2:
                raise DatasetError(f'{folder}: expected a folder named "<adjective> <noun>"')
            adj, noun = words
            if adj == 'adj':
                continue
            if split == 'train' and noun in test_nouns:
                continue
            if split == 'test' and noun not in test_nouns:
                continue
            for file_path in sorted(os.listdir(folder)):
                if file_path.startswith('.'):
                    continue
                full_path = os.path.join(folder, file_path)
                if not file_path.lower().endswith(('jpg', 'jpeg')):
                    raise DatasetError(f'{full_path}: not a JPEG image (MIT-States image folders '
                                       f'hold only .jpg files)')
                self.imgs.append({'file_path': full_path, 'captions': [f], 'adj': adj,
                                  'noun': noun})
        if not self.imgs:
            raise DatasetError(f'{images_path}: no images of the {split} split (folders '
                               f'"<adjective> <noun>" with .jpg files)')
        self.caption_index_init_()
        if split == 'test':
            self.generate_test_queries_()

    def image_file(self, idx):
        return self.imgs[idx]['file_path']

    def caption_index_init_(self):
        self.caption2imgids = {}
        self.noun2adjs = {}
        for i, img in enumerate(self.imgs):
            self.caption2imgids.setdefault(img['captions'][0], []).append(i)
            adjs = self.noun2adjs.setdefault(img['noun'], [])
            if img['adj'] not in adjs:
                adjs.append(img['adj'])
        for noun, adjs in self.noun2adjs.items():
            if len(adjs) < 2:
                raise DatasetError(
                    f'{os.path.join(self.path, "images", adjs[0] + " " + noun)}: the noun '
                    f'"{noun}" has images of one adjective only ("{adjs[0]}"); every noun of '
                    f'the {self.split} split needs at least two')

    def caption_index_sample_(self, idx, py_rng=random):
        """A random adjective of the image's noun (possibly its own) and a random image of it."""
        noun = self.imgs[idx]['noun']
        target_caption = py_rng.choice(self.noun2adjs[noun]) + ' ' + noun
        target_idx = py_rng.choice(self.caption2imgids[target_caption])
        return idx, target_idx

    def generate_test_queries_(self):
        self.test_queries = []
        for idx, img in enumerate(self.imgs):
            adj, noun = img['adj'], img['noun']
            for target_adj in self.noun2adjs[noun]:
                if target_adj != adj:
                    self.test_queries.append({
                        'source_img_id': idx, 'source_caption': img['captions'][0],
                        'target_caption': target_adj + ' ' + noun, 'mod': {'str': target_adj}})

    def _two_targets(self, idx, py_rng=random):
        """Two targets of different adjectives for source `idx`."""
        while True:
            idx, target_idx1 = self.caption_index_sample_(idx, py_rng)
            idx, target_idx2 = self.caption_index_sample_(idx, py_rng)
            if self.imgs[target_idx1]['adj'] != self.imgs[target_idx2]['adj']:
                return target_idx1, target_idx2

    def _next_pair(self, idx):
        """The reference's pairs: two targets of different adjectives for one source; the first
        now, the second (kept in `saved_item`) at the next call, whatever index it asks for."""
        if self.saved_item is None:
            target_idx1, target_idx2 = self._two_targets(idx)
            self.saved_item = [idx, target_idx2]
            return idx, target_idx1
        idx, target_idx = self.saved_item
        self.saved_item = None
        return idx, target_idx

    def _keyed_pair(self, key, attempt):
        """Positions 2k and 2k+1 of the global order: the source at 2k (`pair_index`) and its two
        targets, drawn alike at both positions from generators keyed by 2k; each returns its
        own.  After an unreadable image both move to a fresh source at their next attempt."""
        np_rng, py_rng = keyed_streams(key, key.position - key.position % 2, attempt)
        source = self._wrap_index(key.pair_index) if attempt == 0 else self._redraw_index(np_rng)
        return source, self._two_targets(source, py_rng)[key.position % 2]

    def __getitem__(self, item):
        """dataset[DrawKey]: the example at that position (see _keyed_pair); dataset[int]: the
        reference's draw from the global generators, pairs following call by call."""
        key = item if isinstance(item, DrawKey) else None
        idx = None if key is not None else self._wrap_index(item)
        for attempt in range(MAX_REDRAWS):
            source, target = self._keyed_pair(key, attempt) if key is not None else self._next_pair(idx)
            try:
                source_img, target_img = self.get_img(source), self.get_img(target)
            except ImageReadError as e:
                last_error = e
                self._report_unreadable(e)
                if key is None:
                    self.saved_item = None
                    idx = self._redraw_index()
                continue
            return {
                'source_img_id': source,
                'source_img_data': source_img,
                'source_caption': self.imgs[source]['captions'][0],
                'target_img_id': target,
                'target_img_data': target_img,
                'noun': self.imgs[source]['noun'],
                'target_caption': self.imgs[target]['captions'][0],
                'mod': {'str': self.imgs[target]['adj']},
            }
        raise DatasetError(f'{self.path}: {MAX_REDRAWS} training examples in a row had an '
                           f'unreadable image (last: {last_error.path})')

    def summary(self):
        captions = {img['captions'][0] for img in self.imgs}
        adjs = {img['adj'] for img in self.imgs}
        return (f'MITStates {self.split}: {len(self.imgs)} images, {len(captions)} unique '
                f'captions, {len(self.noun2adjs)} nouns, {len(adjs)} adjectives, '
                f'{len(self.test_queries)} test queries')
