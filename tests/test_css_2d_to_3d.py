"""CSS 2D->3D, --css_query_images=2d (issue 19 section 3, SPEC 2.1): every query (source) image is
the 2D drawing of its scene, every target and gallery image the rendered PNG."""
import argparse
import glob
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import TINY, run_main, write_css_fixture

import checkpoints
import datasets
import retrieval_grid
import retrieve
import test_retrieval

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def normalised(hwc):
    """ToTensor then the ImageNet Normalize, written out: CHW floats."""
    return torch.tensor(((np.asarray(hwc, dtype=np.float64) - MEAN) / STD).transpose(2, 0, 1),
                        dtype=torch.float32)


def write_png_fixture(root):
    """The fixture's PNGs are the drawings inverted, so that a PNG and a drawing differ everywhere."""
    data = write_css_fixture(root, pngs=True)
    for path in glob.glob(os.path.join(root, 'images', '*.png')):
        pixels = np.asarray(PIL.Image.open(path).convert('RGB'))
        PIL.Image.fromarray(255 - pixels).save(path)
    return data


def drawing(data, split, idx):
    return datasets.draw_css_2d_image(data[split]['objects_img'][idx])


def expected_2d(data, split, idx):
    return normalised(drawing(data, split, idx))


def expected_png(root, split, idx):
    path = os.path.join(root, 'images', 'css_%s_%06d.png' % (split, idx))
    return normalised(np.asarray(PIL.Image.open(path).convert('RGB')) / 255.0)


@pytest.fixture
def png_root(tmp_path):
    root = str(tmp_path / 'css_png')
    return root, write_png_fixture(root)


def same(a, b):
    return torch.allclose(torch.as_tensor(a).float(), b, atol=1e-5)


def test_training_examples_draw_the_source_and_read_the_target(png_root):
    root, data = png_root
    trainset = datasets.CSSDataset(root, 'train', datasets.css_transform(), query_images='2d')
    np.random.seed(0)
    for _ in range(8):
        e = trainset[0]
        assert same(e['source_img_data'], expected_2d(data, 'train', e['source_img_id']))
        assert not same(e['source_img_data'], expected_png(root, 'train', e['source_img_id']))
        assert same(e['target_img_data'], expected_png(root, 'train', e['target_img_id']))
    # The gallery (get_img) stays the PNGs; the shown query is the drawing.
    assert same(trainset.get_img(0), expected_png(root, 'train', 0))
    shown = np.asarray(retrieval_grid.display_query_image(trainset, 3))
    assert np.array_equal(shown, (drawing(data, 'train', 3) * 255).round().astype(np.uint8))
    # 3D->3D is unchanged: sources are the PNGs.
    plain = datasets.CSSDataset(root, 'train', datasets.css_transform())
    np.random.seed(0)
    e = plain[0]
    assert same(e['source_img_data'], expected_png(root, 'train', e['source_img_id']))


class RecordingModel(torch.nn.Module):
    """Records the images the retrieval test encodes; features are a few of their pixels."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.queries, self.gallery = [], []

    def compose_img_text(self, imgs, texts):
        self.queries.append(imgs.clone())
        return imgs.flatten(1)[:, ::97] * self.weight

    def extract_img_feature(self, imgs):
        self.gallery.append(imgs.clone())
        return imgs.flatten(1)[:, ::97] * self.weight


@pytest.mark.parametrize('split', ['test', 'train'])
def test_the_retrieval_test_encodes_drawn_queries_against_the_png_gallery(png_root, split):
    root, data = png_root
    dataset = datasets.CSSDataset(root, split, datasets.css_transform(), query_images='2d')
    model = RecordingModel()
    features = {}
    opt = argparse.Namespace(batch_size=5, loader_num_workers=0, dataset='css3d')
    test_retrieval.test(opt, model, dataset, features=features)
    queries = dataset.get_test_queries()
    encoded = torch.cat(model.queries)
    assert len(encoded) == len(queries)
    for q, img in zip(queries, encoded):
        assert same(img, expected_2d(data, split, q['source_img_id']))
    gallery = torch.cat(model.gallery)
    assert len(gallery) == len(dataset.imgs)
    for i, img in enumerate(gallery):
        assert same(img, expected_png(root, split, i))
    # The source's own gallery image (its PNG) is still left out of its ranking.
    assert features['exclude'].tolist() == [q['source_img_id'] for q in queries]


@pytest.mark.slow
def test_cli_trains_2d_to_3d_and_test_only_adopts_it_from_the_checkpoint(png_root, tmp_path, monkeypatch):
    root, data = png_root
    shown = []  # the query pictures of tensorboard's 'retrieval examples'
    result_row = retrieval_grid.result_row

    def recording_result_row(dataset, query_img, *args):
        shown.append(query_img)
        return result_row(dataset, query_img, *args)
    monkeypatch.setattr(retrieval_grid, 'result_row', recording_result_row)
    args = TINY + [f'--dataset_path={root}', '--num_iters=4', '--seed=1', '--comment=_2d',
                   '--css_query_images=2d']
    result = run_main(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'query images drawn in 2D' in result.stdout
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), 'runs', '*_2d'))
    ckpt = os.path.join(run_dir, 'latest_checkpoint.pth')
    assert checkpoints.load(ckpt)['opt'].css_query_images == '2d'
    assert json.load(open(os.path.join(run_dir, 'options.json')))['options']['css_query_images'] == '2d'
    final = [json.loads(line) for line in open(os.path.join(run_dir, 'metrics.jsonl'))][-1]
    first_query = datasets.CSSDataset(root, 'test').get_test_queries()[0]['source_img_id']
    assert np.array_equal(np.asarray(shown[0]),
                          (drawing(data, 'test', first_query) * 255).round().astype(np.uint8))

    tested = run_main(['--test_only', f'--checkpoint={ckpt}', '--batch_size=4',
                       '--loader_num_workers=0', '--comment=_t2d'], cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    assert "the checkpoint's --css_query_images=2d" in tested.stdout
    (test_dir,) = glob.glob(os.path.join(str(tmp_path), 'runs', '*_t2d'))
    metrics = json.load(open(os.path.join(test_dir, 'test_results.json')))['metrics']
    assert metrics.keys() == {k for k in final if k.startswith('test ')}
    for name, value in metrics.items():
        assert value == pytest.approx(final[name], abs=1e-6), name

    # Resuming cannot change it: it shapes the experiment.
    refused = run_main(args[:-1] + ['--css_query_images=3d', '--num_iters=6', f'--resume={ckpt}'],
                       cwd=tmp_path)
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert '--css_query_images=3d' in line and '--css_query_images=2d' in line


@pytest.mark.slow
def test_retrieve_encodes_and_shows_the_drawn_query(png_root, tmp_path, capsys):
    root, data = png_root
    result = run_main(TINY + [f'--dataset_path={root}', '--num_iters=2', '--comment=_r',
                              '--css_query_images=2d'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (ckpt,) = glob.glob(os.path.join(str(tmp_path), 'runs', '*_r', 'latest_checkpoint.pth'))
    args = [f'--checkpoint={ckpt}', '--query_index=2', '--topk=3', '--no_cache',
            '--loader_num_workers=0', '--device=cpu']
    query, results = retrieve.retrieve(retrieve.parse_opt(args))
    source = query['source_id']
    assert np.array_equal(np.asarray(query['display']),
                          (drawing(data, 'test', source) * 255).round().astype(np.uint8))
    # The scores are those of the drawn query against the PNG gallery, its source left out.
    model, testset = retrieve.load_model_and_gallery(retrieve.parse_opt(args))
    with torch.no_grad():
        q = model.compose_img_text(expected_2d(data, 'test', source)[None], [query['text']])
        g = model.extract_img_feature(torch.stack([expected_png(root, 'test', i)
                                                   for i in range(len(testset.imgs))]))
    scores = (torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).t())[0]
    scores[source] = -float('inf')
    assert [r['index'] for r in results] == scores.topk(3).indices.tolist()
    assert [r['score'] for r in results] == pytest.approx(scores.topk(3).values.tolist(), abs=1e-5)
    query_3d, _ = retrieve.retrieve(retrieve.parse_opt(args + ['--css_query_images=3d']))
    assert not np.array_equal(np.asarray(query_3d['display']), np.asarray(query['display']))


@pytest.mark.parametrize('case', ['no_pngs', 'fashion200k'])
def test_2d_queries_without_pngs_or_on_another_dataset_are_one_line_errors(css_root, tmp_path, case):
    path = css_root if case == 'no_pngs' else str(tmp_path)
    args = TINY + [f'--dataset_path={path}', '--css_query_images=2d', '--num_iters=2']
    if case == 'fashion200k':
        args = [a for a in args if not a.startswith('--dataset=')] + ['--dataset=fashion200k']
    result = run_main(args, cwd=tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith('main.py: error: --css_query_images=2d: ')
    assert (os.path.join(css_root, 'images') if case == 'no_pngs' else 'fashion200k') in line
    assert not os.path.exists(tmp_path / 'runs')
