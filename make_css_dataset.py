"""Generate a synthetic CSS dataset in the CSS3D on-disk format.

Writes OUT/css_toy_dataset_novel2_small.dup.npy: a pickled dict inside a 0-d object array, read
with `np.load(f, allow_pickle=True, encoding='latin1').item()`.  For each of the splits `train`
and `test` it holds

  objects_img  one list of objects per image; an object is {'shape', 'color', 'size', 'pos'},
               pos = (row_fraction, col_fraction), the centre of a cell of a 3x3 grid
  mods         [{'from': [3 source image ids], 'to': [3 target image ids], 'to_str': text}]
  labels       one int per image; images with the same set of objects share a label

The images of a split are its base scenes (random 1-5 objects) followed by the results of the
modifications.  Every modification text ("add large red rectangle to top-left", "remove
middle-center cyan object", "make top-left brown object cyan", "make bottom-center small purple
circle large") is applied to 3 distinct base scenes, and every base scene is the source of at
least 2 modifications (the training sampler pairs two modifications of one source).  A fixed set
of (shape, colour) combinations (NOVEL_COMBOS) never occurs in a train image, and every word of
the test texts occurs in the train texts.

With --pngs the images are also rendered (64x64, 2D, as the reference did) to
OUT/images/css_<split>_<index:06d>.png.

OUT must be new or empty: the real CSS3D renders use these very file names.  OUT/.make_css_dataset.json
records the sha256 of every file written, and --overwrite replaces exactly those files, unchanged,
never others.  The files are written into a staging folder beside OUT and moved into place when
complete, so a killed run leaves no half dataset in OUT (the next run removes its staging folder).

Usage: python make_css_dataset.py OUT [--base_scenes N] [--seed S] [--pngs] [--overwrite]
"""
import argparse
import hashlib
import io
import json
import os
import random
import re
import secrets
import string
import sys
import time

try:
    import fcntl
except ImportError:  # Windows: interrupted runs are not cleaned up
    fcntl = None

import numpy as np

from css_scenes import CSS_COLORS, CSS_DATA_FILE, draw_css_2d_image

SPLITS = ('train', 'test')

SHAPES = ('rectangle', 'circle', 'triangle')
COLORS = tuple(CSS_COLORS)
SIZES = ('small', 'large')
ROWS = ('top', 'middle', 'bottom')
COLS = ('left', 'center', 'right')
POS_FRACTIONS = (1 / 6, 3 / 6, 5 / 6)
CELLS = tuple((r, c) for r in range(3) for c in range(3))

# (shape, colour) combinations that occur only in the test split.
NOVEL_COMBOS = frozenset({('rectangle', 'cyan'), ('circle', 'yellow'),
                          ('circle', 'brown'), ('triangle', 'purple')})

MIN_BASE_SCENES = 3  # every modification needs 3 distinct source scenes
MAX_BASE_OBJECTS = 5
OTHERS_SAMPLE = 24   # candidate co-sources looked at before falling back to a full scan
RANDOM_TRIES = 30    # random modifications tried for a scene before enumerating all of them
SPLIT_ATTEMPTS = 50


def tokenize(text):
    """Words of a modification text: lowercase, punctuation removed, split on whitespace."""
    return text.lower().translate(str.maketrans('', '', string.punctuation)).split()


# ---------------------------------------------------------------------------------------------
# Scenes are dicts cell -> (shape, colour, size) internally (insertion order = object order).
# A modification spec is one of
#   ('add', size, color, shape, cell)      ('remove', cell, color)
#   ('color', cell, color, new_color)      ('size', cell, size, color, shape, new_size)


def cell_name(cell):
    return f'{ROWS[cell[0]]}-{COLS[cell[1]]}'


def mod_text(spec):
    kind = spec[0]
    if kind == 'add':
        _, size, color, shape, cell = spec
        return f'add {size} {color} {shape} to {cell_name(cell)}'
    if kind == 'remove':
        _, cell, color = spec
        return f'remove {cell_name(cell)} {color} object'
    if kind == 'color':
        _, cell, color, new_color = spec
        return f'make {cell_name(cell)} {color} object {new_color}'
    _, cell, size, color, shape, new_size = spec
    return f'make {cell_name(cell)} {size} {color} {shape} {new_size}'


def applies(scene, spec, train):
    """Whether the text of `spec` describes a valid change of `scene` (keeping train non-novel)."""
    kind = spec[0]
    if kind == 'add':
        return spec[4] not in scene
    obj = scene.get(spec[1])
    if obj is None:
        return False
    if kind == 'remove':
        return obj[1] == spec[2] and len(scene) >= 2  # no empty target scenes
    if kind == 'color':
        return obj[1] == spec[2] and not (train and (obj[0], spec[3]) in NOVEL_COMBOS)
    return obj == (spec[4], spec[3], spec[2])


def apply_mod(scene, spec):
    out = dict(scene)
    kind = spec[0]
    if kind == 'add':
        _, size, color, shape, cell = spec
        out[cell] = (shape, color, size)
    elif kind == 'remove':
        del out[spec[1]]
    elif kind == 'color':
        shape, _, size = out[spec[1]]
        out[spec[1]] = (shape, spec[3], size)
    else:
        shape, color, _ = out[spec[1]]
        out[spec[1]] = (shape, color, spec[5])
    return out


def all_specs():
    specs = []
    for cell in CELLS:
        for size in SIZES:
            for color in COLORS:
                for shape in SHAPES:
                    specs.append(('add', size, color, shape, cell))
                    specs.append(('size', cell, size, color, shape,
                                  SIZES[1 - SIZES.index(size)]))
        for color in COLORS:
            specs.append(('remove', cell, color))
            for new_color in COLORS:
                if new_color != color:
                    specs.append(('color', cell, color, new_color))
    return specs


def scene_specs(scene, train):
    """Every modification that applies to `scene`."""
    specs = []
    for cell in CELLS:
        if cell not in scene:
            for size in SIZES:
                for color in COLORS:
                    for shape in SHAPES:
                        specs.append(('add', size, color, shape, cell))
            continue
        shape, color, size = scene[cell]
        specs.append(('remove', cell, color))
        specs.append(('size', cell, size, color, shape, SIZES[1 - SIZES.index(size)]))
        for new_color in COLORS:
            if new_color != color:
                specs.append(('color', cell, color, new_color))
    return [s for s in specs if applies(scene, s, train) and not (
        train and s[0] == 'add' and (s[3], s[2]) in NOVEL_COMBOS)]


class _Infeasible(Exception):
    pass


class _SplitGenerator:
    def __init__(self, rnd, n_base, n_mods, train, allowed_words):
        self.rnd = rnd
        self.n_base = n_base
        self.n_mods = n_mods
        self.train = train
        self.allowed_words = allowed_words  # None: any word
        self.combos = [(sh, co) for sh in SHAPES for co in COLORS
                       if not (train and (sh, co) in NOVEL_COMBOS)]
        self._spec_ok_cache = {}

    # -- base scenes ---------------------------------------------------------------------------
    def random_scene(self):
        rnd = self.rnd
        n = rnd.randint(1, MAX_BASE_OBJECTS)
        scene = {}
        for cell in rnd.sample(CELLS, n):
            shape, color = rnd.choice(self.combos)
            scene[cell] = (shape, color, rnd.choice(SIZES))
        return scene

    def make_base_scenes(self):
        scenes = [self.random_scene() for _ in range(self.n_base)]
        if not self.train:  # make sure every novel combination occurs in the test split
            for j, (shape, color) in enumerate(sorted(NOVEL_COMBOS)):
                scene = scenes[j % self.n_base]
                empty = [c for c in CELLS if c not in scene]
                scene[self.rnd.choice(empty)] = (shape, color, self.rnd.choice(SIZES))
        return scenes

    # -- modifications -------------------------------------------------------------------------
    def spec_ok(self, spec):
        ok = self._spec_ok_cache.get(spec)
        if ok is None:
            ok = not (self.train and spec[0] == 'add' and (spec[3], spec[2]) in NOVEL_COMBOS)
            if ok and self.allowed_words is not None:
                ok = set(tokenize(mod_text(spec))) <= self.allowed_words
            self._spec_ok_cache[spec] = ok
        return ok

    def random_spec(self, scene):
        rnd = self.rnd
        empty = [c for c in CELLS if c not in scene]
        full = list(scene)
        # Removals fail more often (few per scene), so they are drawn more often than their
        # share: at the default scale about 45% add, 15% remove, 30% colour, 13% size.
        kinds = [('add', 1 if empty else 0), ('remove', 2 if len(full) >= 2 else 0),
                 ('color', 1), ('size', 1)]
        kind = rnd.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        if kind == 'add':
            shape, color = rnd.choice(self.combos)
            return ('add', rnd.choice(SIZES), color, shape, rnd.choice(empty))
        cell = rnd.choice(full)
        shape, color, size = scene[cell]
        if kind == 'remove':
            return ('remove', cell, color)
        if kind == 'color':
            return ('color', cell, color, rnd.choice([c for c in COLORS if c != color]))
        return ('size', cell, size, color, shape, SIZES[1 - SIZES.index(size)])

    def candidates(self, spec):
        if spec[0] == 'add':
            return self.empty_by_cell[spec[4]]
        if spec[0] in ('remove', 'color'):
            return self.by_cell_color[(spec[1], spec[2])]
        return self.by_cell_obj[(spec[1], (spec[4], spec[3], spec[2]))]

    def eligible(self, j, spec):
        return spec not in self.applied[j] and applies(self.scenes[j], spec, self.train)

    def pick_sources(self, spec, k, exclude=None):
        """Up to k eligible scenes for `spec` (fewest modifications first), or None."""
        cands = self.candidates(spec)
        if len(cands) > OTHERS_SAMPLE:
            sample = self.rnd.sample(cands, OTHERS_SAMPLE)
            elig = [j for j in sample if j != exclude and self.eligible(j, spec)]
            if len(elig) < k:
                elig = [j for j in cands if j != exclude and self.eligible(j, spec)]
        else:
            elig = [j for j in cands if j != exclude and self.eligible(j, spec)]
        if len(elig) < k:
            return None
        self.rnd.shuffle(elig)
        elig.sort(key=self.counts.__getitem__)  # stable: random among equal counts
        return elig[:k]

    def find_mod_for(self, s):
        scene = self.scenes[s]
        for _ in range(RANDOM_TRIES):
            spec = self.random_spec(scene)
            if not self.spec_ok(spec) or not self.eligible(s, spec):
                continue
            others = self.pick_sources(spec, 2, exclude=s)
            if others is not None:
                return spec, others
        specs = scene_specs(scene, self.train)
        self.rnd.shuffle(specs)
        for spec in specs:
            if self.spec_ok(spec) and spec not in self.applied[s]:
                others = self.pick_sources(spec, 2, exclude=s)
                if others is not None:
                    return spec, others
        return None

    def add_mod(self, spec, sources):
        self.rnd.shuffle(sources)
        for j in sources:
            self.counts[j] += 1
            self.applied[j].add(spec)
        self.mods.append((spec, sources))
        self.words.update(tokenize(mod_text(spec)))

    def generate(self):
        self.scenes = self.make_base_scenes()
        n = self.n_base
        self.empty_by_cell = {c: [] for c in CELLS}
        self.by_cell_color = {(c, co): [] for c in CELLS for co in COLORS}
        self.by_cell_obj = {}
        for j, scene in enumerate(self.scenes):
            for c in CELLS:
                if c in scene:
                    self.by_cell_color[(c, scene[c][1])].append(j)
                    self.by_cell_obj.setdefault((c, scene[c]), []).append(j)
                else:
                    self.empty_by_cell[c].append(j)
        for key in [(c, (sh, co, si)) for c in CELLS for sh in SHAPES for co in COLORS
                    for si in SIZES]:
            self.by_cell_obj.setdefault(key, [])
        self.counts = [0] * n
        self.applied = [set() for _ in range(n)]
        self.mods = []
        self.words = set()

        # Always extend the least-used scene, so that each one is a source of >= 2 mods.
        exhausted = set()
        under = n  # scenes that are the source of fewer than 2 mods
        level, queue = 0, []
        while len(self.mods) < self.n_mods or under > 0:
            if not queue:
                rest = [j for j in range(n) if j not in exhausted]
                if not rest:
                    break
                level = min(self.counts[j] for j in rest)
                queue = [j for j in rest if self.counts[j] == level]
                self.rnd.shuffle(queue)
            s = queue.pop()
            if self.counts[s] != level or s in exhausted:
                continue
            found = self.find_mod_for(s)
            if found is None:
                if self.counts[s] < 2:
                    raise _Infeasible(f'no modification of base scene {s} applies to 2 others')
                exhausted.add(s)
                continue
            spec, others = found
            before = sum(self.counts[j] < 2 for j in [s] + others)
            self.add_mod(spec, [s] + others)
            under -= before - sum(self.counts[j] < 2 for j in [s] + others)

        if self.train:
            self.cover_vocabulary()
        return self.build()

    def cover_vocabulary(self):
        """Add modifications until the train texts use every word the texts can have."""
        specs = [s for s in all_specs() if self.spec_ok(s)]
        vocab = set()
        for spec in specs:
            vocab.update(tokenize(mod_text(spec)))
        for word in sorted(vocab - self.words):
            if word in self.words:
                continue
            with_word = [s for s in specs if word in tokenize(mod_text(s))]
            self.rnd.shuffle(with_word)
            for spec in with_word:
                sources = self.pick_sources(spec, 3)
                if sources is not None:
                    self.add_mod(spec, sources)
                    break

    def build(self):
        images = list(self.scenes)
        mods = []
        for spec, sources in self.mods:
            targets = []
            for j in sources:
                targets.append(len(images))
                images.append(apply_mod(self.scenes[j], spec))
            mods.append({'from': list(sources), 'to': targets, 'to_str': mod_text(spec)})
        label_of, labels, objects_img = {}, [], []
        for scene in images:
            key = tuple(sorted(scene.items()))
            labels.append(label_of.setdefault(key, len(label_of)))
            objects_img.append([
                {'shape': shape, 'color': color, 'size': size,
                 'pos': (POS_FRACTIONS[cell[0]], POS_FRACTIONS[cell[1]])}
                for cell, (shape, color, size) in scene.items()])
        return {'objects_img': objects_img, 'mods': mods, 'labels': labels}


def generate_split(split, base_scenes, seed, n_mods, allowed_words=None):
    """One split's dict.  `allowed_words` restricts the words its texts may use."""
    rnd = random.Random(f'css-{split}-{seed}')
    last = None
    for _ in range(SPLIT_ATTEMPTS):
        try:
            return _SplitGenerator(rnd, base_scenes, n_mods, split == 'train',
                                   allowed_words).generate()
        except _Infeasible as e:
            last = e
    raise ValueError(f'cannot generate the {split} split with {base_scenes} base scenes '
                     f'({last}); use more base scenes')


def split_words(split_data):
    words = set()
    for mod in split_data['mods']:
        words.update(tokenize(mod['to_str']))
    return words


def png_name(split, idx):
    return os.path.join('images', 'css_%s_%06d.png' % (split, idx))


def write_pngs(out_dir, split, split_data):
    """Write the split's PNGs; {relative name: sha256} of what was written."""
    import PIL.Image
    os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
    cache, written = {}, {}
    for idx, (objects, label) in enumerate(zip(split_data['objects_img'], split_data['labels'])):
        if label not in cache:  # images of one label are identical: encoded once
            img = (draw_css_2d_image(objects) * 255).round().astype(np.uint8)
            buffer = io.BytesIO()
            PIL.Image.fromarray(img).save(buffer, format='PNG')
            png = buffer.getvalue()
            cache[label] = (png, hashlib.sha256(png).hexdigest())
        png, digest = cache[label]
        name = png_name(split, idx)
        with open(os.path.join(out_dir, name), 'wb') as f:
            f.write(png)
        written[name] = digest
    return written


# ---------------------------------------------------------------------------------------------
# The output folder.  Real CSS3D renders use the very names written here, so a folder that is not
# empty is refused, and --overwrite deletes only files the record (MANIFEST) says this script
# wrote, with the checksum they still have.  The files are written into a staging folder beside
# OUT first (a killed run leaves no half dataset in OUT), then moved into place.

MANIFEST = '.make_css_dataset.json'
NAMES_PREVIEW = 3
STAGING_SUFFIX = '.partial'
OUR_NAME = re.compile(r'(%s(\.tmp)?|images/css_(%s)_\d{6}\.png)\Z' % (re.escape(CSS_DATA_FILE),
                                                                      '|'.join(SPLITS)))
ANY_CONTENT = True  # the identity of a file whose every content is ours (an unfinished .tmp)


class OutputFolderError(FileExistsError):
    """The output folder holds files this script must not replace (reported as one line)."""


def _preview(names):
    more = ', ...' if len(names) > NAMES_PREVIEW else ''
    noun = 'entry' if len(names) == 1 else 'entries'
    return f'{len(names)} {noun}: {", ".join(names[:NAMES_PREVIEW])}{more}'


def file_digest(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def recorded_files(out_dir):
    """{relative name: identity} of the files an earlier run recorded having written: the sha256
    of what it wrote, or (a record of an earlier version) the data file's size, ANY_CONTENT for
    its temporary file, and None for the PNGs it lists without either (never replaced)."""
    manifest = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(manifest):
        return {}
    try:
        with open(manifest, encoding='utf-8') as f:
            record = json.load(f)
        if 'files' in record:
            files = {name: str(digest) for name, digest in record['files'].items()}
        else:
            files = {CSS_DATA_FILE: record.get('data_file'), CSS_DATA_FILE + '.tmp': ANY_CONTENT}
            for split, count in record.get('pngs', {}).items():
                if split in SPLITS:
                    files.update((png_name(split, i), None) for i in range(int(count)))
        if not all(isinstance(name, str) and OUR_NAME.match(name.replace(os.sep, '/'))
                   for name in files):
            raise ValueError('a name outside the dataset layout')
    except (OSError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise OutputFolderError(f'{manifest}: unreadable record of the files make_css_dataset.py '
                                f'wrote ({type(e).__name__}); not overwriting anything') from None
    return files


def unchanged(path, identity):
    """Whether the regular file at `path` is still what the record says was written there."""
    if not os.path.isfile(path):
        return False
    if identity is ANY_CONTENT:
        return True
    if isinstance(identity, str):
        return file_digest(path) == identity
    if isinstance(identity, int) and not isinstance(identity, bool):
        return os.path.getsize(path) == identity
    return False


def named_like_ours(out_dir):
    """The entries in out_dir that a dataset of this layout has (ours or real CSS3D ones)."""
    names = [n for n in (CSS_DATA_FILE, CSS_DATA_FILE + '.tmp')
             if os.path.lexists(os.path.join(out_dir, n))]
    images = os.path.join(out_dir, 'images')
    if os.path.isdir(images):
        names += sorted(os.path.join('images', n) for n in os.listdir(images)
                        if n.startswith('css_') and n.endswith('.png'))
    return names


def files_to_replace(out_dir, overwrite):
    """The files of an earlier run of this script to delete before writing; OutputFolderError
    when out_dir is not empty without `overwrite`, or holds such files that it did not write or
    that changed since (then nothing is deleted)."""
    if not os.path.exists(out_dir):
        return []
    if not os.path.isdir(out_dir):
        raise NotADirectoryError(f'{out_dir}: exists and is not a directory')
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return []
    if not overwrite:
        raise OutputFolderError(
            f'{out_dir}: not empty ({_preview(entries)}); make_css_dataset.py writes into a new '
            f'or empty folder, or with --overwrite over a dataset it wrote there before')
    recorded = recorded_files(out_dir)
    foreign = [name for name in named_like_ours(out_dir)
               if name not in recorded or not unchanged(os.path.join(out_dir, name), recorded[name])]
    if foreign:
        raise OutputFolderError(
            f'{os.path.join(out_dir, foreign[0])}: not written by make_css_dataset.py (no record '
            f'in {MANIFEST}, or changed since){"" if len(foreign) == 1 else f", and {len(foreign) - 1} more"}; '
            f'nothing was deleted: --overwrite replaces only files this script wrote, unchanged: '
            f'move them away or choose another folder')
    return [name for name in recorded if os.path.isfile(os.path.join(out_dir, name))]


def remove_files(out_dir, names):
    for name in names:
        os.remove(os.path.join(out_dir, name))
    images = os.path.join(out_dir, 'images')
    if os.path.isdir(images) and not os.listdir(images):
        os.rmdir(images)  # an empty images/ folder would make the loader expect PNGs


def write_manifest(out_dir, files):
    with open(os.path.join(out_dir, MANIFEST), 'w', encoding='utf-8') as f:
        json.dump({'written_by': 'make_css_dataset.py', 'files': files}, f, separators=(',', ':'))


def write_files(folder, data, pngs):
    """The dataset's files and their record, in `folder`; {relative name: sha256}."""
    path = os.path.join(folder, CSS_DATA_FILE)
    with open(path, 'wb') as f:
        np.save(f, np.array(data, dtype=object), allow_pickle=True)
    files = {CSS_DATA_FILE: file_digest(path)}
    if pngs:
        for split in SPLITS:
            files.update(write_pngs(folder, split, data[split]))
    write_manifest(folder, files)
    return files


# A staging folder is locked (flock, released by the kernel when its process dies) for as long as
# it is written: one that can be locked is what a killed run left.
def _lock(folder):
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd):
    if fd is not None:
        os.close(fd)


def staging_prefix(out_dir):
    return '.%s.make_css_dataset-' % os.path.basename(os.path.abspath(out_dir))


def make_staging_folder(out_dir):
    """(path, lock) of a new folder beside out_dir, as the umask makes folders."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    while True:
        path = os.path.join(parent, '%s%d-%s%s' % (staging_prefix(out_dir), os.getpid(),
                                                   secrets.token_hex(4), STAGING_SUFFIX))
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path, _lock(path)


def remove_staging_folder(path):
    """Delete what this script writes in a staging folder; anything else is left, with it."""
    for name in [MANIFEST] + named_like_ours(path):
        try:
            os.remove(os.path.join(path, name))
        except OSError:
            pass
    for folder in (os.path.join(path, 'images'), path):
        try:
            os.rmdir(folder)
        except OSError:
            pass


def remove_interrupted_runs(out_dir, log):
    """Delete the staging folders of runs for out_dir that were killed while writing."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    if fcntl is None or not os.path.isdir(parent):
        return
    prefix = staging_prefix(out_dir)
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not (name.startswith(prefix) and name.endswith(STAGING_SUFFIX) and os.path.isdir(path)
                and not os.path.islink(path)):
            continue
        lock = _lock(path)
        if lock is None:
            continue  # still being written
        try:
            remove_staging_folder(path)
        finally:
            _unlock(lock)
        log(f'removed {path}: the unfinished files of an interrupted make_css_dataset.py run'
            + (' (it holds other files: kept)' if os.path.exists(path) else ''))


def others_in(out_dir):
    """The entries of out_dir (and of its images/ folder) that are not this script's."""
    names = [n for n in sorted(os.listdir(out_dir)) if n not in (MANIFEST, 'images')]
    images = os.path.join(out_dir, 'images')
    if os.path.isdir(images):
        names += [os.path.join('images', n) for n in sorted(os.listdir(images))]
    elif os.path.lexists(images):
        names.append('images')
    return names


def move_into_place(staging, out_dir, files, overwrite, log):
    """Rename the staging folder to out_dir when that is new or empty, else replace the files
    of an earlier run in it one by one (the record first: any file present that matches it is
    ours)."""
    if not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        try:
            os.rename(staging, out_dir)
            return
        except OSError:
            pass  # written to meanwhile: the same checks as for any folder that is not empty
    old_files = files_to_replace(out_dir, overwrite)
    remove_files(out_dir, old_files)
    if old_files:
        log(f'removed the {len(old_files)} files of the dataset make_css_dataset.py wrote earlier')
    kept = others_in(out_dir)
    if kept:
        log(f'kept what it did not write ({_preview(kept)})')
    for name in [MANIFEST] + sorted(files):
        os.makedirs(os.path.dirname(os.path.join(out_dir, name)), exist_ok=True)
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    remove_staging_folder(staging)


def generate_data(base_scenes, seed, n_mods):
    """{'train': ..., 'test': ...}, checked against the promises of the module docstring."""
    data = {'train': generate_split('train', base_scenes, seed, n_mods)}
    train_words = split_words(data['train'])
    data['test'] = generate_split('test', base_scenes, seed, n_mods, allowed_words=train_words)
    missing = split_words(data['test']) - train_words
    if missing:
        raise RuntimeError(f'test texts use words absent from train: {sorted(missing)}')
    for objects in data['train']['objects_img']:
        for obj in objects:
            if (obj['shape'], obj['color']) in NOVEL_COMBOS:
                raise RuntimeError(f'novel combination in train: {obj}')
    return data


def generate_css_dataset(out_dir, base_scenes=1000, seed=0, pngs=False, mods_per_split=None,
                         verbose=True, overwrite=False):
    """Write a synthetic CSS dataset to `out_dir` and return the path of its npy file.

    base_scenes: base scenes per split (>= 3); mods_per_split: modifications per split
    (default 6 * base_scenes; raised where needed so that every base scene is the source of
    at least 2 modifications, and for train so that its texts use every word); pngs: also write
    OUT/images/css_<split>_<index:06d>.png.  out_dir must be new or empty, unless `overwrite`:
    then the files an earlier run wrote there are replaced, and no other file is touched.
    Raises ValueError for bad arguments, NotADirectoryError when out_dir is a file and
    OutputFolderError (a FileExistsError) for a folder it must not write into.
    """
    log = print if verbose else (lambda *a, **k: None)
    if base_scenes < MIN_BASE_SCENES:
        raise ValueError(f'base_scenes must be at least {MIN_BASE_SCENES}, got {base_scenes}')
    n_mods = 6 * base_scenes if mods_per_split is None else mods_per_split
    if n_mods < 0:
        raise ValueError(f'mods_per_split must be >= 0, got {mods_per_split}')
    files_to_replace(out_dir, overwrite)  # refused before the seconds of generating
    remove_interrupted_runs(out_dir, log)
    data = generate_data(base_scenes, seed, n_mods)
    staging, lock = make_staging_folder(out_dir)
    try:
        files = write_files(staging, data, pngs)
        move_into_place(staging, out_dir, files, overwrite, log)
    finally:
        _unlock(lock)
        if os.path.isdir(staging):
            remove_staging_folder(staging)
    path = os.path.join(out_dir, CSS_DATA_FILE)
    for split in SPLITS:
        d = data[split]
        n_queries = sum(len(m['from']) for m in d['mods'])
        log(f'{split}: {len(d["objects_img"])} images ({base_scenes} base scenes, '
            f'{len(set(d["labels"]))} distinct scenes), {len(d["mods"])} mods, '
            f'{n_queries} queries')
    log(f'wrote {path}' + (' (with PNGs)' if pngs else ''))
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Generate a synthetic CSS dataset in the CSS3D format '
                    f'(OUT/{CSS_DATA_FILE}, optionally OUT/images/*.png).')
    parser.add_argument('out', metavar='OUT', help='output folder: new or empty (created if missing)')
    parser.add_argument('--base_scenes', type=int, default=1000,
                        help='base scenes per split; each split gets 6 modifications per base '
                             f'scene, 3 pairs each (default: 1000, minimum {MIN_BASE_SCENES})')
    parser.add_argument('--seed', type=int, default=0,
                        help='random seed; the same seed gives the same data (default: 0)')
    parser.add_argument('--pngs', action='store_true',
                        help='also write 64x64 PNG renderings to OUT/images (default: off; '
                             'without them the images are drawn in 2D when loaded)')
    parser.add_argument('--overwrite', action='store_true',
                        help=f'replace a dataset this script wrote in OUT before (the files '
                             f'{MANIFEST} lists); other files are left alone, and files of '
                             f'the dataset layout that it did not write are refused')
    args = parser.parse_args(argv)
    if args.base_scenes < MIN_BASE_SCENES:
        parser.error(f'--base_scenes must be at least {MIN_BASE_SCENES} (each modification '
                     f'needs 3 distinct source scenes), got {args.base_scenes}')
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    try:
        generate_css_dataset(args.out, base_scenes=args.base_scenes, seed=args.seed,
                             pngs=args.pngs, overwrite=args.overwrite)
    except NotADirectoryError as e:
        print(f'make_css_dataset.py: error: {e}', file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f'make_css_dataset.py: error: {e}', file=sys.stderr)
        return 1
    print(f'done in {time.time() - start:.1f}s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
