"""FashionIQ and CIRR through main.py as a user runs them (issue 11): training saves and prints
SPEC 2.4 / 2.5's metric names, --test_only writes test_results.json with them under each
FashionIQ protocol, and CIRR's test1 run writes the evaluation server's two files."""
import argparse
import glob
import json
import os

import pytest
import torch

from conftest import small_photos
from fiq_cirr_fixtures import cirr_layout, fiq_layout, write_cirr, write_fiq

import fashioniq
import main

SMALL = ['--batch_size=4', '--embed_dim=16', '--loader_num_workers=0', '--img_weights=none', '--seed=0']
FIQ_NAMES = ([f'recall_top{k}_{c}' for c in fashioniq.CATEGORIES for k in (10, 50)]
             + ['recall_top10_mean', 'recall_top50_mean', 'recall_mean'])
CIRR_NAMES = ([f'recall_top{k}' for k in (1, 5, 10, 50)]
              + [f'recall_subset_top{k}' for k in (1, 2, 3)] + ['recall_avg'])


def only_run_folder(cwd, comment):
    found = glob.glob(os.path.join(str(cwd), 'runs', f'*{comment}'))
    assert len(found) == 1, found
    return found[0]


def results_of(run_dir):
    """test_results.json with the metrics' split prefix ('test ', as in metrics.jsonl) checked
    and dropped."""
    with open(os.path.join(run_dir, 'test_results.json')) as f:
        results = json.load(f)
    assert all(name.startswith('test ') for name in results['metrics']), results['metrics']
    results['metrics'] = {name[len('test '):]: value for name, value in results['metrics'].items()}
    return results


def run_main(args, capsys):
    """main.py in this process (the working folder is the test's): its exit code and output."""
    code = main.main(args)
    out, err = capsys.readouterr()
    return argparse.Namespace(returncode=code, stdout=out, stderr=err)


@pytest.fixture(autouse=True)
def in_tmp_path_with_small_photos(tmp_path, monkeypatch):
    """Photos at 64 px (conftest.small_photos): what is tested here is the protocols and files."""
    monkeypatch.chdir(tmp_path)
    with small_photos():
        yield


def train(tmp_path, capsys, dataset, root, comment):
    result = run_main(SMALL + [f'--dataset={dataset}', f'--dataset_path={root}', '--num_iters=6',
                               f'--comment={comment}'], capsys)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run_dir = only_run_folder(tmp_path, comment)
    ckpt = torch.load(os.path.join(run_dir, 'latest_checkpoint.pth'), weights_only=False)
    assert ckpt['it'] == 6 and ckpt['opt'].dataset == dataset
    assert os.path.isfile(os.path.join(run_dir, 'best_checkpoint.pth'))
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        lines = [json.loads(line) for line in f]
    return result, run_dir, lines


def run_test_only(tmp_path, capsys, checkpoint, comment, *flags):
    result = run_main(SMALL + ['--test_only', f'--checkpoint={checkpoint}', f'--comment={comment}']
                      + list(flags), capsys)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result, only_run_folder(tmp_path, comment)


def printed(stdout, split):
    """{name: value} of the last evaluation's lines '     <split> <name> <value>'."""
    values = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == split:
            values[parts[1]] = float(parts[2])
    return values


@pytest.mark.slow
def test_fashioniq_trains_saves_and_tests_under_both_protocols(tmp_path, capsys):
    root = tmp_path / 'fiq'
    # Dress's split gallery (24 names) is twice its val-protocol gallery (12).
    write_fiq(str(root), fiq_layout(val_sizes={'dress': 24, 'shirt': 14, 'toptee': 14}))
    result, run_dir, lines = train(tmp_path, capsys, 'fashioniq', root, 'fiq_train')
    final = printed(result.stdout, 'test')
    assert list(final) == FIQ_NAMES
    assert lines[-1]['it'] == 6 and {f'test {n}' for n in FIQ_NAMES} <= set(lines[-1])
    assert 'train recall_top1_correct_composition' in lines[-1]

    checkpoint = os.path.join(run_dir, 'latest_checkpoint.pth')
    _, split_dir = run_test_only(tmp_path, capsys, checkpoint, 'fiq_split')
    split = results_of(split_dir)
    assert split['fiq_protocol'] == 'split' and split['fiq_category'] == 'all'
    assert list(split['metrics']) == FIQ_NAMES
    # The training run's final test used the split protocol with the same weights.
    for name, value in final.items():
        assert split['metrics'][name] == pytest.approx(value, abs=1e-4), name

    _, val_dir = run_test_only(tmp_path, capsys, checkpoint, 'fiq_val', '--fiq_protocol=val')
    val = results_of(val_dir)
    assert val['fiq_protocol'] == 'val' and list(val['metrics']) == FIQ_NAMES
    # Galleries of at most 50 images: every target is within the top 50.
    assert val['metrics']['recall_top50_dress'] == split['metrics']['recall_top50_dress'] == 1.0
    assert val['metrics'] != split['metrics']  # a gallery half the size ranks targets higher
    assert val['metrics']['recall_top10_dress'] >= split['metrics']['recall_top10_dress']

    _, dress_dir = run_test_only(tmp_path, capsys, checkpoint, 'fiq_dress', '--fiq_category=dress')
    dress = results_of(dress_dir)
    assert list(dress['metrics']) == ['recall_top10_dress', 'recall_top50_dress',
                                      'recall_top10_mean', 'recall_top50_mean', 'recall_mean']
    assert dress['metrics']['recall_top10_dress'] == split['metrics']['recall_top10_dress']


@pytest.mark.slow
def test_cirr_trains_tests_and_writes_the_test1_submission(tmp_path, capsys):
    root = tmp_path / 'cirr'
    layout = write_cirr(str(root), cirr_layout())
    result, run_dir, lines = train(tmp_path, capsys, 'cirr', root, 'cirr_train')
    final = printed(result.stdout, 'test')
    assert list(final) == CIRR_NAMES
    assert {f'test {n}' for n in CIRR_NAMES} <= set(lines[-1])

    checkpoint = os.path.join(run_dir, 'latest_checkpoint.pth')
    resumed = run_main([f'--resume={checkpoint}', '--num_iters=8'], capsys)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(checkpoint, weights_only=False)['it'] == 8
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        assert [json.loads(line)['it'] for line in f][-2:] == [6, 8]  # resumed in the same folder
    assert only_run_folder(tmp_path, 'cirr_train') == run_dir
    final = printed(resumed.stdout, 'test')  # the weights tested below are those at 8
    assert list(final) == CIRR_NAMES

    _, val_dir = run_test_only(tmp_path, capsys, checkpoint, 'cirr_val')
    val = results_of(val_dir)
    assert val['dataset'] == 'cirr' and list(val['metrics']) == CIRR_NAMES
    for name, value in final.items():
        assert val['metrics'][name] == pytest.approx(value, abs=1e-4), name

    submission, test1_dir = run_test_only(tmp_path, capsys, checkpoint, 'cirr_test1', '--test_split=test1')
    pairids = [str(e['pairid']) for e in layout['test1']['entries']]
    names = set(layout['test1']['images'])
    # The fixture holds a 2-member subset on purpose: its row lists 2 names, the others 3.
    subset_sizes = [len(set(e['img_set']['members']) - {e['reference']})
                    for e in layout['test1']['entries']]
    for file_name, metric, counts in (('cirr_test1_recall.json', 'recall', [50] * len(pairids)),
                                      ('cirr_test1_recall_subset.json', 'recall_subset',
                                       [min(3, size) for size in subset_sizes])):
        path = os.path.join(test1_dir, file_name)
        assert f'Wrote {os.path.relpath(path)}' in submission.stdout.splitlines()
        with open(path) as f:
            content = json.load(f)
        assert content.pop('version') == 'rc2' and content.pop('metric') == metric
        assert list(content) == pairids
        assert [len(ranked) for ranked in content.values()] == counts
        assert all(set(ranked) <= names for ranked in content.values())
