"""Tests of make_css_dataset.py (synthetic CSS3D-format data), at a small scale."""
import collections
import os
import re
import string
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import make_css_dataset as mcd  # noqa: E402

DATA_FILE = 'css_toy_dataset_novel2_small.dup.npy'
SHAPES = {'rectangle', 'circle', 'triangle'}
COLORS = {'gray', 'red', 'blue', 'green', 'brown', 'purple', 'cyan', 'yellow'}
SIZES = {'small', 'large'}
ROW = {'top': 1 / 6, 'middle': 3 / 6, 'bottom': 5 / 6}
COL = {'left': 1 / 6, 'center': 3 / 6, 'right': 5 / 6}
BASE = 30

# The reference 2D rendering, kept here so that the test does not depend on the module's copy.
CSS_COLORS = {'gray': [87, 87, 87], 'red': [244, 35, 35], 'blue': [42, 75, 215],
              'green': [29, 205, 20], 'brown': [129, 74, 25], 'purple': [129, 38, 192],
              'cyan': [41, 208, 208], 'yellow': [255, 238, 51]}


def reference_draw(objects, size=64):
    img = np.ones((size, size, 3))
    for obj in objects:
        s = 8.0 if obj['size'] == 'large' else 4.0
        c = [v / 255.0 for v in CSS_COLORS[obj['color']]]
        y = obj['pos'][0] * size
        x = obj['pos'][1] * size
        if obj['shape'] == 'rectangle':
            img[int(y - s):int(y + s), int(x - s):int(x + s), :] = c
        elif obj['shape'] == 'circle':
            for y0 in range(int(y - s), int(y + s) + 1):
                x0 = x + (abs(y0 - y) - s); x1 = 2 * x - x0
                img[y0, int(x0):int(x1), :] = c
        elif obj['shape'] == 'triangle':
            for y0 in range(int(y - s), int(y + s)):
                half_width = (y0 - y + s) / 2  # apex at the top (SPEC 2.1)
                img[y0, int(x - half_width):int(x + half_width), :] = c
    return img


def load(out_dir):
    arr = np.load(os.path.join(out_dir, DATA_FILE), allow_pickle=True, encoding='latin1')
    assert arr.shape == () and arr.dtype == object
    return arr.item()


def key(obj):
    return (obj['shape'], obj['color'], obj['size'], tuple(obj['pos']))


def scene_key(objects):
    return tuple(sorted(key(o) for o in objects))


def words(text):
    return text.lower().translate(str.maketrans('', '', string.punctuation)).split()


def split_words(split):
    return {w for m in split['mods'] for w in words(m['to_str'])}


def pos_of(cell):
    row, col = cell.split('-')
    return (ROW[row], COL[col])


def at(objects, pos):
    found = [o for o in objects if tuple(o['pos']) == pos]
    assert len(found) <= 1
    return found[0] if found else None


def apply_text(objects, text):
    """Apply a modification text to a list of objects, checking that it applies."""
    objects = [dict(o) for o in objects]
    m = re.fullmatch(r'add (\w+) (\w+) (\w+) to (\w+-\w+)', text)
    if m:
        size, color, shape, cell = m.groups()
        assert at(objects, pos_of(cell)) is None, text
        return objects + [{'shape': shape, 'color': color, 'size': size, 'pos': pos_of(cell)}]
    m = re.fullmatch(r'remove (\w+-\w+) (\w+) object', text)
    if m:
        cell, color = m.groups()
        obj = at(objects, pos_of(cell))
        assert obj is not None and obj['color'] == color, text
        return [o for o in objects if o is not obj]
    m = re.fullmatch(r'make (\w+-\w+) (\w+) object (\w+)', text)
    if m:
        cell, color, new_color = m.groups()
        obj = at(objects, pos_of(cell))
        assert obj is not None and obj['color'] == color and new_color != color, text
        obj['color'] = new_color
        return objects
    m = re.fullmatch(r'make (\w+-\w+) (\w+) (\w+) (\w+) (\w+)', text)
    assert m, f'unparsable text: {text!r}'
    cell, size, color, shape, new_size = m.groups()
    obj = at(objects, pos_of(cell))
    assert obj is not None and key(obj)[:3] == (shape, color, size) and new_size != size, text
    obj['size'] = new_size
    return objects


@pytest.fixture(scope='module')
def out(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('css'))
    path = mcd.generate_css_dataset(out_dir, base_scenes=BASE, seed=0, verbose=False)
    assert path == os.path.join(out_dir, DATA_FILE)
    return out_dir


@pytest.fixture(scope='module')
def data(out):
    return load(out)


def test_format(data):
    assert set(data) >= {'train', 'test'}
    for split in ('train', 'test'):
        d = data[split]
        assert {'objects_img', 'mods', 'labels'} <= set(d)
        assert len(d['labels']) == len(d['objects_img']) == BASE + 3 * len(d['mods'])
        assert len(d['mods']) >= 6 * BASE
        for objects in d['objects_img']:
            assert isinstance(objects, list) and objects
            cells = [tuple(o['pos']) for o in objects]
            assert len(set(cells)) == len(cells)
            for o in objects:
                assert set(o) == {'shape', 'color', 'size', 'pos'}
                assert o['shape'] in SHAPES and o['color'] in COLORS and o['size'] in SIZES
                assert o['pos'][0] in ROW.values() and o['pos'][1] in COL.values()
        for objects in d['objects_img'][:BASE]:
            assert 1 <= len(objects) <= 5


def test_mods_are_applied_as_their_text_says(data):
    for split in ('train', 'test'):
        d = data[split]
        imgs = d['objects_img']
        n_images = len(imgs)
        for mod in d['mods']:
            assert set(mod) == {'from', 'to', 'to_str'}
            assert len(mod['from']) == len(mod['to']) == 3
            assert len(set(mod['from'])) == 3
            for source, target in zip(mod['from'], mod['to']):
                assert 0 <= source < BASE <= target < n_images  # sources are base scenes
                expected = apply_text(imgs[source], mod['to_str'])
                assert collections.Counter(map(key, expected)) == \
                    collections.Counter(map(key, imgs[target]))


def test_every_target_is_a_distinct_new_image(data):
    for split in ('train', 'test'):
        targets = [t for m in data[split]['mods'] for t in m['to']]
        assert sorted(targets) == list(range(BASE, len(data[split]['objects_img'])))


def test_labels_follow_scene_identity(data):
    for split in ('train', 'test'):
        d = data[split]
        label_of = {}
        for objects, label in zip(d['objects_img'], d['labels']):
            assert isinstance(label, int)
            label_of.setdefault(scene_key(objects), set()).add(label)
        assert all(len(v) == 1 for v in label_of.values())  # same scene, same label
        labels = [next(iter(v)) for v in label_of.values()]
        assert len(set(labels)) == len(labels)               # different scenes, different labels
        assert sorted(labels) == list(range(len(labels)))


def test_every_base_scene_is_a_source_of_two_mods(data):
    for split in ('train', 'test'):
        uses = collections.Counter(s for m in data[split]['mods'] for s in m['from'])
        assert all(uses[i] >= 2 for i in range(BASE)), split
        # the same text is never applied twice to one source
        pairs = [(s, m['to_str']) for m in data[split]['mods'] for s in m['from']]
        assert len(pairs) == len(set(pairs))


def test_novel_combinations_only_in_test(data):
    novel = set(mcd.NOVEL_COMBOS)
    assert len(novel) == 4
    train = {(o['shape'], o['color']) for objs in data['train']['objects_img'] for o in objs}
    test = {(o['shape'], o['color']) for objs in data['test']['objects_img'] for o in objs}
    assert not train & novel
    assert novel <= test


def test_test_words_are_train_words(data):
    train = split_words(data['train'])
    assert split_words(data['test']) <= train
    vocabulary = {'add', 'to', 'remove', 'object', 'make'} | SHAPES | COLORS | SIZES | {
        r + c for r in ROW for c in COL}
    assert train == vocabulary


def test_deterministic_by_seed(tmp_path, data):
    a, b, c = (str(tmp_path / n) for n in 'abc')
    mcd.generate_css_dataset(a, base_scenes=BASE, seed=0, verbose=False)
    mcd.generate_css_dataset(b, base_scenes=BASE, seed=1, verbose=False)
    assert load(a) == data
    assert load(b) != data
    assert data['train']['mods'] != data['test']['mods']
    assert data['train']['objects_img'][:BASE] != data['test']['objects_img'][:BASE]
    mcd.generate_css_dataset(c, base_scenes=BASE, seed=0, mods_per_split=5, verbose=False)
    small = load(c)
    for split in ('train', 'test'):  # raised so that every base scene has 2 mods
        assert 2 * BASE / 3 <= len(small[split]['mods']) < 6 * BASE


def test_pngs(tmp_path):
    out_dir = str(tmp_path)
    mcd.generate_css_dataset(out_dir, base_scenes=6, seed=2, pngs=True, mods_per_split=6,
                             verbose=False)
    d = load(out_dir)
    for split in ('train', 'test'):
        objs = d[split]['objects_img']
        for idx in range(len(objs)):
            with PIL.Image.open(os.path.join(out_dir, 'images', 'css_%s_%06d.png' % (split, idx))) as f:
                assert f.size == (64, 64) and f.mode == 'RGB'
                png = np.asarray(f)
            expected = (reference_draw(objs[idx]) * 255).round().astype(np.uint8)
            assert np.array_equal(png, expected)
        assert not os.path.exists(
            os.path.join(out_dir, 'images', 'css_%s_%06d.png' % (split, len(objs))))
    # Regenerating without PNGs removes the now stale ones, and their folder (the loader would
    # otherwise expect PNGs).
    mcd.generate_css_dataset(out_dir, base_scenes=6, seed=3, mods_per_split=6, verbose=False,
                             overwrite=True)
    assert not os.path.exists(os.path.join(out_dir, 'images'))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        mcd.generate_css_dataset(str(tmp_path / 'x'), base_scenes=0, verbose=False)
    a_file = tmp_path / 'file'
    a_file.write_text('')
    with pytest.raises(NotADirectoryError):
        mcd.generate_css_dataset(str(a_file), base_scenes=BASE, verbose=False)


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'make_css_dataset.py'), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli(tmp_path):
    out_dir = tmp_path / 'out'
    r = run_cli(str(out_dir), '--base_scenes', '20')
    assert r.returncode == 0, r.stderr
    assert DATA_FILE in r.stdout and 'train:' in r.stdout and 'test:' in r.stdout
    d = load(str(out_dir))
    assert len(d['train']['objects_img']) >= 20 + 3 * 120
    r = run_cli(str(out_dir), '--base_scenes', '20', '--overwrite')  # its own dataset
    assert r.returncode == 0 and 'removed the 1 files' in r.stdout, r.stderr
    assert load(str(out_dir)) == d


@pytest.mark.slow
def test_cli_errors(tmp_path):
    a_file = tmp_path / 'file'
    a_file.write_text('x')
    r = run_cli(str(a_file), '--base_scenes', '20')
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr
    assert a_file.read_text() == 'x'
    r = run_cli(str(tmp_path / 'o'), '--base_scenes', '0')
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    r = run_cli('--help')
    assert r.returncode == 0 and 'default: 1000' in r.stdout


# ---------------------------------------------------------------------------------------------
# The output folder (issue 12, item 1): real CSS3D renders use the same names.

def folder_contents(root):
    """{relative path: bytes} of every file under root."""
    contents = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                contents[os.path.relpath(path, root)] = f.read()
    return contents


def real_dataset(root):
    """A dataset make_css_dataset.py did not write: the data file and PNGs of the CSS3D layout."""
    from conftest import write_css_fixture
    write_css_fixture(root, num_scenes=3, pngs=True)
    with open(os.path.join(root, 'README'), 'w') as f:
        f.write('renders from Blender')
    return folder_contents(root)


def test_a_folder_that_is_not_empty_is_refused_and_left_alone(tmp_path):
    root = str(tmp_path / 'css3d')
    before = real_dataset(root)
    with pytest.raises(mcd.OutputFolderError) as info:
        mcd.generate_css_dataset(root, base_scenes=BASE, verbose=False)
    message = str(info.value)
    assert message.startswith(f'{root}: not empty (3 entries: README, {DATA_FILE}, images)')
    assert '--overwrite' in message and '\n' not in message
    assert folder_contents(root) == before


def test_overwrite_refuses_files_it_did_not_write(tmp_path):
    root = str(tmp_path / 'css3d')
    before = real_dataset(root)
    with pytest.raises(mcd.OutputFolderError) as info:
        mcd.generate_css_dataset(root, base_scenes=BASE, verbose=False, overwrite=True)
    assert str(info.value).startswith(os.path.join(root, DATA_FILE) + ': not written by '
                                      'make_css_dataset.py')
    assert 'and 18 more' in str(info.value)  # the 2 x 9 PNGs
    assert folder_contents(root) == before
    os.remove(os.path.join(root, DATA_FILE))  # the PNGs alone are refused as well
    with pytest.raises(mcd.OutputFolderError, match='images/css_test_000000.png: not written'):
        mcd.generate_css_dataset(root, base_scenes=BASE, verbose=False, overwrite=True)
    assert len(os.listdir(os.path.join(root, 'images'))) == 18


def test_overwrite_replaces_exactly_its_own_files(tmp_path, capsys):
    root = str(tmp_path / 'synth')
    mcd.generate_css_dataset(root, base_scenes=4, seed=0, pngs=True, mods_per_split=4, verbose=False)
    pngs = sorted(os.listdir(os.path.join(root, 'images')))
    with open(os.path.join(root, 'notes.txt'), 'w') as f:
        f.write('mine')
    with open(os.path.join(root, 'images', 'other.png'), 'wb') as f:
        f.write(b'not a css image: kept')
    mcd.generate_css_dataset(root, base_scenes=4, seed=1, mods_per_split=4, verbose=True,
                             overwrite=True)
    assert 'kept what it did not write (2 entries: notes.txt, images/other.png)' in capsys.readouterr().out
    assert load(root) != {}  # the new data, without PNGs
    assert sorted(os.listdir(os.path.join(root, 'images'))) == ['other.png']
    assert open(os.path.join(root, 'notes.txt')).read() == 'mine'
    assert pngs[0] == 'css_test_000000.png'
    # A PNG of the layout that the record does not list (a real render, say) stops it.
    with open(os.path.join(root, 'images', 'css_train_000000.png'), 'wb') as f:
        f.write(b'a render')
    with pytest.raises(mcd.OutputFolderError, match='css_train_000000.png: not written'):
        mcd.generate_css_dataset(root, base_scenes=4, seed=2, mods_per_split=4, verbose=False,
                                 overwrite=True)


def test_a_replaced_data_file_is_not_overwritten(tmp_path):
    root = str(tmp_path / 'synth')
    mcd.generate_css_dataset(root, base_scenes=4, seed=0, mods_per_split=4, verbose=False)
    with open(os.path.join(root, DATA_FILE), 'ab') as f:
        f.write(b'the real one, copied over ours')
    before = folder_contents(root)
    with pytest.raises(mcd.OutputFolderError, match=re.escape(DATA_FILE) + ': not written'):
        mcd.generate_css_dataset(root, base_scenes=4, seed=1, mods_per_split=4, verbose=False,
                                 overwrite=True)
    assert folder_contents(root) == before


def test_an_empty_existing_folder_is_written(tmp_path):
    root = tmp_path / 'empty'
    root.mkdir()  # what experiment.ensure_default_dataset may find
    mcd.generate_css_dataset(str(root), base_scenes=4, mods_per_split=4, verbose=False)
    assert sorted(os.listdir(root)) == ['.make_css_dataset.json', DATA_FILE]


@pytest.mark.slow
def test_cli_refuses_a_folder_with_a_dataset_and_overwrites_its_own(tmp_path):
    root = str(tmp_path / 'css3d')
    before = real_dataset(root)
    r = run_cli(root, '--base_scenes', '5')
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr.startswith(f'make_css_dataset.py: error: {root}: not empty (3 entries: ')
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli(root, '--base_scenes', '5', '--overwrite')
    assert r.returncode == 1 and 'not written by make_css_dataset.py' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert folder_contents(root) == before  # test_cli overwrites a dataset of its own


def test_main_does_not_generate_into_a_default_folder_holding_other_files(tmp_path, monkeypatch, capsys):
    import main
    monkeypatch.chdir(tmp_path)
    os.makedirs(os.path.join('data', 'css_synth'))
    with open(os.path.join('data', 'css_synth', 'notes.txt'), 'w') as f:
        f.write('mine')
    assert main.main(['--img_weights=none', '--num_iters=1', '--loader_num_workers=0']) == 1
    err = capsys.readouterr().err
    folder = os.path.join(str(tmp_path), 'data', 'css_synth')
    assert err.startswith(f'main.py: error: {folder}: not empty (1 entry: notes.txt); ')
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(os.path.join('data', 'css_synth')) == ['notes.txt']


# ---------------------------------------------------------------------------------------------
# Issue 18, items 2 and 3: a PNG replaced since is kept; a killed run leaves no half dataset.

def test_overwrite_keeps_a_png_replaced_in_place_with_the_same_size_and_time(tmp_path):
    root = str(tmp_path / 'synth')
    mcd.generate_css_dataset(root, base_scenes=4, seed=0, pngs=True, mods_per_split=4, verbose=False)
    mine = os.path.join(root, 'images', 'css_train_000003.png')
    stat = os.stat(mine)
    with open(mine, 'r+b') as f:  # edited in place: same size, and the same mtime put back
        data = f.read()
        f.seek(0)
        f.write(bytes(255 - b for b in data[:64]) + data[64:])
    os.utime(mine, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = folder_contents(root)
    with pytest.raises(mcd.OutputFolderError) as info:
        mcd.generate_css_dataset(root, base_scenes=4, seed=1, mods_per_split=4, verbose=False,
                                 overwrite=True)
    message = str(info.value)
    assert message.startswith(f'{mine}: not written by make_css_dataset.py (no record in '
                              f'.make_css_dataset.json, or changed since); nothing was deleted')
    assert '\n' not in message
    assert folder_contents(root) == before
    # Put back as written, it is replaced with the rest.
    with open(mine, 'wb') as f:
        f.write(data)
    mcd.generate_css_dataset(root, base_scenes=4, seed=1, mods_per_split=4, verbose=False,
                             overwrite=True)
    assert sorted(os.listdir(root)) == ['.make_css_dataset.json', DATA_FILE]


def test_a_record_naming_files_outside_the_dataset_is_not_followed(tmp_path):
    root = tmp_path / 'synth'
    mcd.generate_css_dataset(str(root), base_scenes=4, mods_per_split=4, verbose=False)
    victim = tmp_path / 'victim.txt'
    victim.write_text('mine')
    import hashlib
    digest = hashlib.sha256(b'mine').hexdigest()
    (root / '.make_css_dataset.json').write_text('{"files": {"../victim.txt": "%s"}}' % digest)
    with pytest.raises(mcd.OutputFolderError, match='unreadable record'):
        mcd.generate_css_dataset(str(root), base_scenes=4, mods_per_split=4, verbose=False,
                                 overwrite=True)
    assert victim.read_text() == 'mine'


KILLED_GENERATOR = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
import make_css_dataset

def save_then_hang(f, *args, **kwargs):  # killed halfway through writing the data file
    f.write(b'\x93NUMPY half a file')
    f.flush()
    print('writing', flush=True)
    time.sleep(120)

np.save = save_then_hang
make_css_dataset.generate_css_dataset(sys.argv[2], base_scenes=4, mods_per_split=4, verbose=False)
'''


def small_default_generator(monkeypatch):
    import functools
    monkeypatch.setattr(mcd, 'generate_css_dataset',
                        functools.partial(mcd.generate_css_dataset, base_scenes=4, mods_per_split=4))


@pytest.mark.slow
def test_a_generator_killed_while_writing_leaves_nothing_that_stops_main(tmp_path, monkeypatch, capsys):
    import signal
    import experiment
    from datasets import CSSDataset
    monkeypatch.chdir(tmp_path)
    target = os.path.join('data', 'css_synth')
    child = subprocess.Popen([sys.executable, '-c', KILLED_GENERATOR, ROOT, target],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == 'writing\n'
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert not os.path.exists(target)  # the half-written file is in a staging folder beside it
    [staging] = os.listdir('data')
    assert staging.startswith('.css_synth.make_css_dataset-') and staging.endswith('.partial')

    small_default_generator(monkeypatch)
    opt = experiment_opt()
    experiment.ensure_default_dataset(opt)
    out = capsys.readouterr().out
    assert 'interrupted make_css_dataset.py run' in out and staging in out
    assert os.listdir('data') == ['css_synth']
    assert sorted(os.listdir(target)) == ['.make_css_dataset.json', DATA_FILE]
    assert len(CSSDataset(target, 'train').get_all_texts()) > 0


def experiment_opt():
    import argparse
    import experiment
    return argparse.Namespace(dataset='css3d', dataset_path=experiment.DEFAULT_DATASET_PATH)


def test_the_unfinished_work_of_an_earlier_generator_is_replaced(tmp_path, monkeypatch, capsys):
    """The previous version wrote into the folder itself: its record, then the data file's
    temporary file; killed there, every main.py refused the folder."""
    import experiment
    from datasets import CSSDataset
    monkeypatch.chdir(tmp_path)
    target = os.path.join('data', 'css_synth')
    os.makedirs(target)
    with open(os.path.join(target, '.make_css_dataset.json'), 'w') as f:
        f.write('{"written_by": "make_css_dataset.py", "data_file": null, '
                '"pngs": {"train": 0, "test": 0}}')
    with open(os.path.join(target, DATA_FILE + '.tmp'), 'wb') as f:
        f.write(b'\x93NUMPY half a file')
    small_default_generator(monkeypatch)
    experiment.ensure_default_dataset(experiment_opt())
    assert 'holds an unfinished synthetic CSS dataset' in capsys.readouterr().out
    assert sorted(os.listdir(target)) == ['.make_css_dataset.json', DATA_FILE]
    assert len(CSSDataset(target, 'train').get_all_texts()) > 0
