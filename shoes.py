"""Shoes (SPEC 2.6): relative captions (Guo et al. 2018) on the Attribute Discovery shoe images,
the dataset and its retrieval test under both protocols.

Layout: `<root>/relative_captions_shoes.json`, `<root>/train_im_names.txt`,
`<root>/eval_im_names.txt`; images found by file name anywhere under `<root>` inside folders whose
name starts with `womens`.  Our `test` split is the eval list.
"""
import os

import torch

import amp
import datasets
import fashioniq
import test_retrieval
from fashioniq import entry_field, expect_type

CAPTIONS_FILE = 'relative_captions_shoes.json'
LIST_FILES = {'train': 'train_im_names.txt', 'test': 'eval_im_names.txt'}
PROTOCOLS = ('val', 'unique')
RECALL_KS = (1, 10, 50)
IMAGE_FOLDER_PREFIX = 'womens'
# The eval lists in circulation: the current release's and the older copy most repositories ship.
KNOWN_EVAL_LISTS = {4658: 'the current release', 4621: 'the older copy most repositories ship'}
LAYOUT = (f'<root>/{CAPTIONS_FILE}, <root>/{LIST_FILES["train"]}, <root>/{LIST_FILES["test"]} '
          f'and the images in folders named womens* anywhere under <root>')


def read_triplets(root):
    """[{'target', 'reference', 'caption'}] of the captions file, in file order."""
    file_path = os.path.join(root, CAPTIONS_FILE)
    data = fashioniq.read_json(file_path, f'Shoes relative captions file not found (expected {LAYOUT})')
    expect_type(data, list, file_path)
    return [{'target': entry_field(entry, 'ImageName', str, file_path, index),
             'reference': entry_field(entry, 'ReferenceImageName', str, file_path, index),
             'caption': entry_field(entry, 'RelativeCaption', str, file_path, index)}
            for index, entry in enumerate(data)]


def list_path(root, split):
    return os.path.join(root, LIST_FILES[split])


def read_names(root, split):
    """[(line number, name)] of a split's list, blank lines left out."""
    file_path = list_path(root, split)
    try:
        with open(file_path, encoding='utf-8-sig') as f:  # a byte order mark is UTF-8 too
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise datasets.DatasetError(f'{file_path}: Shoes image list not found (expected {LAYOUT})') from None
    except UnicodeDecodeError as e:
        raise datasets.DatasetError(f'{file_path}: not UTF-8 text (byte {e.start})') from None
    except OSError as e:
        raise datasets.DatasetError(f'{file_path}: cannot read ({e.strerror or e})') from None
    return [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()]


def find_images(root):
    """{file name: path} of the regular files inside folders named womens* under `root` (symbolic
    links followed, each real folder once).  A name found twice is an error naming both paths."""
    found, seen_folders = {}, set()
    for folder, subfolders, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_folders:
            subfolders[:] = []
            continue
        seen_folders.add(real)
        relative = os.path.relpath(folder, root).split(os.sep)
        if not any(part.startswith(IMAGE_FOLDER_PREFIX) for part in relative):
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.is_file():  # a FIFO, a socket, a folder: not an image
                    continue
                if entry.name in found:
                    raise datasets.DatasetError(f'Shoes: image {entry.name} found twice: '
                                                f'{found[entry.name]} and {entry.path}')
                found[entry.name] = entry.path
    return found


def check_names_known(root, split, numbered_names, triplets, images):
    """A train-list name that no triplet uses and no image has is a sign of the wrong file.  (An
    eval-list name is a gallery entry: without its image it is a missing image, SPEC 2.6.)"""
    used = {n for t in triplets for n in (t['target'], t['reference'])}
    for number, name in numbered_names:
        if name not in used and name not in images:
            raise datasets.DatasetError(
                f'{list_path(root, split)} line {number}: "{datasets.echoed(name)}" is in no '
                f'triplet of {os.path.join(root, CAPTIONS_FILE)} and no image under {root} '
                f'(womens* folders)')


def protocol_triplets(triplets, names, protocol, earlier_names=()):
    """The triplets of a split whose list is `names` (SPEC 2.6).  'val': for each name in list
    order, every triplet (file order) whose target or reference is that name, so a triplet with
    both images in the list comes twice, one whose target is its reference once.  'unique': the
    triplets with both images in the list, once each, in file order, except those with both
    images in `earlier_names` (the eval split is given the train list: ARTEMIS's if / elif puts
    a triplet whose images are in both lists in train only)."""
    if protocol == 'unique':
        listed, earlier = set(names), set(earlier_names)
        return [t for t in triplets if t['target'] in listed and t['reference'] in listed
                and not (t['target'] in earlier and t['reference'] in earlier)]
    touching = {}
    for t in triplets:
        for name in dict.fromkeys((t['target'], t['reference'])):
            touching.setdefault(name, []).append(t)
    return [t for name in names for t in touching.get(name, [])]


def protocol_gallery(names, queries, protocol):
    """'val': the list's names with every query's reference and target, de-duplicated, sorted;
    'unique': the list's names in file order."""
    if protocol == 'unique':
        return list(dict.fromkeys(names))
    return sorted(set(names) | {n for t in queries for n in (t['target'], t['reference'])})


def describe_eval_list(root, count):
    known = KNOWN_EVAL_LISTS.get(count, f'neither of the known lists ({", ".join(map(str, KNOWN_EVAL_LISTS))} names)')
    return f'Shoes eval list {list_path(root, "test")}: {count} names ({known})'


class Shoes(fashioniq.QuietPhotoDataset):
    """Shoes triplets of a split under a protocol (SPEC 2.6).

    `imgs`: test, the protocol's gallery (every query's images are in it); train, the training
    examples' images in order of first appearance.  Each image is captioned by its file name.
    `__getitem__(i)` is training example i (wrapping around); `num_training_examples()` counts
    them.  Vocabulary texts: the captions of the protocol's training examples, images present or
    not, so the vocabulary does not depend on the download.
    """

    def __init__(self, path, split='train', transform=None, protocol='val', skip_missing_images=False,
                 fast_decode=False):
        super().__init__(path, split, transform, fast_decode)
        if split not in LIST_FILES:
            raise datasets.DatasetError(f'Shoes: unknown split {split!r} (expected train or test, '
                                        f'which is the eval list)')
        if protocol not in PROTOCOLS:
            raise datasets.DatasetError(f'Shoes: unknown protocol {protocol!r} (expected '
                                        f'{" or ".join(PROTOCOLS)})')
        self.protocol = protocol
        self.skipped = {}
        triplets = read_triplets(path)
        numbered_names = read_names(path, split)
        images = find_images(path)
        if split == 'train' and not skip_missing_images:
            check_names_known(path, split, numbered_names, triplets, images)
        names = [name for _, name in numbered_names]
        if split == 'test':
            print(describe_eval_list(path, len(names)))
        train_names = [name for _, name in read_names(path, 'train')] \
            if split == 'test' and protocol == 'unique' else ()
        examples = protocol_triplets(triplets, names, protocol, train_names)
        self._vocabulary_texts = [t['caption'] for t in examples] if split == 'train' else None
        gallery = protocol_gallery(names, examples, protocol) if split == 'test' else []
        needed = list(dict.fromkeys(gallery + [n for t in examples for n in (t['reference'], t['target'])]))
        missing = [name for name in needed if name not in images]
        if missing and not skip_missing_images:
            raise fashioniq.missing_images_error('Shoes', split, missing, len(needed),
                                                 f'{path} (womens* folders)')
        if skip_missing_images:
            examples, gallery = self._drop_missing(examples, names, gallery, set(missing))
        self._build_index(examples, gallery, images)

    def _drop_missing(self, examples, names, gallery, missing):
        kept = [t for t in examples if t['reference'] not in missing and t['target'] not in missing]
        self.skipped = {'missing_images': len(missing),
                        ('dropped_triplets' if self.split == 'train' else 'dropped_queries'):
                            len(examples) - len(kept)}
        if self.split != 'train':
            # The val gallery is rebuilt from the queries kept: what only dropped ones brought goes too.
            kept_gallery = protocol_gallery([n for n in names if n not in missing], kept, self.protocol)
            self.skipped['dropped_gallery'] = len(gallery) - len(kept_gallery)
            gallery = kept_gallery
        fashioniq.report_skipped('Shoes', self.split, self.skipped)
        return kept, gallery

    def _build_index(self, examples, gallery, images):
        names = list(dict.fromkeys(gallery + [n for t in examples for n in (t['reference'], t['target'])]))
        self.imgs = [{'captions': [n], 'file_path': images[n]} for n in names]
        self.name_to_id = {n: i for i, n in enumerate(names)}
        self.examples = examples
        self.gallery_ids = [self.name_to_id[n] for n in gallery]
        if not examples:
            raise datasets.DatasetError(f'{list_path(self.path, self.split)}: no '
                                        f'{"training example" if self.split == "train" else "test query"} '
                                        f'(protocol {self.protocol})')
        if self.split == 'test':
            self.test_queries = [{
                'source_img_id': self.name_to_id[t['reference']], 'source_caption': t['reference'],
                'target_img_id': self.name_to_id[t['target']], 'target_caption': t['target'],
                'mod': {'str': t['caption']}} for t in examples]

    def image_file(self, idx):
        return self.imgs[idx]['file_path']

    def get_all_texts(self):
        if self._vocabulary_texts is None:
            names = [name for _, name in read_names(self.path, 'train')]
            self._vocabulary_texts = [t['caption'] for t in
                                      protocol_triplets(read_triplets(self.path), names, self.protocol)]
        return list(self._vocabulary_texts)

    def num_training_examples(self):
        return len(self.examples)

    def __getitem__(self, item):
        """The triplet at `item` (QuietPhotoDataset.triplet_example); nothing is drawn but redraws."""
        def triplet_at(idx, py_rng):
            example = self.examples[idx]
            return example['reference'], example['target'], example['caption']
        return self.triplet_example(item, len(self.examples), triplet_at)

    def summary(self):
        return (f'Shoes {self.split} (protocol {self.protocol}): {len(self.imgs)} images, '
                f'{len(self.examples)} triplets, {len(self.test_queries)} test queries')


# ---------------------------------------------------------------------------------------------
# Ranking

def rank(model, dataset, batch_size, num_workers=0, k=max(RECALL_KS), precision=amp.FLOAT32):
    """Top gallery ids of every test query, best first (at most len(gallery)).  Each query's
    reference scores -inf, so it is ranked last rather than removed, as VAL's code (distance 1e8)
    and ARTEMIS's (score -inf) rank it: a query whose target is its reference is a hit once k
    reaches the gallery's size.  Features are computed once: the test split's images are its
    gallery."""
    queries = dataset.get_test_queries()
    with fashioniq.evaluation_mode(model):
        query_features = fashioniq.normalized(test_retrieval.compute_query_features(
            model, dataset, queries, batch_size, num_workers, precision))
        gallery_features = fashioniq.normalized(test_retrieval.compute_gallery_features(
            model, dataset, batch_size, num_workers, precision=precision))
    references = torch.tensor([q['source_img_id'] for q in queries], device=query_features.device)
    k = min(k, gallery_features.shape[0])
    rows = max(1, test_retrieval.MAX_SCORES_PER_CHUNK // max(1, gallery_features.shape[0]))
    tops = []
    for start in range(0, len(queries), rows):
        scores = query_features[start:start + rows] @ gallery_features.t()
        scores.scatter_(1, references[start:start + rows].unsqueeze(1), float('-inf'))
        tops.append(scores.topk(k, dim=1).indices)
    return torch.cat(tops)


def evaluate(model, dataset, batch_size, num_workers=0, precision=amp.FLOAT32):
    """[(metric name, recall)] of the Shoes test (SPEC 2.6): a hit at k when the target's name is
    among the top-k names."""
    top = rank(model, dataset, batch_size, num_workers, precision=precision)
    names = [img['captions'][0] for img in dataset.imgs]
    targets = [q['target_caption'] for q in dataset.get_test_queries()]
    recalls = test_retrieval.recalls_at_k(top, names, targets, RECALL_KS)
    metrics = [(f'recall_top{k}', recall) for k, recall in zip(RECALL_KS, recalls)]
    metrics.append(('recall_mean', sum(recalls) / len(recalls)))
    return metrics
