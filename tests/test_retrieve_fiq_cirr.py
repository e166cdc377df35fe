"""retrieve.py on FashionIQ and CIRR (issue 11): a test query is ranked as the dataset's retrieval
test ranks it (FashionIQ: its category's gallery, the candidate kept under the split protocol
and left out under val; CIRR: every image of the
split but the reference, plus the image-set ranking), checked against a straightforward
per-query ranking computed here with the model's own modules."""
import argparse
import glob
import os

import pytest
import torch

from conftest import small_photos
from fiq_cirr_fixtures import cirr_layout, fiq_layout, write_cirr, write_fiq
from test_retrieve import ranked_lines, run_retrieve

import cirr
import datasets
import fashioniq
import img_text_composition_models
import retrieve


@pytest.fixture(scope='module', autouse=True)
def with_small_photos():
    """Photos at 64 px (conftest.small_photos), for the module's checkpoints and every test:
    what is tested here is the ranking."""
    with small_photos():
        yield


def save_tirg_checkpoint(path, dataset_name, root, trainset, **saved_flags):
    torch.manual_seed(0)
    model = img_text_composition_models.TIRG(trainset.get_all_texts(), 16, pretrained=False)
    opt = argparse.Namespace(model='tirg', embed_dim=16, dataset=dataset_name, dataset_path=root,
                             **saved_flags)
    torch.save({'it': 0, 'opt': opt, 'model_state_dict': model.state_dict(),
                'vocab': model.text_model.vocab.words()}, path)
    return model.eval()


@torch.no_grad()
def straightforward_ranking(model, dataset, source, text, gallery_ids):
    """[(score, id)] of `gallery_ids`, best first: one image at a time, a full sort."""
    query = model.compose_img_text(dataset.get_img(source).unsqueeze(0), [text])
    query = torch.nn.functional.normalize(query, dim=1)[0]
    scores = []
    for idx in gallery_ids:
        feature = model.extract_img_feature(dataset.get_img(idx).unsqueeze(0))
        scores.append((float(query @ torch.nn.functional.normalize(feature, dim=1)[0]), idx))
    return sorted(scores, key=lambda pair: -pair[0])


def assert_same_ranking(lines, expected, dataset):
    assert [line.caption for line in lines] == [dataset.imgs[idx]['captions'][0] for _, idx in expected]
    assert [line.score for line in lines] == pytest.approx([score for score, _ in expected], abs=1e-4)


@pytest.fixture(scope='module')
def fiq(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('fiq')
    root = str(tmp / 'fashioniq')
    write_fiq(root, fiq_layout())
    transform = datasets.photo_transform()
    trainset = fashioniq.FashionIQ(root, 'train', transform)
    ckpt = str(tmp / 'run' / 'fiq.pth')
    os.makedirs(os.path.dirname(ckpt))
    model = save_tirg_checkpoint(ckpt, 'fashioniq', root, trainset, fiq_category='all')
    return root, ckpt, model, fashioniq.FashionIQ(root, 'test', transform)


@pytest.mark.slow
@pytest.mark.parametrize('protocol', ['split', 'val'])
def test_a_fashioniq_query_ranks_its_category_gallery_as_its_protocol_does(fiq, capsys, protocol):
    """split: the candidate ranked with the others; val: one query per caption, the candidate
    left out (VAL's code ranks it last)."""
    root, ckpt, model, _ = fiq
    testset = fashioniq.FashionIQ(root, 'test', datasets.photo_transform(), protocol=protocol)
    queries = testset.get_test_queries()
    n = next(i for i, q in enumerate(queries) if q['category'] == 'shirt') + 1
    q = queries[n]
    gallery = testset.galleries['shirt']
    # Dataset and category come from the checkpoint; 100 results is more than the gallery holds.
    code, out, err = run_retrieve([f'--checkpoint={ckpt}', f'--query_index={n}', '--topk=100',
                                   f'--fiq_protocol={protocol}', '--loader_num_workers=0'], capsys)
    assert code == 0, err
    assert f'test query {n} of the test split (shirt)' in out
    shirt = fiq_layout()['shirt']['val']
    if protocol == 'split':
        assert f'text "{shirt[1]["captions"][0]} and {shirt[1]["captions"][1]}"' in out
        ranked = gallery
    else:
        assert f'text "{shirt[0]["captions"][1]}"' in out  # the second query: one caption
        ranked = [i for i in gallery if i != q['source_img_id']]
    lines = ranked_lines(out)
    assert len(lines) == len(ranked) == (14 if protocol == 'split' else len(
        {name for t in shirt for name in (t['candidate'], t['target'])}) - 1)
    expected = straightforward_ranking(model, testset, q['source_img_id'], q['mod']['str'], ranked)
    assert_same_ranking(lines, expected, testset)
    assert (q['source_caption'] in [line.caption for line in lines]) == (protocol == 'split')
    assert [line.caption for line in lines if line.target] == [q['target_caption']]


def test_a_val_protocol_checkpoint_is_ranked_by_its_protocol(fiq, capsys, tmp_path):
    root, _, _, _ = fiq
    trainset = fashioniq.FashionIQ(root, 'train', datasets.photo_transform(), categories=['toptee'],
                                   protocol='val')
    ckpt = str(tmp_path / 'val.pth')
    save_tirg_checkpoint(ckpt, 'fashioniq', root, trainset, fiq_category='toptee', fiq_protocol='val')
    code, out, err = run_retrieve([f'--checkpoint={ckpt}', '--query_index=3', '--topk=100',
                                   '--loader_num_workers=0', '--no_cache'], capsys)
    assert code == 0, err
    toptee = fiq_layout()['toptee']['val']
    assert f'test query 3 of the test split (toptee)' in out and f'text "{toptee[1]["captions"][1]}"' in out
    names = {name for t in toptee for name in (t['candidate'], t['target'])}
    assert len(ranked_lines(out)) == len(names) - 1
    assert toptee[1]['candidate'] not in [line.caption for line in ranked_lines(out)]


@pytest.mark.slow
def test_a_fashioniq_gallery_file_as_query_is_kept_and_the_cache_is_per_protocol(fiq, capsys, tmp_path):
    root, ckpt, model, testset = fiq
    source = testset.name_to_id['dress_v7']
    args = [f'--checkpoint={ckpt}', f'--query_img={testset.image_file(source)}',
            '--query_text=make it longer', '--topk=500', '--loader_num_workers=0',
            f'--cache_dir={tmp_path}']
    code, out, err = run_retrieve(args, capsys)
    assert code == 0, err
    assert 'kept in the results, as in the FashionIQ split protocol' in err
    lines = ranked_lines(out)
    assert len(lines) == len(testset.imgs)  # a file query ranks every image of the split
    assert 'dress_v7' in [line.caption for line in lines]
    expected = straightforward_ranking(model, testset, source, 'make it longer', range(len(testset.imgs)))
    assert_same_ranking(lines, expected, testset)
    code, _, err = run_retrieve(args, capsys)
    assert code == 0 and '(cached)' in err
    code, _, err = run_retrieve(args + ['--fiq_protocol=val'], capsys)
    assert code == 0 and 'Computing gallery features' in err
    code, _, err = run_retrieve(args, capsys)
    assert code == 0 and '(cached)' in err
    caches = glob.glob(os.path.join(str(tmp_path), 'gallery_fashioniq_test_*.pt'))
    assert len(caches) == 2  # one per protocol: neither overwrites the other


def test_test1_is_only_a_cirr_split(fiq, capsys):
    code, _, err = run_retrieve([f'--checkpoint={fiq[1]}', '--query_index=0', '--split=test1'], capsys)
    assert code == 1
    assert err.strip() == 'retrieve.py: error: --split=test1: only CIRR has a test1 split (the ' \
                          'dataset here is fashioniq)'


@pytest.fixture(scope='module')
def cirr_tree(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('cirr')
    root = str(tmp / 'cirr')
    write_cirr(root, cirr_layout())
    transform = datasets.photo_transform()
    ckpt = str(tmp / 'cirr.pth')
    model = save_tirg_checkpoint(ckpt, 'cirr', root, cirr.CIRR(root, 'train', transform))
    return root, ckpt, model


@pytest.mark.slow
@pytest.mark.parametrize('split', ['test', 'test1'])
def test_a_cirr_query_leaves_its_reference_out_and_ranks_its_image_set(cirr_tree, capsys, split):
    root, ckpt, model = cirr_tree
    dataset = cirr.CIRR(root, split, datasets.photo_transform())
    n = 3  # its image set leaves the reference out already: 6 members to rank
    q = dataset.get_test_queries()[n]
    code, out, err = run_retrieve([f'--checkpoint={ckpt}', f'--query_index={n}', '--topk=100',
                                   f'--split={split}', '--loader_num_workers=0'], capsys)
    assert code == 0, err
    assert f'(pairid {q["pairid"]})' in out
    lines = ranked_lines(out.split('Within its image set')[0])
    others = [i for i in range(len(dataset.imgs)) if i != q['source_img_id']]
    expected = straightforward_ranking(model, dataset, q['source_img_id'], q['mod']['str'], others)
    assert_same_ranking(lines, expected, dataset)
    assert len(lines) == len(dataset.imgs) - 1
    assert sum(line.target for line in lines) == (1 if split == 'test' else 0)

    (subset_line,) = [line for line in out.splitlines() if line.startswith('Within its image set')]
    subset = straightforward_ranking(model, dataset, q['source_img_id'], q['mod']['str'], q['subset_ids'])
    shown = subset_line.split(': ', 1)[1].split(', ')
    assert len(shown) == len(q['subset_ids']) == 6
    assert [item.split()[0] for item in shown] == [dataset.imgs[idx]['captions'][0] for _, idx in subset]
    assert [float(item.split()[1]) for item in shown] == pytest.approx([s for s, _ in subset], abs=1e-4)
