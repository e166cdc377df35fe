"""retrieve.py (one query, top-k, picture, feature cache) and the 'retrieval examples' image that
training logs to tensorboard."""
import argparse
import glob
import io
import os
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import REPO, TINY, read_events, write_css_fixture

import datasets
import img_text_composition_models
import main
import retrieval_grid
import retrieve
import test_retrieval

class Ranked:
    """One printed result line, cut at the header's columns (captions may hold spaces)."""

    def __init__(self, line, caption_at, file_at):
        rank, score = line[:caption_at].split()
        self.rank, self.score = int(rank), float(score)
        self.caption = line[caption_at:file_at].strip()
        self.file = line[file_at:]
        self.target = self.file.endswith('  <- target')
        if self.target:
            self.file = self.file[:-len('  <- target')]


def ranked_lines(stdout):
    lines = stdout.splitlines()
    (header,) = [i for i, line in enumerate(lines) if re.match(r'^\s*rank\s+score\s+caption\s+file$', line)]
    caption_at, file_at = lines[header].index('caption'), lines[header].index('file')
    return [Ranked(line, caption_at, file_at) for line in lines[header + 1:] if line.strip()]


def read_images(run_dir):
    """{tag: [(step, PIL image)]} from the tensorboard event files of a run folder."""
    images = {}
    for event in read_events(run_dir):
        for value in event.summary.value:
            if value.HasField('image'):
                img = PIL.Image.open(io.BytesIO(value.image.encoded_image_string))
                img.load()
                assert (img.width, img.height) == (value.image.width, value.image.height)
                images.setdefault(value.tag, []).append((event.step, img))
    return images


def picture_width(columns):
    g = retrieval_grid
    return g.PAD + (g.TILE + g.PAD) + g.GAP + (columns - 1) * (g.TILE + g.PAD)


def green_pixels(img):
    return int((np.asarray(img.convert('RGB')) == retrieval_grid.CORRECT_COLOR).all(axis=2).sum())


def train_tiny(tmp_path, monkeypatch, root, comment):
    monkeypatch.chdir(tmp_path)
    assert main.main(TINY + [f'--dataset_path={root}', '--num_iters=3', f'--comment={comment}']) == 0
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), 'runs', f'*{comment}'))
    return run_dir


def save_checkpoint(path, model, model_name, root, embed_dim=16):
    opt = argparse.Namespace(model=model_name, embed_dim=embed_dim, dataset='css3d', dataset_path=root)
    torch.save({'it': 0, 'opt': opt, 'model_state_dict': model.state_dict(),
                'vocab': model.text_model.vocab.words()}, path)


def run_retrieve(argv, capsys):
    code = retrieve.main_cli(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_after_training_prints_topk_and_writes_a_picture(tmp_path, monkeypatch):
    root = str(tmp_path / 'css')
    write_css_fixture(root, pngs=True)
    run_dir = train_tiny(tmp_path, monkeypatch, root, '_r')
    query = str(tmp_path / 'query.png')  # not a gallery file: nothing is left out
    shutil.copy(os.path.join(root, 'images', 'css_test_000003.png'), query)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, 'retrieve.py'),
         f'--checkpoint={os.path.join(run_dir, "latest_checkpoint.pth")}', '--dataset=css3d',
         f'--dataset_path={root}', f'--query_img={query}', '--query_text=make top-left object red',
         '--topk=5', '--out=grid.png', '--loader_num_workers=0'],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    lines = ranked_lines(result.stdout)
    assert [m.rank for m in lines] == [1, 2, 3, 4, 5]
    scores = [m.score for m in lines]
    assert scores == sorted(scores, reverse=True)
    for m in lines:
        assert re.fullmatch(re.escape(os.path.join(root, 'images')) + r'/css_test_\d{6}\.png', m.file)
    picture = PIL.Image.open(tmp_path / 'grid.png')
    assert picture.format == 'PNG' and picture.width > picture.height
    assert picture.width == picture_width(6)  # the query and five results
    assert green_pixels(picture) == 0  # no target known for an image query


def planted_fixture(tmp_path):
    """A CSS fixture with PNGs, a test query whose target image is overwritten with its source
    image, and an image-only checkpoint: the query's feature then equals the target's exactly."""
    root = str(tmp_path / 'css')
    write_css_fixture(root, pngs=True)
    testset = datasets.CSSDataset(root, 'test', transform=datasets.css_transform())
    pixels = [np.asarray(testset.get_img(i, raw_img=True)) for i in range(len(testset.imgs))]
    for n, q in enumerate(testset.get_test_queries()):
        source, target = q['source_img_id'], q['target_img_id']
        twins = [i for i, p in enumerate(pixels) if i != source and np.array_equal(p, pixels[source])]
        if not twins and testset.imgs[source]['captions'] != testset.imgs[target]['captions']:
            break
    else:
        raise AssertionError('no test query with a unique source image in the fixture')
    shutil.copy(testset._png_path(testset.img_path, source), testset._png_path(testset.img_path, target))
    torch.manual_seed(0)
    texts = datasets.CSSDataset(root, 'train').get_all_texts()
    model = img_text_composition_models.SimpleModelImageOnly(texts, 16, pretrained=False)
    ckpt = str(tmp_path / 'imgonly.pth')
    save_checkpoint(ckpt, model, 'imgonly', root)
    return root, ckpt, n, source, target


def test_a_test_query_retrieves_its_planted_target_first(tmp_path, capsys):
    root, ckpt, n, source, target = planted_fixture(tmp_path)
    out_png = str(tmp_path / 'planted.png')
    # --dataset, --dataset_path, --model and --embed_dim all come from the checkpoint.
    code, out, err = run_retrieve([f'--checkpoint={ckpt}', f'--query_index={n}', '--topk=4',
                                   f'--out={out_png}', '--loader_num_workers=0'], capsys)
    assert code == 0, err
    lines = ranked_lines(out)
    assert len(lines) == 4
    first = lines[0]
    assert first.file.endswith('css_test_%06d.png' % target) and first.target
    assert first.score == pytest.approx(1.0, abs=1e-4)
    # The source image scores 1.0 as well, but the retrieval protocol leaves it out.
    assert not any(m.file.endswith('css_test_%06d.png' % source) for m in lines)
    assert all(m.score < 0.99999 for m in lines[1:])
    picture = PIL.Image.open(out_png)
    assert picture.width == picture_width(5)
    assert green_pixels(picture) > 4 * retrieval_grid.TILE  # the target's frame

    # The same image given as a file: a copy is not excluded, so it and the target tie at 1.0;
    # the gallery file itself is recognised and left out.
    copy = str(tmp_path / 'query.png')
    shutil.copy(os.path.join(root, 'images', 'css_test_%06d.png' % source), copy)
    opt = retrieve.parse_opt([f'--checkpoint={ckpt}', f'--query_img={copy}', '--query_text=anything',
                              '--topk=3', '--loader_num_workers=0'])
    _, results = retrieve.retrieve(opt)
    assert {r['index'] for r in results[:2]} == {source, target}
    assert [r['score'] for r in results[:2]] == pytest.approx([1.0, 1.0], abs=1e-4)
    opt = retrieve.parse_opt([f'--checkpoint={ckpt}', '--query_text=anything', '--topk=3',
                              f'--query_img={os.path.join(root, "images", "css_test_%06d.png" % source)}',
                              '--loader_num_workers=0'])
    _, results = retrieve.retrieve(opt)
    assert results[0]['index'] == target and source not in [r['index'] for r in results]
    assert 'left out of the results' in capsys.readouterr().err


def test_second_query_reads_cached_gallery_features_and_is_5x_faster(tmp_path, capsys):
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=100)  # 300 test images, drawn in 2D
    texts = datasets.CSSDataset(root, 'train').get_all_texts()
    torch.manual_seed(0)
    model = img_text_composition_models.TIRG(texts, 16, pretrained=False)
    ckpt = str(tmp_path / 'run' / 'tirg.pth')
    os.makedirs(os.path.dirname(ckpt))
    save_checkpoint(ckpt, model, 'tirg', root)
    args = [f'--checkpoint={ckpt}', f'--dataset_path={root}', '--loader_num_workers=0',
            '--batch_size=32', '--device=cpu']

    def timed(extra):
        tic = time.perf_counter()
        _, results = retrieve.retrieve(retrieve.parse_opt(args + extra))
        seconds = time.perf_counter() - tic
        return seconds, results, capsys.readouterr()

    first, results1, log1 = timed(['--query_index=7'])
    assert 'Computing gallery features of the 300 test images' in log1.err
    (cache,) = glob.glob(os.path.join(str(tmp_path), 'run', 'feature_cache', 'gallery_css3d_test_*.pt'))
    assert 'css_test_' in log1.out  # drawn images are named css_<split>_<index>
    second, results2, log2 = timed(['--query_index=7'])
    assert 'Computing' not in log2.err and '(cached)' in log2.err
    assert [r['index'] for r in results2] == [r['index'] for r in results1]
    assert [r['score'] for r in results2] == pytest.approx([r['score'] for r in results1], abs=1e-5)
    assert first >= 5 * second, (first, second)
    # Another query of the same split uses the cache too.
    _, _, log3 = timed(['--query_index=100', '--topk=3'])
    assert '(cached)' in log3.err
    # A changed checkpoint or changed data rebuild it, in the same file.
    stat = os.stat(ckpt)
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    _, _, log4 = timed(['--query_index=7'])
    assert 'Computing gallery features' in log4.err
    data_file = os.path.join(root, datasets.CSS_DATA_FILE)
    stat = os.stat(data_file)
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    _, _, log5 = timed(['--query_index=7'])
    assert 'Computing gallery features' in log5.err
    _, _, log6 = timed(['--query_index=7', '--split=train'])
    assert 'Computing gallery features of the 300 train images' in log6.err
    assert len(glob.glob(os.path.join(os.path.dirname(cache), '*.pt'))) == 2  # test and train
    cached = torch.load(cache, weights_only=True)
    assert cached['features'].shape == (300, 16) and cached['key']['split'] == 'test'


def test_a_corrupt_cache_is_recomputed(tmp_path, capsys):
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=4)
    texts = datasets.CSSDataset(root, 'train').get_all_texts()
    ckpt = str(tmp_path / 'tirg.pth')
    save_checkpoint(ckpt, img_text_composition_models.TIRG(texts, 16, pretrained=False), 'tirg', root)
    cache_dir = str(tmp_path / 'cache')
    args = [f'--checkpoint={ckpt}', f'--dataset_path={root}', '--loader_num_workers=0',
            '--query_index=0', f'--cache_dir={cache_dir}']
    assert run_retrieve(args, capsys)[0] == 0
    (cache,) = glob.glob(os.path.join(cache_dir, '*.pt'))
    with open(cache, 'wb') as f:
        f.write(b'garbage')
    code, _, err = run_retrieve(args, capsys)
    assert code == 0 and 'unreadable feature cache' in err and 'Computing' in err
    code, _, err = run_retrieve(args + ['--no_cache'], capsys)
    assert code == 0 and 'Computing' in err


@pytest.mark.parametrize('case', ['checkpoint', 'query_img', 'bad_image', 'dataset_path',
                                  'query_index', 'no_query', 'both_queries', 'out_folder'])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, case):
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=4)
    texts = datasets.CSSDataset(root, 'train').get_all_texts()
    ckpt = str(tmp_path / 'tirg.pth')
    save_checkpoint(ckpt, img_text_composition_models.TIRG(texts, 16, pretrained=False), 'tirg', root)
    bad_image = tmp_path / 'bad.png'
    bad_image.write_bytes(b'not an image')
    base = [f'--checkpoint={ckpt}', f'--dataset_path={root}', '--loader_num_workers=0']
    argv, fragment = {
        'checkpoint': ([f'--checkpoint={tmp_path}/missing.pth', '--query_index=0'], 'missing.pth'),
        'query_img': (base + [f'--query_img={tmp_path}/nope.png', '--query_text=x'], 'nope.png'),
        'bad_image': (base + [f'--query_img={bad_image}', '--query_text=x'], 'bad.png'),
        'dataset_path': ([f'--checkpoint={ckpt}', f'--dataset_path={tmp_path}/nodata',
                          '--query_index=0'], 'nodata'),
        'query_index': (base + ['--query_index=8'], 'out of range'),
        'no_query': (base, '--query_index'),
        'both_queries': (base + ['--query_index=0', '--query_text=x'], 'not both'),
        'out_folder': (base + ['--query_index=0', f'--out={tmp_path}/no/dir/x.png'], 'no such folder'),
    }[case]
    code, out, err = run_retrieve(argv, capsys)
    assert code == 1
    assert err.startswith('retrieve.py: error: ') and fragment in err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err


def test_training_logs_retrieval_examples_to_tensorboard(tmp_path, monkeypatch):
    root = str(tmp_path / 'css')
    write_css_fixture(root, pngs=True)
    run_dir = train_tiny(tmp_path, monkeypatch, root, '_tb')
    images = read_images(run_dir)
    assert list(images) == ['retrieval examples']
    ((step, picture),) = images['retrieval examples']
    assert step == 3
    assert picture.width == picture_width(6)  # the query and its top 5
    g = retrieval_grid
    row_height = picture.height // 4
    assert row_height > g.TILE and picture.height - 4 * row_height < row_height  # four queries


def test_retrieval_examples_draw_no_random_numbers(css_root, tmp_path):
    testset = datasets.CSSDataset(css_root, 'test', transform=datasets.css_transform())
    model = img_text_composition_models.TIRG(testset.get_all_texts(), 16, pretrained=False)
    opt = main.parse_opt(['--batch_size=8', '--loader_num_workers=0', '--embed_dim=16'])

    class Logger:
        def __init__(self):
            self.summaries = []

        def _get_file_writer(self):
            return self

        def add_summary(self, summary, step):
            self.summaries.append((summary, step))

    logger = Logger()
    model.train()
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    main.evaluate(opt, model, [('test', testset)], logger, 9, 0, str(tmp_path))
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert model.training
    images = [(s, step) for s, step in logger.summaries if s.value[0].HasField('image')]
    assert len(images) == 1 and images[0][1] == 9
    assert images[0][0].value[0].tag == 'retrieval examples'


def test_top_k_with_scores_leaves_the_source_out():
    gallery = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    queries = gallery[[2, 4]].clone()
    scores, indices = test_retrieval.top_k_with_scores(queries, gallery, 10, exclude=[2, 4])
    assert indices.shape == (2, 5)  # at most all but the source
    assert 2 not in indices[0].tolist() and 4 not in indices[1].tolist()
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    scores, indices = test_retrieval.top_k_with_scores(queries, gallery, 3)
    assert indices[:, 0].tolist() == [2, 4]
    assert scores[:, 0] == pytest.approx([1.0, 1.0], abs=1e-6)


def test_photo_dataset_query_image_goes_through_the_dataset_transform(tmp_path, capsys):
    from test_mitstates import write_mitstates_fixture
    root = write_mitstates_fixture(str(tmp_path / 'mitstates'))
    testset = datasets.MITStates(root, 'test', transform=datasets.photo_transform())
    torch.manual_seed(0)
    texts = datasets.MITStates(root, 'train').get_all_texts()
    model = img_text_composition_models.SimpleModelImageOnly(texts, 16, pretrained=False)
    ckpt = str(tmp_path / 'imgonly.pth')
    save_checkpoint(ckpt, model, 'imgonly', root)
    torch.save(dict(torch.load(ckpt, weights_only=False),
                    opt=argparse.Namespace(model='imgonly', embed_dim=16, dataset='mitstates',
                                           dataset_path=root)), ckpt)
    # A 40x30 JPEG copied elsewhere and read as a file: Resize(224) + CenterCrop(224) make it
    # the very tensor the gallery has, so its image-only feature finds that image at score 1.
    k = 3
    copy = str(tmp_path / 'query.jpg')
    shutil.copy(testset.image_file(k), copy)
    code, out, err = run_retrieve([f'--checkpoint={ckpt}', f'--query_img={copy}', '--topk=3',
                                   '--query_text=dried', '--loader_num_workers=0',
                                   f'--out={tmp_path}/photo.png'], capsys)
    assert code == 0, err
    lines = ranked_lines(out)
    assert lines[0].file == testset.image_file(k)
    assert lines[0].score == pytest.approx(1.0, abs=1e-4)
    assert PIL.Image.open(tmp_path / 'photo.png').width == picture_width(4)
    # A test query: its target caption is known (MIT-States queries name no target image).
    q = testset.get_test_queries()[2]
    code, out, err = run_retrieve([f'--checkpoint={ckpt}', '--query_index=2', '--topk=8',
                                   '--loader_num_workers=0'], capsys)
    assert code == 0, err
    assert f'Target caption: {q["target_caption"]}\n' in out
    lines = ranked_lines(out)
    assert len(lines) == 8 and testset.image_file(q['source_img_id']) not in [m.file for m in lines]
    for m in lines:
        assert m.target == (m.caption == q['target_caption'])
        assert m.file.startswith(os.path.join(root, 'images', m.caption) + '/')
    marked = {m.file for m in lines if m.target}
    expected = {testset.image_file(i) for i, img in enumerate(testset.imgs)
                if img['captions'][0] == q['target_caption']}
    assert marked == expected & {m.file for m in lines} and marked


def test_released_format_checkpoint_without_vocabulary(tmp_path, capsys):
    from test_main import released_checkpoint
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=4)
    ckpt = str(tmp_path / 'released.pth')
    released_checkpoint(ckpt, datasets.CSSDataset(root, 'train').get_all_texts())  # dataset_path='x'
    code, out, err = run_retrieve([f'--checkpoint={ckpt}', f'--dataset_path={root}', '--topk=3',
                                   '--query_index=1', '--loader_num_workers=0', '--device=cpu'], capsys)
    assert code == 0, err
    assert [m.rank for m in ranked_lines(out)] == [1, 2, 3]
    assert os.path.isdir(os.path.join(str(tmp_path), 'feature_cache'))
