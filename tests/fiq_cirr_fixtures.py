"""Tiny FashionIQ and CIRR trees in the exact layouts, and a stand-in model whose rankings a test
can set, for tests/test_fashioniq.py and tests/test_cirr.py."""
import json
import os
import zlib

import numpy as np
import torch
from PIL import Image


# --------------------------------------------------------------------------------------------
# Images

def write_image(file_path, mode='RGB', seed=0):
    """A 4x4 image in `mode`; 'P+trns' is a palette image whose transparency is given per palette
    entry (bytes), the case PIL warns about when such an image is converted to RGBA."""
    os.makedirs(os.path.dirname(file_path), exist_ok=True)
    rgb = np.random.RandomState(seed).randint(0, 256, (4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode in ('P', 'P+trns'):
        img = img.convert('P', palette=Image.Palette.ADAPTIVE, colors=8)
        if mode == 'P+trns':
            img.save(file_path, transparency=bytes([0, 128, 255, 64, 255, 255, 255, 255]))
            return
    elif mode != 'RGB':
        img = img.convert(mode)
    img.save(file_path)


def id_image(idx):
    """What a patched `get_img` returns: the image id, which the stand-in model reads back."""
    return torch.full((3, 1, 1), float(idx))


def use_id_images(dataset):
    """Retrieval tests score names, not pixels: images are read as their ids."""
    dataset.get_img = lambda idx, raw_img=False: id_image(idx)
    return dataset


class NameModel(torch.nn.Module):
    """Image feature: the one-hot vector of the image's name among `names`, so a composed
    feature is a score per name.  `query_scores[(source name, text)]` sets some names' scores
    (the others get noise below 0.1); other queries score every name with noise in [0, 1).
    The noise depends only on (source, text), so a per-query implementation can recompute it."""

    def __init__(self, dataset, names, query_scores=None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # gives the model a device
        self.dataset = dataset
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.query_scores = query_scores or {}

    def _source_names(self, imgs):
        return [self.dataset.imgs[i]['captions'][0] for i in imgs[:, 0, 0, 0].round().long().tolist()]

    def image_vector(self, name):
        vector = torch.zeros(len(self.names))
        vector[self.index[name]] = 1
        return vector

    def query_vector(self, source, text):
        generator = torch.Generator().manual_seed(zlib.crc32(f'{source}|{text}'.encode()))
        vector = torch.rand(len(self.names), generator=generator)
        scores = self.query_scores.get((source, text))
        if scores:
            vector *= 0.1
            for name, score in scores.items():
                if name in self.index:  # names outside this gallery do not matter
                    vector[self.index[name]] = score
        return vector

    def extract_img_feature(self, imgs):
        return torch.stack([self.image_vector(n) for n in self._source_names(imgs)]) * self.scale

    def compose_img_text(self, imgs, texts):
        sources = self._source_names(imgs)
        return torch.stack([self.query_vector(s, t) for s, t in zip(sources, texts)]) * self.scale


def per_query_ranking(model, source, text, gallery):
    """`gallery` names by the stand-in's cosine similarity to the query, best first: a full sort."""
    query = model.query_vector(source, text)
    query = query / query.norm()
    scores = {n: float(query @ model.image_vector(n)) for n in gallery}
    return sorted(gallery, key=lambda n: -scores[n])


# --------------------------------------------------------------------------------------------
# FashionIQ: <root>/captions/cap.<category>.<split>.json, <root>/image_splits/split.<category>.
# <split>.json, <root>/images/<name>.<ext>

def fiq_layout(val_sizes=None, seed=0):
    """{category: {'train': triplets, 'val': triplets, 'split_train': names, 'split_val': names}}
    with triplets as JSON entries.  Dress has a gallery past 50 names so recall@50 is not trivial;
    the val triplets use only part of each gallery, so the two protocols' galleries differ."""
    val_sizes = val_sizes or {'dress': 56, 'shirt': 14, 'toptee': 14}
    rng = np.random.RandomState(seed)
    layout = {}
    for category, size in val_sizes.items():
        val_names = [f'{category}_v{i}' for i in range(size)]
        train_names = [f'{category}_t{i}' for i in range(8)]
        used = val_names[:12]
        layout[category] = {
            'split_val': val_names, 'split_train': train_names,
            'val': [triplet(category, i, *rng.choice(used, 2, replace=False)) for i in range(10)],
            'train': [triplet(category, 100 + i, *rng.choice(train_names, 2, replace=False))
                      for i in range(6)]}
    return layout


def triplet(category, i, candidate, target):
    return {'candidate': str(candidate), 'target': str(target),
            'captions': [f'{category} first {i}', f'{category} second {i}']}


FIQ_IMAGE_MODES = {'dress_v0': 'RGBA', 'dress_v1': 'P', 'dress_v2': 'P+trns', 'dress_v3': 'L'}
FIQ_EXTENSIONS = {'dress_v4': '.jpg', 'shirt_v0': '.jpeg'}


def write_fiq(root, layout, modes=FIQ_IMAGE_MODES, extensions=FIQ_EXTENSIONS, missing=()):
    """Writes the annotation files of `layout` and an image for every name except `missing`."""
    names = set()
    for category, parts in layout.items():
        for split in ('train', 'val'):
            write_json(os.path.join(root, 'captions', f'cap.{category}.{split}.json'), parts[split])
            write_json(os.path.join(root, 'image_splits', f'split.{category}.{split}.json'),
                       parts[f'split_{split}'])
            names.update(parts[f'split_{split}'])
    for i, name in enumerate(sorted(names - set(missing))):
        write_image(os.path.join(root, 'images', name + extensions.get(name, '.png')),
                    modes.get(name, 'RGB'), seed=i)
    return layout


def write_json(file_path, content):
    os.makedirs(os.path.dirname(file_path), exist_ok=True)
    with open(file_path, 'w') as f:
        json.dump(content, f)


# --------------------------------------------------------------------------------------------
# CIRR: <root>/cirr/captions/cap.rc2.<split>.json, <root>/cirr/image_splits/split.rc2.<split>.json,
# images where the split file says, relative to <root>.

CIRR_FOLDERS = {'train': 'train/0', 'val': 'dev', 'test1': 'test1'}


def cirr_split(split, num_images, num_entries, seed, with_target=True):
    """{'images': names, 'entries': caption entries}: an img_set has 6 members, the reference
    and the target among them, except in entries 1 (target outside), 3 (reference outside) and 4
    (3 members)."""
    rng = np.random.RandomState(seed)
    names = [f'{split}-{i}-img0' for i in range(num_images)]
    entries = []
    for i in range(num_entries):
        reference, target = (str(n) for n in rng.choice(names, 2, replace=False))
        others = [str(n) for n in rng.permutation(names) if n not in (reference, target)]
        members = [reference] + ([target] if i != 1 else []) + others
        # Subsets of other sizes: without the reference (6), and short (2 besides the reference).
        members = members[1:7] if i == 3 else members[:3] if i == 4 else members[:6]
        rng.shuffle(members)
        entry = {'pairid': 1000 + 7 * i, 'reference': reference, 'caption': f'{split} caption {i}',
                 'img_set': {'id': i, 'members': members}}
        if with_target:
            entry['target_hard'] = target
            entry['target_soft'] = {target: 1.0}
        entries.append(entry)
    return {'images': names, 'entries': entries}


def cirr_layout():
    return {'train': cirr_split('train', 10, 8, 0), 'val': cirr_split('dev', 56, 14, 1),
            'test1': cirr_split('test1', 54, 6, 2, with_target=False)}


def write_cirr(root, layout, official=True, missing=()):
    annotations = os.path.join(root, 'cirr') if official else root
    for i, (split, content) in enumerate(layout.items()):
        paths = {n: f'./{CIRR_FOLDERS[split]}/{n}.png' for n in content['images']}
        write_json(os.path.join(annotations, 'captions', f'cap.rc2.{split}.json'), content['entries'])
        write_json(os.path.join(annotations, 'image_splits', f'split.rc2.{split}.json'), paths)
        for j, (name, path) in enumerate(paths.items()):
            if name not in missing:
                write_image(os.path.join(root, path), seed=100 * i + j)
    return layout
