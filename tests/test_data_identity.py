"""What identifies a dataset (data_identity.py, SPEC 10, issue 23 item 3): the same data at any
path is one identity, other data never is, and the cache never stands in for changed data."""
import hashlib
import json
import os
import shutil
import sys

import pytest

from conftest import write_css_fixture
from fiq_cirr_fixtures import cirr_layout, fiq_layout, write_cirr, write_fiq
from shoes_fixtures import small_lists, write_shoes
from test_fashion200k import write_fashion_fixture
from test_mitstates import write_mitstates_fixture

import data_identity


def write_dataset(dataset, root):
    if dataset == 'css3d':
        write_css_fixture(root, num_scenes=3, pngs=True)
    elif dataset == 'fashion200k':
        write_fashion_fixture(root)
    elif dataset == 'mitstates':
        write_mitstates_fixture(root)
    elif dataset == 'fashioniq':
        write_fiq(root, fiq_layout({'dress': 3, 'shirt': 2, 'toptee': 2}))
    elif dataset == 'cirr':
        write_cirr(root, cirr_layout())
    else:
        write_shoes(root, *small_lists())
    return root


# An annotation file of each dataset, and an image, relative to its folder.
ANNOTATION = {'css3d': 'css_toy_dataset_novel2_small.dup.npy',
              'fashion200k': 'labels/dress_test_detect_all.txt', 'fashioniq': 'captions/cap.dress.val.json',
              'cirr': 'cirr/captions/cap.rc2.val.json', 'shoes': 'eval_im_names.txt'}
IMAGE = {'css3d': 'images/css_test_000001.png', 'fashion200k': 'women/dresses/c24/204/204_0.jpeg',
         'mitstates': 'images/ripe apple/image_0.jpg', 'fashioniq': 'images/shirt_v1.png',
         'cirr': 'dev/dev-3-img0.png', 'shoes': 'womens_pumps/0/img_womens_pumps_4.jpg'}
DATASETS = sorted(IMAGE)


@pytest.mark.parametrize('dataset', DATASETS)
def test_the_same_data_at_two_paths_is_one_identity_and_changed_data_is_not(dataset, tmp_path):
    original = write_dataset(dataset, str(tmp_path / 'a' / dataset))
    copy = str(tmp_path / 'elsewhere' / 'b')
    shutil.copytree(original, copy)
    first = data_identity.identify(dataset, original)
    assert data_identity.identify(dataset, copy) == first
    assert first['image_files'] > 0 and first['version'] == 1
    assert first['annotation_files'] == (0 if dataset == 'mitstates' else first['annotation_files'])

    # An image folder where one image is gone: another image list.
    fewer = str(tmp_path / 'fewer')
    shutil.copytree(original, fewer)
    os.remove(os.path.join(fewer, IMAGE[dataset]))
    gone = data_identity.identify(dataset, fewer)
    assert gone['images'] != first['images'] and gone['digest'] != first['digest']
    assert gone['image_files'] == first['image_files'] - (dataset not in ('fashion200k', 'cirr'))
    assert gone['annotations'] == first['annotations']

    if dataset in ANNOTATION:  # one byte of one annotation file changed: other data
        changed = str(tmp_path / 'changed')
        shutil.copytree(original, changed)
        path = os.path.join(changed, ANNOTATION[dataset])
        data = bytearray(open(path, 'rb').read())
        data[-2] ^= 1
        open(path, 'wb').write(bytes(data))
        other = data_identity.identify(dataset, changed)
        assert other['annotations'] != first['annotations'] and other['digest'] != first['digest']
        assert other['images'] == first['images']


def test_an_images_size_is_part_of_the_identity_not_its_content(tmp_path):
    original = write_dataset('fashioniq', str(tmp_path / 'a'))
    first = data_identity.identify('fashioniq', original)
    path = os.path.join(original, IMAGE['fashioniq'])
    data = bytearray(open(path, 'rb').read())
    data[-1] ^= 1
    open(path, 'wb').write(bytes(data))
    assert data_identity.identify('fashioniq', original) == first  # image contents are not read
    open(path, 'ab').write(b'\0')
    assert data_identity.identify('fashioniq', original)['images'] != first['images']


@pytest.mark.slow
def test_hidden_files_fifos_and_the_generators_manifest_are_not_data(tmp_path):
    """A FIFO named like an annotation file is never opened (that would wait for ever)."""
    original = write_dataset('shoes', str(tmp_path / 'a'))
    first = data_identity.identify('shoes', original)
    os.mkfifo(os.path.join(original, 'womens_clogs', '0', 'pipe.jpg'))
    with open(os.path.join(original, 'womens_clogs', '.hidden.jpg'), 'w') as f:
        f.write('x')
    assert data_identity.identify('shoes', original) == first
    css = str(tmp_path / 'css')
    write_css_fixture(css, num_scenes=3)
    before = data_identity.identify('css3d', css)
    with open(os.path.join(css, '.make_css_dataset.json'), 'w') as f:
        f.write('{}')
    assert data_identity.identify('css3d', css) == before
    os.remove(os.path.join(css, 'css_toy_dataset_novel2_small.dup.npy'))
    os.mkfifo(os.path.join(css, 'css_toy_dataset_novel2_small.dup.npy'))
    # In a forked child: opening the FIFO would wait for ever, here a timeout.
    from conftest import ForkedProcess
    process = ForkedProcess(lambda: print(data_identity.identify('css3d', css)['annotation_files']) or 0,
                            str(tmp_path))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0 and out.strip() == '0', err


def test_the_cirr_layouts_of_one_download_are_one_identity(tmp_path):
    official = str(tmp_path / 'official')
    flat = str(tmp_path / 'flat')
    layout = cirr_layout()
    write_cirr(official, layout)
    write_cirr(flat, layout, official=False)
    assert data_identity.identify('cirr', official) == data_identity.identify('cirr', flat)


def test_the_digests_follow_the_documented_scheme(tmp_path):
    """An independent reading of the module's docstring on a hand-written Shoes folder, and the
    digest pinned: a change of what is hashed would split every recorded run from new ones."""
    root = tmp_path / 'shoes'
    (root / 'womens_boots' / '0').mkdir(parents=True)
    files = {'relative_captions_shoes.json': b'[{"ImageName": "b.jpg", "ReferenceImageName": '
                                             b'"a.jpg", "RelativeCaption": "is taller"}]',
             'train_im_names.txt': b'a.jpg\n', 'eval_im_names.txt': b'b.jpg\n'}
    for name, content in files.items():
        (root / name).write_bytes(content)
    (root / 'womens_boots' / '0' / 'a.jpg').write_bytes(b'1234567')
    (root / 'womens_boots' / '0' / 'b.jpg').write_bytes(b'12')
    (root / 'notes.txt').write_text('not data')
    annotations = hashlib.sha256(''.join(
        f'{name}\t{hashlib.sha256(files[name]).hexdigest()}\n' for name in sorted(files)).encode()).hexdigest()
    images = hashlib.sha256(b'womens_boots/0/a.jpg\t7\nwomens_boots/0/b.jpg\t2\n').hexdigest()
    digest = hashlib.sha256(f'shoes\nannotations {annotations}\nimages {images}\n'.encode()).hexdigest()
    assert data_identity.identify('shoes', str(root)) == {
        'version': 1, 'digest': digest, 'annotations': annotations, 'images': images,
        'annotation_files': 3, 'image_files': 2}
    assert digest == '5159a393a404a86279fd558ba7cdbea1544fe9c5225740c0b45c52d0f201d7ba'


# ---------------------------------------------------------------------------------------------
# The cache.

@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / 'cache'
    monkeypatch.setenv('TIRG_CACHE_DIR', str(folder))
    return folder / 'data_identity.json'


def counting_identify(monkeypatch):
    calls = []
    real = data_identity.identify

    def identify(dataset, path):
        calls.append(path)
        return real(dataset, path)
    monkeypatch.setattr(data_identity, 'identify', identify)
    return calls


def test_an_identity_is_computed_once_per_folder_until_the_folder_changes(tmp_path, cache, monkeypatch):
    root = write_dataset('fashioniq', str(tmp_path / 'fiq'))
    calls = counting_identify(monkeypatch)
    first = data_identity.cached_identity('fashioniq', root)
    assert data_identity.cached_identity('fashioniq', root) == first and len(calls) == 1
    assert json.loads(cache.read_text())['entries'][f'fashioniq {os.path.realpath(root)}']['identity'] == first
    # Another dataset read from the same folder is another entry.
    data_identity.cached_identity('cirr', root)
    assert len(calls) == 2
    # An annotation file rewritten (its size changes): computed again.
    path = os.path.join(root, 'captions', 'cap.dress.val.json')
    with open(path, 'a') as f:
        f.write(' ')
    changed = data_identity.cached_identity('fashioniq', root)
    assert len(calls) == 3 and changed['annotations'] != first['annotations']
    # An image added: its folder changed.
    with open(os.path.join(root, 'images', 'new.png'), 'wb') as f:
        f.write(b'x')
    added = data_identity.cached_identity('fashioniq', root)
    assert len(calls) == 4 and added['images'] != changed['images']
    assert data_identity.cached_identity('fashioniq', root) == added and len(calls) == 4
    # A folder that no longer exists leaves the cache at the next write.
    gone = write_dataset('shoes', str(tmp_path / 'gone'))
    data_identity.cached_identity('shoes', gone)
    shutil.rmtree(gone)
    data_identity.cached_identity('css3d', write_dataset('css3d', str(tmp_path / 'css')))
    assert not [k for k in json.loads(cache.read_text())['entries'] if k.endswith(os.sep + 'gone')]


def test_mitstates_images_added_to_an_existing_folder_change_the_cached_identity(tmp_path, cache):
    root = write_dataset('mitstates', str(tmp_path / 'mit'))
    first = data_identity.cached_identity('mitstates', root)
    with open(os.path.join(root, 'images', 'ripe apple', 'image_9.jpg'), 'wb') as f:
        f.write(b'jpeg')
    assert data_identity.cached_identity('mitstates', root)['images'] != first['images']


def test_a_file_that_is_not_the_cache_is_left_alone(tmp_path, cache):
    root = write_dataset('shoes', str(tmp_path / 'shoes'))
    cache.parent.mkdir()
    cache.write_text('my notes')
    identity = data_identity.cached_identity('shoes', root)
    assert identity == data_identity.identify('shoes', root)
    assert cache.read_text() == 'my notes'
    cache.unlink()
    os.mkfifo(cache)  # never opened: reading it would wait for a writer
    assert data_identity.cached_identity('shoes', root) == identity
    cache.unlink()
    cache.parent.rmdir()
    cache.parent.write_text('a file where the cache folder would be')
    assert data_identity.cached_identity('shoes', root) == identity


def test_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv('TIRG_CACHE_DIR', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert data_identity.cache_dir() == str(tmp_path / 'xdg' / 'tirg')
    monkeypatch.delenv('XDG_CACHE_HOME')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert data_identity.cache_dir() == str(tmp_path / 'home' / '.cache' / 'tirg')
    monkeypatch.setenv('TIRG_CACHE_DIR', str(tmp_path / 'mine'))
    assert data_identity.cache_dir() == str(tmp_path / 'mine')
