"""FashionIQ (SPEC 2.4): dataset and its per-category retrieval test.

Layout: `<root>/captions/cap.<category>.<split>.json`, `<root>/image_splits/split.<category>.<split>.json`,
`<root>/images/<name>.png` (or `.jpg`, `.jpeg`).  Our `test` split is FashionIQ's `val`.

Also home of what CIRR (cirr.py) shares with it: reading and checking the JSON annotation files,
the missing-image report, and switching a model to evaluation mode for a test.
"""
import contextlib
import json
import os
import sys
import warnings

import torch

import amp
import datasets
import test_retrieval

CATEGORIES = ('dress', 'shirt', 'toptee')
PROTOCOLS = ('split', 'val')
# Our split -> FashionIQ's file split (its public test split has no targets).
FILE_SPLITS = {'train': 'train', 'test': 'val'}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
RECALL_KS = (10, 50)
# Missing images named in the error; the count says how many more there are.
MISSING_NAMES_SHOWN = 3
LAYOUT = ('<root>/captions/cap.<category>.<split>.json, <root>/image_splits/split.<category>.'
          '<split>.json and <root>/images/<name>.png|.jpg|.jpeg')


# ---------------------------------------------------------------------------------------------
# Shared with cirr.py: annotation files.

def read_json(file_path, missing_message):
    """The parsed content of `file_path`; any problem is one DatasetError line naming it."""
    try:
        with open(file_path, encoding='utf-8-sig') as f:  # a byte order mark is UTF-8 too
            return json.load(f)
    except FileNotFoundError:
        raise datasets.DatasetError(f'{file_path}: {missing_message}') from None
    except json.JSONDecodeError as e:
        raise datasets.DatasetError(f'{file_path}: malformed JSON ({e.msg} at line {e.lineno} '
                                    f'column {e.colno})') from None
    except UnicodeDecodeError as e:
        raise datasets.DatasetError(f'{file_path}: not UTF-8 text (byte {e.start})') from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise datasets.DatasetError(f'{file_path}: JSON nested too deeply (more than '
                                    f'{sys.getrecursionlimit()} levels or so); an annotation '
                                    f'file is a few levels deep') from None
    except OSError as e:
        raise datasets.DatasetError(f'{file_path}: cannot read ({e.strerror or e})') from None


JSON_TYPE_NAMES = {dict: 'an object', list: 'a list', str: 'a string', int: 'an integer',
                   float: 'a number', bool: 'true/false', type(None): 'null'}


def expect_type(value, kind, where):
    """`value` itself, when it is of `kind` (a JSON true/false is no integer)."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        got = JSON_TYPE_NAMES.get(type(value), type(value).__name__)
        raise datasets.DatasetError(f'{where}: expected {JSON_TYPE_NAMES[kind]}, got {got} '
                                    f'{json.dumps(value)[:60]}')
    return value


def entry_field(entry, field, kind, file_path, index):
    """`entry[field]` of entry `index` of `file_path`, checked to be of `kind`."""
    where = f'{file_path} entry {index}'
    expect_type(entry, dict, where)
    if field not in entry:
        raise datasets.DatasetError(f'{where}: missing field "{field}"')
    return expect_type(entry[field], kind, f'{where} field "{field}"')


def check_listed(name, field, listed, file_path, index, split_file):
    if name not in listed:
        raise datasets.DatasetError(f'{file_path} entry {index}: {field} '
                                    f'"{datasets.echoed(name)}" is not in {split_file}')


def missing_images_error(dataset_name, split, missing, total, where):
    shown = ', '.join(map(datasets.echoed, missing[:MISSING_NAMES_SHOWN])) + (
        ', ...' if len(missing) > MISSING_NAMES_SHOWN else '')
    return datasets.DatasetError(
        f'{where}: {len(missing)} of the {total} images the {dataset_name} {split} split needs are '
        f'missing ({shown}); --skip_missing_images drops the entries that use them')


def report_skipped(dataset_name, split, skipped):
    print(f'--skip_missing_images: {dataset_name} {split}: ' +
          ', '.join(f'{key.replace("_", " ")} {value}' for key, value in skipped.items()))


@contextlib.contextmanager
def evaluation_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def normalized(features):
    return torch.nn.functional.normalize(features, dim=1)


class QuietPhotoDataset(datasets.PhotoDataset):
    """FashionIQ and CIRR hold palette images whose transparency is given per palette entry.
    Converting one to RGB drops the transparency, exactly as going through RGBA would; PIL warns
    all the same, once per worker, about a loss that does not matter for an RGB model."""

    def get_img(self, idx, raw_img=False):
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Palette images with Transparency', category=UserWarning)
            return super().get_img(idx, raw_img)

    def triplet_example(self, item, count, triplet_at):
        """The training example at `item` of `count`: `triplet_at(idx, py_rng)` gives its (source
        name, target name, text).  For a datasets.DrawKey every draw (the text's, a redraw after an
        unreadable image) comes from generators keyed by the example's position; for a plain int,
        from the global generators."""
        if isinstance(item, datasets.DrawKey):
            idx, (np_rng, py_rng) = item.index, datasets.keyed_streams(item, item.position)
        else:
            idx, (np_rng, py_rng) = item, datasets.global_streams()
        idx = int(idx) % count
        for _ in range(datasets.MAX_REDRAWS):
            source, target, text = triplet_at(idx, py_rng)
            source_id, target_id = self.name_to_id[source], self.name_to_id[target]
            try:
                source_img, target_img = self.get_img(source_id), self.get_img(target_id)
            except datasets.ImageReadError as e:
                last_error = e
                self._report_unreadable(e)
                idx = np_rng.randint(0, count)
                continue
            return {'source_img_id': source_id, 'source_img_data': source_img, 'source_caption': source,
                    'target_img_id': target_id, 'target_img_data': target_img, 'target_caption': target,
                    'mod': {'str': text}}
        raise datasets.DatasetError(f'{self.path}: {datasets.MAX_REDRAWS} training examples in a '
                                    f'row had an unreadable image (last: {last_error.path})')


# ---------------------------------------------------------------------------------------------
# FashionIQ

def check_categories(categories):
    if categories == 'all':
        return list(CATEGORIES)
    categories = [categories] if isinstance(categories, str) else list(categories)
    for category in categories:
        if category not in CATEGORIES:
            raise datasets.DatasetError(f'FashionIQ: unknown category {category!r} (expected '
                                        f'{", ".join(CATEGORIES)} or all)')
    if not categories:
        raise datasets.DatasetError(f'FashionIQ: no category selected (expected some of '
                                    f'{", ".join(CATEGORIES)})')
    return categories


def join_captions(captions):
    return f'{captions[0]} and {captions[1]}'


def caption_examples(triplets):
    """The VAL protocol's examples and queries: one per non-empty caption (stripped) of each
    triplet, in file order, caption order within a triplet; each is the triplet with its `text`."""
    return [dict(t, text=c.strip()) for t in triplets for c in t['captions'] if c.strip()]


def val_gallery(examples, category):
    """The VAL protocol's gallery: the distinct candidates and targets of the category's examples
    (so of the triplets kept), sorted by name."""
    return sorted({n for e in examples if e['category'] == category for n in (e['candidate'], e['target'])})


def captions_file(root, category, file_split):
    return os.path.join(root, 'captions', f'cap.{category}.{file_split}.json')


def split_file(root, category, file_split):
    return os.path.join(root, 'image_splits', f'split.{category}.{file_split}.json')


def read_triplets(root, category, file_split):
    """[{'category', 'candidate', 'target', 'captions': [first, second]}] in file order."""
    file_path = captions_file(root, category, file_split)
    data = read_json(file_path, f'FashionIQ captions file not found (expected {LAYOUT})')
    expect_type(data, list, file_path)
    triplets = []
    for index, entry in enumerate(data):
        captions = entry_field(entry, 'captions', list, file_path, index)
        if len(captions) != 2 or not all(isinstance(c, str) for c in captions):
            raise datasets.DatasetError(f'{file_path} entry {index}: field "captions": expected '
                                        f'two strings, got {json.dumps(captions)[:60]}')
        triplets.append({'category': category,
                         'candidate': entry_field(entry, 'candidate', str, file_path, index),
                         'target': entry_field(entry, 'target', str, file_path, index),
                         'captions': captions})
    return triplets


def read_split_names(root, category, file_split):
    file_path = split_file(root, category, file_split)
    names = expect_type(read_json(file_path, f'FashionIQ image split file not found (expected '
                                             f'{LAYOUT})'), list, file_path)
    for index, name in enumerate(names):
        expect_type(name, str, f'{file_path} entry {index}')
    return names


def check_triplets_listed(root, category, file_split, triplets, names):
    listed = set(names)
    for index, triplet in enumerate(triplets):
        for field in ('candidate', 'target'):
            check_listed(triplet[field], field, listed, captions_file(root, category, file_split),
                         index, split_file(root, category, file_split))


def list_image_files(images_dir):
    """{name: file name} of the images in `images_dir`, the first of IMAGE_EXTENSIONS that exists.
    One directory listing instead of a stat per image and extension (tens of thousands).  Only
    regular files (or links to them) count: a folder or a FIFO named like an image is no image,
    and a FIFO is never opened (that would wait for a writer)."""
    try:
        with os.scandir(images_dir) as listing:
            entries = {entry.name for entry in listing if entry.is_file()}
    except FileNotFoundError:
        raise datasets.DatasetError(f'{images_dir}: FashionIQ images folder not found (expected '
                                    f'{LAYOUT})') from None
    files = {}
    for extension in reversed(IMAGE_EXTENSIONS):  # the earliest extension written last wins
        for entry in entries:
            if entry.endswith(extension):
                files[entry[:-len(extension)]] = entry
    return files


def example_text(example, captions=None):
    """The modification text of an example: its own caption (val protocol), else the two captions
    joined, in `captions`' order when given (a training example's drawn order)."""
    if 'text' in example:
        return example['text']
    return join_captions(example['captions'] if captions is None else captions)


class FashionIQ(QuietPhotoDataset):
    """FashionIQ triplets of the selected categories (SPEC 2.4).

    `imgs` holds one entry per distinct image the split uses (train: the triplets' candidates and
    targets; test: the galleries and the triplets), each captioned by its name, which is what the
    protocol matches.  `examples` are what training draws and the test asks: under the `split`
    protocol the triplets (their two captions joined), under `val` one per non-empty caption
    (caption_examples).  `__getitem__(i)` is example i (wrapping around); `__len__` is the number
    of images, `num_training_examples()` the number of examples.  Vocabulary texts: `split`, the
    joined captions of every train triplet in the files, images present or not, so the vocabulary
    does not depend on the download; `val`, every caption of a train triplet whose two images
    exist, as VAL's code builds it (test-split objects read the train files when asked).
    """

    def __init__(self, path, split='train', transform=None, categories=CATEGORIES, protocol='split',
                 skip_missing_images=False, fast_decode=False):
        super().__init__(path, split, transform, fast_decode)
        if split not in FILE_SPLITS:
            raise datasets.DatasetError(f'FashionIQ: unknown split {split!r} (expected train or '
                                        f'test, which reads FashionIQ\'s val files)')
        if protocol not in PROTOCOLS:
            raise datasets.DatasetError(f'FashionIQ: unknown protocol {protocol!r} (expected '
                                        f'{" or ".join(PROTOCOLS)})')
        self.categories = check_categories(categories)
        self.protocol = protocol
        self.file_split = FILE_SPLITS[split]
        self.skipped = {}
        self._vocabulary_texts = None
        triplets, galleries = self._read_annotations()
        image_files = list_image_files(os.path.join(path, 'images'))
        needed = list(dict.fromkeys([n for t in triplets for n in (t['candidate'], t['target'])] +
                                    [n for names in galleries.values() for n in names]))
        missing = [name for name in needed if name not in image_files]
        if missing and not skip_missing_images:
            raise missing_images_error('FashionIQ', split, missing, len(needed),
                                       os.path.join(path, 'images'))
        if skip_missing_images:
            triplets, galleries = self._drop_missing(triplets, galleries, set(missing))
        self._build_index(triplets, galleries, image_files)

    def _read_annotations(self):
        """(triplets of every selected category, {category: gallery names}; empty for train)."""
        triplets, galleries = [], {}
        for category in self.categories:
            category_triplets = read_triplets(self.path, category, self.file_split)
            names = read_split_names(self.path, category, self.file_split)
            check_triplets_listed(self.path, category, self.file_split, category_triplets, names)
            if self.split == 'train':  # the val protocol's replace these in _build_index
                self._vocabulary_texts = (self._vocabulary_texts or []) + [
                    join_captions(t['captions']) for t in category_triplets]
            elif self.protocol == 'split':
                galleries[category] = list(dict.fromkeys(names))
            else:  # the images of the triplets kept, known once the missing ones are dropped
                galleries[category] = val_gallery(caption_examples(category_triplets), category)
            triplets += category_triplets
        return triplets, galleries

    def _drop_missing(self, triplets, galleries, missing):
        kept = [t for t in triplets if t['candidate'] not in missing and t['target'] not in missing]
        if self.protocol == 'split':
            kept_galleries = {c: [n for n in names if n not in missing] for c, names in galleries.items()}
            dropped_queries = len(triplets) - len(kept)
        else:  # VAL: a triplet is kept when both its images exist, and the gallery is theirs
            kept_galleries = {c: val_gallery(caption_examples(kept), c) for c in galleries}
            dropped_queries = len(caption_examples(triplets)) - len(caption_examples(kept))
        self.skipped = {'missing_images': len(missing)}
        if self.split == 'train':
            self.skipped['dropped_triplets'] = len(triplets) - len(kept)
        else:
            self.skipped['dropped_queries'] = dropped_queries
            self.skipped['dropped_gallery'] = sum(len(names) for names in galleries.values()) - \
                sum(len(names) for names in kept_galleries.values())
        report_skipped('FashionIQ', self.split, self.skipped)
        return kept, kept_galleries

    def _build_index(self, triplets, galleries, image_files):
        names = list(dict.fromkeys([n for names in galleries.values() for n in names] +
                                   [n for t in triplets for n in (t['candidate'], t['target'])]))
        self.imgs = [{'captions': [n], 'file_path': os.path.join('images', image_files[n])}
                     for n in names]
        self.name_to_id = {n: i for i, n in enumerate(names)}
        self.triplets = triplets
        self.examples = triplets if self.protocol == 'split' else caption_examples(triplets)
        if self.split == 'train' and self.protocol == 'val':
            self._vocabulary_texts = [e['text'] for e in self.examples]
        self.galleries = {c: [self.name_to_id[n] for n in g] for c, g in galleries.items()}
        where = f'{self.path} ({", ".join(self.categories)}, {self.file_split} files)'
        if self.split == 'train':
            if not self.examples:
                raise datasets.DatasetError(f'{where}: no training triplet')
            return
        for category in self.categories:
            if not any(e['category'] == category for e in self.examples):
                raise datasets.DatasetError(f'{where}: no {category} query left to test')
        self.test_queries = [{
            'source_img_id': self.name_to_id[e['candidate']], 'source_caption': e['candidate'],
            'target_img_id': self.name_to_id[e['target']], 'target_caption': e['target'],
            'mod': {'str': example_text(e)}, 'category': e['category']}
            for e in self.examples]

    def image_file(self, idx):
        return os.path.join(self.path, self.imgs[idx]['file_path'])

    def get_all_texts(self):
        if self._vocabulary_texts is None:
            triplets = [t for category in self.categories
                        for t in read_triplets(self.path, category, 'train')]
            if self.protocol == 'split':
                self._vocabulary_texts = [join_captions(t['captions']) for t in triplets]
            else:  # VAL: the captions of the train triplets whose two images exist
                present = list_image_files(os.path.join(self.path, 'images'))
                self._vocabulary_texts = [e['text'] for e in caption_examples(
                    [t for t in triplets if t['candidate'] in present and t['target'] in present])]
        return list(self._vocabulary_texts)

    def num_training_examples(self):
        return len(self.examples)

    def __getitem__(self, item):
        """The triplet at `item`; the split protocol draws its captions' order (QuietPhotoDataset.
        triplet_example says from which generators); the val protocol draws nothing."""
        def triplet_at(idx, py_rng):
            triplet = self.examples[idx]
            if 'text' in triplet:
                captions = None
            else:
                captions = triplet['captions'] if py_rng.random() < 0.5 else triplet['captions'][::-1]
            return triplet['candidate'], triplet['target'], example_text(triplet, captions)
        return self.triplet_example(item, len(self.examples), triplet_at)

    def summary(self):
        examples = '' if self.protocol == 'split' else f', {len(self.examples)} captions'
        return (f'FashionIQ {self.split} ({", ".join(self.categories)}; protocol {self.protocol}): '
                f'{len(self.imgs)} images, {len(self.triplets)} triplets{examples}, '
                f'{len(self.test_queries)} test queries')


def evaluate(model, dataset, batch_size, num_workers=0, precision=amp.FLOAT32):
    """[(metric name, recall)] of the FashionIQ test (SPEC 2.4): features are computed once for
    every query and every image (each test image is in a gallery or a query); each category ranks
    its queries against its own gallery.  The `split` protocol keeps the candidate in the ranking;
    `val` scores it below every other image, as VAL's code sets its distance to infinity.
    `precision`: of the features (amp.choose); they are ranked in float32."""
    queries = dataset.get_test_queries()
    with evaluation_mode(model):
        query_features = normalized(test_retrieval.compute_query_features(
            model, dataset, queries, batch_size, num_workers, precision))
        gallery_features = normalized(test_retrieval.compute_gallery_features(
            model, dataset, batch_size, num_workers, precision=precision))
    metrics, means = [], {k: [] for k in RECALL_KS}
    for category in dataset.categories:
        query_rows = [i for i, q in enumerate(queries) if q['category'] == category]
        category_ids = dataset.galleries[category]
        exclude = None
        if dataset.protocol == 'val':
            position = {idx: i for i, idx in enumerate(category_ids)}
            exclude = torch.tensor([position[queries[i]['source_img_id']] for i in query_rows],
                                   device=query_features.device)
        neighbours = test_retrieval.nearest_neighbours(
            query_features[query_rows], gallery_features[category_ids], exclude,
            k=max(RECALL_KS))
        recalls = test_retrieval.recalls_at_k(
            neighbours, [dataset.imgs[i]['captions'][0] for i in category_ids],
            [queries[i]['target_caption'] for i in query_rows], RECALL_KS)
        for k, recall in zip(RECALL_KS, recalls):
            metrics.append((f'recall_top{k}_{category}', recall))
            means[k].append(recall)
    for k in RECALL_KS:
        metrics.append((f'recall_top{k}_mean', sum(means[k]) / len(means[k])))
    metrics.append(('recall_mean', sum(value for _, value in metrics[-len(RECALL_KS):]) / len(RECALL_KS)))
    return metrics
