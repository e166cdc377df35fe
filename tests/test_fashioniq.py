"""FashionIQ (SPEC 2.4) on tiny trees in the exact layout, against a per-query implementation."""
import json
import os
import random
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from fiq_cirr_fixtures import (NameModel, fiq_layout, per_query_ranking, triplet, use_id_images,
                               write_fiq, write_image, write_json)

import datasets
import fashioniq


def load(root, split='test', **options):
    return fashioniq.FashionIQ(str(root), split, datasets.photo_transform(), **options)


def stand_in(dataset, query_scores=None):
    return NameModel(use_id_images(dataset), [img['captions'][0] for img in dataset.imgs], query_scores)


def per_query_gallery(layout, category, protocol):
    """SPEC 2.4: the split file's names, or the triplets' names sorted."""
    if protocol == 'split':
        return layout[category]['split_val']
    return sorted({n for t in layout[category]['val'] for n in (t['candidate'], t['target'])})


def per_query_recalls(model, layout, categories, protocol, ks=(10, 50)):
    """The SPEC 2.4 test written out: for each category, each val triplet in file order, a full
    sort of the category's gallery with the candidate in it (split protocol); or val_recalls."""
    if protocol == 'val':
        return val_recalls(model, layout, categories, ks=ks)
    metrics = {}
    for category in categories:
        triplets = layout[category]['val']
        gallery = per_query_gallery(layout, category, protocol)
        hits = {k: 0 for k in ks}
        for t in triplets:
            text = t['captions'][0] + ' and ' + t['captions'][1]
            ranking = per_query_ranking(model, t['candidate'], text, gallery)
            for k in ks:
                hits[k] += t['target'] in ranking[:k]
        for k in ks:
            metrics[f'recall_top{k}_{category}'] = hits[k] / len(triplets)
    for k in ks:
        metrics[f'recall_top{k}_mean'] = sum(metrics[f'recall_top{k}_{c}'] for c in categories) / len(categories)
    metrics['recall_mean'] = (metrics['recall_top10_mean'] + metrics['recall_top50_mean']) / 2
    return metrics


def val_recalls(model, layout, categories, present=None, ks=(10, 50)):
    """--fiq_protocol=val as SPEC 2.4 reads, one query at a time in numpy, as VAL's test_val.py
    does it: keep a triplet only when both its images are `present` (default: all); every
    non-empty caption (stripped) of a kept triplet is a query, in file order; the gallery is the
    kept triplets' distinct candidates and targets, sorted by name; squared L2 distances of the
    L2-normalised features, the candidate's set to infinity, then a full argsort."""
    metrics = {}
    for category in categories:
        kept = [t for t in layout[category]['val']
                if present is None or (t['candidate'] in present and t['target'] in present)]
        queries = []
        for t in kept:
            for caption in t['captions']:
                if caption.strip() != '':
                    queries.append((t['candidate'], caption.strip(), t['target']))
        gallery = sorted(set([t['candidate'] for t in kept] + [t['target'] for t in kept]))
        images = np.stack([model.image_vector(n).double().numpy() for n in gallery])
        images = images / np.linalg.norm(images, axis=1, keepdims=True)
        hits = np.zeros(len(ks))
        for candidate, text, target in queries:
            query = model.query_vector(candidate, text).double().numpy()
            query = query / np.linalg.norm(query)
            distances = np.sum((query[np.newaxis, :] - images) ** 2, axis=1)
            distances[gallery.index(candidate)] = np.inf
            rank = np.argsort(distances)
            position = np.where(rank == gallery.index(target))[0][0]
            hits += np.array([position < k for k in ks])
        for k, count in zip(ks, hits):
            metrics[f'recall_top{k}_{category}'] = count / len(queries)
    for k in ks:
        metrics[f'recall_top{k}_mean'] = sum(metrics[f'recall_top{k}_{c}'] for c in categories) / len(categories)
    metrics['recall_mean'] = (metrics['recall_top10_mean'] + metrics['recall_top50_mean']) / 2
    return metrics


@pytest.fixture(scope='module')
def fiq_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('fiq')
    write_fiq(str(root), fiq_layout())
    return root


# --------------------------------------------------------------------------------------------
# Recalls

@pytest.mark.parametrize('categories', [fashioniq.CATEGORIES, ('shirt',), ('toptee', 'dress')])
def test_recalls_equal_the_per_query_implementation_under_both_protocols(fiq_root, categories):
    layout = fiq_layout()
    results = {}
    for protocol in fashioniq.PROTOCOLS:
        dataset = load(fiq_root, categories=categories, protocol=protocol)
        model = stand_in(dataset)
        metrics = fashioniq.evaluate(model, dataset, batch_size=4)
        expected = per_query_recalls(model, layout, categories, protocol)
        assert [name for name, _ in metrics] == list(expected)
        assert dict(metrics) == pytest.approx(expected)
        results[protocol] = dict(metrics)
        for category in categories:
            assert [dataset.imgs[i]['captions'][0] for i in dataset.galleries[category]] == \
                per_query_gallery(layout, category, protocol)
    # The fixture's galleries differ, and so must the numbers: the protocol is not ignored.
    assert results['split'] != results['val']


def one_category_root(tmp_path, val_triplets, split_val):
    layout = {'dress': {'val': val_triplets, 'split_val': split_val,
                        'train': [triplet('dress', 0, 'dress_t0', 'dress_t1')],
                        'split_train': ['dress_t0', 'dress_t1']}}
    write_fiq(str(tmp_path), layout)
    return layout


def ranked(*names):
    """Scores putting `names` first, in this order."""
    return {n: 1.0 - 0.01 * i for i, n in enumerate(names)}


def test_the_candidate_stays_in_the_gallery(tmp_path):
    names = [f'dress_v{i}' for i in range(12)]
    t = triplet('dress', 0, 'dress_v0', 'dress_v11')
    one_category_root(tmp_path, [t], names)
    text = 'dress first 0 and dress second 0'
    for order, top10 in [(names[0:1] + names[2:11] + ['dress_v11'], 0.0),  # target 11th
                         (names[0:1] + names[2:10] + ['dress_v11'], 1.0)]:  # target 10th
        dataset = load(tmp_path, categories=['dress'])
        metrics = dict(fashioniq.evaluate(stand_in(dataset, {('dress_v0', text): ranked(*order)}),
                                          dataset, batch_size=5))
        assert (metrics['recall_top10_dress'], metrics['recall_top50_dress']) == (top10, 1.0)


def test_split_protocol_ranks_every_split_name_val_protocol_only_the_triplets(tmp_path):
    names = [f'dress_v{i}' for i in range(14)]
    queries = [triplet('dress', 0, 'dress_v0', 'dress_v1'), triplet('dress', 1, 'dress_v1', 'dress_v2')]
    one_category_root(tmp_path, queries, names)
    # The first query ranks 10 names that only the split file lists above its target.
    scores = {('dress_v0', 'dress first 0 and dress second 0'): ranked(*names[3:13], 'dress_v1')}
    for protocol, top10 in [('split', 0.5), ('val', 1.0)]:
        dataset = load(tmp_path, categories=['dress'], protocol=protocol)
        metrics = dict(fashioniq.evaluate(stand_in(dataset, scores), dataset, batch_size=5))
        assert metrics['recall_top10_dress'] == top10
    val_gallery = load(tmp_path, categories=['dress'], protocol='val').galleries['dress']
    assert val_gallery == [0, 1, 2]  # first appearance: v0, v1, v2


def test_captions_are_joined_in_file_order_at_test(fiq_root):
    dataset = load(fiq_root, categories=['shirt'])
    layout = fiq_layout()['shirt']
    assert [q['mod']['str'] for q in dataset.get_test_queries()] == \
        [f'{t["captions"][0]} and {t["captions"][1]}' for t in layout['val']]
    assert [(dataset.imgs[q['source_img_id']]['captions'][0], q['target_caption'])
            for q in dataset.get_test_queries()] == [(t['candidate'], t['target']) for t in layout['val']]


# --------------------------------------------------------------------------------------------
# Images

def test_every_image_mode_and_extension_comes_out_rgb(tmp_path):
    layout = fiq_layout({'dress': 14})
    write_fiq(str(tmp_path), layout)
    # Both a .png and a .jpg of one name: the .png is taken (SPEC: first of .png, .jpg, .jpeg).
    write_image(os.path.join(str(tmp_path), 'images', 'dress_v5.jpg'), 'L', seed=99)
    dataset = load(tmp_path, categories=['dress'])
    files = {img['captions'][0]: img['file_path'] for img in dataset.imgs}
    assert files['dress_v4'] == os.path.join('images', 'dress_v4.jpg')
    assert files['dress_v5'] == os.path.join('images', 'dress_v5.png')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # e.g. PIL's "Palette images with Transparency ..."
        for name in ('dress_v0', 'dress_v1', 'dress_v2', 'dress_v3', 'dress_v4', 'dress_v5'):
            idx = dataset.name_to_id[name]
            assert dataset.get_img(idx, raw_img=True).mode == 'RGB'
            assert dataset.get_img(idx).shape == (3, 224, 224)
    # Transparency dropped as RGBA -> RGB would: the palette colours.
    with Image.open(os.path.join(str(tmp_path), 'images', 'dress_v2.png')) as palette:
        assert palette.mode == 'P' and isinstance(palette.info['transparency'], bytes)
        expected = palette.convert('RGBA').convert('RGB')
    assert dataset.get_img(dataset.name_to_id['dress_v2'], raw_img=True).tobytes() == expected.tobytes()
    grey = dataset.get_img(dataset.name_to_id['dress_v3'], raw_img=True)
    red, green, blue = grey.split()
    assert red.tobytes() == green.tobytes() == blue.tobytes()


def test_a_missing_image_is_one_line_naming_the_count_and_the_first_names(tmp_path):
    layout = fiq_layout({'dress': 14})
    write_fiq(str(tmp_path), layout, missing=['dress_v13', 'dress_v0'])
    with pytest.raises(datasets.DatasetError) as error:
        load(tmp_path, categories=['dress'])
    message = str(error.value)
    assert '\n' not in message
    assert '2 of the 14 images' in message and 'dress_v0' in message and 'dress_v13' in message
    assert '--skip_missing_images' in message


def test_only_regular_files_are_images_a_fifo_is_never_opened(tmp_path):
    """A FIFO named like an image would hang the test when opened, a folder fail there: both are
    missing images at the start check; a regular file of a later extension is taken instead."""
    layout = fiq_layout({'dress': 14})
    write_fiq(str(tmp_path), layout, missing=['dress_v5', 'dress_v6', 'dress_v7'])
    images = tmp_path / 'images'
    os.mkfifo(str(images / 'dress_v5.png'))
    os.mkdir(str(images / 'dress_v6.png'))
    os.mkfifo(str(images / 'dress_v7.png'))
    write_image(str(images / 'dress_v7.jpg'), seed=7)
    with pytest.raises(datasets.DatasetError) as error:
        load(tmp_path, categories=['dress'])
    message = str(error.value)
    assert '2 of the 14 images' in message and 'dress_v5' in message and 'dress_v6' in message
    os.remove(str(images / 'dress_v5.png'))
    os.rmdir(str(images / 'dress_v6.png'))
    for name in ('dress_v5', 'dress_v6'):
        write_image(str(images / (name + '.png')), seed=5)
    dataset = load(tmp_path, categories=['dress'])
    assert dataset.image_file(dataset.name_to_id['dress_v7']).endswith('dress_v7.jpg')
    dataset.get_img(dataset.name_to_id['dress_v7'], raw_img=True)  # read, not the FIFO


def test_skip_missing_images_drops_triplets_and_gallery_entries_and_says_so(tmp_path, capsys):
    layout = fiq_layout({'dress': 14})
    write_fiq(str(tmp_path), layout, missing=['dress_v13', 'dress_v0'])
    dataset = load(tmp_path, categories=['dress'], skip_missing_images=True)
    kept = [t for t in layout['dress']['val'] if 'dress_v0' not in (t['candidate'], t['target'])]
    assert 0 < len(kept) < len(layout['dress']['val'])
    assert dataset.skipped == {'missing_images': 2, 'dropped_queries': 10 - len(kept),
                               'dropped_gallery': 2}
    assert 'missing images 2' in capsys.readouterr().out
    model = stand_in(dataset)
    expected = per_query_recalls(
        model, {'dress': dict(layout['dress'], val=kept,
                              split_val=[f'dress_v{i}' for i in range(1, 13)])}, ['dress'], 'split')
    assert dict(fashioniq.evaluate(model, dataset, batch_size=4)) == pytest.approx(expected)
    train = load(tmp_path, 'train', categories=['dress'], skip_missing_images=True)
    assert train.skipped == {'missing_images': 0, 'dropped_triplets': 0}


# --------------------------------------------------------------------------------------------
# Training examples and vocabulary

def test_training_examples_are_the_train_triplets_with_captions_in_random_order(fiq_root):
    layout = fiq_layout()
    dataset = load(fiq_root, 'train')
    train = [t for c in fashioniq.CATEGORIES for t in layout[c]['train']]
    assert dataset.num_training_examples() == len(train)
    random.seed(0)
    orders = []
    for i in range(60):
        t = train[i % len(train)]
        example = dataset[i]
        assert (example['source_caption'], example['target_caption']) == (t['candidate'], t['target'])
        assert dataset.imgs[example['source_img_id']]['captions'] == [t['candidate']]
        assert dataset.imgs[example['target_img_id']]['captions'] == [t['target']]
        assert example['source_img_data'].shape == (3, 224, 224)
        first, second = t['captions']
        assert example['mod']['str'] in (f'{first} and {second}', f'{second} and {first}')
        orders.append(example['mod']['str'] == f'{first} and {second}')
    assert 15 < sum(orders) < 45  # both orders, about half each
    random.seed(5)
    first_draw = [dataset[3]['mod']['str'] for _ in range(8)]
    random.seed(5)
    assert [dataset[3]['mod']['str'] for _ in range(8)] == first_draw  # the global random module


def test_an_unreadable_training_image_is_reported_once_and_another_example_drawn(tmp_path, capsys):
    layout = fiq_layout({'dress': 14})
    write_fiq(str(tmp_path), layout)
    bad = layout['dress']['train'][0]['candidate']
    with open(os.path.join(str(tmp_path), 'images', bad + '.png'), 'wb') as f:
        f.write(b'not a png')
    dataset = load(tmp_path, 'train', categories=['dress'])
    for _ in range(3):
        example = dataset[0]
        assert bad not in (example['source_caption'], example['target_caption'])
    assert capsys.readouterr().err.count(bad) == 1


def test_vocabulary_texts_are_every_train_triplet_joined_in_file_order(fiq_root):
    layout = fiq_layout()
    for categories in (fashioniq.CATEGORIES, ['toptee']):
        expected = [f'{t["captions"][0]} and {t["captions"][1]}'
                    for c in categories for t in layout[c]['train']]
        for split in ('train', 'test'):
            assert load(fiq_root, split, categories=categories).get_all_texts() == expected


def test_the_train_split_has_no_test_queries(fiq_root):
    assert load(fiq_root, 'train').get_test_queries() == []


def test_the_train_split_is_scored_on_at_most_its_triplets(fiq_root, monkeypatch):
    import test_retrieval
    trainset = load(fiq_root, 'train')
    assert len(test_retrieval.sample_training_examples(trainset)) == 18  # 3 categories x 6
    assert len(test_retrieval.sample_training_examples(trainset, count=5)) == 5


def test_all_and_a_single_name_select_categories(fiq_root):
    assert load(fiq_root, categories='all').categories == list(fashioniq.CATEGORIES)
    assert {q['category'] for q in load(fiq_root, categories='toptee').get_test_queries()} == {'toptee'}


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the entry

def cap_file(root, category='dress', split='val'):
    return os.path.join(str(root), 'captions', f'cap.{category}.{split}.json')


def split_file(root, category='dress', split='val'):
    return os.path.join(str(root), 'image_splits', f'split.{category}.{split}.json')


def bad_root(tmp_path, change):
    layout = fiq_layout({'dress': 14})
    write_fiq(str(tmp_path), layout)
    change(str(tmp_path), layout['dress'])
    return tmp_path


def entry_without(field):
    def change(root, parts):
        entries = parts['val']
        del entries[3][field]
        write_json(cap_file(root), entries)
    return change


def unlisted(field):
    def change(root, parts):
        entries = parts['val']
        entries[2][field] = 'dress_nowhere'
        write_json(cap_file(root), entries)
    return change


def truncated_json(root, parts):
    with open(cap_file(root), 'w') as f:
        f.write(json.dumps(parts['val'])[:-2])


def one_caption(root, parts):
    parts['val'][4]['captions'] = ['only one']
    write_json(cap_file(root), parts['val'])


def deeply_nested_json(path):
    def change(root, parts):
        with open(path(root), 'w') as f:  # valid JSON, too deep for the parser's recursion
            f.write('[' * 100000 + ']' * 100000)
    return change


@pytest.mark.parametrize('change, expected', [
    (truncated_json, [cap_file('{root}'), 'malformed JSON', 'line 1 column']),
    (deeply_nested_json(cap_file), [cap_file('{root}') + ': JSON nested too deeply']),
    (deeply_nested_json(split_file), [split_file('{root}') + ': JSON nested too deeply']),
    (lambda root, parts: os.remove(cap_file(root)),
     [cap_file('{root}'), 'FashionIQ captions file not found', 'image_splits/split.<category>.<split>.json']),
    (lambda root, parts: os.remove(split_file(root)),
     [split_file('{root}'), 'FashionIQ image split file not found']),
    (entry_without('target'), [cap_file('{root}') + ' entry 3', 'missing field "target"']),
    (entry_without('candidate'), [cap_file('{root}') + ' entry 3', 'missing field "candidate"']),
    (entry_without('captions'), [cap_file('{root}') + ' entry 3', 'missing field "captions"']),
    (one_caption, [cap_file('{root}') + ' entry 4', 'field "captions"', 'two strings']),
    (unlisted('target'), [cap_file('{root}') + ' entry 2', 'target "dress_nowhere"', split_file('{root}')]),
    (unlisted('candidate'), [cap_file('{root}') + ' entry 2', 'candidate "dress_nowhere"', split_file('{root}')]),
    (lambda root, parts: write_json(split_file(root), {'not': 'a list'}),
     [split_file('{root}'), 'expected a list, got an object']),
])
def test_bad_annotations_are_one_line_naming_the_file_and_entry(tmp_path, change, expected):
    root = bad_root(tmp_path, change)
    with pytest.raises(datasets.DatasetError) as error:
        load(root, categories=['dress'])
    message = str(error.value)
    assert '\n' not in message
    for part in expected:
        assert part.replace('{root}', str(root)) in message


@pytest.mark.parametrize('options, expected', [
    ({'categories': ['dress', 'skirt']}, "unknown category 'skirt' (expected dress, shirt, toptee or all)"),
    ({'protocol': 'test'}, "unknown protocol 'test' (expected split or val)"),
])
def test_unknown_category_or_protocol_is_one_line(fiq_root, options, expected):
    with pytest.raises(datasets.DatasetError, match='^' + re.escape('FashionIQ: ' + expected) + '$'):
        load(fiq_root, **options)


def test_evaluation_leaves_the_model_in_training_mode(fiq_root):
    dataset = load(fiq_root, categories=['shirt'])
    model = stand_in(dataset)
    model.train()
    fashioniq.evaluate(model, dataset, batch_size=4)
    assert model.training


def test_main_reports_bad_annotations_as_one_line_without_traceback(tmp_path):
    from conftest import TINY, run_main
    root = bad_root(tmp_path / 'fiq', entry_without('target'))
    result = run_main(TINY[1:] + ['--dataset=fashioniq', '--fiq_category=dress', f'--dataset_path={root}'], cwd=str(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0] == f'main.py: error: {cap_file(root)} entry 3: missing field "target"'
    assert 'Traceback' not in result.stdout


# --------------------------------------------------------------------------------------------
# --fiq_protocol=val: VAL's released code (SPEC 2.4)

def val_layout():
    """Dress: 80 val triplets over 70 names (a gallery past 50, so both recalls and the
    candidate's exclusion matter), with an empty caption, a blank one and captions with
    surrounding white space; shirt and toptee as fiq_layout, with a spaced caption each."""
    layout = fiq_layout({'dress': 72, 'shirt': 14, 'toptee': 14}, seed=3)
    rng = np.random.RandomState(4)
    names = layout['dress']['split_val'][:70]
    layout['dress']['val'] = [triplet('dress', i, *rng.choice(names, 2, replace=False)) for i in range(80)]
    val = layout['dress']['val']
    val[0]['captions'] = ['', ' dress second 0 ']
    val[1]['captions'] = ['  dress first 1', '   ']
    val[2]['captions'] = ['dress first 2\t', '\ndress second 2']
    val[10].update(candidate='dress_v70', target='dress_v71')  # the only triplet of both images
    for category in ('shirt', 'toptee'):
        layout[category]['val'][3]['captions'][1] = f'  {category} second 3  '
    return layout


def val_scores(layout):
    """Queries whose target follows the candidate right at the 10th or 50th place: a hit only
    when the candidate is ranked last.  Keyed by the stripped text: an unstripped one scores at
    random."""
    val = layout['dress']['val']
    scores = {}
    for i, k in ((0, 10), (1, 10), (2, 50), (4, 10), (5, 50), (6, 10)):
        t = val[i]
        others = [n for n in sorted({n for u in val for n in (u['candidate'], u['target'])})
                  if n not in (t['candidate'], t['target'])]
        text = [c.strip() for c in t['captions'] if c.strip()][-1]
        scores[(t['candidate'], text)] = ranked(*others[:k - 1], t['candidate'], t['target'])
    return scores


@pytest.fixture(scope='module')
def val_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('fiq_val')
    write_fiq(str(root), val_layout())
    return root


def test_val_protocol_recalls_equal_a_per_query_numpy_implementation_of_vals_code(val_root):
    layout = val_layout()
    dataset = load(val_root, protocol='val')
    model = stand_in(dataset, val_scores(layout))
    metrics = fashioniq.evaluate(model, dataset, batch_size=16)
    expected = val_recalls(model, layout, fashioniq.CATEGORIES)
    assert [name for name, _ in metrics] == list(expected)
    assert dict(metrics) == pytest.approx(expected)
    assert len(fashioniq.val_gallery(fashioniq.caption_examples(dataset.triplets), 'dress')) > 50
    assert 0 < expected['recall_top10_dress'] < expected['recall_top50_dress'] < 1
    # The designed queries alone: four targets 10th and two 50th once the candidate is ranked
    # last (with the candidate kept they would be 11th and 51st).
    dress = load(val_root, categories=['dress'], protocol='val')
    scores = val_scores(layout)
    dress.test_queries = [q for q in dress.test_queries if (q['source_caption'], q['mod']['str']) in scores]
    assert len(dress.test_queries) == 6
    designed = dict(fashioniq.evaluate(stand_in(dress, scores), dress, batch_size=16))
    assert (designed['recall_top10_dress'], designed['recall_top50_dress']) == pytest.approx((4 / 6, 1.0))


def test_val_protocol_queries_are_each_non_empty_stripped_caption_in_file_order(val_root):
    layout = val_layout()
    dataset = load(val_root, categories=['dress', 'toptee'], protocol='val')
    expected = [(t['candidate'], c.strip(), t['target'], category)
                for category in ('dress', 'toptee') for t in layout[category]['val']
                for c in t['captions'] if c.strip()]
    got = [(q['source_caption'], q['mod']['str'], q['target_caption'], q['category'])
           for q in dataset.get_test_queries()]
    assert got == expected
    assert len(got) == 2 * (80 + 10) - 2  # one empty and one blank caption dropped
    assert got[:4] == [(expected[0][0], 'dress second 0', expected[0][2], 'dress'),
                       (expected[1][0], 'dress first 1', expected[1][2], 'dress'),
                       (expected[2][0], 'dress first 2', expected[2][2], 'dress'),
                       (expected[3][0], 'dress second 2', expected[3][2], 'dress')]
    for q in dataset.get_test_queries():
        assert dataset.imgs[q['source_img_id']]['captions'] == [q['source_caption']]
        assert dataset.imgs[q['target_img_id']]['captions'] == [q['target_caption']]
    for category in ('dress', 'toptee'):
        names = [dataset.imgs[i]['captions'][0] for i in dataset.galleries[category]]
        assert names == sorted({n for t in layout[category]['val'] for n in (t['candidate'], t['target'])})


def test_val_protocol_trains_on_each_caption_without_drawing(tmp_path):
    layout = val_layout()
    layout['shirt']['train'][1]['captions'] = ['', ' spaced shirt ']
    write_fiq(str(tmp_path), layout)
    dataset = load(tmp_path, 'train', categories=['shirt', 'dress'], protocol='val')
    expected = [(t['candidate'], c.strip(), t['target']) for category in ('shirt', 'dress')
                for t in layout[category]['train'] for c in t['captions'] if c.strip()]
    assert len(expected) == 2 * 12 - 1
    assert dataset.num_training_examples() == len(expected)
    states = random.getstate(), np.random.get_state()[1].tolist()
    examples = [dataset[i] for i in range(2 * len(expected))]
    assert (random.getstate(), np.random.get_state()[1].tolist()) == states  # nothing drawn
    assert [(e['source_caption'], e['mod']['str'], e['target_caption']) for e in examples] == expected * 2
    assert examples[2]['mod']['str'] == 'spaced shirt'
    # The vocabulary: every kept train caption, for the train and the test split alike.
    assert dataset.get_all_texts() == [text for _, text, _ in expected]
    assert load(tmp_path, categories=['shirt', 'dress'], protocol='val').get_all_texts() == \
        [text for _, text, _ in expected]


def test_val_protocol_keeps_triplets_whose_two_images_exist_and_their_gallery(tmp_path, capsys):
    layout = val_layout()
    val = layout['dress']['val']
    # The candidate of the triplet that goes appears in no other: it leaves the gallery too,
    # though it exists.
    missing = 'dress_v71'
    write_fiq(str(tmp_path), layout, missing=[missing])
    with pytest.raises(datasets.DatasetError, match='--skip_missing_images'):
        load(tmp_path, categories=['dress'], protocol='val')
    dataset = load(tmp_path, categories=['dress'], protocol='val', skip_missing_images=True)
    present = set(layout['dress']['split_val']) - {missing}
    kept = [t for t in val if missing not in (t['candidate'], t['target'])]
    gallery = sorted({n for t in kept for n in (t['candidate'], t['target'])})
    full = sorted({n for t in val for n in (t['candidate'], t['target'])})
    assert [dataset.imgs[i]['captions'][0] for i in dataset.galleries['dress']] == gallery
    assert 'dress_v70' in full and 'dress_v70' not in gallery
    dropped = [t for t in val if t not in kept]
    assert dataset.skipped == {'missing_images': 1,
                               'dropped_queries': sum(1 for t in dropped for c in t['captions'] if c.strip()),
                               'dropped_gallery': len(full) - len(gallery)}
    assert 'missing images 1' in capsys.readouterr().out
    model = stand_in(dataset, val_scores(layout))
    assert dict(fashioniq.evaluate(model, dataset, batch_size=16)) == \
        pytest.approx(val_recalls(model, layout, ['dress'], present=present))
    # The vocabulary leaves out the train triplets that lack an image.
    train_missing = layout['dress']['train'][2]['candidate']
    os.remove(os.path.join(str(tmp_path), 'images', train_missing + '.png'))
    train = load(tmp_path, 'train', categories=['dress'], protocol='val', skip_missing_images=True)
    expected = [c.strip() for t in layout['dress']['train']
                if train_missing not in (t['candidate'], t['target']) for c in t['captions'] if c.strip()]
    assert train.get_all_texts() == expected
    assert load(tmp_path, categories=['dress'], protocol='val',
                skip_missing_images=True).get_all_texts() == expected


def test_val_protocol_skipping_over_all_categories_keeps_each_gallery_to_its_category(tmp_path):
    """--skip_missing_images rebuilds every category's gallery from the kept triplets of all
    categories at once: each must still hold only its own category's images."""
    layout = val_layout()
    write_fiq(str(tmp_path), layout, missing=['dress_v71', 'shirt_v4'])
    dataset = load(tmp_path, protocol='val', skip_missing_images=True)
    present = {n for c in fashioniq.CATEGORIES for n in layout[c]['split_val']} - {'dress_v71', 'shirt_v4'}
    for category in fashioniq.CATEGORIES:
        kept = [t for t in layout[category]['val'] if t['candidate'] in present and t['target'] in present]
        names = [dataset.imgs[i]['captions'][0] for i in dataset.galleries[category]]
        assert names == sorted({n for t in kept for n in (t['candidate'], t['target'])})
        assert all(name.startswith(category + '_') for name in names)
    model = stand_in(dataset, val_scores(layout))
    assert dict(fashioniq.evaluate(model, dataset, batch_size=16)) == \
        pytest.approx(val_recalls(model, layout, fashioniq.CATEGORIES, present=present))


def test_val_protocol_triplet_without_a_caption_gives_no_query_nor_gallery_image(tmp_path):
    """SPEC 2.4 leaves this open; VAL's code writes one line per non-empty caption and builds its
    gallery from those lines, so such a triplet's images are in the gallery only through others."""
    names = [f'dress_v{i}' for i in range(6)]
    triplets = [triplet('dress', 0, 'dress_v0', 'dress_v1'), triplet('dress', 1, 'dress_v4', 'dress_v5'),
                triplet('dress', 2, 'dress_v1', 'dress_v2')]
    triplets[1]['captions'] = ['', '  ']
    one_category_root(tmp_path, triplets, names)
    dataset = load(tmp_path, categories=['dress'], protocol='val')
    assert [dataset.imgs[i]['captions'][0] for i in dataset.galleries['dress']] == \
        ['dress_v0', 'dress_v1', 'dress_v2']
    assert [q['source_caption'] for q in dataset.get_test_queries()] == ['dress_v0'] * 2 + ['dress_v1'] * 2
