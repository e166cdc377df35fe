"""FashionIQ (SPEC 2.4) on tiny trees in the exact layout, against a per-query implementation."""
import json
import os
import random
import re
import warnings

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
    """SPEC 2.4: the split file's names, or the triplets' names in order of first appearance."""
    if protocol == 'split':
        return layout[category]['split_val']
    return list(dict.fromkeys(n for t in layout[category]['val'] for n in (t['candidate'], t['target'])))


def per_query_recalls(model, layout, categories, protocol, ks=(10, 50)):
    """The SPEC 2.4 test written out: for each category, each val triplet in file order, a full
    sort of the category's gallery with the candidate in it."""
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
