"""Shoes (SPEC 2.6) on tiny trees in the release formats: the two protocols' queries and
galleries written out by hand, recalls against a per-query implementation, every bad input."""
import os

import numpy as np
import pytest

from fiq_cirr_fixtures import NameModel, per_query_ranking, use_id_images
from shoes_fixtures import LAYOUTS, image_folder, image_name, small_lists, write_shoes

import datasets
import shoes
import test_retrieval


def load(root, split='test', **options):
    return shoes.Shoes(str(root), split, datasets.photo_transform(), **options)


@pytest.fixture
def small(tmp_path):
    train, evaluation, triplets = small_lists()
    write_shoes(str(tmp_path / 'shoes'), train, evaluation, triplets)
    return tmp_path / 'shoes', triplets


def pairs(dataset):
    return [(e['reference'], e['target']) for e in dataset.examples]


def triplet_pairs(triplets, indices):
    return [(triplets[i][0], triplets[i][1]) for i in indices]


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_query_and_gallery_counts_of_a_fixture_built_like_the_real_lists(tmp_path, layout):
    train, evaluation, triplets = small_lists()
    root = tmp_path / layout
    write_shoes(str(root), train, evaluation, triplets, layout=layout)
    b1, b2, b3, b4, b5 = evaluation
    # val: per eval name b1..b5 in list order, the triplets touching it in file order; 3 and 9
    # (both images in the list) come twice, the self-pair 4 once, 5 and 6 (an image in neither
    # list) once; b5 is in no triplet.
    test = load(root, protocol='val')
    assert pairs(test) == triplet_pairs(triplets, [3, 7, 9, 3, 5, 4, 6, 9])
    assert len(test.get_test_queries()) == 8
    gallery = sorted([b1, b2, b3, b4, b5, train[3], image_name(21), image_name(22)])
    assert [img['captions'][0] for img in test.imgs] == gallery
    assert [test.imgs[i]['captions'][0] for i in test.gallery_ids] == gallery
    # unique: triplets with both images in the list, once each; gallery = the list.
    test = load(root, protocol='unique')
    assert pairs(test) == triplet_pairs(triplets, [3, 4, 9])
    assert [img['captions'][0] for img in test.imgs] == [b1, b2, b3, b4, b5]
    assert len(load(root, 'train', protocol='val').examples) == 9
    assert pairs(load(root, 'train', protocol='val')) == triplet_pairs(triplets, [0, 2, 10, 0, 1, 1, 2, 10, 7])
    assert pairs(load(root, 'train', protocol='unique')) == triplet_pairs(triplets, [0, 1, 2, 10])


def test_unique_puts_a_triplet_with_both_images_in_both_lists_in_train_only(tmp_path):
    """ARTEMIS's if / elif: train first.  c1 and c2 are in both lists; val lists by name, so
    there the triplet is in both splits."""
    a1, a2, b1, b2, c1, c2 = (image_name(n) for n in (1, 2, 11, 12, 21, 22))
    triplets = [(c1, c2, 'in both lists'), (b1, c1, 'eval only'), (a1, c2, 'train only'),
                (c2, b2, 'eval only too'), (a2, a1, 'train')]
    write_shoes(str(tmp_path), [a1, a2, c1, c2], [b1, b2, c1, c2], triplets)
    assert pairs(load(tmp_path, 'train', protocol='unique')) == triplet_pairs(triplets, [0, 2, 4])
    test = load(tmp_path, protocol='unique')
    assert pairs(test) == triplet_pairs(triplets, [1, 3])
    assert [img['captions'][0] for img in test.imgs] == [b1, b2, c1, c2]  # the gallery: the list
    assert (c1, c2) in pairs(load(tmp_path, protocol='val'))
    assert (c1, c2) in pairs(load(tmp_path, 'train', protocol='val'))


def test_queries_carry_reference_target_and_caption_and_images_come_from_their_files(small):
    root, triplets = small
    test = load(root, protocol='unique')
    query = test.get_test_queries()[1]  # triplet 4, the self-pair
    assert query['mod']['str'] == 'is the same shoe'
    assert query['source_img_id'] == query['target_img_id']
    assert query['source_caption'] == query['target_caption'] == triplets[4][0]
    name = test.imgs[0]['captions'][0]
    assert test.image_file(0) == os.path.join(str(root), 'womens_boots', '1', name)
    assert tuple(test.get_img(0).shape) == (3, 224, 224)


def test_training_examples_and_vocabulary_follow_the_protocol(small):
    root, triplets = small
    train = load(root, 'train', protocol='val')
    assert train.num_training_examples() == 9
    example = train[4]  # triplet 1
    assert example['mod']['str'] == 'has a higher heel'
    assert (example['source_caption'], example['target_caption']) == triplets[1][:2]
    assert train.imgs[example['source_img_id']]['captions'][0] == triplets[1][0]
    assert train.imgs[example['target_img_id']]['captions'][0] == triplets[1][1]
    assert tuple(example['source_img_data'].shape) == (3, 224, 224)
    assert train[9]['mod']['str'] == 'is darker'  # wraps around
    captions = [triplets[i][2] for i in (0, 2, 10, 0, 1, 1, 2, 10, 7)]
    assert train.get_all_texts() == captions
    assert load(root, 'test', protocol='val').get_all_texts() == captions
    assert load(root, 'test', protocol='unique').get_all_texts() == [triplets[i][2] for i in (0, 1, 2, 10)]
    assert train.get_test_queries() == []


def test_the_eval_list_found_is_printed_with_its_count(small, capsys):
    load(small[0])
    assert 'eval_im_names.txt: 5 names' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Recall against a per-query implementation

def per_query_protocol(train_or_eval_names, triplets, protocol):
    """(queries, gallery) written plainly from SPEC 2.6."""
    names = train_or_eval_names
    if protocol == 'val':
        queries = []
        for name in names:
            for t in triplets:
                if name == t[0] or name == t[1]:
                    queries.append(t)
        gallery = sorted(set(names) | {n for t in queries for n in t[:2]})
    else:
        queries = [t for t in triplets if t[0] in names and t[1] in names]
        gallery = list(names)
    return queries, gallery


def per_query_recalls(model, queries, gallery, ks=(1, 10, 50)):
    """A full sort of the gallery per query, its reference moved to the end (SPEC 2.6)."""
    hits = {k: 0 for k in ks}
    for reference, target, caption in queries:
        ranking = [n for n in per_query_ranking(model, reference, caption, gallery) if n != reference]
        ranking.append(reference)
        for k in ks:
            hits[k] += target in ranking[:k]
    recalls = [hits[k] / len(queries) for k in ks]
    return recalls + [sum(recalls) / len(recalls)]


@pytest.mark.parametrize('protocol', shoes.PROTOCOLS)
def test_recalls_equal_the_per_query_implementation(small, protocol):
    root, triplets = small
    _, evaluation, _ = small_lists()
    b1, b2, b3, b4, _ = evaluation
    test = load(root, protocol=protocol)
    # The self-pair's reference (its target) scores highest: ranked last, so a hit at 10 and 50
    # (galleries of 5 and 8), never at 1.  Triplet 9 (twice under val) finds its target first;
    # triplet 3 finds it only at rank 2.
    scores = {(b3, 'is the same shoe'): {b3: 1.0},
              (b4, 'has a strap'): {b4: 1.0, b1: 0.9},
              (b1, 'is red'): {b1: 1.0, b4: 0.8, b2: 0.7}}
    model = NameModel(use_id_images(test), [img['captions'][0] for img in test.imgs], scores)
    got = dict(shoes.evaluate(model, test, batch_size=3))
    assert list(got) == ['recall_top1', 'recall_top10', 'recall_top50', 'recall_mean']
    queries, gallery = per_query_protocol(evaluation, triplets, protocol)
    expected = per_query_recalls(model, queries, gallery)
    assert list(got.values()) == pytest.approx(expected)
    if protocol == 'unique':  # 3, 4, 9: a hit at 1 for 9 only; all three within 10
        assert list(got.values()) == pytest.approx([1 / 3, 1, 1, 7 / 9])


def val_code_recalls(model, queries, gallery, ks):
    """VAL's test, one query at a time in numpy: squared L2 distances between L2-normalised
    features, the reference's distance set to 1e8, a full argsort; a hit at k when the target's
    position is below k."""
    images = np.stack([model.image_vector(n).double().numpy() for n in gallery])
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    hits = np.zeros(len(ks))
    for reference, target, caption in queries:
        query = model.query_vector(reference, caption).double().numpy()
        query /= np.linalg.norm(query)
        distances = np.sum((query[np.newaxis, :] - images) ** 2, axis=1)
        distances[gallery.index(reference)] = 1e8
        position = int(np.where(np.argsort(distances) == gallery.index(target))[0][0])
        hits += [position < k for k in ks]
    return list(hits / len(queries))


def artemis_code_recalls(model, queries, gallery, ks):
    """ARTEMIS's test, one query at a time in numpy: cosine scores, the reference's set to -inf,
    sorted best first; a hit at k when the target is among the first k."""
    images = np.stack([model.image_vector(n).double().numpy() for n in gallery])
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    hits = np.zeros(len(ks))
    for reference, target, caption in queries:
        query = model.query_vector(reference, caption).double().numpy()
        scores = images @ (query / np.linalg.norm(query))
        scores[gallery.index(reference)] = -np.inf
        order = [gallery[i] for i in np.argsort(-scores, kind='stable')]
        hits += [target in order[:k] for k in ks]
    return list(hits / len(queries))


@pytest.mark.parametrize('protocol', shoes.PROTOCOLS)
def test_a_gallery_smaller_than_k_ranks_each_reference_last_as_vals_and_artemis_code(tmp_path, monkeypatch,
                                                                                     protocol):
    """Five eval images, so recall@10 and @50 rank the whole gallery: a query whose target is its
    reference (scored highest here) finds it last, a hit at 10 and 50 and not at 1."""
    train = [image_name(n) for n in (1, 2, 3)]
    evaluation = [image_name(n) for n in (11, 12, 13, 14, 15)]
    b1, b2, b3, b4, b5 = evaluation
    triplets = [(train[0], train[1], 'train darker'), (b1, b2, 'is red'), (b3, b3, 'the same shoe'),
                (b4, b1, 'has a strap'), (b5, b2, 'is shinier'), (train[2], train[0], 'train taller')]
    write_shoes(str(tmp_path), train, evaluation, triplets)
    test = load(tmp_path, protocol=protocol)
    scores = {(b1, 'is red'): {b2: 1.0},                       # first: a hit at every k
              (b3, 'the same shoe'): {b3: 1.0, b4: 0.9},       # itself best, ranked last
              (b4, 'has a strap'): {b4: 1.0, b5: 0.9, b1: 0.8},  # second once b4 is last
              (b5, 'is shinier'): {b5: 1.0, b1: 0.9, b2: 0.1}}   # last but for b5
    model = NameModel(use_id_images(test), [img['captions'][0] for img in test.imgs], scores)
    monkeypatch.setattr(test_retrieval, 'MAX_SCORES_PER_CHUNK', 10)  # chunks of 2 queries
    got = dict(shoes.evaluate(model, test, batch_size=3))
    queries, gallery = per_query_protocol(evaluation, [t for t in triplets], protocol)
    assert len(gallery) == 5 and [img['captions'][0] for img in test.imgs] == gallery
    ks = shoes.RECALL_KS
    assert ks == (1, 10, 50)
    for reference_code in (val_code_recalls, artemis_code_recalls):
        expected = reference_code(model, queries, gallery, ks)
        assert [got[f'recall_top{k}'] for k in ks] == pytest.approx(expected)
    # val: per name b1..b5, the triplets touching it: (b1,b2) (b4,b1) | (b1,b2) (b5,b2) | (b3,b3)
    # | (b4,b1) | (b5,b2); a hit at 1 for (b1,b2) only, twice in 7.  unique: each once, 1 in 4.
    top1 = {'val': 2 / 7, 'unique': 1 / 4}[protocol]
    assert list(got.values()) == pytest.approx([top1, 1.0, 1.0, (top1 + 2) / 3])


def test_a_gallery_of_its_reference_alone_finds_it_at_every_k(tmp_path):
    name = image_name(1)
    write_shoes(str(tmp_path), [image_name(2)], [name], [(name, name, 'same'), (image_name(2), image_name(2), 'x')])
    test = load(tmp_path, protocol='unique')
    model = NameModel(use_id_images(test), [name])
    assert dict(shoes.evaluate(model, test, batch_size=2)) == {
        'recall_top1': 1.0, 'recall_top10': 1.0, 'recall_top50': 1.0, 'recall_mean': 1.0}


# ---------------------------------------------------------------------------------------------
# Missing images

def test_a_missing_image_is_one_line_with_the_count_first_names_and_the_flag(tmp_path):
    train, evaluation, triplets = small_lists()
    missing = [evaluation[0], evaluation[1], evaluation[3], image_name(21)]
    write_shoes(str(tmp_path), train, evaluation, triplets, missing=missing)
    with pytest.raises(datasets.DatasetError) as e:
        load(tmp_path, protocol='val')
    message = str(e.value)
    assert '\n' not in message
    assert '4 of the 8 images the Shoes test split needs are missing' in message
    assert '--skip_missing_images' in message
    assert message.count('img_womens_') == 3 and ', ...' in message


def test_skip_missing_images_drops_queries_and_gallery_entries_and_counts_them(tmp_path, capsys):
    train, evaluation, triplets = small_lists()
    b1, b2, b3, b4, b5 = evaluation
    write_shoes(str(tmp_path), train, evaluation, triplets, missing=[image_name(21), train[0]])
    test = load(tmp_path, protocol='val', skip_missing_images=True)
    # n1 (image 21) is missing: triplet 5 goes; n2 stays (triplet 6 brings it).
    assert pairs(test) == triplet_pairs(triplets, [3, 7, 9, 3, 4, 6, 9])
    assert [img['captions'][0] for img in test.imgs] == sorted([b1, b2, b3, b4, b5, train[3], image_name(22)])
    assert test.skipped == {'missing_images': 1, 'dropped_queries': 1, 'dropped_gallery': 1}
    assert '--skip_missing_images: Shoes test: missing images 1, dropped queries 1, dropped gallery 1' \
        in capsys.readouterr().out
    trainset = load(tmp_path, 'train', protocol='val', skip_missing_images=True)
    assert pairs(trainset) == triplet_pairs(triplets, [1, 1, 7])  # a1 is in 0, 2, 10
    assert trainset.skipped == {'missing_images': 1, 'dropped_triplets': 6}
    assert len(trainset.get_all_texts()) == 9  # the vocabulary does not depend on the download


def test_only_regular_files_are_images(tmp_path):
    train, evaluation, triplets = small_lists()
    paths = write_shoes(str(tmp_path), train, evaluation, triplets, missing=[evaluation[3]])
    folder = os.path.dirname(paths[evaluation[2]])
    os.mkfifo(os.path.join(folder, evaluation[3]))
    os.mkdir(os.path.join(os.path.dirname(paths[evaluation[0]]), evaluation[3]))  # a folder
    with pytest.raises(datasets.DatasetError, match=r'1 of the 8 images .* missing \(img_womens_boots_14.jpg\)'):
        load(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad annotations: one line naming the file and what was expected

def rewrite(root, file_name, content):
    with open(os.path.join(str(root), file_name), 'w') as f:
        f.write(content)


@pytest.mark.parametrize('file_name', ['relative_captions_shoes.json', 'train_im_names.txt',
                                       'eval_im_names.txt'])
def test_a_missing_annotation_file_is_one_line(small, file_name):
    os.remove(os.path.join(str(small[0]), file_name))
    with pytest.raises(datasets.DatasetError) as e:
        load(small[0], 'train' if file_name == 'train_im_names.txt' else 'test')
    assert str(e.value).startswith(os.path.join(str(small[0]), file_name) + ': ')
    assert 'not found' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('content, expected', [
    ('[{"ImageName": "a.jpg", ', r'relative_captions_shoes.json: malformed JSON'),
    ('{"ImageName": "a.jpg"}', r'relative_captions_shoes.json: expected a list, got an object'),
    ('[{"ImageName": "a.jpg", "ReferenceImageName": "b.jpg"}]',
     r'relative_captions_shoes.json entry 0: missing field "RelativeCaption"'),
    ('[{"ReferenceImageName": "b.jpg", "RelativeCaption": "x"}]',
     r'relative_captions_shoes.json entry 0: missing field "ImageName"'),
    ('[{"ImageName": "a.jpg", "ReferenceImageName": 3, "RelativeCaption": "x"}]',
     r'relative_captions_shoes.json entry 0 field "ReferenceImageName": expected a string'),
])
def test_bad_captions_file_is_one_line_naming_file_and_entry(small, content, expected):
    rewrite(small[0], 'relative_captions_shoes.json', content)
    with pytest.raises(datasets.DatasetError, match=expected) as e:
        load(small[0])
    assert '\n' not in str(e.value)


def test_a_train_list_name_no_triplet_or_image_has_is_one_line_unless_images_may_be_missing(small):
    train, _, _ = small_lists()
    rewrite(small[0], 'train_im_names.txt', '\n'.join(train + ['img_womens_clogs_999.jpg']) + '\n')
    with pytest.raises(datasets.DatasetError,
                       match=r'train_im_names.txt line 5: "img_womens_clogs_999.jpg" is in no triplet'):
        load(small[0], 'train')
    # Nothing uses it: with --skip_missing_images it changes nothing.
    trainset = load(small[0], 'train', skip_missing_images=True)
    assert len(trainset.examples) == 9 and trainset.skipped == {'missing_images': 0, 'dropped_triplets': 0}


@pytest.mark.parametrize('protocol', shoes.PROTOCOLS)
def test_an_eval_list_name_no_triplet_or_image_has_is_a_missing_gallery_image(small, protocol, capsys):
    """SPEC 2.6: a missing image as in 2.4.  The real eval list has 2,361 names in no triplet: one
    missing distractor must not block the benchmark."""
    root, triplets = small
    _, evaluation, _ = small_lists()
    distractor = 'img_womens_clogs_999.jpg'
    rewrite(root, 'eval_im_names.txt', '\n'.join(evaluation[:2] + [distractor] + evaluation[2:]) + '\n')
    with pytest.raises(datasets.DatasetError) as e:
        load(root, protocol=protocol)
    total = {'val': 9, 'unique': 6}[protocol]
    assert str(e.value) == (f'{root} (womens* folders): 1 of the {total} images the Shoes test split '
                            f'needs are missing ({distractor}); --skip_missing_images drops the '
                            f'entries that use them')
    test = load(root, protocol=protocol, skip_missing_images=True)
    assert test.skipped == {'missing_images': 1, 'dropped_queries': 0, 'dropped_gallery': 1}
    assert '--skip_missing_images: Shoes test: missing images 1, dropped queries 0, dropped gallery 1' \
        in capsys.readouterr().out
    gallery = [test.imgs[i]['captions'][0] for i in test.gallery_ids]
    assert distractor not in gallery and len(gallery) == total - 1
    assert pairs(test) == triplet_pairs(triplets, {'val': [3, 7, 9, 3, 5, 4, 6, 9], 'unique': [3, 4, 9]}[protocol])


def test_unique_eval_list_repeating_a_name_has_it_once_in_the_gallery_and_counts_it_once(small):
    root, triplets = small
    b1, b2, b3, b4, b5 = small_lists()[1]
    # b5 (in no triplet) listed three times and its image missing; b2 twice, present.
    rewrite(root, 'eval_im_names.txt', '\n'.join([b5, b1, b2, b5, b3, b2, b4, b5]) + '\n')
    os.remove(os.path.join(str(root), image_folder('flat', b5), b5))
    test = load(root, protocol='unique', skip_missing_images=True)
    assert [test.imgs[i]['captions'][0] for i in test.gallery_ids] == [b1, b2, b3, b4]
    assert test.skipped == {'missing_images': 1, 'dropped_queries': 0, 'dropped_gallery': 1}
    assert pairs(test) == triplet_pairs(triplets, [3, 4, 9])


def test_a_byte_order_mark_is_read_as_utf8(small):
    """Issue 23 item 19: files saved by editors that write a UTF-8 byte order mark."""
    root, triplets = small
    for file_name in ('relative_captions_shoes.json', 'train_im_names.txt', 'eval_im_names.txt'):
        path = os.path.join(str(root), file_name)
        with open(path, 'rb') as f:
            content = f.read()
        with open(path, 'wb') as f:
            f.write(b'\xef\xbb\xbf' + content)
    assert pairs(load(root, protocol='unique')) == triplet_pairs(triplets, [3, 4, 9])
    assert pairs(load(root, 'train', protocol='unique')) == triplet_pairs(triplets, [0, 1, 2, 10])
    assert load(root, 'train').get_all_texts()[0] == triplets[0][2]


@pytest.mark.parametrize('split', ['train', 'test'])
def test_a_20_mb_list_line_is_not_echoed_whole(small, split):
    train, evaluation, _ = small_lists()
    line = 'img_womens_' + 'x' * 20_000_000
    file_name, names = {'train': ('train_im_names.txt', train), 'test': ('eval_im_names.txt', evaluation)}[split]
    rewrite(small[0], file_name, '\n'.join(names + [line]) + '\n')
    with pytest.raises(datasets.DatasetError) as e:
        load(small[0], split)
    message = str(e.value)
    assert len(message) < 600 and '\n' not in message
    assert line[:80] + '...' in message and line[:81] not in message


def test_a_missing_name_holding_a_line_break_is_escaped_in_the_one_line_error(tmp_path):
    train, evaluation, triplets = small_lists()
    write_shoes(str(tmp_path), train, evaluation, triplets + [(evaluation[0], 'two\nlines.jpg', 'x')],
                missing=['two\nlines.jpg'])
    with pytest.raises(datasets.DatasetError) as e:
        load(tmp_path, protocol='val')
    assert '\n' not in str(e.value) and '(two\\nlines.jpg)' in str(e.value)


def test_a_name_found_twice_names_both_paths(small):
    root = str(small[0])
    name = image_name(1)
    first = os.path.join(root, image_folder('flat', name), name)
    second = os.path.join(root, 'attributedata', 'womens_pumps', '0', name)
    os.makedirs(os.path.dirname(second))
    with open(first, 'rb') as src, open(second, 'wb') as dst:
        dst.write(src.read())
    with pytest.raises(datasets.DatasetError) as e:
        load(root)
    assert f'{name} found twice' in str(e.value)
    assert first in str(e.value) and second in str(e.value)


def test_images_outside_womens_folders_do_not_count(small):
    root = str(small[0])
    name = image_name(11)
    os.rename(os.path.join(root, image_folder('flat', name), name), os.path.join(root, name))
    with pytest.raises(datasets.DatasetError, match=r'1 of the 8 images'):
        load(root)


@pytest.mark.parametrize('options, expected', [
    ({'protocol': 'split'}, r"Shoes: unknown protocol 'split' \(expected val or unique\)"),
    ({'split': 'val'}, r"Shoes: unknown split 'val'"),
])
def test_unknown_protocol_or_split_is_one_line(small, options, expected):
    split = options.pop('split', 'test')
    with pytest.raises(datasets.DatasetError, match=expected):
        load(small[0], split, **options)

