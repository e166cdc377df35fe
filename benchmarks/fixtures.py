"""Data trees the sections generate in their temporary folder: photo-like JPEGs, a small CSS
set, and FashionIQ, CIRR, Shoes and MIT-States trees in their real layouts."""
import json
import os
import shutil

import numpy as np

import fashioniq
import make_css_dataset
import shoes


def write_css_tree(root):
    """A CSS dataset of 100 base scenes drawn at 64x64: enough batches for a few iterations."""
    make_css_dataset.generate_css_dataset(root, base_scenes=100, verbose=False)
    return root


def write_jpegs(folder, count, width, height, seed):
    """Smooth random colour fields with fine grain: photo-like JPEG sizes."""
    import PIL.Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        low = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
        img = np.asarray(PIL.Image.fromarray(low).resize((width, height), PIL.Image.BICUBIC),
                         dtype=np.int16)
        img = img + rng.normal(0, 5, (height, width, 1)).astype(np.int16)
        path = os.path.join(folder, f'img_{i:04d}.jpg')
        PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def write_triplet_tree(dataset_name, root, jpegs):
    """A FashionIQ, CIRR or Shoes train split in the real layout over the generated photos, 2
    triplets per image (each image a source twice and a target twice); FashionIQ's and Shoes' as
    JPEGs, CIRR's as PNGs, as their downloads hold.  Shoes: the last 2 photos are the eval list,
    the others the train list with the triplets among them (4 examples each under --shoes_protocol
    =val: every triplet is listed under both its images)."""
    import PIL.Image

    def write(path, content):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(content, f)
    names = [f'img{i:04d}' for i in range(len(jpegs))]
    pairs = [(names[i], names[(i + step) % len(names)]) for step in (1, 2) for i in range(len(names))]
    if dataset_name == 'shoes':
        return write_shoes_tree(root, jpegs, write)
    if dataset_name == 'fashioniq':
        for name, jpeg in zip(names, jpegs):
            os.makedirs(os.path.join(root, 'images'), exist_ok=True)
            shutil.copy(jpeg, os.path.join(root, 'images', name + '.jpg'))
        write(fashioniq.captions_file(root, 'dress', 'train'),
              [{'candidate': a, 'target': b, 'captions': [f'is longer {i}', f'has stripes {i}']}
               for i, (a, b) in enumerate(pairs)])
        write(fashioniq.split_file(root, 'dress', 'train'), names)
        for category in fashioniq.CATEGORIES[1:]:  # one triplet each: the loader reads every file
            write(fashioniq.captions_file(root, category, 'train'),
                  [{'candidate': names[0], 'target': names[1], 'captions': ['a', 'b']}])
            write(fashioniq.split_file(root, category, 'train'), names[:2])
        return root
    paths = {name: f'./train/0/{name}.png' for name in names}
    for name, jpeg in zip(names, jpegs):
        os.makedirs(os.path.join(root, 'train', '0'), exist_ok=True)
        PIL.Image.open(jpeg).save(os.path.join(root, paths[name]))
    write(os.path.join(root, 'cirr', 'captions', 'cap.rc2.train.json'),
          [{'pairid': i, 'reference': a, 'target_hard': b, 'caption': f'make it brighter {i}',
            'img_set': {'id': i, 'members': [a, b]}} for i, (a, b) in enumerate(pairs)])
    write(os.path.join(root, 'cirr', 'image_splits', 'split.rc2.train.json'), paths)
    return root


def write_shoes_tree(root, jpegs, write):
    """Shoes' release files, and its images in the attributedata/womens_<category>/{0,1}/ layout."""
    categories = ('clogs', 'pumps', 'boots')
    names = [f'img_womens_{categories[i % 3]}_{i}.jpg' for i in range(len(jpegs))]
    for i, (name, jpeg) in enumerate(zip(names, jpegs)):
        folder = os.path.join(root, 'attributedata', f'womens_{categories[i % 3]}', str(i % 2))
        os.makedirs(folder, exist_ok=True)
        shutil.copy(jpeg, os.path.join(folder, name))
    train = names[:-2]
    pairs = [(train[i], train[(i + step) % len(train)]) for step in (1, 2) for i in range(len(train))]
    write(os.path.join(root, shoes.CAPTIONS_FILE),
          [{'ImageName': b, 'ReferenceImageName': a, 'RelativeCaption': f'has a higher heel {i}'}
           for i, (a, b) in enumerate(pairs)])
    for split, listed in (('train', train), ('test', names[-2:])):
        with open(shoes.list_path(root, split), 'w') as f:
            f.write(''.join(name + '\n' for name in listed))
    return root


def write_mitstates_tree(root, images_per_folder, seed):
    """Two train nouns with two adjectives each, plus a test noun: MIT-States' layout."""
    for i, folder in enumerate(['ripe apple', 'sliced apple', 'small cake', 'whole cake',
                                'ripe fig', 'dried fig']):
        write_jpegs(os.path.join(root, 'images', folder), images_per_folder, 256, 256, seed + i)
    return root
