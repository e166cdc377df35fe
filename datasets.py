"""Datasets with the reference API (SPEC section 2).

Every dataset offers `imgs`, `get_all_texts()`, `get_test_queries()`, `get_img(idx, raw_img)`,
`__len__` (number of images) and `__getitem__` returning one training example as a dict.
Sampling uses the global `random` and `numpy.random` generators, as the reference did; `main.py`
seeds them from `--seed`, and `worker_init_fn` gives every DataLoader worker its own stream.
"""
import os
import random

import numpy as np
import PIL.Image
import torch
import torchvision

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class DatasetError(Exception):
    """A problem with the data on disk, reported to the user as one line."""


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

    # Attributes of a stateful training sampler (ints and lists of ints), saved in checkpoints so
    # that a resumed run draws exactly the examples an uninterrupted one would.
    _sampler_state_attrs = ()

    def get_sampler_state(self):
        return {name: _plain_ints(getattr(self, name)) for name in self._sampler_state_attrs}

    def set_sampler_state(self, state):
        for name, value in (state or {}).items():
            setattr(self, name, value)

    def summary(self):
        """One line describing what was loaded."""
        captions = {img['captions'][0] for img in self.imgs}
        return (f'{type(self).__name__} {getattr(self, "split", "")}: {len(self.imgs)} images, '
                f'{len(captions)} unique captions, {len(self.get_test_queries())} test queries')


CSS_COLORS = {
    'gray': [87, 87, 87],
    'red': [244, 35, 35],
    'blue': [42, 75, 215],
    'green': [29, 205, 20],
    'brown': [129, 74, 25],
    'purple': [129, 38, 192],
    'cyan': [41, 208, 208],
    'yellow': [255, 238, 51],
}
CSS_DATA_FILE = 'css_toy_dataset_novel2_small.dup.npy'


def draw_css_2d_image(objects, size=64):
    """The reference's 2D rendering of a CSS scene: HxWx3 floats in [0, 1] on white."""
    img = np.ones((size, size, 3))
    for obj in objects:
        s = 8.0 if obj['size'] == 'large' else 4.0
        c = [v / 255.0 for v in CSS_COLORS[obj['color']]]
        y = obj['pos'][0] * size
        x = obj['pos'][1] * size
        if obj['shape'] == 'rectangle':
            img[int(y - s):int(y + s), int(x - s):int(x + s), :] = c
        elif obj['shape'] == 'circle':  # drawn as a diamond, as in the reference
            for y0 in range(int(y - s), int(y + s) + 1):
                x0 = x + (abs(y0 - y) - s)
                x1 = 2 * x - x0
                img[y0, int(x0):int(x1), :] = c
        elif obj['shape'] == 'triangle':
            for y0 in range(int(y - s), int(y + s)):
                x0 = x + (y0 - y - s) / 2
                x1 = 2 * x - x0
                img[y0, int(x0):int(x1), :] = c
    return img


def load_css_data(path):
    data_file = os.path.join(path, CSS_DATA_FILE)
    if not os.path.isfile(data_file):
        raise DatasetError(f'{data_file}: CSS data file not found (is --dataset_path a CSS3D '
                           f'dataset? make_css_dataset.py generates one)')
    try:
        # The released file is a Python 2 pickle of a dict inside a 0-d object array.
        return np.load(data_file, allow_pickle=True, encoding='latin1').item()
    except Exception as e:  # corrupt or foreign files raise many different types
        raise DatasetError(f'{data_file}: cannot read CSS data ({type(e).__name__}: {e})') from None


class CSSDataset(BaseDataset):
    """CSS3D (SPEC 2.1): scenes of coloured objects and their modification texts."""

    _sampler_state_attrs = ('last_from', 'last_mod')

    def __init__(self, path, split='train', transform=None, use_2d=False):
        super().__init__()
        self.path = path
        self.split = split
        self.transform = transform
        data = load_css_data(path)
        if split not in data:
            raise DatasetError(f'{os.path.join(path, CSS_DATA_FILE)}: no "{split}" split '
                               f'(has {sorted(data)})')
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
        self.last_from, self.last_mod = None, []
        self.generate_test_queries_()

    def _find_image_folder(self, use_2d):
        """PNGs when the split has them, otherwise None: images are drawn in 2D."""
        folder = os.path.join(self.path, 'images')
        if use_2d or not self.imgs or not os.path.isfile(self._png_path(folder, 0)):
            return None
        return folder

    def _png_path(self, folder, idx):
        return os.path.join(folder, 'css_%s_%06d.png' % (self.split, int(idx)))

    def generate_test_queries_(self):
        self.test_queries = [
            {'source_img_id': source,
             'target_caption': self.imgs[target]['captions'][0],
             'target_img_id': target,
             'mod': {'str': mod['to_str']}}
            for mod in self.mods for source, target in zip(mod['from'], mod['to'])]

    def get_all_texts(self):
        return [mod['to_str'] for mod in self.mods]

    def get_1st_training_query(self):
        mod_id = np.random.randint(0, len(self.mods))
        mod = self.mods[mod_id]
        j = np.random.randint(0, len(mod['from']))
        self.last_from = mod['from'][j]
        self.last_mod = [mod_id]
        return mod['from'][j], mod_id, mod['to'][j]

    def get_2nd_training_query(self):
        """The same source with another modification.  The reference retried forever when the
        source had no other one; here a fresh first query is drawn instead."""
        others = [(m, t) for m, t in self.imgid2modtarget[self.last_from]
                  if m not in self.last_mod]
        if not others:
            return self.get_1st_training_query()
        mod_id, target = random.choice(others)
        self.last_mod.append(mod_id)
        return self.last_from, mod_id, target

    def generate_random_query_target(self):
        if self.last_from is not None and len(self.last_mod) < 2:
            source, mod_id, target = self.get_2nd_training_query()
        else:
            source, mod_id, target = self.get_1st_training_query()
        return {
            'source_img_id': source,
            'source_img_data': self.get_img(source),
            'source_caption': self.imgs[source]['captions'][0],
            'target_img_id': target,
            'target_img_data': self.get_img(target),
            'target_caption': self.imgs[target]['captions'][0],
            'mod': {'id': mod_id, 'str': self.mods[mod_id]['to_str']},
        }

    def get_img(self, idx, raw_img=False, get_2d=False):
        if self.img_path is None or get_2d:
            img = draw_css_2d_image(self.imgs[idx]['objects']).astype(np.float32)
        else:
            img_file = self._png_path(self.img_path, idx)
            try:
                with PIL.Image.open(img_file) as f:
                    img = f.convert('RGB')
            except (OSError, ValueError) as e:
                raise DatasetError(f'{img_file}: cannot read image ({e})') from None
        if raw_img:
            return img
        if self.transform:
            img = self.transform(img)
        return img
