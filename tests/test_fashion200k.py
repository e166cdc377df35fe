"""Fashion200k loader (SPEC 2.2) on a small fixture tree of tiny real JPEGs."""
import glob
import os
import random
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import REPO

import datasets

MAIN = os.path.join(REPO, 'main.py')

# (label file, image path, raw caption as written in the label file).  Captions carry the
# characters the clean-up rewrites (. ? & *), non-ASCII letters and stray spaces.
TRAIN = [
    ('top_train_detect_all.txt', 'women/tops/c01/101/101_0.jpeg', 'black & white top'),
    ('top_train_detect_all.txt', 'women/tops/c02/102/102_0.jpeg', 'black & red top'),
    ('top_train_detect_all.txt', 'women/tops/c03/103/103_0.jpeg', 'what? top*'),
    ('top_train_detect_all.txt', 'women/tops/c04/104/104_0.jpeg', 'why? top*'),
    ('top_train_detect_all.txt', 'women/tops/naïve/105/105_0.jpeg', 'naïve top'),
    ('dress_train_detect_all.txt', 'women/dresses/c06/106/106_0.jpeg', ' red dress '),
    ('dress_train_detect_all.txt', 'women/dresses/c06/107/107_0.jpeg', 'red dress'),
    ('dress_train_detect_all.txt', 'women/dresses/c08/108/108_0.jpeg', 'blue dress'),
    # The quirk: removing "red" also cuts it out of "embroidered", so this one is no child of
    # "embroidered dress" and (with no other parent shared) not modifiable.
    ('dress_train_detect_all.txt', 'women/dresses/c09/109/109_0.jpeg', 'red embroidered dress'),
    ('dress_train_detect_all.txt', 'women/dresses/c10/110/110_0.jpeg', 'blue embroidered dress'),
    ('dress_train_detect_all.txt', 'women/dresses/c11/111/111_0.jpeg', 'embroidered dress'),
    ('dress_train_detect_all.txt', 'women/dresses/café/112/112_0.jpeg', 'café dress'),
    ('dress_train_detect_all.txt', 'women/dresses/c13/113/113_0.jpeg', 'café au lait dress.'),
    ('dress_train_detect_all.txt', 'women/dresses/c14/114/114_0.jpeg', 'pink embroidered dress'),
]
TEST = [
    ('skirt_test_detect_all.txt', 'women/skirts/c21/201/201_0.jpeg', 'sheer & lace top'),
    ('skirt_test_detect_all.txt', 'women/skirts/c22/202/202_0.jpeg', 'sheer & silk top'),
    ('dress_test_detect_all.txt', 'women/dresses/c23/203/203_0.jpeg', 'black dress'),
    ('dress_test_detect_all.txt', 'women/dresses/c24/204/204_0.jpeg', 'white dress'),
    ('dress_test_detect_all.txt', 'women/dresses/c25/205/205_0.jpeg', 'long black dress'),
    ('dress_test_detect_all.txt', 'women/dresses/c26/206/206_0.jpeg', 'black long dress'),
    ('dress_test_detect_all.txt', 'women/dresses/c27/207/207_0.jpeg', 'crème dress?'),
    # Listed twice, as real label files do: its queries map to this later line (index 7).
    ('skirt_test_detect_all.txt', 'women/dresses/c23/203/203_0.jpeg', 'black dress'),
]
QUERIES = [  # file order is not image order
    ('women/dresses/c23/203/203_0.jpeg', 'women/dresses/c24/204/204_0.jpeg'),
    ('women/skirts/c21/201/201_0.jpeg', 'women/skirts/c22/202/202_0.jpeg'),
    ('women/dresses/c25/205/205_0.jpeg', 'women/dresses/c26/206/206_0.jpeg'),  # no word differs
    ('women/dresses/c23/203/203_0.jpeg', 'women/dresses/c25/205/205_0.jpeg'),  # source words all shared
    ('women/dresses/c27/207/207_0.jpeg', 'women/dresses/c23/203/203_0.jpeg'),
]


def index_of(ds, path):
    return [img['file_path'] for img in ds.imgs].index(path)


def write_jpeg(path, size=(40, 30), seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.RandomState(seed)
    PIL.Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, 'JPEG')


def write_fashion_fixture(root, train=TRAIN, test=TEST, queries=QUERIES):
    labels = os.path.join(root, 'labels')
    os.makedirs(labels)
    for n, (label_file, path, caption) in enumerate(train + test):
        with open(os.path.join(labels, label_file), 'a', encoding='utf-8') as f:
            f.write(f'{path}\t{0.5 + n / 100:.3f}\t{caption}\n')
        write_jpeg(os.path.join(root, path), seed=n)
    # Files the loader must ignore: not .txt, and a folder.
    with open(os.path.join(labels, 'train_notes.md'), 'w') as f:
        f.write('women/x.jpeg\t0.1\tnot a label\n')
    os.makedirs(os.path.join(labels, 'old_train.txt'))
    with open(os.path.join(root, 'test_queries.txt'), 'w', encoding='utf-8') as f:
        f.writelines(f'{s} {t}\n' for s, t in queries)
    return root


@pytest.fixture
def fashion_root(tmp_path):
    return write_fashion_fixture(str(tmp_path / 'fashion200k'))


# --- An independent reading of SPEC 2.2 ----------------------------------------------------

CLEANUP = {'.': 'dotmark', '?': 'questionmark', '&': 'andmark', '*': 'starmark'}


def spec_clean(caption):
    return ''.join(CLEANUP.get(ch, ch) for ch in caption.strip())


def spec_images(root, split):
    """[(path relative to root, caption)] from the split's label files in sorted name order."""
    out = []
    names = [os.path.basename(p) for p in glob.glob(os.path.join(root, 'labels', '*.txt'))]
    for name in sorted(names):
        full = os.path.join(root, 'labels', name)
        if split not in name or not os.path.isfile(full):
            continue
        with open(full, encoding='utf-8') as f:
            for row in f.read().split('\n'):
                if row:
                    path, _score, caption = row.split('\t')
                    out.append((path, spec_clean(caption)))
    return out


def spec_first_absent(words, others):
    absent = [w for w in words if w not in others]
    return absent[0] if absent else words[-1]


def spec_text(source_caption, target_caption):
    s, t = source_caption.split(), target_caption.split()
    return f'replace {spec_first_absent(s, t)} with {spec_first_absent(t, s)}'


def spec_parents(caption):
    return {caption.replace(w, '').replace('  ', ' ').strip() for w in caption.split()}


def spec_children(captions):
    children = {}
    for c in set(captions):
        for p in spec_parents(c):
            children.setdefault(p, set()).add(c)
    return children


def spec_modifiable_captions(captions):
    return {c for kids in spec_children(captions).values() if len(kids) >= 2 for c in kids}


# --- Loading ----------------------------------------------------------------------------------

def test_images_captions_and_texts_follow_the_spec(fashion_root):
    for split in ('train', 'test'):
        ds = datasets.Fashion200k(fashion_root, split)
        expected = spec_images(fashion_root, split)
        assert [(img['file_path'], img['captions']) for img in ds.imgs] == \
            [(p, [c]) for p, c in expected]
        assert ds.get_all_texts() == [c for _, c in expected]
        assert len(ds) == len(expected)
    # Sorted label files: dress_* before top_*, though top_* was written first.
    train = datasets.Fashion200k(fashion_root, 'train')
    assert train.imgs[0]['captions'] == ['red dress']
    assert 'blackandmarkwhite' not in ' '.join(train.get_all_texts())
    assert 'black andmark white top' in train.get_all_texts()
    assert 'whatquestionmark topstarmark' in train.get_all_texts()
    assert 'café au lait dressdotmark' in train.get_all_texts()


def test_test_queries_follow_the_spec(fashion_root):
    ds = datasets.Fashion200k(fashion_root, 'test')
    images = spec_images(fashion_root, 'test')
    index = {p: i for i, (p, _) in enumerate(images)}
    expected = [(index[s], images[index[t]][1], spec_text(images[index[s]][1], images[index[t]][1]))
                for s, t in QUERIES]
    got = [(q['source_img_id'], q['target_caption'], q['mod']['str']) for q in ds.get_test_queries()]
    assert got == expected
    texts = [q['mod']['str'] for q in ds.get_test_queries()]
    # Quirks kept: no differing word ends on the last words; all source words shared likewise.
    assert texts == ['replace black with white', 'replace lace with silk',
                     'replace dress with dress', 'replace dress with long',
                     'replace crème with black']
    for q in ds.get_test_queries():
        assert ds.imgs[q['target_img_id']]['captions'][0] == q['target_caption']


def test_a_file_listed_twice_maps_its_queries_to_its_last_index(fashion_root):
    ds = datasets.Fashion200k(fashion_root, 'test')
    twice = 'women/dresses/c23/203/203_0.jpeg'
    assert [i for i, img in enumerate(ds.imgs) if img['file_path'] == twice] == [0, 7]
    queries = ds.get_test_queries()
    # Queries 0 and 3 start from it, query 4 ends on it (QUERIES).
    assert [queries[i]['source_img_id'] for i in (0, 3)] == [7, 7]
    assert queries[4]['target_img_id'] == 7


def test_modifiable_images_follow_the_spec_substring_quirk_included(fashion_root):
    ds = datasets.Fashion200k(fashion_root, 'train')
    modifiable = spec_modifiable_captions([c for _, c in spec_images(fashion_root, 'train')])
    assert [img['modifiable'] for img in ds.imgs] == \
        [img['captions'][0] in modifiable for img in ds.imgs]
    by_caption = {img['captions'][0]: img['modifiable'] for img in ds.imgs}
    assert by_caption['red embroidered dress'] is False  # "embroide dress": the quirk
    assert by_caption['blue embroidered dress'] is True
    assert by_caption['café au lait dressdotmark'] is False
    assert 'Fashion200k train: 14 images, 13 unique captions, 11 modifiable images, 0 test queries' \
        == ds.summary()
    assert datasets.Fashion200k(fashion_root, 'test').summary() == \
        'Fashion200k test: 8 images, 7 unique captions, 5 test queries'


# --- Training sampler ------------------------------------------------------------------------

def test_training_examples_follow_the_sampler_rules(fashion_root):
    ds = datasets.Fashion200k(fashion_root, 'train')
    captions = [img['captions'][0] for img in ds.imgs]
    children = spec_children(captions)
    modifiable = spec_modifiable_captions(captions)
    random.seed(0)
    np.random.seed(0)
    sources, targets, replaced = set(), set(), 0
    for i in range(300):
        asked = i % len(ds)
        ex = ds[asked]
        s, t = ex['source_img_id'], ex['target_img_id']
        assert captions[s] in modifiable
        if captions[asked] in modifiable:
            assert s == asked
        else:
            replaced += 1
        assert ex['source_caption'] == captions[s] and ex['target_caption'] == captions[t]
        assert captions[t] != captions[s]
        assert any(captions[t] in children[p] for p in spec_parents(captions[s]))
        assert ex['mod'] == {'str': spec_text(captions[s], captions[t])}
        assert ex['source_img_data'].size == (40, 30) and ex['target_img_data'].mode == 'RGB'
        sources.add(captions[s])
        targets.add(captions[t])
    assert replaced > 0
    assert sources == modifiable and targets == modifiable


def test_sampler_draws_from_the_global_generators(fashion_root):
    ds = datasets.Fashion200k(fashion_root, 'train')

    def draw(seed):
        random.seed(seed)
        np.random.seed(seed)
        return [(e['source_img_id'], e['target_img_id']) for e in (ds[i % len(ds)] for i in range(40))]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_indices_past_the_end_wrap_around(fashion_root):
    ds = datasets.Fashion200k(fashion_root, 'train')
    random.seed(0)
    np.random.seed(0)
    assert ds[len(ds) + 5]['source_img_id'] == 5
    test = datasets.Fashion200k(fashion_root, 'test')  # indexed on first use, unlike train
    example = test[0]
    assert example['target_caption'] != example['source_caption']
    assert 'modifiable images' in test.summary()


# --- Images -----------------------------------------------------------------------------------

def test_get_img_transform_and_fast_decode(fashion_root):
    path = os.path.join(fashion_root, TEST[0][1])
    write_jpeg(path, size=(1000, 700))
    exact = datasets.Fashion200k(fashion_root, 'test', transform=lambda im: im.size)
    fast = datasets.Fashion200k(fashion_root, 'test', transform=lambda im: im.size, fast_decode=True)
    big, small = index_of(exact, TEST[0][1]), index_of(exact, TEST[1][1])
    assert exact.get_img(big) == (1000, 700)
    assert fast.get_img(big) == (500, 350)  # largest 1/n scale keeping both sides >= 224
    assert fast.get_img(small) == (40, 30)
    assert fast.get_img(big, raw_img=True).size == (1000, 700)
    photo = datasets.Fashion200k(fashion_root, 'test', transform=datasets.photo_transform(),
                                 fast_decode=True)
    assert photo.get_img(big).shape == (3, 224, 224)
    assert photo.get_img(small).shape == (3, 224, 224)


# --- Bad data ---------------------------------------------------------------------------------

def one_line(error):
    text = str(error.value)
    assert '\n' not in text
    return text


def test_missing_root_labels_and_queries_are_one_line_errors(tmp_path):
    root = str(tmp_path / 'nothing')
    with pytest.raises(datasets.DatasetError) as e:
        datasets.Fashion200k(root, 'train')
    assert root in one_line(e)
    os.makedirs(root)
    with pytest.raises(datasets.DatasetError) as e:
        datasets.Fashion200k(root, 'train')
    assert os.path.join(root, 'labels') in one_line(e)
    write_fashion_fixture(str(tmp_path / 'f'))
    os.remove(str(tmp_path / 'f' / 'test_queries.txt'))
    datasets.Fashion200k(str(tmp_path / 'f'), 'train')  # the train split does not need it
    with pytest.raises(datasets.DatasetError) as e:
        datasets.Fashion200k(str(tmp_path / 'f'), 'test')
    assert str(tmp_path / 'f' / 'test_queries.txt') in one_line(e)


def test_missing_image_and_unknown_query_file_are_named(fashion_root):
    missing = os.path.join(fashion_root, TRAIN[3][1])
    os.remove(missing)
    with pytest.raises(datasets.DatasetError) as e:
        datasets.Fashion200k(fashion_root, 'train')
    assert missing in one_line(e) and 'top_train_detect_all.txt line 4' in one_line(e)
    with open(os.path.join(fashion_root, 'test_queries.txt'), 'a') as f:
        f.write('women/dresses/c23/203/203_0.jpeg women/nowhere/1.jpeg\n')
    with pytest.raises(datasets.DatasetError) as e:
        datasets.Fashion200k(fashion_root, 'test')
    assert 'women/nowhere/1.jpeg' in one_line(e) and 'line 6' in one_line(e)


def test_malformed_label_line_is_named(fashion_root):
    with open(os.path.join(fashion_root, 'labels', 'dress_train_detect_all.txt'), 'a') as f:
        f.write('women/dresses/c06/106/106_0.jpeg only two fields\n')
    with pytest.raises(datasets.DatasetError) as e:
        datasets.Fashion200k(fashion_root, 'train')
    lines = sum(1 for name, _, _ in TRAIN if name == 'dress_train_detect_all.txt')
    assert f'dress_train_detect_all.txt line {lines + 1}' in one_line(e)


def test_unreadable_image_is_an_error_at_test_time_and_redrawn_in_training(fashion_root, capsys):
    bad = os.path.join(fashion_root, TRAIN[5][1])  # "red dress", modifiable
    with open(bad, 'wb') as f:
        f.write(b'\xff\xd8 not really a jpeg')
    ds = datasets.Fashion200k(fashion_root, 'train')
    with pytest.raises(datasets.DatasetError) as e:
        ds.get_img(0)
    assert bad in one_line(e)
    random.seed(0)
    np.random.seed(0)
    examples = [ds[i % len(ds)] for i in range(60)]
    assert all(e['source_img_id'] != 0 and e['target_img_id'] != 0 for e in examples)
    err = capsys.readouterr().err
    assert err.count(bad) == 1 and 'Traceback' not in err


def test_error_raised_in_a_loader_worker_stays_one_line(fashion_root):
    bad = os.path.join(fashion_root, TEST[0][1])
    with open(bad, 'wb') as f:
        f.write(b'')
    ds = datasets.Fashion200k(fashion_root, 'test', transform=datasets.photo_transform())
    loader = torch.utils.data.DataLoader(_Images(ds), batch_size=2, num_workers=1)
    with pytest.raises(datasets.DatasetError) as e:
        list(loader)
    assert one_line(e).startswith(bad + ': cannot read image')


class _Images(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds.get_img(i)


# --- Command line -----------------------------------------------------------------------------

TINY = ['--dataset=fashion200k', '--img_weights=none', '--num_iters=2', '--batch_size=2',
        '--embed_dim=16', '--loader_num_workers=0']
# Runs that reach the end-of-training retrieval test go through a wrapper that makes them cheap
# on a shared CPU: the test samples SAMPLED training examples instead of 10,000, and photos are
# resized to 64 px instead of 224 (ResNet-18 pools globally; the pipeline is otherwise unchanged).
SAMPLED = 4
WRAPPER = """
import sys
sys.path.insert(0, {repo!r})
import torchvision.transforms as T
import datasets, test_retrieval
sample = test_retrieval.sample_training_examples
test_retrieval.sample_training_examples = lambda d, count={n}, seed=0: sample(d, count, seed)
datasets.photo_transform = lambda: T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(),
                                              T.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)])
import main
sys.exit(main.main(sys.argv[1:]))
"""


def start_main(args, cwd, sampled=None):
    if sampled is None:
        cmd = [sys.executable, MAIN]
    else:
        cmd = [sys.executable, '-c', WRAPPER.format(repo=REPO, n=sampled)]
    os.makedirs(cwd, exist_ok=True)
    # One intra-op thread: on a shared 2-core machine spinning OpenMP threads make a tiny
    # ResNet step ten times slower.
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    return subprocess.Popen(cmd + list(args), cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process):
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_one_line_error(result, path):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('main.py: error: ') and path in lines[0], \
        result.stderr
    assert 'Traceback' not in result.stderr + result.stdout


@pytest.mark.parametrize('missing', ['test_queries.txt', 'an image'])
def test_cli_without_test_queries_or_an_image_is_a_one_line_error(fashion_root, tmp_path, monkeypatch,
                                                                  capsys, missing):
    """In this process (main.main): other tests run main.py's command line in a fresh interpreter."""
    import main
    missing = os.path.join(fashion_root, 'test_queries.txt' if missing == 'test_queries.txt' else TEST[2][1])
    os.remove(missing)
    monkeypatch.chdir(tmp_path)
    assert main.main(TINY + [f'--dataset_path={fashion_root}']) == 1
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess([], 1, captured.out, captured.err), missing)
    assert not os.path.exists(tmp_path / 'runs')


@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_the_same_losses(fashion_root, tmp_path):
    args = TINY + [f'--dataset_path={fashion_root}', '--seed=3', '--loader_num_workers=2',
                   '--num_iters=4']
    # One run in a fresh interpreter, the other in this process after whatever ran here before:
    # nothing but the seed may decide the losses.
    started = start_main(args, cwd=str(tmp_path / 'a'), sampled=SAMPLED)
    import test_retrieval
    from conftest import run_main, small_photos
    sample = test_retrieval.sample_training_examples
    with pytest.MonkeyPatch.context() as patch, small_photos():
        patch.setattr(test_retrieval, 'sample_training_examples',
                      lambda dataset, count=SAMPLED, seed=0: sample(dataset, SAMPLED, seed))
        os.makedirs(tmp_path / 'b')
        here = run_main(args, cwd=str(tmp_path / 'b'))
    losses = []
    for name, result in (('a', finish(started)), ('b', here)):
        assert result.returncode == 0, result.stderr
        (ckpt,) = glob.glob(str(tmp_path / name / 'runs' / '*' / 'latest_checkpoint.pth'))
        losses.append(torch.load(ckpt, weights_only=False)['losses'])
    assert len(losses[0]['soft_triplet']) == 4
    assert losses[0] == losses[1]
