"""MIT-States loader (SPEC 2.3) on a small fixture tree of tiny real JPEGs."""
import glob
import os
import random

import numpy as np
import pytest

import datasets
from test_fashion200k import SAMPLED, write_jpeg

# The 49 test nouns, copied from SPEC 2.3.
SPEC_TEST_NOUNS = set("""armor bracelet bush camera candy castle ceramic cheese clock
  clothes coffee fan fig fish foam forest fruit furniture garden gate glass horse island laptop
  lead lightning mirror orange paint persimmon plastic plate potato road rubber sand shell sky
  smoke steel stream table tea tomato vacuum wax wheel window wool""".split())

# folder -> number of images.  Written in an order unlike the sorted one.
FOLDERS = {
    'sliced apple': 2, 'ripe apple': 3, 'rotten apple': 2,
    'fresh jalapeño': 2, 'dried jalapeño': 2,  # non-ASCII noun
    'half-eaten cake': 1, 'whole cake': 2,
    'ripe fig': 2, 'dried fig': 2,  # test nouns
    'spilled tea': 2, 'hot tea': 2, 'iced tea': 1,
    'adj apple': 2, 'adj tea': 1,  # skipped: the adjective is literally "adj"
    'misc': 2,  # skipped: no space
}


def write_mitstates_fixture(root, folders=FOLDERS):
    images = os.path.join(root, 'images')
    n = 0
    for folder, count in folders.items():
        for i in range(count):
            write_jpeg(os.path.join(images, folder, f'image_{(7 * i) % 10}.jpg'), seed=n)
            n += 1
    with open(os.path.join(images, 'ripe apple', '.DS_Store'), 'wb') as f:
        f.write(b'\0\1')
    with open(os.path.join(images, 'read me.txt'), 'w') as f:  # a file, not a folder
        f.write('notes')
    return root


@pytest.fixture
def mit_root(tmp_path):
    return write_mitstates_fixture(str(tmp_path / 'mitstates'))


# --- An independent reading of SPEC 2.3 ----------------------------------------------------

def spec_images(root, split):
    """[(file name, caption, adjective, noun)] in sorted folder and file order."""
    out = []
    images = os.path.join(root, 'images')
    for folder in sorted(os.listdir(images)):
        if ' ' not in folder or not os.path.isdir(os.path.join(images, folder)):
            continue
        adj, noun = folder.split(' ')
        if adj == 'adj' or (noun in SPEC_TEST_NOUNS) != (split == 'test'):
            continue
        for name in sorted(os.listdir(os.path.join(images, folder))):
            if name.endswith('.jpg'):
                out.append((os.path.join(images, folder, name), folder, adj, noun))
    return out


def spec_adjectives(images):
    adjs = {}
    for _, _, adj, noun in images:
        adjs.setdefault(noun, set()).add(adj)
    return adjs


def spec_queries(images):
    """(source id, target caption, text) for each test image and each other adjective of its
    noun (adjectives in sorted order)."""
    adjs = spec_adjectives(images)
    return [(i, f'{other} {noun}', other)
            for i, (_, _, adj, noun) in enumerate(images)
            for other in sorted(adjs[noun]) if other != adj]


# --- Loading ----------------------------------------------------------------------------------

def test_images_captions_texts_and_queries_follow_the_spec(mit_root):
    for split in ('train', 'test'):
        ds = datasets.MITStates(mit_root, split)
        expected = spec_images(mit_root, split)
        assert [(img['file_path'], img['captions'], img['adj'], img['noun']) for img in ds.imgs] == \
            [(p, [c], a, n) for p, c, a, n in expected]
        assert ds.get_all_texts() == [c for _, c, _, _ in expected]
        assert len(ds) == len(expected)
        got = [(q['source_img_id'], q['target_caption'], q['mod']['str'])
               for q in ds.get_test_queries()]
        assert got == (spec_queries(expected) if split == 'test' else [])
    train = datasets.MITStates(mit_root, 'train')
    test = datasets.MITStates(mit_root, 'test')
    assert {img['noun'] for img in train.imgs} == {'apple', 'jalapeño', 'cake'}
    assert {img['noun'] for img in test.imgs} == {'fig', 'tea'}
    assert train.summary() == ('MITStates train: 14 images, 7 unique captions, 3 nouns, '
                               '7 adjectives, 0 test queries')
    assert test.summary() == ('MITStates test: 9 images, 5 unique captions, 2 nouns, '
                              '5 adjectives, 14 test queries')


def test_test_nouns_are_the_spec_list():
    assert set(datasets.MITSTATES_TEST_NOUNS) == SPEC_TEST_NOUNS
    assert len(SPEC_TEST_NOUNS) == 49


# --- Training sampler ------------------------------------------------------------------------

def draw(ds, count, seed=0, start=0):
    random.seed(seed)
    np.random.seed(seed)
    return [ds[(start + i) % len(ds)] for i in range(count)]


def test_training_examples_come_in_pairs_and_follow_the_sampler_rules(mit_root):
    ds = datasets.MITStates(mit_root, 'train')
    captions = [img['captions'][0] for img in ds.imgs]
    examples = draw(ds, 300)
    same_adj = 0
    for k in range(0, 300, 2):
        first, second = examples[k], examples[k + 1]
        source = first['source_img_id']
        assert source == k % len(ds)  # the first of a pair starts at the index asked for
        assert second['source_img_id'] == source  # the second ignores its index
        noun = ds.imgs[source]['noun']
        adjs = []
        for ex in (first, second):
            t = ex['target_img_id']
            adj, target_noun = captions[t].split(' ')
            assert target_noun == noun and ex['noun'] == noun
            assert ex['mod'] == {'str': adj}
            assert ex['target_caption'] == captions[t] and ex['source_caption'] == captions[source]
            assert ex['source_img_data'].size == (40, 30)
            adjs.append(adj)
            same_adj += adj == ds.imgs[source]['adj']
        assert adjs[0] != adjs[1]
    assert same_adj > 0  # a target may keep the source's adjective (SPEC)
    assert {e['target_caption'] for e in examples} == set(captions)


def test_pending_pair_is_saved_and_restored_for_an_exact_resume(mit_root):
    ds = datasets.MITStates(mit_root, 'train')
    draw(ds, 3)  # odd: the second of a pair is pending
    state = ds.get_sampler_state()
    assert isinstance(state['saved_item'], list) and all(type(v) is int for v in state['saved_item'])
    rng = random.getstate(), np.random.get_state()
    expected = [(e['source_img_id'], e['target_img_id']) for e in (ds[i] for i in range(5))]

    resumed = datasets.MITStates(mit_root, 'train')
    resumed.set_sampler_state(state)
    random.setstate(rng[0])
    np.random.set_state(rng[1])
    assert [(e['source_img_id'], e['target_img_id']) for e in (resumed[i] for i in range(5))] == \
        expected
    resumed.reset_sampler_state()
    assert resumed.get_sampler_state() == {'saved_item': None}


def test_sampler_draws_from_the_global_generators(mit_root):
    ds = datasets.MITStates(mit_root, 'train')
    ids = lambda seed: [(e['source_img_id'], e['target_img_id']) for e in draw(ds, 40, seed)]
    assert ids(1) == ids(1)
    assert ids(1) != ids(2)


# --- Bad data ---------------------------------------------------------------------------------

def one_line(error):
    assert '\n' not in str(error.value)
    return str(error.value)


def test_missing_folders_are_one_line_errors(tmp_path):
    root = str(tmp_path / 'm')
    with pytest.raises(datasets.DatasetError) as e:
        datasets.MITStates(root, 'train')
    assert root in one_line(e)
    os.makedirs(root)
    with pytest.raises(datasets.DatasetError) as e:
        datasets.MITStates(root, 'train')
    assert os.path.join(root, 'images') in one_line(e)


def test_noun_with_one_adjective_is_named(tmp_path):
    root = write_mitstates_fixture(str(tmp_path / 'm'), {'ripe apple': 1, 'sliced apple': 1,
                                                          'old car': 2, 'ripe fig': 1, 'dried fig': 1})
    with pytest.raises(datasets.DatasetError) as e:
        datasets.MITStates(root, 'train')
    assert '"car"' in one_line(e) and os.path.join(root, 'images', 'old car') in one_line(e)
    datasets.MITStates(root, 'test')


def test_non_jpeg_file_is_named(mit_root):
    stray = os.path.join(mit_root, 'images', 'ripe apple', 'notes.txt')
    with open(stray, 'w') as f:
        f.write('x')
    with pytest.raises(datasets.DatasetError) as e:
        datasets.MITStates(mit_root, 'train')
    assert stray in one_line(e)


def test_unreadable_image_is_an_error_at_test_time_and_redrawn_in_training(mit_root, capsys):
    ds = datasets.MITStates(mit_root, 'train')
    bad_id = 0
    bad = ds.imgs[bad_id]['file_path']
    with open(bad, 'rb') as f:
        data = f.read()
    with open(bad, 'wb') as f:
        f.write(data[:len(data) // 2])  # truncated JPEG: fails while decoding
    with pytest.raises(datasets.DatasetError) as e:
        ds.get_img(bad_id)
    assert bad in one_line(e)
    examples = draw(ds, 80)
    assert all(bad_id not in (e['source_img_id'], e['target_img_id']) for e in examples)
    err = capsys.readouterr().err
    assert err.count(bad) == 1 and 'Traceback' not in err


# --- Command line -----------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_training_with_a_corrupt_jpeg_finishes_and_names_it_once(tmp_path, monkeypatch):
    """main.main in this process, with photos at 64 px and SAMPLED training examples tested."""
    import test_retrieval
    from conftest import run_main, small_photos
    sample = test_retrieval.sample_training_examples
    monkeypatch.setattr(test_retrieval, 'sample_training_examples',
                        lambda dataset, count=SAMPLED, seed=0: sample(dataset, SAMPLED, seed))
    # One noun, four images: the corrupt one is drawn for sure.
    root = write_mitstates_fixture(str(tmp_path / 'm'), {
        'ripe apple': 2, 'sliced apple': 2, 'ripe fig': 1, 'dried fig': 1})
    bad = os.path.join(root, 'images', 'ripe apple', 'image_7.jpg')
    with open(bad, 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0 this is not a JPEG')
    os.makedirs(tmp_path / 'run')
    with small_photos():
        result = run_main(['--dataset=mitstates', f'--dataset_path={root}', '--img_weights=none',
                           '--num_iters=2', '--batch_size=2', '--embed_dim=16', '--loader_num_workers=0',
                           '--seed=0'], cwd=str(tmp_path / 'run'))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(bad) == 1, result.stderr
    assert 'Traceback' not in result.stderr
    assert glob.glob(str(tmp_path / 'run' / 'runs' / '*' / 'latest_checkpoint.pth'))
    assert 'test recall_top1_correct_adj' in result.stdout
