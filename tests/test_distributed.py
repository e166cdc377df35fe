"""Several processes (SPEC 9): the loss over the gathered global batch gives the single-process
gradient, and sharded feature extraction gives the single-process features in the same order.
One torchrun launch of 2 gloo processes (tests/distributed_checks.py) runs every check there; this
process computes the same things without a process group and compares."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

import distributed
import distributed_checks as checks

# A torchrun of 2 processes (the module-scoped fixture) for all of them: one worker under
# pytest-xdist builds it once; the quick tier leaves the module out.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('test_distributed')]

WORLD = 2
LOSSES = {'soft_triplet': True, 'batch_based_classification': False}


@pytest.fixture(scope='module')
def per_process(tmp_path_factory):
    """What each of the 2 processes computed, rank 0 first."""
    out = tmp_path_factory.mktemp('ranks')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
               f'--nproc_per_node={WORLD}', os.path.join(REPO, 'tests', 'distributed_checks.py'),
               str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f'rank{r}.pt', weights_only=False) for r in range(WORLD)]


def single_process(soft_triplet):
    model, query_imgs, texts, target_imgs = checks.tiny_model_and_batch()
    torch.manual_seed(checks.TRIPLET_SEED)
    return checks.loss_and_gradients(model, model, query_imgs, texts, target_imgs, soft_triplet)


def test_every_process_sees_the_global_batch(per_process):
    assert [r['world_size'] for r in per_process] == [WORLD, WORLD]
    for name, soft_triplet in LOSSES.items():
        expected = single_process(soft_triplet)['loss']
        for r in per_process:
            assert torch.allclose(r[name]['loss'], expected, rtol=1e-6), name


@pytest.mark.parametrize('name', LOSSES)
def test_feature_gradients_after_averaging_equal_the_single_process_ones(per_process, name):
    # all_gather's backward sums the same loss's gradient from each process onto the local rows
    # (WORLD times dL/dx); DistributedDataParallel then divides by WORLD.
    expected = single_process(LOSSES[name])
    for features in ('query_grad', 'target_grad'):
        gathered = torch.cat([r[name][features] for r in per_process]) / WORLD
        assert gathered.shape == expected[features].shape
        assert torch.allclose(gathered, expected[features], rtol=1e-5, atol=1e-7), features


@pytest.mark.parametrize('name', LOSSES)
def test_parameter_gradients_under_ddp_equal_the_single_process_ones(per_process, name):
    expected = single_process(LOSSES[name])['param_grads']
    for r in per_process:
        grads = r[name]['param_grads']
        assert grads.keys() == expected.keys()
        for param, grad in expected.items():
            assert torch.allclose(grads[param], grad, rtol=1e-5, atol=1e-7), (name, param)


def test_a_batch_that_does_not_divide_by_the_processes_gives_the_single_process_gradient(per_process):
    """A batch fitted to a small training set: 5 rows as 2 + 3 (sampling.fit_batch_size)."""
    model, query_imgs, texts, target_imgs = checks.tiny_model_and_batch()
    rows = slice(0, checks.UNEVEN_BATCH)
    torch.manual_seed(checks.TRIPLET_SEED)
    expected = checks.loss_and_gradients(model, model, query_imgs[rows], texts[rows],
                                         target_imgs[rows], True)
    assert [len(r['uneven']['query_grad']) for r in per_process] == [2, 3]
    gathered = torch.cat([r['uneven']['query_grad'] for r in per_process]) / WORLD
    assert torch.allclose(gathered, expected['query_grad'], rtol=1e-5, atol=1e-7)
    for r in per_process:
        assert torch.allclose(r['uneven']['loss'], expected['loss'], rtol=1e-6)
        for param, grad in expected['param_grads'].items():
            assert torch.allclose(r['uneven']['param_grads'][param], grad, rtol=1e-5, atol=1e-7), param


def test_dropout_masks_differ_between_processes(per_process):
    """SPEC 9 (experiment.seed_process): each slice of the batch is a different sample, so each
    process's dropout masks are its own (torch seeded with seed + rank); the first process's are
    those of one process."""
    import argparse
    import experiment
    first, second = (r['dropout_kept'] for r in per_process)
    assert 400 < int(first.sum()) < 600 and 400 < int(second.sum()) < 600
    assert (first != second).sum() > 300  # independent masks disagree on about half the units
    experiment.seed_process(argparse.Namespace(seed=5), 0)
    assert torch.equal(first, checks.dropout_kept())


def test_sharded_features_equal_single_process_features_in_order(per_process):
    model = checks.tiny_model_and_batch()[0].eval()
    expected = checks.features_of(model)
    for r in per_process:
        for name in ('query', 'gallery', 'one'):
            assert r['features'][name].shape == expected[name].shape, name
            assert torch.allclose(r['features'][name], expected[name], rtol=1e-6, atol=1e-7), name


def test_each_process_reads_only_its_contiguous_share(per_process):
    first, second = (r['features'] for r in per_process)
    assert first['read_for_gallery'] == [0, 1, 2] and second['read_for_gallery'] == [3, 4, 5, 6]
    # Queries (source images 6, 2, 4): one for the first process, two for the second.
    assert first['read_for_queries'] == [6] and second['read_for_queries'] == [2, 4]


def test_without_a_process_group_everything_is_local():
    assert not distributed.is_initialized()
    assert distributed.shard_range(7) == range(7)
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x and distributed.gather_rows(x) is x


@pytest.mark.parametrize('n', [0, 1, 7, 8])
def test_shards_cover_every_item_once_in_order_and_evenly(monkeypatch, n):
    shards = []
    monkeypatch.setattr(distributed, 'world_size', lambda: 3)
    for r in range(3):
        monkeypatch.setattr(distributed, 'rank', lambda r=r: r)
        shards.append(list(distributed.shard_range(n)))
    assert sum(shards, []) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # no process waits on a long share
