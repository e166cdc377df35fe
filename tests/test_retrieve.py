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


@pytest.mark.slow
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


def count_gallery_computations(monkeypatch):
    calls = []
    compute = test_retrieval.compute_gallery_features

    def counted(*args, **kwargs):
        calls.append(1)
        return compute(*args, **kwargs)
    monkeypatch.setattr(test_retrieval, 'compute_gallery_features', counted)
    return calls


@pytest.mark.slow
def test_second_query_reads_cached_gallery_features(tmp_path, capsys, monkeypatch):
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
    computed = count_gallery_computations(monkeypatch)

    def query(extra):
        _, results = retrieve.retrieve(retrieve.parse_opt(args + extra))
        return results, capsys.readouterr()

    results1, log1 = query(['--query_index=7'])
    assert 'Computing gallery features of the 300 test images' in log1.err and len(computed) == 1
    (cache,) = glob.glob(os.path.join(str(tmp_path), 'run', 'feature_cache', 'gallery_css3d_test_*.pt'))
    assert 'css_test_' in log1.out  # drawn images are named css_<split>_<index>
    results2, log2 = query(['--query_index=7'])
    assert len(computed) == 1  # the gallery's features were read, not computed again
    assert 'Computing' not in log2.err and '(cached)' in log2.err
    assert [r['index'] for r in results2] == [r['index'] for r in results1]
    assert [r['score'] for r in results2] == pytest.approx([r['score'] for r in results1], abs=1e-5)
    # Another query of the same split uses the cache too.
    _, log3 = query(['--query_index=100', '--topk=3'])
    assert '(cached)' in log3.err and len(computed) == 1
    # A changed checkpoint or changed data rebuild it, in the same file.
    stat = os.stat(ckpt)
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    _, log4 = query(['--query_index=7'])
    assert 'Computing gallery features' in log4.err and len(computed) == 2
    data_file = os.path.join(root, datasets.CSS_DATA_FILE)
    stat = os.stat(data_file)
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    _, log5 = query(['--query_index=7'])
    assert 'Computing gallery features' in log5.err and len(computed) == 3
    _, log6 = query(['--query_index=7', '--split=train'])
    assert 'Computing gallery features of the 300 train images' in log6.err
    assert len(glob.glob(os.path.join(os.path.dirname(cache), '*.pt'))) == 2  # test and train
    cached = torch.load(cache, weights_only=True)
    assert cached['features'].shape == (300, 16) and cached['key']['split'] == 'test'


def imgonly_checkpoint(tmp_path, root):
    torch.manual_seed(0)
    texts = datasets.CSSDataset(root, 'train').get_all_texts()
    ckpt = str(tmp_path / 'imgonly.pth')
    save_checkpoint(ckpt, img_text_composition_models.SimpleModelImageOnly(texts, 16, pretrained=False),
                    'imgonly', root)
    return ckpt


def test_a_gallery_image_overwritten_in_place_is_not_read_from_the_cache(tmp_path, capsys, monkeypatch):
    root = str(tmp_path / 'css')
    write_css_fixture(root, pngs=True)
    ckpt = imgonly_checkpoint(tmp_path, root)
    computed = count_gallery_computations(monkeypatch)
    args = [f'--checkpoint={ckpt}', '--query_index=0', '--topk=35', '--loader_num_workers=0']
    _, results = retrieve.retrieve(retrieve.parse_opt(args))
    before = {r['index']: r['score'] for r in results}
    a, b = 10, 20
    assert before[a] != pytest.approx(before[b], abs=1e-4)
    png = os.path.join(root, 'images', 'css_test_%06d.png')
    images_mtime = os.stat(os.path.join(root, 'images')).st_mtime_ns
    shutil.copyfile(png % b, png % a)  # same file, new content: the folder's mtime stays
    assert os.stat(os.path.join(root, 'images')).st_mtime_ns == images_mtime
    _, results = retrieve.retrieve(retrieve.parse_opt(args))
    after = {r['index']: r['score'] for r in results}
    assert len(computed) == 2 and 'Computing gallery features' in capsys.readouterr().err
    assert after[a] == pytest.approx(before[b], abs=1e-5)  # image a now looks like image b


@pytest.mark.slow
def test_a_full_disk_while_writing_the_cache_still_prints_the_results(tmp_path, capsys):
    from test_checkpoints import file_size_limit
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=100)  # 300 x 16 features: 19 kB, past the limit
    ckpt = imgonly_checkpoint(tmp_path, root)
    args = [f'--checkpoint={ckpt}', '--query_index=3', '--topk=4', '--loader_num_workers=0']
    with file_size_limit(4096):
        code, out, err = run_retrieve(args, capsys)
    assert code == 0, err
    assert [m.rank for m in ranked_lines(out)] == [1, 2, 3, 4]
    (warning,) = [line for line in err.splitlines() if line.startswith('warning:')]
    assert 'feature cache not written' in warning and 'File too large' in warning
    assert not glob.glob(os.path.join(str(tmp_path), 'feature_cache', '*'))  # no partial file


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


@pytest.mark.slow
def test_training_logs_retrieval_examples_to_tensorboard(tmp_path, monkeypatch):
    root = str(tmp_path / 'css')
    write_css_fixture(root, pngs=True)
    run_dir = train_tiny(tmp_path, monkeypatch, root, '_tb')
    images = read_images(run_dir)
    assert list(images) == ['retrieval_examples']  # tensorboardX stores 'retrieval examples' so
    ((step, picture),) = images['retrieval_examples']
    assert step == 3
    assert picture.width == picture_width(6)  # the query and its top 5
    g = retrieval_grid
    row_height = picture.height // 4
    assert row_height > g.TILE and picture.height - 4 * row_height < row_height  # four queries


def test_retrieval_examples_draw_no_random_numbers(css_root, tmp_path):
    testset = datasets.CSSDataset(css_root, 'test', transform=datasets.css_transform())
    model = img_text_composition_models.TIRG(testset.get_all_texts(), 16, pretrained=False)
    opt = main.parse_opt(['--batch_size=8', '--loader_num_workers=0', '--embed_dim=16'])

    import tensorboardX
    logger = tensorboardX.SummaryWriter(str(tmp_path / 'run'))
    model.train()
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    main.evaluate(opt, model, [('test', testset)], logger, 9, 0, str(tmp_path))
    logger.close()
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert model.training
    images = read_images(str(tmp_path / 'run'))
    assert [step for step, _ in images['retrieval_examples']] == [9] and len(images) == 1


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
    # Shoes' protocols: the source scores -inf and stays, last once k reaches the gallery's size.
    scores, indices = test_retrieval.top_k_with_scores(queries, gallery, 10, exclude=[2, 4],
                                                       exclude_ranks_last=True)
    assert indices.shape == (2, 6) and indices[:, -1].tolist() == [2, 4]
    assert scores[:, -1].tolist() == [float('-inf')] * 2
    assert sorted(indices[0].tolist()) == list(range(6))


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


@pytest.mark.slow
def test_a_relative_dataset_folder_that_is_not_here_is_an_error_not_the_default(tmp_path, monkeypatch, capsys):
    """The checkpoint names data/css relative to where training ran; from another folder that
    holds ./data/css_synth (the default dataset), retrieve.py says so instead of ranking it."""
    trained_in = tmp_path / 'project'
    write_css_fixture(str(trained_in / 'data' / 'css'), num_scenes=4)
    texts = datasets.CSSDataset(str(trained_in / 'data' / 'css'), 'train').get_all_texts()
    ckpt = str(trained_in / 'tirg.pth')
    save_checkpoint(ckpt, img_text_composition_models.TIRG(texts, 16, pretrained=False), 'tirg',
                    os.path.join('data', 'css'))
    elsewhere = tmp_path / 'elsewhere'
    write_css_fixture(str(elsewhere / 'data' / 'css_synth'), num_scenes=4)
    monkeypatch.chdir(elsewhere)
    code, out, err = run_retrieve([f'--checkpoint={ckpt}', '--query_index=0', '--loader_num_workers=0'],
                                  capsys)
    result = subprocess.CompletedProcess([], code, out, err)
    assert result.returncode == 1 and result.stdout == ''
    assert result.stderr.startswith("retrieve.py: error: --dataset_path: not given, and the "
                                    "checkpoint's dataset folder data/css is not here")
    assert str(elsewhere / 'data' / 'css') in result.stderr and 'give --dataset_path=DIR' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_dataset_folder_taken_from_the_checkpoint_is_named(tmp_path, capsys, monkeypatch):
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=4)
    ckpt = imgonly_checkpoint(tmp_path, root)
    code, out, err = run_retrieve([f'--checkpoint={ckpt}', '--query_index=0', '--topk=2',
                                   '--loader_num_workers=0'], capsys)
    assert code == 0, err
    assert f"Dataset: css3d at {root} (the checkpoint's --dataset_path)\n" in err
    # A checkpoint that names no dataset folder: asked for, not guessed.
    monkeypatch.chdir(tmp_path)
    write_css_fixture(os.path.join('data', 'css_synth'), num_scenes=4)
    ckpt_without = str(tmp_path / 'no_opt.pth')
    torch.save({k: v for k, v in torch.load(ckpt, weights_only=False).items() if k != 'opt'},
               ckpt_without)
    code, out, err = run_retrieve([f'--checkpoint={ckpt_without}', '--query_index=0',
                                   '--model=imgonly', '--embed_dim=16'], capsys)
    assert code == 1
    assert err == (f'retrieve.py: error: --dataset_path: not given, and {ckpt_without} names no '
                   f'css3d dataset folder; give --dataset_path=DIR\n')


def test_a_long_topk_picture_wraps_and_draws_at_most_max_drawn(tmp_path, capsys):
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=25)  # 75 test images
    ckpt = imgonly_checkpoint(tmp_path, root)
    out_png = str(tmp_path / 'many.png')
    code, out, err = run_retrieve([f'--checkpoint={ckpt}', '--query_index=0', '--topk=70',
                                   f'--out={out_png}', '--loader_num_workers=0'], capsys)
    assert code == 0, err
    assert len(ranked_lines(out)) == 70  # every result is printed
    assert f'Wrote {out_png} (the first 50 of the 70 results)' in err
    picture = PIL.Image.open(out_png)
    assert picture.width == picture_width(1 + retrieval_grid.MAX_COLUMNS)
    one_line = retrieval_grid.draw_rows([{'query_img': np.ones((64, 64, 3)), 'query_text': 'q',
                                          'results': []}])
    assert picture.height == 5 * (one_line.height - retrieval_grid.PAD // 2) + retrieval_grid.PAD // 2


def test_draw_rows_wraps_long_rows_under_the_first_result():
    img = np.ones((8, 8, 3))
    img[:, :, 1:] = 0  # red
    results = [{'img': img, 'rank': r + 1, 'score': 1.0, 'caption': str(r), 'correct': r == 12}
               for r in range(379)]
    tile = 16
    picture = retrieval_grid.draw_rows([{'query_img': np.ones((8, 8, 3)), 'query_text': 'q',
                                         'results': results}], tile=tile, max_columns=10)
    g = retrieval_grid
    cell = tile + g.PAD
    assert picture.width == g.PAD + cell + g.GAP + 10 * cell  # not 379 columns wide
    empty = g.draw_rows([{'query_img': img, 'query_text': 'q', 'results': []}], tile=tile)
    row_height = empty.height - g.PAD // 2
    assert picture.height == 38 * row_height + g.PAD // 2
    pixels = np.asarray(picture)
    x0 = g.PAD + cell + g.GAP
    for r in (0, 9, 10, 378):  # each result's tile: line r // 10, column r % 10
        x, y = x0 + (r % 10) * cell, g.PAD + (r // 10) * row_height
        assert tuple(pixels[y + tile // 2, x + tile // 2]) == (255, 0, 0), r
    x, y = x0 + 2 * cell, g.PAD + row_height  # result 12, line 1, column 2: framed in green
    assert tuple(pixels[y - 1, x + tile // 2]) == g.CORRECT_COLOR
    assert tuple(pixels[g.PAD + row_height + tile // 2, g.PAD + tile // 2]) == g.BACKGROUND


def test_a_checkpoint_of_another_dataset_is_refused_naming_both(tmp_path, capsys):
    """Issue 18 item 8: --dataset given, the checkpoint trained on another dataset (its words
    unknown there but for a warning): one line naming both, nothing ranked."""
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=4)
    ckpt = imgonly_checkpoint(tmp_path, root)
    saved = torch.load(ckpt, weights_only=False)
    saved['opt'].dataset = 'fashion200k'
    torch.save(saved, ckpt)
    code, out, err = run_retrieve([f'--checkpoint={ckpt}', '--dataset=css3d', f'--dataset_path={root}',
                                   '--query_index=0', '--loader_num_workers=0'], capsys)
    assert code == 1 and out == ''
    assert err == (f'retrieve.py: error: --dataset=css3d: {ckpt} was trained on fashion200k; give '
                   f'--dataset=fashion200k (or leave --dataset out) to search with it\n')


def scaled_gallery_image(root, index, path, size, margin=0):
    """Gallery image `index` scaled up (nearest) to size x size, `margin` white columns on
    each side."""
    img = PIL.Image.open(os.path.join(root, 'images', 'css_test_%06d.png' % index)).convert('RGB')
    canvas = PIL.Image.new('RGB', (size + 2 * margin, size), (255, 255, 255))
    canvas.paste(img.resize((size, size), PIL.Image.NEAREST), (margin, 0))
    canvas.save(path)
    return path


def test_a_css_query_image_is_brought_to_the_size_of_the_dataset_s_images(tmp_path, capsys):
    """Issue 23 item 11: CSS's transform resizes nothing, so a user's 2048 x 2048 image (or a
    wider one) would be seen at another scale than the 64 x 64 gallery; it is scaled to cover
    64 x 64 and its centre cut out, as the photo datasets' Resize + CenterCrop do."""
    root = str(tmp_path / 'css')
    write_css_fixture(root, pngs=True)
    ckpt = imgonly_checkpoint(tmp_path, root)
    testset = datasets.CSSDataset(root, 'test', transform=datasets.css_transform())
    k = 5
    for name, size, margin in [('square', 2048, 0), ('wide', 1024, 512)]:
        query = scaled_gallery_image(root, k, str(tmp_path / f'{name}.png'), size, margin)
        opt = retrieve.parse_opt([f'--checkpoint={ckpt}', f'--query_img={query}', '--topk=3',
                                  '--query_text=anything', '--loader_num_workers=0'])
        fitted = retrieve.query_from_file(opt, testset)
        assert fitted['tensor'].shape == (3, 64, 64), name
        # The margins are cut off (not squeezed in): the gallery image again, but for the
        # blur of scaling down.
        assert (fitted['tensor'] - testset.get_img(k)).abs().mean() < 0.02, name  # others: 0.08+
        _, results = retrieve.retrieve(opt)
        assert results[0]['index'] == k and results[0]['score'] > 0.99, (name, results)


def test_a_css_query_image_at_the_gallery_size_is_taken_as_it_is(tmp_path):
    root = str(tmp_path / 'css')
    write_css_fixture(root, pngs=True)
    testset = datasets.CSSDataset(root, 'test', transform=datasets.css_transform())
    img = testset.get_img(3, raw_img=True)
    assert retrieve.at_dataset_scale(testset, img) is img
    drawn = datasets.CSSDataset(root, 'test', use_2d=True)
    assert retrieve.css_image_size(drawn) == (64, 64)


MEASURE_PEAK_MEMORY = '''
import os, resource, runpy, sys
# A guard, not the measure: a regression then fails to allocate instead of swamping the machine.
resource.setrlimit(resource.RLIMIT_AS, (16 << 30, resource.RLIM_INFINITY))
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
finally:
    print('peak RSS KiB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
'''


@pytest.mark.slow
def test_relationship_on_a_2048_pixel_css_query_stays_within_4_gb(tmp_path):
    """Issue 23 item 11: relationship's pairs of layer4 cells at 2048 x 2048 pixels would need
    a 34 GB allocation; brought to the gallery's 64 x 64 the query needs no more than a small one."""
    import paper_composers
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=4)  # drawn 64 x 64 images
    torch.manual_seed(0)
    model = paper_composers.Relationship(datasets.CSSDataset(root, 'train').get_all_texts(), 8,
                                         pretrained=False)
    ckpt = str(tmp_path / 'relationship.pth')
    save_checkpoint(ckpt, model, 'relationship', root, embed_dim=8)
    query = str(tmp_path / 'query.png')
    PIL.Image.new('RGB', (2048, 2048), (255, 255, 255)).save(query)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-c', MEASURE_PEAK_MEMORY, os.path.join(REPO, 'retrieve.py'),
         f'--checkpoint={ckpt}', f'--query_img={query}', '--query_text=make top-left object red',
         '--topk=3', '--no_cache', '--loader_num_workers=0', '--device=cpu'],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m.rank for m in ranked_lines(result.stdout)] == [1, 2, 3]
    peak_kib = int(re.search(r'peak RSS KiB (\d+)', result.stderr).group(1))
    assert peak_kib < 4 << 20, peak_kib
