"""CSSDataset (SPEC section 2.1) on the small fixture of conftest.py."""
import json
import os
import pickle
import random
import signal
import sys
import contextlib
import types

import numpy as np
import PIL.Image
import pytest
import torch

import datasets
from conftest import obj, write_css_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CSS_COLORS = {'gray': (87, 87, 87), 'red': (244, 35, 35), 'blue': (42, 75, 215),
              'green': (29, 205, 20), 'brown': (129, 74, 25), 'purple': (129, 38, 192),
              'cyan': (41, 208, 208), 'yellow': (255, 238, 51)}
WHITE = (1.0, 1.0, 1.0)


def rgb(color):
    return np.array(CSS_COLORS[color]) / 255.0


def load_fixture_data(root):
    return np.load(os.path.join(root, datasets.CSS_DATA_FILE), allow_pickle=True, encoding='latin1').item()


def make_dataset(root, split='train', **kwargs):
    return datasets.CSSDataset(root, split=split, transform=datasets.css_transform(), **kwargs)


@contextlib.contextmanager
def time_limit(seconds):
    def expired(signum, frame):
        raise TimeoutError(f'did not finish within {seconds} s')
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def triple(example):
    return example['source_img_id'], example['mod']['id'], example['target_img_id']


# --------------------------------------------------------------------------------------------
# Images, captions, queries, texts
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('split', ['train', 'test'])
def test_captions_are_labels(css_root, split):
    data = load_fixture_data(css_root)[split]
    ds = make_dataset(css_root, split)
    assert len(ds) == len(ds.imgs) == len(data['objects_img'])
    assert [img['captions'] for img in ds.imgs] == [[str(label)] for label in data['labels']]
    assert [img['objects'] for img in ds.imgs] == data['objects_img']
    # Identical scenes share a label, so some captions repeat.
    assert len({img['captions'][0] for img in ds.imgs}) < len(ds.imgs)


def test_captions_are_indices_without_labels(tmp_path):
    root = str(tmp_path / 'nolabels')
    data = write_css_fixture(root, with_labels=False)
    ds = make_dataset(root, 'train')
    assert [img['captions'] for img in ds.imgs] == [[str(i)] for i in range(len(data['train']['objects_img']))]


@pytest.mark.parametrize('split', ['train', 'test'])
def test_test_queries_in_mod_order(css_root, split):
    data = load_fixture_data(css_root)[split]
    ds = make_dataset(css_root, split)
    captions = [str(label) for label in data['labels']]
    expected = [(source, captions[target], mod['to_str'])
                for mod in data['mods'] for source, target in zip(mod['from'], mod['to'])]
    got = [(q['source_img_id'], q['target_caption'], q['mod']['str']) for q in ds.get_test_queries()]
    assert got == expected
    assert len(got) == len(data['mods'])


def test_test_queries_with_several_pairs_per_mod(tmp_path):
    root = str(tmp_path / 'pairs')
    scenes = [[obj('rectangle', c, 'small', 'top', 'left')] for c in ('red', 'blue', 'green', 'gray')]
    split = {'objects_img': scenes,
             'mods': [{'from': [0, 2], 'to': [1, 3], 'to_str': 'first'},
                      {'from': [3, 1, 0], 'to': [0, 2, 3], 'to_str': 'second'}],
             'labels': [10, 11, 12, 13]}
    np.save(os.path.join(root_dir(root), datasets.CSS_DATA_FILE),
            np.array({'train': split, 'test': split}, dtype=object), allow_pickle=True)
    ds = make_dataset(root, 'test')
    got = [(q['source_img_id'], q['target_caption'], q['mod']['str']) for q in ds.get_test_queries()]
    assert got == [(0, '11', 'first'), (2, '13', 'first'),
                   (3, '10', 'second'), (1, '12', 'second'), (0, '13', 'second')]


def root_dir(root):
    os.makedirs(root, exist_ok=True)
    return root


def test_get_all_texts_is_every_mod_text(css_root):
    data = load_fixture_data(css_root)['train']
    ds = make_dataset(css_root, 'train')
    assert ds.get_all_texts() == [mod['to_str'] for mod in data['mods']]


# --------------------------------------------------------------------------------------------
# Training sampler
# --------------------------------------------------------------------------------------------

def assert_real_pair(ds, example):
    source, mod_id, target = triple(example)
    mod = ds.mods[mod_id]
    assert (source, target) in list(zip(mod['from'], mod['to']))
    assert example['mod']['str'] == mod['to_str']
    assert example['source_caption'] == ds.imgs[source]['captions'][0]
    assert example['target_caption'] == ds.imgs[target]['captions'][0]


def test_consecutive_examples_share_a_source_with_different_mods(css_root):
    ds = make_dataset(css_root, 'train')
    np.random.seed(0)
    random.seed(0)
    examples = [ds[i] for i in range(40)]
    for example in examples:
        assert_real_pair(ds, example)
    for first, second in zip(examples[0::2], examples[1::2]):
        assert first['source_img_id'] == second['source_img_id']
        assert first['mod']['id'] != second['mod']['id']
    # Images are the transformed images of the ids.
    e = examples[0]
    assert torch.equal(e['source_img_data'], ds.get_img(e['source_img_id']))
    assert torch.equal(e['target_img_data'], ds.get_img(e['target_img_id']))
    assert e['source_img_data'].shape == (3, 64, 64)
    # Different pairs use different sources (random first queries).
    assert len({e['source_img_id'] for e in examples}) > 3


def test_second_query_is_a_random_other_mod_of_the_source(tmp_path):
    """Scene 0 has three mods: after a first query with one of them, the second uses each of the
    two others."""
    root = root_dir(str(tmp_path / 'three'))
    colors = ['red', 'blue', 'green', 'gray']
    scenes = [[obj('circle', c, 'large', 'middle', 'center')] for c in colors]
    mods = [{'from': [0], 'to': [k], 'to_str': f'make middle-center red object {colors[k]}'}
            for k in (1, 2, 3)]
    split = {'objects_img': scenes, 'mods': mods}
    np.save(os.path.join(root, datasets.CSS_DATA_FILE),
            np.array({'train': split, 'test': split}, dtype=object), allow_pickle=True)
    ds = make_dataset(root, 'train')
    np.random.seed(1)
    random.seed(1)
    seconds = {0: set(), 1: set(), 2: set()}
    for _ in range(60):
        first, second = ds.generate_random_query_target(), ds.generate_random_query_target()
        assert first['source_img_id'] == second['source_img_id'] == 0
        assert first['mod']['id'] != second['mod']['id']
        seconds[first['mod']['id']].add(second['mod']['id'])
    assert seconds == {0: {1, 2}, 1: {0, 2}, 2: {0, 1}}


def single_mod_fixture(root):
    """Scene 0 has a single modification, scene 1 has two."""
    root = root_dir(root)
    scenes = [[obj('rectangle', 'red', 'small', 'top', 'left')],
              [obj('triangle', 'blue', 'large', 'bottom', 'right')],
              [obj('rectangle', 'green', 'small', 'top', 'left')],
              [obj('triangle', 'gray', 'large', 'bottom', 'right')],
              [obj('triangle', 'cyan', 'large', 'bottom', 'right')]]
    mods = [{'from': [0], 'to': [2], 'to_str': 'make top-left red object green'},
            {'from': [1], 'to': [3], 'to_str': 'make bottom-right blue object gray'},
            {'from': [1], 'to': [4], 'to_str': 'make bottom-right blue object cyan'}]
    split = {'objects_img': scenes, 'mods': mods}
    np.save(os.path.join(root, datasets.CSS_DATA_FILE),
            np.array({'train': split, 'test': split}, dtype=object), allow_pickle=True)
    return root


def test_source_with_a_single_mod_does_not_hang(tmp_path, monkeypatch):
    ds = make_dataset(single_mod_fixture(str(tmp_path / 'single')), 'train')
    # Force the first query onto mod 0 (scene 0, the only mod of its source).
    monkeypatch.setattr(np.random, 'randint', lambda low, high=None, *args, **kwargs: 0)
    with time_limit(10):
        first = ds.generate_random_query_target()
        second = ds.generate_random_query_target()
    assert triple(first) == (0, 0, 2)
    assert_real_pair(ds, first)
    assert_real_pair(ds, second)


def test_sampling_with_single_mod_sources_stays_valid(tmp_path):
    ds = make_dataset(single_mod_fixture(str(tmp_path / 'single')), 'train')
    np.random.seed(3)
    random.seed(3)
    examples, second_queries = [], 0
    with time_limit(20):
        for _ in range(80):
            # A source with two mods whose first query was just drawn: its second query follows.
            pending = ds.last_from if len(ds.last_mod) == 1 else None
            previous_mod = ds.last_mod[0] if pending is not None else None
            e = ds.generate_random_query_target()
            examples.append(e)
            if pending == 1:
                second_queries += 1
                assert e['source_img_id'] == 1 and e['mod']['id'] != previous_mod
    for e in examples:
        assert_real_pair(ds, e)
    assert {e['source_img_id'] for e in examples} == {0, 1}
    assert second_queries > 5


def test_sampler_state_round_trip(css_root):
    ds = make_dataset(css_root, 'train')
    np.random.seed(5)
    random.seed(5)
    drawn = [ds.generate_random_query_target() for _ in range(3)]  # mid-pair
    state = ds.get_sampler_state()
    state = json.loads(json.dumps(state))  # plain ints and lists
    assert state['last_from'] == drawn[-1]['source_img_id']

    np.random.seed(7)
    random.seed(7)
    expected = [triple(ds.generate_random_query_target()) for _ in range(5)]
    assert expected[0][0] == drawn[-1]['source_img_id']  # the pair is completed

    resumed = make_dataset(css_root, 'train')
    resumed.set_sampler_state(state)
    np.random.seed(7)
    random.seed(7)
    assert [triple(resumed.generate_random_query_target()) for _ in range(5)] == expected

    fresh = make_dataset(css_root, 'train')
    np.random.seed(7)
    random.seed(7)
    assert [triple(fresh.generate_random_query_target()) for _ in range(5)] != expected


def test_sampler_state_is_plain(css_root):
    ds = make_dataset(css_root, 'train')
    ds.set_sampler_state({'last_from': np.int64(3), 'last_mod': [np.int64(1)]})
    state = ds.get_sampler_state()
    assert state == {'last_from': 3, 'last_mod': [1]}
    assert type(state['last_from']) is int and type(state['last_mod'][0]) is int
    assert make_dataset(css_root, 'train').get_sampler_state() == {'last_from': None, 'last_mod': []}


# --------------------------------------------------------------------------------------------
# 2D drawing and PNGs
# --------------------------------------------------------------------------------------------

def coloured(img, color):
    return np.all(np.isclose(img, rgb(color)), axis=2)


def test_images_are_drawn_when_there_are_no_pngs(css_root):
    ds = make_dataset(css_root, 'train')
    assert ds.img_path is None
    transform = datasets.css_transform()
    for idx in (0, 5, len(ds.imgs) - 1):
        img = ds.get_img(idx)
        assert isinstance(img, torch.Tensor) and img.shape == (3, 64, 64) and img.dtype == torch.float32
        raw = ds.get_img(idx, raw_img=True)
        assert isinstance(raw, np.ndarray) and raw.shape == (64, 64, 3)
        assert raw.min() >= 0 and raw.max() <= 1
        torch.testing.assert_close(img, transform(raw))
        # white background, the object's colour at its centre (single-object scenes)
        (o,) = ds.imgs[idx]['objects']
        assert tuple(raw[0, 0]) == WHITE and tuple(raw[63, 63]) == WHITE
        y, x = int(o['pos'][0] * 64), int(o['pos'][1] * 64)
        np.testing.assert_allclose(raw[y, x], rgb(o['color']))
        n = coloured(raw, o['color']).sum()
        s = 8 if o['size'] == 'large' else 4
        assert 0 < n <= (2 * s) ** 2
    # ImageNet normalisation of white
    white = (1 - np.array(datasets.IMAGENET_MEAN)) / np.array(datasets.IMAGENET_STD)
    np.testing.assert_allclose(ds.get_img(0)[:, 0, 0].numpy(), white, rtol=1e-5)


def test_rectangle_is_a_filled_2s_square():
    for size, s in (('small', 4), ('large', 8)):
        img = datasets.draw_css_2d_image([obj('rectangle', 'red', size, 'middle', 'center')])
        mask = coloured(img, 'red')
        expected = np.zeros((64, 64), bool)
        expected[32 - s:32 + s, 32 - s:32 + s] = True
        assert np.array_equal(mask, expected)
        assert np.all(img[~mask] == 1.0)


def test_circle_is_a_diamond():
    img = datasets.draw_css_2d_image([obj('circle', 'blue', 'small', 'middle', 'center')])
    mask = coloured(img, 'blue')
    widths = mask.sum(axis=1)
    # rows 28..36: the width shrinks linearly from 2s at the centre row to the tips
    assert widths[28:37].tolist() == [0, 2, 4, 6, 8, 6, 4, 2, 0]
    assert widths.sum() == widths[28:37].sum()
    assert mask[32, 28:36].all() and not mask[32, 27] and not mask[32, 36]
    # the corners of the 2s square are white: not a square
    assert not mask[29, 28] and not mask[35, 35] and mask[29, 31] and mask[29, 32]
    # symmetric about the centre column (x1 = 2x - x0)
    assert np.array_equal(mask[:, :32], mask[:, 32:64][:, ::-1])


def reference_triangle(y, x, s):
    """The reference's triangle rows: apex at the top, base about 2s wide at the bottom."""
    mask = np.zeros((64, 64), bool)
    for y0 in range(int(y - s), int(y + s)):
        x0 = x + (y0 - y + s) / 2
        x1 = 2 * x - x0
        x0, x1 = min(x0, x1), max(x0, x1)
        mask[y0, int(x0):int(x1)] = True
    return mask


@pytest.mark.parametrize('size,s', [('small', 4), ('large', 8)])
def test_triangle_apex_at_top_base_at_bottom(size, s):
    img = datasets.draw_css_2d_image([obj('triangle', 'green', size, 'middle', 'center')])
    mask = coloured(img, 'green')
    rows = [r for r in range(64) if mask[r].any()]
    top, bottom = rows[0], rows[-1]
    assert mask[top].sum() <= 2  # apex
    assert mask[bottom].sum() >= 2 * s - 1  # base, about 2s wide
    widths = [mask[r].sum() for r in rows]
    assert widths == sorted(widths)  # widening downwards
    assert np.array_equal(mask, reference_triangle(32.0, 32.0, s))
    assert tuple(img[32, 32]) == tuple(rgb('green'))


def test_objects_are_drawn_in_order_on_one_canvas():
    objects = [obj('rectangle', 'yellow', 'large', 'top', 'left'),
               obj('rectangle', 'purple', 'small', 'top', 'left'),
               obj('circle', 'brown', 'small', 'bottom', 'right')]
    img = datasets.draw_css_2d_image(objects)
    y, x = int(64 / 6), int(64 / 6)
    np.testing.assert_allclose(img[y, x], rgb('purple'))  # drawn over the yellow one
    np.testing.assert_allclose(img[y - 6, x - 6], rgb('yellow'))
    np.testing.assert_allclose(img[int(5 * 64 / 6), int(5 * 64 / 6)], rgb('brown'))
    assert coloured(img, 'purple').sum() == 64


def test_pngs_are_read_when_present(tmp_path):
    root = str(tmp_path / 'pngs')
    write_css_fixture(root, pngs=True)
    ds = make_dataset(root, 'test')
    assert ds.img_path == os.path.join(root, 'images')
    transform = datasets.css_transform()
    for idx in (0, 7, len(ds.imgs) - 1):
        png = os.path.join(root, 'images', 'css_test_%06d.png' % idx)
        with PIL.Image.open(png) as f:
            expected = transform(f.convert('RGB'))
        img = ds.get_img(idx)
        assert img.shape == (3, 64, 64)
        torch.testing.assert_close(img, expected)
        raw = ds.get_img(idx, raw_img=True)
        assert isinstance(raw, PIL.Image.Image) and raw.size == (64, 64) and raw.mode == 'RGB'
        drawn = ds.get_img(idx, raw_img=True, get_2d=True)
        assert isinstance(drawn, np.ndarray)
        assert np.abs(np.asarray(raw) / 255.0 - drawn).max() <= 1 / 255.0
        assert (img - ds.get_img(idx, get_2d=True)).abs().max() <= (1 / 255.0) / min(datasets.IMAGENET_STD) + 1e-6
    # use_2d ignores the PNGs
    ds2d = make_dataset(root, 'test', use_2d=True)
    assert ds2d.img_path is None
    torch.testing.assert_close(ds2d.get_img(3), ds.get_img(3, get_2d=True))


def test_unreadable_png_is_a_dataset_error(tmp_path):
    root = str(tmp_path / 'badpng')
    write_css_fixture(root, pngs=True)
    bad = os.path.join(root, 'images', 'css_train_000002.png')
    with open(bad, 'wb') as f:
        f.write(b'not a png')
    ds = make_dataset(root, 'train')
    with pytest.raises(datasets.DatasetError, match='css_train_000002.png'):
        ds.get_img(2)


# --------------------------------------------------------------------------------------------
# The data file
# --------------------------------------------------------------------------------------------

class _Python2Pickler(pickle._Pickler):
    """Writes str and bytes the way Python 2 pickled its byte strings (BINSTRING opcodes)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_string(self, value):
        data = value if isinstance(value, bytes) else value.encode('latin1')
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, 'little') + data)
        self.memoize(value)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string


def write_python2_npy(path, data):
    """A 0-d object array holding `data`, pickled with protocol 2 as Python 2 numpy wrote it."""
    import io
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(np.array(data, dtype=object))
    payload = buffer.getvalue().replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n')
    with open(path, 'wb') as f:
        np.lib.format.write_array_header_1_0(
            f, {'descr': '|O', 'fortran_order': False, 'shape': ()})
        f.write(payload)


def test_python2_pickle_loads(tmp_path):
    root = root_dir(str(tmp_path / 'py2'))
    split = {'objects_img': [[obj('rectangle', 'red', 'small', 'top', 'left')],
                             [obj('rectangle', 'blue', 'small', 'top', 'left')]],
             'mods': [{'from': [0], 'to': [1], 'to_str': 'make top-left red object blue caf\xe9'}],
             'labels': [0, 1]}
    path = os.path.join(root, datasets.CSS_DATA_FILE)
    write_python2_npy(path, {'train': split, 'test': split})
    with open(path, 'rb') as f:
        assert b'cnumpy.core.multiarray\n' in f.read()
    with pytest.raises(UnicodeError):  # it really is a Python 2 byte-string pickle
        np.load(path, allow_pickle=True, encoding='ASCII')
    ds = make_dataset(root, 'train')
    assert ds.get_all_texts() == ['make top-left red object blue caf\xe9']
    assert [img['captions'] for img in ds.imgs] == [['0'], ['1']]
    assert ds.get_img(0).shape == (3, 64, 64)


def test_protocol_2_npy_loads(tmp_path):
    root = root_dir(str(tmp_path / 'proto2'))
    data = write_css_fixture(str(tmp_path / 'tmp'))
    path = os.path.join(root, datasets.CSS_DATA_FILE)
    with open(path, 'wb') as f:
        np.lib.format.write_array_header_1_0(
            f, {'descr': '|O', 'fortran_order': False, 'shape': ()})
        pickle.dump(np.array(data, dtype=object), f, protocol=2)
    with open(path, 'rb') as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        assert f.read(2) == b'\x80\x02'  # a protocol 2 pickle
    assert np.load(path, allow_pickle=True, encoding='latin1').item().keys() == data.keys()
    ds = make_dataset(root, 'test')
    assert len(ds.imgs) == len(data['test']['objects_img'])


def test_missing_data_file_names_the_path(tmp_path):
    root = str(tmp_path / 'nothing')
    with pytest.raises(datasets.DatasetError) as info:
        make_dataset(root)
    assert os.path.join(root, datasets.CSS_DATA_FILE) in str(info.value)


def test_corrupt_data_file_names_the_path(tmp_path):
    root = root_dir(str(tmp_path / 'corrupt'))
    path = os.path.join(root, datasets.CSS_DATA_FILE)
    with open(path, 'wb') as f:
        f.write(b'\x93NUMPY garbage')
    with pytest.raises(datasets.DatasetError) as info:
        make_dataset(root)
    assert path in str(info.value)


def test_missing_split_is_a_dataset_error(tmp_path):
    root = str(tmp_path / 'nosplit')
    data = write_css_fixture(root)
    np.save(os.path.join(root, datasets.CSS_DATA_FILE), np.array({'train': data['train']}, dtype=object),
            allow_pickle=True)
    with pytest.raises(datasets.DatasetError, match='test'):
        make_dataset(root, 'test')


# --------------------------------------------------------------------------------------------
# Safe loading (issue 12, item 10), structure (item 9) and the image source (item 4)
# --------------------------------------------------------------------------------------------

def test_np_save_with_numpy_arrays_and_scalars_loads_as_np_load_reads_it(tmp_path):
    root = str(tmp_path / 'numpy_values')
    data = write_css_fixture(root)
    for split in data.values():  # numpy scalars and arrays where a numpy-built file has them
        split['labels'] = np.array(split['labels'], dtype=np.int64)
        split['objects_img'][0][0]['pos'] = np.array(split['objects_img'][0][0]['pos'])
        split['mods'][0]['from'] = [np.int64(i) for i in split['mods'][0]['from']]
        split['objects_img'][1][0]['pos'] = tuple(np.float64(v) for v in split['objects_img'][1][0]['pos'])
    path = os.path.join(root, datasets.CSS_DATA_FILE)
    np.save(path, np.array(data, dtype=object), allow_pickle=True)
    loaded = datasets.load_css_data(root)
    expected = np.load(path, allow_pickle=True, encoding='latin1').item()
    assert repr(loaded) == repr(expected)
    assert isinstance(loaded['test']['labels'], np.ndarray)
    ds = make_dataset(root, 'test')
    assert [img['captions'][0] for img in ds.imgs] == [str(v) for v in data['test']['labels']]
    assert ds.get_img(1).shape == (3, 64, 64)


def test_python2_pickle_with_numpy_scalars_loads(tmp_path):
    root = root_dir(str(tmp_path / 'py2np'))
    split = {'objects_img': [[obj('circle', 'red', 'large', 'top', 'left')],
                             [obj('circle', 'blue', 'large', 'top', 'left')]],
             'mods': [{'from': [np.int64(0)], 'to': [np.int64(1)], 'to_str': 'make it blue'}],
             'labels': np.array([7, 9])}
    path = os.path.join(root, datasets.CSS_DATA_FILE)
    write_python2_npy(path, {'train': split, 'test': split})
    with open(path, 'rb') as f:
        assert b'cnumpy.core.multiarray\nscalar\n' in f.read()
    ds = make_dataset(root, 'test')
    assert [img['captions'] for img in ds.imgs] == [['7'], ['9']]
    assert ds.get_test_queries()[0]['target_img_id'] == 1


class _Shell:
    """Unpickling it runs a shell command (what a hostile .npy can do with np.load)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_hostile_npy(root, marker):
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, datasets.CSS_DATA_FILE)
    with open(path, 'wb') as f:
        np.lib.format.write_array_header_1_0(f, {'descr': '|O', 'fortran_order': False, 'shape': ()})
        pickle.dump(np.array({'train': _Shell(f'touch {marker}')}, dtype=object), f, protocol=2)
    return path


def test_a_crafted_data_file_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / 'ran'
    path = write_hostile_npy(str(tmp_path / 'hostile'), marker)
    np.load(path, allow_pickle=True)  # the threat is real: np.load runs the command
    assert marker.exists()
    marker.unlink()
    with pytest.raises(datasets.DatasetError) as info:
        make_dataset(str(tmp_path / 'hostile'))
    message = str(info.value)
    assert message.startswith(path) and 'refusing posix.system' in message
    assert '\n' not in message
    assert not marker.exists()


def test_a_crafted_data_file_through_main_is_a_one_line_error(tmp_path):
    from conftest import TINY, run_main
    marker = tmp_path / 'ran'
    root = str(tmp_path / 'hostile')
    write_hostile_npy(root, marker)
    result = run_main(TINY + [f'--dataset_path={root}', '--num_iters=1'], cwd=str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith('main.py: error: ') and 'refusing posix.system' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def _broken(mutate):
    def write(root):
        data = write_css_fixture(root)
        mutate(data)
        np.save(os.path.join(root, datasets.CSS_DATA_FILE), np.array(data, dtype=object),
                allow_pickle=True)
    return write


def _write_plain(value):
    def write(root):
        os.makedirs(root, exist_ok=True)
        np.save(os.path.join(root, datasets.CSS_DATA_FILE), np.array(value, dtype=object),
                allow_pickle=True)
    return write


BROKEN_FILES = {
    'a 0-d int': (_write_plain(3), 'expected a dict of splits'),
    'a numeric array': (lambda root: os.makedirs(root, exist_ok=True) or np.save(
        os.path.join(root, datasets.CSS_DATA_FILE), np.arange(4)), 'expected one pickled object'),
    'split not a dict': (_broken(lambda d: d.update(train=[1, 2])), 'split "train": expected a dict'),
    'no mods': (_broken(lambda d: d['train'].pop('mods')), 'split "train": no "mods"'),
    'no objects_img': (_broken(lambda d: d['train'].pop('objects_img')), 'no "objects_img"'),
    'index out of range': (_broken(lambda d: d['train']['mods'][3].update(to=[10 ** 6])),
                           'mods[3]["to"]: 1000000 is not an image index'),
    'negative index': (_broken(lambda d: d['train']['mods'][0].update({'from': [-1]})),
                       'mods[0]["from"]: -1 is not an image index'),
    'from and to differ in length': (_broken(lambda d: d['train']['mods'][1].update(to=[1, 2])),
                                     'mods[1]: "from" and "to"'),
    'mod without text': (_broken(lambda d: d['train']['mods'][2].pop('to_str')),
                         'mods[2]: expected a dict with from, to and to_str'),
    'objects not a list': (_broken(lambda d: d['train']['objects_img'].__setitem__(4, 'scene')),
                           'objects_img[4]: expected a list of objects'),
    'labels too short': (_broken(lambda d: d['train']['labels'].pop()), 'labels: expected one per image'),
    'undrawable colour': (_broken(lambda d: d['train']['objects_img'][5][0].update(color='pink')),
                          'objects_img[5]: cannot draw'),
    'object without pos': (_broken(lambda d: d['train']['objects_img'][6][0].pop('pos')),
                           'objects_img[6]: cannot draw'),
}


@pytest.mark.parametrize('case', sorted(BROKEN_FILES))
def test_a_data_file_of_the_wrong_structure_is_a_one_line_dataset_error(tmp_path, case):
    write, fragment = BROKEN_FILES[case]
    root = str(tmp_path / 'broken')
    write(root)
    with pytest.raises(datasets.DatasetError) as info:
        make_dataset(root, 'train')
    message = str(info.value)
    assert message.startswith(os.path.join(root, datasets.CSS_DATA_FILE) + ': ')
    assert fragment in message and '\n' not in message


def test_undrawable_objects_are_fine_with_pngs(tmp_path):
    root = str(tmp_path / 'pngs')
    data = write_css_fixture(root, pngs=True)
    data['train']['objects_img'][5][0]['color'] = 'pink'  # a colour of real renders, say
    np.save(os.path.join(root, datasets.CSS_DATA_FILE), np.array(data, dtype=object), allow_pickle=True)
    assert make_dataset(root, 'train').get_img(5).shape == (3, 64, 64)


def test_objects_at_the_border_are_cut_not_wrapped_around():
    for shape in ('rectangle', 'circle', 'triangle'):
        img = datasets.draw_css_2d_image([{'shape': shape, 'color': 'red', 'size': 'large',
                                           'pos': (1.0, 0.0)}])
        red = coloured(img, 'red')
        assert red[56:, :8].any(), shape
        assert not red[:40].any() and not red[:, 40:].any(), shape


@pytest.mark.parametrize('missing', [0, 5])
def test_a_missing_png_is_found_when_the_dataset_is_built(tmp_path, missing):
    root = str(tmp_path / 'pngs')
    write_css_fixture(root, pngs=True)
    for idx in (missing, 9, 11, 13):
        os.remove(os.path.join(root, 'images', 'css_test_%06d.png' % idx))
    assert make_dataset(root, 'train').img_path == os.path.join(root, 'images')
    with pytest.raises(datasets.DatasetError) as info:
        make_dataset(root, 'test')
    message = str(info.value)
    assert message.startswith(os.path.join(root, 'images') + ': 4 of the 36 test images are missing')
    first = sorted([missing, 9, 11])
    assert ', '.join('css_test_%06d.png' % i for i in first) + ', ...' in message
    assert '\n' not in message
    assert make_dataset(root, 'test', use_2d=True).img_path is None  # 2D asked for: no PNG read


def test_without_an_images_folder_both_splits_are_drawn(tmp_path):
    root = str(tmp_path / 'pngs')
    write_css_fixture(root, pngs=True)
    import shutil
    shutil.rmtree(os.path.join(root, 'images'))
    for split in ('train', 'test'):
        assert make_dataset(root, split).img_path is None


def test_a_corrupt_png_in_training_is_reported_once_and_redrawn(tmp_path, capsys):
    root = str(tmp_path / 'badpng')
    write_css_fixture(root, pngs=True)
    ds = make_dataset(root, 'train')
    data = load_fixture_data(root)['train']
    bad = data['mods'][0]['from'][0]  # a source: both mods of its scene have it
    bad_target = data['mods'][3]['to'][0]  # its source is fine: the pair must start afresh
    bad_file = os.path.join(root, 'images', 'css_train_%06d.png' % bad)
    for idx in (bad, bad_target):
        with open(os.path.join(root, 'images', 'css_train_%06d.png' % idx), 'wb') as f:
            f.write(b'not a png')
    np.random.seed(0)
    random.seed(0)
    examples, states = [], []
    for i in range(200):
        examples.append(ds[i])
        states.append((ds.last_from, list(ds.last_mod)))
    err = capsys.readouterr().err
    assert err.count(bad_file) == 1 and 'drawing another training example' in err
    assert all(not {bad, bad_target} & {e['source_img_id'], e['target_img_id']} for e in examples)
    for example in examples:
        assert_real_pair(ds, example)
    # The pairs continue after a redraw: each example is a first or the second of its source.
    for (source, mods), example in zip(states, examples):
        assert source == example['source_img_id'] and mods[-1] == example['mod']['id']
    assert len(states[0][1]) == 1
    for i in range(1, len(examples)):
        if len(states[i][1]) == 2:  # a second example follows the first of its source
            assert len(states[i - 1][1]) == 1
            assert examples[i - 1]['source_img_id'] == examples[i]['source_img_id']
    with pytest.raises(datasets.DatasetError, match='css_train_%06d.png' % bad):
        ds.get_img(bad)  # at test time: an error naming the file


def test_every_png_unreadable_stops_with_a_dataset_error(tmp_path):
    root = str(tmp_path / 'allbad')
    write_css_fixture(root, num_scenes=3, pngs=True)
    ds = make_dataset(root, 'train')
    for name in os.listdir(os.path.join(root, 'images')):
        with open(os.path.join(root, 'images', name), 'wb') as f:
            f.write(b'x')
    with pytest.raises(datasets.DatasetError, match='training examples in a row had an unreadable'):
        ds[0]


# --------------------------------------------------------------------------------------------
# Issue 18, item 12: a few hundred bytes of shared references make a structure whose repr (or
# str, or hash) never ends; a rejected file is reported in one line, fast.

SHARED_REFERENCES = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import datasets

def bomb():
    """A list nested 40 deep whose two elements are the same list: 2**40 leaves, 500 bytes."""
    x = []
    for _ in range(40):
        x = [x, x]
    return x

class Reduce:
    """Unpickled as f(*args) (numpy.dtype's error message quotes its whole argument)."""
    def __init__(self, f, args):
        self.f, self.args = f, args
    def __reduce__(self):
        return self.f, self.args

def fixture():
    return {'objects_img': [[{'shape': 'circle', 'color': 'red', 'size': 'large',
                              'pos': (0.5, 0.5)}]] * 2,
            'mods': [{'from': [0], 'to': [1], 'to_str': 'make it so'}], 'labels': [0, 1]}

PLACES = {
    'the data': lambda s: bomb(),
    'a split': lambda s: {'train': bomb(), 'test': s},
    'objects_img': lambda s: {'train': dict(s, objects_img=bomb()), 'test': s},
    'an image': lambda s: {'train': dict(s, objects_img=[bomb(), []]), 'test': s},
    'a label': lambda s: {'train': dict(s, labels=[0, bomb()]), 'test': s},
    'labels': lambda s: {'train': dict(s, labels=bomb()), 'test': s},
    'a mod': lambda s: {'train': dict(s, mods=[bomb()]), 'test': s},
    'an index': lambda s: {'train': dict(s, mods=[{'from': [bomb()], 'to': [1], 'to_str': 'x'}]), 'test': s},
    'a text': lambda s: {'train': dict(s, mods=[{'from': [0], 'to': [1], 'to_str': bomb()}]), 'test': s},
    'a colour': lambda s: {'train': dict(s, objects_img=[[{'shape': 'circle', 'color': bomb(),
                                                           'size': 'large', 'pos': (0.5, 0.5)}], []]), 'test': s},
    'a position': lambda s: {'train': dict(s, objects_img=[[{'shape': 'circle', 'color': 'red',
                                                              'size': 'large', 'pos': bomb()[:2]}], []]), 'test': s},
    'the split names': lambda s: {'test': s, 7: bomb()},
    'a dtype': lambda s: {'train': Reduce(np.dtype, (bomb(),)), 'test': s},
}
root = sys.argv[2]
os.makedirs(root, exist_ok=True)
path = os.path.join(root, datasets.CSS_DATA_FILE)
for place, make in PLACES.items():
    value = np.empty((), dtype=object)
    value[()] = make(fixture())
    np.save(path, value, allow_pickle=True)
    try:
        datasets.CSSDataset(root, 'train')
        print(place, '| loaded', os.path.getsize(path), flush=True)
    except datasets.DatasetError as e:
        print(place, '|', os.path.getsize(path), '|', e, flush=True)
'''


@pytest.mark.slow
def test_a_small_file_of_shared_references_is_one_line_fast(tmp_path):
    root = str(tmp_path / 'shared')
    # A forked child: a blow-up is a timeout here, not a stuck test.
    from conftest import ForkedProcess

    def script():
        sys.argv = ['shared_references', ROOT, root]
        exec(SHARED_REFERENCES, {'__name__': '__main__'})
        return 0
    process = ForkedProcess(script, str(tmp_path))
    out, err = process.communicate(timeout=120)
    result = types.SimpleNamespace(returncode=process.returncode, stdout=out, stderr=err)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 13, result.stdout
    data_file = os.path.join(root, datasets.CSS_DATA_FILE)
    for line in lines:
        place, size, message = line.split(' | ', 2)
        assert int(size) < 1000
        assert message.startswith(data_file + ': ') and len(message) < len(data_file) + 400, line
    found = dict(line.split(' | ')[::2] for line in lines)
    assert found['the data'].endswith(
        'expected a dict of splits (train, test), found list [[[[...], [...]], [[...], [...]]], [[[...], [...]], [[......')
    assert 'labels[1]: expected an integer, found list [[[[...], [...]]' in found['a label']
    assert 'mods[0]["from"]: [[[[...], [...]], [[...], [...]]], [[[...], [...]], [[...... is not' in found['an index']
    assert 'objects_img[0]: cannot draw dict' in found['a colour']
    assert 'no "train" split (has test, 7)' in found['the split names']
    assert 'cannot read CSS data (refusing numpy.dtype of list (expected a type code))' in found['a dtype']


@pytest.mark.slow
def test_a_file_of_shared_references_through_main_is_one_line(tmp_path):
    from conftest import TINY, run_main
    root = tmp_path / 'shared'
    root.mkdir()
    x = []
    for _ in range(40):
        x = [x, x]
    value = np.empty((), dtype=object)
    value[()] = {'train': {'objects_img': x, 'mods': []}, 'test': {'objects_img': x, 'mods': []}}
    np.save(str(root / datasets.CSS_DATA_FILE), value, allow_pickle=True)
    assert os.path.getsize(str(root / datasets.CSS_DATA_FILE)) < 1000
    # A forked child: a blow-up is a timeout here, not a stuck test.
    from conftest import fork_main
    process = fork_main(TINY + [f'--dataset_path={root}', '--num_iters=1'], tmp_path)
    result = types.SimpleNamespace(stderr=process.communicate(timeout=60)[1], returncode=process.returncode)
    assert result.returncode == 1
    assert result.stderr.startswith('main.py: error: ') and 'objects_img[0]: expected a list of objects' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and len(result.stderr) < 400
