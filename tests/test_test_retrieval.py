"""The retrieval test (SPEC section 6) against a per-query numpy implementation of the reference."""
import argparse
import json
import os
import random
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from test_fashion200k import write_fashion_fixture
from test_mitstates import write_mitstates_fixture

import datasets
import test_retrieval
from benchmarks.memory import PooledImageModel
from benchmarks.peak_memory import peak_memory

KS = (1, 5, 10, 50, 100)
DIM = 16


# --------------------------------------------------------------------------------------------
# Stand-ins
# --------------------------------------------------------------------------------------------

def image_tensor(idx):
    """A small image whose first element encodes the image id."""
    img = torch.zeros(3, 2, 2)
    img[0, 0, 0] = float(idx)
    return img


class StandInModel(torch.nn.Module):
    """A fixed random feature per image id, and per (source image id, text) for compositions;
    `query_features[(source, text)]` overrides the latter."""

    def __init__(self, num_imgs, seed=0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # gives the model a device
        g = torch.Generator().manual_seed(seed)
        self.register_buffer('img_table', torch.randn(num_imgs, DIM, generator=g))
        self.seed = seed
        self.query_features = {}
        self.calls_in_training_mode = 0
        self.calls = 0

    def _ids(self, imgs):
        return imgs[:, 0, 0, 0].round().long()

    def _record(self):
        self.calls += 1
        self.calls_in_training_mode += int(self.training)

    def extract_img_feature(self, imgs):
        self._record()
        return self.img_table[self._ids(imgs)] * self.scale

    def composed_feature(self, source, text):
        if (source, text) in self.query_features:
            return self.query_features[(source, text)]
        seed = zlib.crc32(f'{self.seed}|{source}|{text}'.encode())
        return torch.randn(DIM, generator=torch.Generator().manual_seed(seed))

    def compose_img_text(self, imgs, texts):
        self._record()
        assert len(texts) == imgs.shape[0]
        ids = self._ids(imgs).tolist()
        return torch.stack([self.composed_feature(i, t) for i, t in zip(ids, texts)]) * self.scale


class StandInDataset:
    """imgs (captions), get_test_queries() and get_img(idx)."""

    def __init__(self, captions, queries):
        self.imgs = [{'captions': [c]} for c in captions]
        self.queries = queries

    def get_test_queries(self):
        return self.queries

    def get_img(self, idx, raw_img=False):
        return image_tensor(idx)


class TrainingExamplesDataset(StandInDataset):
    """No test queries; dataset[i] draws a random training example from the global generators
    (random, numpy and torch, as real datasets may) and records it."""

    def __init__(self, captions, texts):
        super().__init__(captions, [])
        self.texts = texts
        self.drawn = []

    def __len__(self):
        return len(self.imgs)

    def __getitem__(self, i):
        source = int(np.random.randint(len(self.imgs)))
        target = random.randrange(len(self.imgs))
        text = self.texts[int(torch.randint(len(self.texts), ()))]
        example = {
            'source_img_id': source,
            'source_img_data': self.get_img(source),
            'target_img_id': target,
            'target_img_data': self.get_img(target),
            'target_caption': self.imgs[target]['captions'][0],
            'mod': {'str': text},
        }
        self.drawn.append(example)
        return example


def options(dataset='css3d', batch_size=32):
    return argparse.Namespace(dataset=dataset, batch_size=batch_size, loader_num_workers=0)


# --------------------------------------------------------------------------------------------
# The reference's per-query implementation
# --------------------------------------------------------------------------------------------

def reference_test(opt, model, testset, examples=None):
    model.eval()
    test_queries = testset.get_test_queries()
    all_imgs, all_captions, all_queries, all_target_captions = [], [], [], []
    with torch.no_grad():
        if test_queries:
            imgs, mods = [], []
            for t in test_queries:
                imgs += [testset.get_img(t['source_img_id'])]
                mods += [t['mod']['str']]
                if len(imgs) >= opt.batch_size or t is test_queries[-1]:
                    f = model.compose_img_text(torch.stack(imgs).float(), mods).numpy()
                    all_queries += [f]
                    imgs, mods = [], []
            all_queries = np.concatenate(all_queries)
            all_target_captions = [t['target_caption'] for t in test_queries]
            imgs = []
            for i in range(len(testset.imgs)):
                imgs += [testset.get_img(i)]
                if len(imgs) >= opt.batch_size or i == len(testset.imgs) - 1:
                    all_imgs += [model.extract_img_feature(torch.stack(imgs).float()).numpy()]
                    imgs = []
            all_imgs = np.concatenate(all_imgs)
            all_captions = [img['captions'][0] for img in testset.imgs]
        else:
            imgs0, imgs, mods = [], [], []
            n = len(examples)
            for i, item in enumerate(examples):
                imgs += [item['source_img_data']]
                mods += [item['mod']['str']]
                if len(imgs) > opt.batch_size or i == n - 1:
                    all_queries += [model.compose_img_text(torch.stack(imgs).float(), mods).numpy()]
                    imgs, mods = [], []
                imgs0 += [item['target_img_data']]
                if len(imgs0) > opt.batch_size or i == n - 1:
                    all_imgs += [model.extract_img_feature(torch.stack(imgs0).float()).numpy()]
                    imgs0 = []
                all_captions += [item['target_caption']]
                all_target_captions += [item['target_caption']]
            all_imgs = np.concatenate(all_imgs)
            all_queries = np.concatenate(all_queries)

    for i in range(all_queries.shape[0]):
        all_queries[i, :] /= np.linalg.norm(all_queries[i, :])
    for i in range(all_imgs.shape[0]):
        all_imgs[i, :] /= np.linalg.norm(all_imgs[i, :])

    nn_result = []
    for i in range(all_queries.shape[0]):
        sims = all_queries[i:(i + 1), :].dot(all_imgs.T)
        if test_queries:
            sims[0, test_queries[i]['source_img_id']] = -10e10  # remove query image
        nn_result.append(np.argsort(-sims[0, :])[:110])

    out = []
    nn_result = [[all_captions[nn] for nn in nns] for nns in nn_result]
    for k in KS:
        r = 0.0
        for i, nns in enumerate(nn_result):
            if all_target_captions[i] in nns[:k]:
                r += 1
        out += [('recall_top' + str(k) + '_correct_composition', r / len(nn_result))]
        if opt.dataset == 'mitstates':
            r = 0.0
            for i, nns in enumerate(nn_result):
                if all_target_captions[i].split()[0] in [c.split()[0] for c in nns[:k]]:
                    r += 1
            out += [('recall_top' + str(k) + '_correct_adj', r / len(nn_result))]
            r = 0.0
            for i, nns in enumerate(nn_result):
                if all_target_captions[i].split()[1] in [c.split()[1] for c in nns[:k]]:
                    r += 1
            out += [('recall_top' + str(k) + '_correct_noun', r / len(nn_result))]
    return out


def assert_same_metrics(got, expected):
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (name, value), (_, ref) in zip(got, expected):
        assert isinstance(value, float), name
        assert value == pytest.approx(ref, abs=1e-6), name


# --------------------------------------------------------------------------------------------
# Problems: a gallery with repeated captions and queries of every kind
# --------------------------------------------------------------------------------------------

ADJS = ['red', 'old', 'wet', 'big', 'tiny', 'ripe', 'burnt']
NOUNS = ['apple', 'car', 'dog', 'sky', 'road', 'tea', 'fish', 'wax', 'sand']


def make_problem(num_imgs, num_queries, num_captions, seed, adj_noun=False):
    """A dataset and a stand-in model whose query features are, for various queries, near the
    target image, near the source image (with the source's caption as the target caption, so
    removing the source matters), near another image with the target's caption, or random."""
    rng = np.random.RandomState(seed)
    if adj_noun:
        names = [f'{a} {n}' for a in ADJS for n in NOUNS]
        rng.shuffle(names)
        names = names[:num_captions]
    else:
        names = [str(c) for c in range(num_captions)]
    captions = [names[i % num_captions] if i < num_captions else names[rng.randint(num_captions)]
                for i in range(num_imgs)]
    model = StandInModel(num_imgs, seed=seed)
    texts = [f'text {t}' for t in range(40)]
    queries = []
    for q in range(num_queries):
        source = int(rng.randint(num_imgs))
        target = int(rng.randint(num_imgs))
        text = texts[rng.randint(len(texts))]
        kind = q % 4
        noise = torch.as_tensor(rng.randn(DIM), dtype=torch.float32)
        if kind == 0:
            feature = model.img_table[target] * rng.uniform(0.0, 3.0) + noise
        elif kind == 1:
            target = source  # the source's own caption is the target caption
            feature = model.img_table[source] * 5.0 + noise * 0.1
        elif kind == 2:
            feature = model.img_table[source] * rng.uniform(0.0, 2.0) + noise
        else:
            feature = None  # a fixed random feature for (source, text)
        if feature is not None:
            model.query_features[(source, text)] = feature
        queries.append({'source_img_id': source, 'target_caption': captions[target],
                        'mod': {'str': text}})
    return StandInDataset(captions, queries), model


def check_against_reference(opt, dataset, model):
    got = test_retrieval.test(opt, model, dataset)
    expected = reference_test(opt, model, dataset)
    assert_same_metrics(got, expected)
    values = [v for _, v in got]
    return got, values


def test_css3d_large_gallery_matches_reference():
    dataset, model = make_problem(num_imgs=700, num_queries=300, num_captions=250, seed=0)
    got, values = check_against_reference(options('css3d', batch_size=32), dataset, model)
    assert [name for name, _ in got] == [f'recall_top{k}_correct_composition' for k in KS]
    assert 0 < values[0] < values[-1] < 1  # informative recalls, increasing with k
    assert values == sorted(values)


def test_css3d_small_gallery_matches_reference():
    """Fewer than 110 (and 100) gallery images: every image, the source included, is ranked."""
    dataset, model = make_problem(num_imgs=60, num_queries=90, num_captions=25, seed=1)
    got, values = check_against_reference(options('css3d', batch_size=7), dataset, model)
    assert values[-1] == 1.0  # k = 100 > gallery: every target caption is found


def test_source_image_is_removed_from_the_ranking():
    """Queries whose feature is their own source image and whose target is the source's caption
    (unique): recall@1 needs the source, which is removed, so it is 0."""
    captions = [f'c{i}' for i in range(150)]
    model = StandInModel(150, seed=3)
    queries = []
    for i in range(0, 150, 3):
        model.query_features[(i, 'same')] = model.img_table[i].clone()
        queries.append({'source_img_id': i, 'target_caption': captions[i], 'mod': {'str': 'same'}})
    dataset = StandInDataset(captions, queries)
    got = dict(test_retrieval.test(options(), model, dataset))
    assert got['recall_top1_correct_composition'] == 0.0
    assert got['recall_top100_correct_composition'] == 0.0  # 150 > 110: ranked last
    assert_same_metrics(list(got.items()), reference_test(options(), model, dataset))


def test_a_target_label_absent_from_the_gallery_is_never_a_hit():
    """A target caption no gallery image has (a dropped image, another split's) counts as a miss
    at every k, even when the first gallery image is ranked first."""
    neighbours = torch.tensor([[0, 1, 2], [2, 0, 1], [0, 2, 1]])
    recalls = test_retrieval.recalls_at_k(neighbours, ['a', 'b', 'c'], ['z', 'c', 'b'], ks=(1, 2, 3))
    assert recalls == pytest.approx([1 / 3, 1 / 3, 2 / 3])


def test_mitstates_names_and_values_match_reference():
    dataset, model = make_problem(num_imgs=500, num_queries=300, num_captions=50, seed=2, adj_noun=True)
    got, values = check_against_reference(options('mitstates', batch_size=32), dataset, model)
    assert [name for name, _ in got] == [f'recall_top{k}_correct_{family}'
                                         for k in KS for family in ('composition', 'adj', 'noun')]
    recalls = dict(got)
    for k in KS:
        # a matching caption matches its adjective and its noun too
        assert recalls[f'recall_top{k}_correct_adj'] >= recalls[f'recall_top{k}_correct_composition']
        assert recalls[f'recall_top{k}_correct_noun'] >= recalls[f'recall_top{k}_correct_composition']
    assert recalls['recall_top1_correct_adj'] > recalls['recall_top1_correct_composition']


def test_mitstates_small_gallery_matches_reference():
    dataset, model = make_problem(num_imgs=80, num_queries=100, num_captions=30, seed=4, adj_noun=True)
    check_against_reference(options('mitstates', batch_size=16), dataset, model)


@pytest.mark.parametrize('max_scores', [1, 700, 5000, 700 * 299])
def test_chunking_gives_identical_results(monkeypatch, max_scores):
    dataset, model = make_problem(num_imgs=700, num_queries=300, num_captions=250, seed=5)
    full = test_retrieval.test(options(), model, dataset)
    monkeypatch.setattr(test_retrieval, 'MAX_SCORES_PER_CHUNK', max_scores)
    chunked = test_retrieval.test(options(), model, dataset)
    assert chunked == full


def test_batch_size_does_not_change_results():
    dataset, model = make_problem(num_imgs=300, num_queries=100, num_captions=120, seed=6)
    a = test_retrieval.test(options(batch_size=1), model, dataset)
    b = test_retrieval.test(options(batch_size=64), model, dataset)
    c = test_retrieval.test(options(batch_size=1000), model, dataset)
    assert a == b == c


def test_eval_mode_during_test_and_training_state_restored():
    dataset, model = make_problem(num_imgs=120, num_queries=40, num_captions=50, seed=7)
    model.train()
    test_retrieval.test(options(), model, dataset)
    assert model.training is True
    assert model.calls > 0 and model.calls_in_training_mode == 0
    model.eval()
    test_retrieval.test(options(), model, dataset)
    assert model.training is False


def test_training_state_restored_after_an_error():
    dataset, model = make_problem(num_imgs=50, num_queries=10, num_captions=20, seed=8)

    def broken(idx, raw_img=False):
        raise RuntimeError('unreadable image')

    dataset.get_img = broken
    model.train()
    with pytest.raises(RuntimeError, match='unreadable image'):
        test_retrieval.test(options(), model, dataset)
    assert model.training is True


# --------------------------------------------------------------------------------------------
# Splits without test queries: sampled training examples
# --------------------------------------------------------------------------------------------

NUM_EXAMPLES = 500


def make_training_problem(adj_noun, seed=9, num_imgs=400):
    rng = np.random.RandomState(seed)
    if adj_noun:
        names = [f'{a} {n}' for a in ADJS for n in NOUNS]
    else:
        names = [f'caption{i}' for i in range(150)]
    captions = [names[rng.randint(len(names))] for _ in range(num_imgs)]
    texts = [f'text {t}' for t in range(6)]
    model = StandInModel(num_imgs, seed=seed)
    # Queries (source, text) land near a fixed image, so some recalls are neither 0 nor 1.
    for source in range(num_imgs):
        for text in texts:
            near = int(rng.randint(num_imgs))
            model.query_features[(source, text)] = (model.img_table[near] * rng.uniform(0, 3)
                                                    + torch.as_tensor(rng.randn(DIM), dtype=torch.float32))
    return TrainingExamplesDataset(captions, texts), model


def _use_num_examples(monkeypatch, count):
    monkeypatch.setattr(test_retrieval, 'NUM_SAMPLED_TRAIN_EXAMPLES', count)
    original = test_retrieval.sample_training_examples

    def sample(dataset, count=None, **kwargs):
        return original(dataset, count=test_retrieval.NUM_SAMPLED_TRAIN_EXAMPLES, **kwargs)

    monkeypatch.setattr(test_retrieval, 'sample_training_examples', sample)


def _rng_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _same_rng_states(a, b):
    return (a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
            and torch.equal(a[2], b[2]))


def examples_drawn_with_images(dataset, count, seed=test_retrieval.SAMPLE_SEED):
    """What the sample stands for: the reference's examples, drawn with their images by the
    dataset itself from a fresh sampler, every generator seeded."""
    getattr(dataset, 'reset_sampler_state', lambda: None)()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    examples = [dataset[i] for i in range(count)]
    assert all(torch.is_tensor(e['source_img_data']) for e in examples)
    return examples


def descriptors(examples):
    return [(e['source_img_id'], e['target_img_id'], e['mod']['str'], e['target_caption'])
            for e in examples]


@pytest.mark.parametrize('dataset_name', ['fashion200k', 'mitstates'])
def test_split_without_queries_matches_reference_on_the_same_examples(monkeypatch, dataset_name):
    _use_num_examples(monkeypatch, NUM_EXAMPLES)
    dataset, model = make_training_problem(adj_noun=True)
    opt = options(dataset_name, batch_size=32)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    got = test_retrieval.test(opt, model, dataset)
    sampled = list(dataset.drawn)
    assert all(e['source_img_data'] is None for e in sampled)  # drawn without decoding images

    examples = examples_drawn_with_images(dataset, NUM_EXAMPLES)
    assert descriptors(sampled) == descriptors(examples)
    assert len({(e['source_img_id'], e['target_img_id']) for e in examples}) > NUM_EXAMPLES // 2
    expected = reference_test(opt, model, dataset, examples=examples)
    assert_same_metrics(got, expected)
    values = [v for _, v in got]
    assert 0 < values[0] < 1

    # The same examples at every evaluation, whatever the generators' state.
    dataset.drawn.clear()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    again = test_retrieval.test(opt, model, dataset)
    assert again == got
    assert descriptors(dataset.drawn) == descriptors(examples)


def test_training_generators_are_left_as_they_were(monkeypatch):
    """Issue 9.2: the sample seeds every generator; Python's, numpy's and torch's CPU streams
    continue afterwards exactly where training left them."""
    _use_num_examples(monkeypatch, 50)
    dataset, model = make_training_problem(adj_noun=False, num_imgs=30)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = _rng_states()
    test_retrieval.test(options('fashion200k'), model, dataset)
    assert _same_rng_states(before, _rng_states())
    assert len(dataset.drawn) == 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_generators_are_left_as_they_were(monkeypatch):
    """Issue 9.2: torch.manual_seed would also reseed every CUDA generator, so that dropout and
    triplet negatives drawn on the GPU replayed one sequence after each evaluation."""
    _use_num_examples(monkeypatch, 50)
    dataset, model = make_training_problem(adj_noun=False, num_imgs=30)
    torch.cuda.manual_seed_all(123)
    torch.rand(3, device='cuda')  # a state that no seed gives
    before = torch.cuda.get_rng_state_all()
    test_retrieval.test(options('fashion200k'), model, dataset)
    after = torch.cuda.get_rng_state_all()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_the_dataset_reads_images_again_after_the_sample_even_on_error():
    dataset, _ = make_training_problem(adj_noun=False, num_imgs=30)

    class Failing(type(dataset)):
        def __getitem__(self, i):
            if i == 3:
                raise RuntimeError('sampler broke')
            return super().__getitem__(i)

    dataset.__class__ = Failing
    with pytest.raises(RuntimeError, match='sampler broke'):
        test_retrieval.sample_training_examples(dataset, 10)
    assert 'get_img' not in vars(dataset)
    assert torch.equal(dataset.get_img(5), image_tensor(5))

    def own(idx, raw_img=False):  # an instance's own get_img is put back, not deleted
        return image_tensor(idx + 1)

    dataset.get_img = own
    assert len(test_retrieval.sample_training_examples(dataset, 3)) == 3
    assert dataset.get_img is own


def test_split_without_queries_has_no_source_removal(monkeypatch):
    """A query equal to its target image's feature is found at rank 1 even when the source is
    the target (the reference removes nothing here)."""
    _use_num_examples(monkeypatch, 50)
    dataset, model = make_training_problem(adj_noun=False, num_imgs=30)

    class SameImageDataset(TrainingExamplesDataset):
        def __getitem__(self, i):
            source = int(np.random.randint(len(self.imgs)))
            example = {'source_img_id': source, 'source_img_data': self.get_img(source),
                       'target_img_id': source, 'target_img_data': self.get_img(source),
                       'target_caption': self.imgs[source]['captions'][0], 'mod': {'str': 'same'}}
            self.drawn.append(example)
            return example

    dataset = SameImageDataset([img['captions'][0] for img in dataset.imgs], dataset.texts)
    for source in range(30):
        model.query_features[(source, 'same')] = model.img_table[source].clone()
    got = dict(test_retrieval.test(options('fashion200k'), model, dataset))
    assert got['recall_top1_correct_composition'] == 1.0


def test_num_sampled_train_examples_constant_is_honoured(monkeypatch):
    """Monkeypatching the module constant (as for MAX_SCORES_PER_CHUNK) changes the number of
    training examples the test draws."""
    monkeypatch.setattr(test_retrieval, 'NUM_SAMPLED_TRAIN_EXAMPLES', 40)
    dataset, model = make_training_problem(adj_noun=False, num_imgs=30)
    test_retrieval.test(options('fashion200k'), model, dataset)
    assert len(dataset.drawn) == 40


def test_number_of_sampled_training_examples_is_10000_unless_the_environment_says():
    assert test_retrieval.num_sampled_train_examples({}) == 10000
    assert test_retrieval.num_sampled_train_examples({'TIRG_NUM_SAMPLED_TRAIN_EXAMPLES': '37'}) == 37
    # The module's value follows this process's environment, whatever it is.
    assert test_retrieval.NUM_SAMPLED_TRAIN_EXAMPLES == test_retrieval.num_sampled_train_examples(os.environ)


# --------------------------------------------------------------------------------------------
# The same on real datasets: images read by id, unreadable ones, memory
# --------------------------------------------------------------------------------------------

def real_training_set(name, tmp_path):
    if name == 'mitstates':
        return datasets.MITStates(write_mitstates_fixture(str(tmp_path / name)), 'train',
                                  transform=datasets.photo_transform())
    return datasets.Fashion200k(write_fashion_fixture(str(tmp_path / name)), 'train',
                                transform=datasets.photo_transform())


@pytest.mark.parametrize('name', ['fashion200k', 'mitstates'])
def test_real_training_split_matches_reference_on_examples_drawn_with_images(monkeypatch, tmp_path, name):
    """Their samplers draw the same examples whether images are decoded or not, and features
    read by image id equal those of the images drawn with each example."""
    _use_num_examples(monkeypatch, 40)
    dataset = real_training_set(name, tmp_path)
    model = PooledImageModel()
    opt = options(name, batch_size=8)
    if name == 'mitstates':
        dataset[0]  # a pending pair, which the sample must neither use nor lose
    pending = dataset.get_sampler_state()
    got = test_retrieval.test(opt, model, dataset)
    assert dataset.get_sampler_state() == pending
    examples = examples_drawn_with_images(dataset, 40)
    assert descriptors(test_retrieval.sample_training_examples(dataset, 40)) == descriptors(examples)
    assert_same_metrics(got, reference_test(opt, model, dataset, examples=examples))


def test_unreadable_training_image_is_redrawn_as_in_the_reference(monkeypatch, tmp_path, capsys):
    """Drawing with images, the sampler skips an unreadable one; the sample does the same."""
    _use_num_examples(monkeypatch, 40)
    dataset = real_training_set('mitstates', tmp_path)
    bad_id = 0
    bad = dataset.imgs[bad_id]['file_path']
    with open(bad, 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0 not a JPEG')
    model = PooledImageModel()
    opt = options('mitstates', batch_size=8)
    got = test_retrieval.test(opt, model, dataset)
    examples = examples_drawn_with_images(dataset, 40)
    assert all(bad_id not in (e['source_img_id'], e['target_img_id']) for e in examples)
    assert_same_metrics(got, reference_test(opt, model, dataset, examples=examples))
    assert capsys.readouterr().err.count(bad) == 1


MEMORY_COUNTS = (60, 600)


def measure_memory_growth(tmp_path):
    """{count: bytes}: peak minus start resident memory of a forked process evaluating `count`
    sampled examples, after a first evaluation of MEMORY_COUNTS[0]."""
    dataset = real_training_set('mitstates', tmp_path)
    model = PooledImageModel()

    def evaluate(count):
        test_retrieval.NUM_SAMPLED_TRAIN_EXAMPLES = count  # in the forked process only
        test_retrieval.test(options('mitstates', batch_size=32), model, dataset)

    growth = {}
    for count in MEMORY_COUNTS:
        memory = peak_memory(lambda: evaluate(count), warmup=lambda: evaluate(MEMORY_COUNTS[0]))
        growth[count] = memory['peak_bytes'] - memory['start_bytes']
    return growth


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='Linux peak-memory reset')
def test_memory_does_not_grow_with_the_number_of_sampled_examples(tmp_path):
    """Issue 9.1: holding the sampled examples' images took 2 x 0.6 MB an example at 224 px
    (12 GB for 10,000).  Measured in a fresh interpreter: a fork of this test process would carry
    whatever earlier tests left in its heap."""
    script = ('import json, sys, pathlib; sys.path[:0] = [sys.argv[1], sys.argv[2]]; '
              'import test_test_retrieval as t; '
              'print(json.dumps(t.measure_memory_growth(pathlib.Path(sys.argv[3]))))')
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, '-c', script, os.path.dirname(tests), tests, str(tmp_path)],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    growth = {int(count): value for count, value in json.loads(result.stdout.splitlines()[-1]).items()}
    more_examples = MEMORY_COUNTS[1] - MEMORY_COUNTS[0]
    image_bytes = 3 * 224 * 224 * 4
    # Holding them would add 2 x 540 images (650 MB); a few MB of descriptors and features are fine.
    assert growth[MEMORY_COUNTS[1]] - growth[MEMORY_COUNTS[0]] < 0.05 * 2 * more_examples * image_bytes, \
        {count: f'{value / 2 ** 20:.1f} MB' for count, value in growth.items()}
