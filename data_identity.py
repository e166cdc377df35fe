"""What identifies a dataset's contents, so that runs on the same data pool in one table and runs
on other data never do (SPEC 10), wherever the data was found: a dataset folder is often copied or
moved, and two folders of one name may hold different data (a synthetic and a real CSS, two
releases of a list).

A dataset is identified by two digests (SHA-256):
- its annotation files' contents (each file by its path relative to the dataset folder), and
- its image list: the images' paths relative to the folder and their sizes in bytes, sorted.
  Image contents are never read, so identifying a dataset costs a directory listing (or a stat per
  named image) and the reading of its annotation files, whatever the number of images.

    dataset       annotation files                                  image list
    css3d         css_toy_dataset_novel2_small.dup.npy              images/*
    fashion200k   labels/*.txt, test_queries.txt                    the images labels/*.txt name
    mitstates     (none)                                            images/<adjective noun>/*
    fashioniq     captions/*, image_splits/*                        images/*
    cirr          captions/*, image_splits/* (under cirr/ or not)   the images image_splits/* name
    shoes         relative_captions_shoes.json, the two name lists  the files in womens* folders

Hidden files (names starting with '.') and anything that is not a regular file (a FIFO is never
opened) are left out of both.

The result is cached per dataset folder in `data_identity.json` under $TIRG_CACHE_DIR, else
$XDG_CACHE_HOME/tirg, else ~/.cache/tirg (this project's own folder of the user's cache: no user
file is ever overwritten; a file there that is not this cache is left alone and nothing is cached).
A cached identity is used while the annotation files (size, modification time) and the listed
image folders (modification time) are unchanged; an image rewritten in place to the same name is
not noticed, as image contents are not part of the identity anyway.
"""
import contextlib
import hashlib
import json
import os
import stat

import checkpoints
import datasets

VERSION = 1  # of what is hashed: identities of another version are never compared
CACHE_FILE = 'data_identity.json'
CACHE_ENTRIES = 200  # the most recently identified folders kept in the cache
SHORT = 12  # hex digits of a digest shown to users
SHOES_CAPTIONS, SHOES_LISTS = 'relative_captions_shoes.json', ('train_im_names.txt', 'eval_im_names.txt')


def cache_dir():
    explicit = os.environ.get('TIRG_CACHE_DIR')
    if explicit:
        return explicit
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'tirg')


def short(digest):
    return digest[:SHORT]


# ---------------------------------------------------------------------------------------------
# Listing what a dataset consists of.

def _visible(name):
    return not name.startswith('.')


def _regular_files(folder):
    """Names of the regular files (links to them included) directly in `folder`, sorted."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if _visible(e.name) and e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _subfolders(folder):
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if _visible(e.name) and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _size(path):
    """The size of a regular file, or -1 (missing, or not a regular file)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def _relative(path, root):
    return os.path.relpath(path, root).replace(os.sep, '/')


def _cirr_root(path):
    # cirr.annotation_root's choice, for any split: the official layout keeps the files in cirr/.
    nested = os.path.join(path, 'cirr')
    return nested if os.path.isdir(os.path.join(nested, 'captions')) else path


def _read_regular(path):
    """The bytes of a regular file, or None; a FIFO or a device is never read (nor waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, 'rb') as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read()


def _named_in_fashion200k_labels(path):
    names = set()
    for name in _regular_files(os.path.join(path, 'labels')):
        if name.endswith('.txt'):
            data = _read_regular(os.path.join(path, 'labels', name)) or b''
            for line in data.decode('utf-8', 'surrogateescape').splitlines():
                if line.strip():
                    names.add(line.split('\t')[0])
    return sorted(names)


def _named_in_cirr_splits(path):
    names = set()
    splits = os.path.join(_cirr_root(path), 'image_splits')
    for name in _regular_files(splits):
        try:
            content = json.loads(_read_regular(os.path.join(splits, name)) or b'null')
        except (ValueError, RecursionError):
            continue  # the dataset loader names a broken file; it is still hashed as it is
        if isinstance(content, dict):
            names.update(p for p in content.values() if isinstance(p, str))
    return sorted(names)


def annotation_files(dataset, path):
    """[(name relative to the dataset folder, path)] of the files whose contents are hashed."""
    if dataset == 'css3d':
        names = [datasets.CSS_DATA_FILE]
    elif dataset == 'fashion200k':
        names = ['labels/' + n for n in _regular_files(os.path.join(path, 'labels')) if n.endswith('.txt')]
        names.append('test_queries.txt')
    elif dataset == 'mitstates':
        names = []
    elif dataset == 'fashioniq':
        names = [f'{folder}/{n}' for folder in ('captions', 'image_splits')
                 for n in _regular_files(os.path.join(path, folder))]
    elif dataset == 'cirr':
        root = _cirr_root(path)
        # Named relative to the annotation root: the two layouts of one download are one dataset.
        return [(f'{folder}/{n}', os.path.join(root, folder, n)) for folder in ('captions', 'image_splits')
                for n in _regular_files(os.path.join(root, folder))]
    elif dataset == 'shoes':
        names = [SHOES_CAPTIONS, *SHOES_LISTS]
    else:
        raise ValueError(f'unknown dataset {dataset!r}')
    return [(n, os.path.join(path, *n.split('/'))) for n in names]


def image_folders(dataset, path):
    """The folders whose listings make the image list (their modification times key the cache);
    empty where the annotation files name the images."""
    if dataset in ('css3d', 'fashioniq'):
        return [os.path.join(path, 'images')]
    if dataset == 'mitstates':
        images = os.path.join(path, 'images')
        return [images] + [os.path.join(images, n) for n in _subfolders(images)]
    if dataset == 'shoes':
        return _shoes_folders(path)
    return []


def _shoes_folders(path):
    """Every folder shoes.find_images walks: all of them under the dataset folder, each real
    folder once."""
    folders, seen = [], set()
    for folder, subfolders, _ in os.walk(path, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        folders.append(folder)
    return folders


def image_list(dataset, path):
    """[(path relative to the dataset folder, size in bytes or -1)], sorted."""
    if dataset in ('css3d', 'fashioniq'):
        images = os.path.join(path, 'images')
        found = [os.path.join(images, n) for n in _regular_files(images)]
    elif dataset == 'mitstates':
        images = os.path.join(path, 'images')
        found = [os.path.join(images, folder, n) for folder in _subfolders(images)
                 for n in _regular_files(os.path.join(images, folder))]
    elif dataset == 'fashion200k':
        found = [os.path.join(path, n) for n in _named_in_fashion200k_labels(path)]
    elif dataset == 'cirr':
        found = [os.path.normpath(os.path.join(path, n)) for n in _named_in_cirr_splits(path)]
    elif dataset == 'shoes':
        import shoes
        found = [f for name, f in shoes.find_images(path).items() if _visible(name)]
    else:
        raise ValueError(f'unknown dataset {dataset!r}')
    return sorted((_relative(f, path), _size(f)) for f in found)


# ---------------------------------------------------------------------------------------------
# Digests.

def file_digest(path):
    """SHA-256 of a regular file's contents, or None for a FIFO or a device (never waited on)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, 'rb') as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def _encode(text):
    return text.encode('utf-8', 'surrogateescape')


def identify(dataset, path):
    """{'version', 'digest', 'annotations', 'images', 'annotation_files', 'image_files'} of the
    dataset in folder `path`; 'digest' is what two runs compare."""
    annotations = hashlib.sha256()
    hashed = 0
    for name, file_path in sorted(annotation_files(dataset, path)):
        try:
            digest = file_digest(file_path)
        except FileNotFoundError:
            continue  # absent (an optional file); the dataset loader says when it is needed
        if digest is None:
            continue
        annotations.update(_encode(name) + b'\t' + digest.encode() + b'\n')
        hashed += 1
    images = hashlib.sha256()
    listed = image_list(dataset, path)
    for name, size in listed:
        images.update(_encode(name) + b'\t' + str(size).encode() + b'\n')
    both = hashlib.sha256(f'{dataset}\nannotations {annotations.hexdigest()}\n'
                          f'images {images.hexdigest()}\n'.encode())
    return {'version': VERSION, 'digest': both.hexdigest(), 'annotations': annotations.hexdigest(),
            'images': images.hexdigest(), 'annotation_files': hashed, 'image_files': len(listed)}


def _signature(dataset, path):
    """What the cached identity of a folder is valid for: its annotation files' (size,
    modification time) and its image folders' modification times (a file added, removed or
    renamed changes its folder's)."""
    parts = [str(VERSION), dataset]
    for name, file_path in sorted(annotation_files(dataset, path)):
        try:
            st = os.stat(file_path)
            parts.append(f'{name}\t{st.st_size}\t{st.st_mtime_ns}')
        except OSError:
            parts.append(f'{name}\t-')
    for folder in image_folders(dataset, path):
        try:
            parts.append(f'{_relative(folder, path)}\t{os.stat(folder).st_mtime_ns}')
        except OSError:
            parts.append(f'{_relative(folder, path)}\t-')
    return hashlib.sha256(_encode('\n'.join(parts))).hexdigest()


# ---------------------------------------------------------------------------------------------
# The cache.

def _read_cache(path):
    """The cache's entries; None when the file is not this cache (then it is never written)."""
    data = _read_regular(path) if os.path.lexists(path) else b'{"version": 1, "entries": {}}'
    try:
        cache = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        cache = None
    if not isinstance(cache, dict) or cache.get('version') != VERSION or not isinstance(cache.get('entries'), dict):
        return None
    return cache['entries']


def cached_identity(dataset, path):
    """identify(dataset, path), from the cache when the folder is unchanged since it was computed.
    The cache is a convenience: one that cannot be read or written is left aside."""
    key = f'{dataset} {os.path.realpath(path)}'
    signature = _signature(dataset, path)
    cache_path = os.path.join(cache_dir(), CACHE_FILE)
    entries = _read_cache(cache_path)
    entry = (entries or {}).get(key)
    if isinstance(entry, dict) and entry.get('signature') == signature and isinstance(entry.get('identity'), dict):
        return entry['identity']
    identity = identify(dataset, path)
    if entries is not None:
        entries.pop(key, None)
        entries[key] = {'signature': signature, 'identity': identity}  # the newest last
        kept = {k: v for k, v in entries.items() if os.path.isdir(k.split(' ', 1)[-1])}
        kept = dict(list(kept.items())[-CACHE_ENTRIES:])
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            checkpoints.write_text_atomic(json.dumps({'version': VERSION, 'entries': kept}, indent=1) + '\n',
                                          cache_path)
    return identity
