"""CIRR (SPEC 2.5): dataset, its retrieval test and the evaluation server's test1 files.

Annotations: `captions/cap.rc2.<split>.json` and `image_splits/split.rc2.<split>.json` under
`<root>/cirr/` (the official layout) or `<root>`; image paths in the split files are relative to
`<root>`.  Our `test` split is CIRR's `val`; `test1` has no targets and only feeds the server files.
"""
import json
import os

import torch

import amp
import checkpoints
import datasets
import fashioniq
import test_retrieval
from fashioniq import entry_field, expect_type

FILE_SPLITS = {'train': 'train', 'test': 'val', 'test1': 'test1'}
RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
# Names per query in the test1 files the evaluation server takes.
SUBMISSION_TOP = 50
SUBSET_SUBMISSION_TOP = 3
RECALL_FILE = 'cirr_test1_recall.json'
RECALL_SUBSET_FILE = 'cirr_test1_recall_subset.json'
# Why a test1 submission cannot skip missing images.
SKIPPED_TEST1 = ('--skip_missing_images with CIRR test1: the evaluation server expects every '
                 'pairid, ranked against the whole gallery, so its files are written from a '
                 'complete download only; leave the flag out (a missing image is then named)')
LAYOUT = ('<root>/cirr/captions/cap.rc2.<split>.json and <root>/cirr/image_splits/split.rc2.'
          '<split>.json (or the same without cirr/), image paths relative to <root>')


def annotation_root(path, file_split):
    """`<path>/cirr` when it holds the captions (the official layout), else `<path>`."""
    name = os.path.join('captions', f'cap.rc2.{file_split}.json')
    for root in (os.path.join(path, 'cirr'), path):
        if os.path.isfile(os.path.join(root, name)):
            return root
    raise datasets.DatasetError(f'{os.path.join(path, "cirr", name)}: CIRR captions file not '
                                f'found, nor {os.path.join(path, name)} (expected {LAYOUT})')


def read_entries(captions_path, with_target, with_members):
    """The caption entries in file order: pairid, reference, caption, target_hard (or None) and
    the img_set members (checked only where the split uses them)."""
    data = fashioniq.read_json(captions_path, f'CIRR captions file not found (expected {LAYOUT})')
    expect_type(data, list, captions_path)
    entries, first_entry_of = [], {}
    for index, entry in enumerate(data):
        def field(name, kind):
            return entry_field(entry, name, kind, captions_path, index)
        pairid = field('pairid', int)
        if pairid in first_entry_of:
            raise datasets.DatasetError(f'{captions_path} entry {index}: pairid {pairid} repeats '
                                        f'entry {first_entry_of[pairid]}')
        first_entry_of[pairid] = index
        members = []
        if with_members:
            img_set = field('img_set', dict)
            members = entry_field(img_set, 'members', list, captions_path, f'{index} img_set')
            for member in members:
                expect_type(member, str, f'{captions_path} entry {index} img_set members')
        entries.append({'pairid': pairid, 'reference': field('reference', str),
                        'caption': field('caption', str),
                        'target': field('target_hard', str) if with_target else None,
                        'members': members})
    return entries


def read_image_paths(split_path):
    """{name: path relative to the dataset root} in file order."""
    paths = expect_type(fashioniq.read_json(
        split_path, f'CIRR image split file not found (expected {LAYOUT})'), dict, split_path)
    for name, relative_path in paths.items():
        expect_type(relative_path, str, f'{split_path} entry "{datasets.echoed(name)}"')
    return paths


def check_entries_listed(entries, paths, captions_path, split_path):
    for index, entry in enumerate(entries):
        named = [('reference', entry['reference'])] + \
            ([('target_hard', entry['target'])] if entry['target'] is not None else []) + \
            [('img_set member', m) for m in entry['members']]
        for field, name in named:
            fashioniq.check_listed(name, field, paths, captions_path, index, split_path)


class CIRR(fashioniq.QuietPhotoDataset):
    """CIRR (SPEC 2.5).

    `imgs`: test and test1, every image of the split file in file order (the gallery); train, the
    references and targets of the entries in order of first appearance.  Each is captioned by its
    name.  `__getitem__(i)` is train entry i (wrapping around); `num_training_examples()` counts
    them.  Vocabulary texts: every train caption (test-split objects read the train file when
    asked).  Test queries carry `pairid` and `subset_ids`: the ids of the img_set members other
    than the reference.
    """

    def __init__(self, path, split='train', transform=None, skip_missing_images=False, fast_decode=False):
        super().__init__(path, split, transform, fast_decode)
        if split not in FILE_SPLITS:
            raise datasets.DatasetError(f'CIRR: unknown split {split!r} (expected train, test '
                                        f'(CIRR\'s val) or test1)')
        self.file_split = FILE_SPLITS[split]
        self.skipped = {}
        self._vocabulary_texts = None
        entries, paths = self._read_annotations()
        if split == 'train':
            self._vocabulary_texts = [e['caption'] for e in entries]
            paths = {n: paths[n] for e in entries for n in (e['reference'], e['target'])}
        files = {name: os.path.normpath(os.path.join(path, p)) for name, p in paths.items()}
        missing = [name for name, f in files.items() if not os.path.isfile(f)]
        if missing and not skip_missing_images:
            raise fashioniq.missing_images_error('CIRR', split, missing, len(files), self.split_path)
        if skip_missing_images:
            entries, files = self._drop_missing(entries, files, set(missing))
        self._build_index(entries, files)

    def _read_annotations(self):
        root = annotation_root(self.path, self.file_split)
        self.captions_path = os.path.join(root, 'captions', f'cap.rc2.{self.file_split}.json')
        self.split_path = os.path.join(root, 'image_splits', f'split.rc2.{self.file_split}.json')
        entries = read_entries(self.captions_path, with_target=self.split != 'test1',
                               with_members=self.split != 'train')
        paths = read_image_paths(self.split_path)
        check_entries_listed(entries, paths, self.captions_path, self.split_path)
        return entries, paths

    def _drop_missing(self, entries, files, missing):
        kept = [e for e in entries if e['reference'] not in missing and e['target'] not in missing]
        self.skipped = {'missing_images': len(missing),
                        ('dropped_triplets' if self.split == 'train' else 'dropped_queries'):
                            len(entries) - len(kept)}
        if self.split != 'train':
            self.skipped['dropped_gallery'] = len(missing)
        fashioniq.report_skipped('CIRR', self.split, self.skipped)
        return kept, {name: f for name, f in files.items() if name not in missing}

    def _build_index(self, entries, files):
        self.imgs = [{'captions': [name], 'file_path': f} for name, f in files.items()]
        self.name_to_id = {name: i for i, name in enumerate(files)}
        self.entries = entries
        if not entries:
            raise datasets.DatasetError(f'{self.captions_path}: no entry left to '
                                        f'{"train on" if self.split == "train" else "test"}')
        if self.split == 'train':
            return
        self.test_queries = []
        for e in entries:
            query = {'source_img_id': self.name_to_id[e['reference']], 'source_caption': e['reference'],
                     'target_caption': e['target'], 'mod': {'str': e['caption']}, 'pairid': e['pairid'],
                     'subset_ids': [self.name_to_id[m] for m in dict.fromkeys(e['members'])
                                    if m != e['reference'] and m in self.name_to_id]}
            if e['target'] is not None:
                query['target_img_id'] = self.name_to_id[e['target']]
            self.test_queries.append(query)

    def image_file(self, idx):
        return self.imgs[idx]['file_path']

    def get_all_texts(self):
        if self._vocabulary_texts is None:
            train_root = annotation_root(self.path, 'train')
            self._vocabulary_texts = [e['caption'] for e in read_entries(
                os.path.join(train_root, 'captions', 'cap.rc2.train.json'), True, False)]
        return list(self._vocabulary_texts)

    def num_training_examples(self):
        return len(self.entries)

    def __getitem__(self, item):
        """The entry at `item` (QuietPhotoDataset.triplet_example); nothing is drawn but redraws."""
        def triplet_at(idx, py_rng):
            entry = self.entries[idx]
            return entry['reference'], entry['target'], entry['caption']
        return self.triplet_example(item, len(self.entries), triplet_at)

    def summary(self):
        return (f'CIRR {self.split} ({self.file_split} files): {len(self.imgs)} images, '
                f'{len(self.entries)} entries, {len(self.test_queries)} test queries')


# ---------------------------------------------------------------------------------------------
# Ranking

def padded_subsets(queries, device):
    """(ids, valid): queries x widest subset; short rows are padded with the reference's id,
    which scores -inf (so padding ranks last), and marked invalid."""
    width = max(1, max(len(q['subset_ids']) for q in queries))
    ids = [q['subset_ids'] + [q['source_img_id']] * (width - len(q['subset_ids'])) for q in queries]
    valid = [[True] * len(q['subset_ids']) + [False] * (width - len(q['subset_ids'])) for q in queries]
    return torch.tensor(ids, device=device), torch.tensor(valid, device=device)


def rank_chunk(query_features, gallery_features, references, subset_ids, subset_valid, k, subset_k):
    """(top-k gallery ids, top subset ids with -1 where the subset runs short) of some queries.
    The reference scores -inf, so it is never among the results."""
    scores = query_features @ gallery_features.t()
    scores.scatter_(1, references.unsqueeze(1), float('-inf'))
    top = scores.topk(k, dim=1).indices
    subset_scores = scores.gather(1, subset_ids)  # padding is the reference: -inf
    order = subset_scores.topk(subset_k, dim=1).indices
    subset_top = subset_ids.gather(1, order).masked_fill(~subset_valid.gather(1, order), -1)
    return top, subset_top


def rank(model, dataset, batch_size, num_workers=0, k=max(RECALL_KS), subset_k=max(SUBSET_KS),
         precision=amp.FLOAT32):
    """(top ids, subset top ids) of every test query: image ids, best first, the reference left
    out.  At most len(gallery) - 1 and len(subset) results; -1 pads short subset rows."""
    queries = dataset.get_test_queries()
    with fashioniq.evaluation_mode(model):
        query_features = fashioniq.normalized(test_retrieval.compute_query_features(
            model, dataset, queries, batch_size, num_workers, precision))
        gallery_features = fashioniq.normalized(test_retrieval.compute_gallery_features(
            model, dataset, batch_size, num_workers, precision=precision))
    device = query_features.device
    references = torch.tensor([q['source_img_id'] for q in queries], device=device)
    subset_ids, subset_valid = padded_subsets(queries, device)
    k = max(0, min(k, gallery_features.shape[0] - 1))
    subset_k = min(subset_k, subset_ids.shape[1])
    rows = max(1, test_retrieval.MAX_SCORES_PER_CHUNK // max(1, gallery_features.shape[0]))
    chunks = [rank_chunk(query_features[s:s + rows], gallery_features, references[s:s + rows],
                         subset_ids[s:s + rows], subset_valid[s:s + rows], k, subset_k)
              for s in range(0, len(queries), rows)]
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


def hit_rates(top, targets, ks):
    return [float((top[:, :k] == targets.unsqueeze(1)).any(1).float().mean()) for k in ks]


def evaluate(model, dataset, batch_size, num_workers=0, precision=amp.FLOAT32):
    """[(metric name, recall)] of the CIRR val test (SPEC 2.5)."""
    if dataset.split == 'test1':
        raise datasets.DatasetError('CIRR test1 has no targets, so no recall: its evaluation '
                                    'server takes the files of test1_submission()')
    top, subset_top = rank(model, dataset, batch_size, num_workers, precision=precision)
    targets = torch.tensor([q['target_img_id'] for q in dataset.get_test_queries()], device=top.device)
    metrics = [(f'recall_top{k}', r) for k, r in zip(RECALL_KS, hit_rates(top, targets, RECALL_KS))]
    metrics += [(f'recall_subset_top{k}', r)
                for k, r in zip(SUBSET_KS, hit_rates(subset_top, targets, SUBSET_KS))]
    values = dict(metrics)
    metrics.append(('recall_avg', (values['recall_top5'] + values['recall_subset_top1']) / 2))
    return metrics


def test1_submission(model, dataset, batch_size, num_workers=0, precision=amp.FLOAT32):
    """(recall, recall_subset): the evaluation server's two dicts, every pairid with its 50 (at
    most len(gallery) - 1) and 3 best names, best first.  The server scores every pairid, so a
    test1 split that dropped queries (--skip_missing_images) is refused, never written."""
    if dataset.skipped.get('missing_images'):
        raise datasets.DatasetError(f'{dataset.split_path}: {SKIPPED_TEST1}')
    top, subset_top = rank(model, dataset, batch_size, num_workers, SUBMISSION_TOP, SUBSET_SUBMISSION_TOP,
                           precision)
    names = [img['captions'][0] for img in dataset.imgs]
    recall = {'version': 'rc2', 'metric': 'recall'}
    recall_subset = {'version': 'rc2', 'metric': 'recall_subset'}
    for query, row, subset_row in zip(dataset.get_test_queries(), top.tolist(), subset_top.tolist()):
        recall[str(query['pairid'])] = [names[i] for i in row]
        recall_subset[str(query['pairid'])] = [names[i] for i in subset_row if i >= 0]
    return recall, recall_subset


def write_test1_files(run_dir, recall, recall_subset):
    """The paths written: RECALL_FILE and RECALL_SUBSET_FILE in `run_dir`, each through a
    temporary file and a rename, so that a kill or a full disk never leaves a truncated file
    that the evaluation server would take."""
    paths = []
    for file_name, content in ((RECALL_FILE, recall), (RECALL_SUBSET_FILE, recall_subset)):
        paths.append(os.path.join(run_dir, file_name))
        checkpoints.write_text_atomic(json.dumps(content), paths[-1])
    return paths


def write_test1_submission(model, dataset, batch_size, num_workers, run_dir, precision=amp.FLOAT32):
    """main.py --test_only --test_split=test1: every process ranks its share; the first one
    (run_dir not None) writes the evaluation server's two files there."""
    recall, recall_subset = test1_submission(model, dataset, batch_size, num_workers, precision)
    if run_dir is None:
        return
    for path in write_test1_files(run_dir, recall, recall_subset):
        print('Wrote', path)
