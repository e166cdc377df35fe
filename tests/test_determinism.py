"""SPEC 9: the global batch's contents are a function of the seed, the epoch and each example's
position, never of a process's or a loader worker's stream (issue 17.2); dropout differs between
processes; the sampler's slices make up the single-process batch (issue 17.4)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_main

import checkpoints
import datasets
import sampling

FLAGS = ['--dataset=css3d', '--batch_size=8', '--embed_dim=16', '--img_weights=none', '--seed=3',
         '--comment=_det']


def sampler_batches(world_size, batch_size=8, size=37, epoch=2, start_batch=0):
    """Every process's batches, joined in rank order per iteration."""
    joined = None
    for rank in range(world_size):
        sampler = sampling.EpochBatchSampler(size, batch_size, seed=5, rank=rank, world_size=world_size)
        sampler.set_epoch(epoch, start_batch)
        batches = list(sampler)
        joined = batches if joined is None else [a + b for a, b in zip(joined, batches)]
    return joined


@pytest.mark.parametrize('world_size', [2, 4, 8])
def test_slices_joined_in_rank_order_are_the_single_process_batch(world_size):
    single = sampler_batches(1)
    assert len(single) == 4 and all(len(b) == 8 for b in single)
    assert sampler_batches(world_size) == single
    assert sampler_batches(world_size, start_batch=3) == single[3:]
    # The keys name the global positions, and pairs their first position's index.
    flat = [key for batch in single for key in batch]
    assert [k.position for k in flat] == list(range(32))
    assert len({k.index for k in flat}) == 32
    assert all(k.pair_index == flat[k.position - k.position % 2].index for k in flat)
    assert {(k.seed, k.epoch) for k in flat} == {(5, 2)}


def read_records(path, ranks=1):
    """{iteration: what the global batch held}, the processes' slices joined in rank order."""
    per_rank = []
    for rank in range(ranks):
        with open(f'{path}.rank{rank}') as f:
            per_rank.append([json.loads(line) for line in f])
    records = {}
    for lines in zip(*per_rank):
        assert len({line['it'] for line in lines}) == 1
        records[lines[0]['it']] = {key: sum((line[key] for line in lines), [])
                                   for key in ('source', 'target', 'mod', 'pixels')}
    return records


def recorded_run(tmp_path, monkeypatch, name, flags):
    path = str(tmp_path / name)
    monkeypatch.setenv(sampling.RECORD_BATCHES_ENV, path)
    result = run_main(FLAGS + flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return path


@pytest.mark.slow
def test_every_iteration_has_the_same_examples_for_any_processes_workers_and_resume(
        css_root, tmp_path, monkeypatch):
    """36 training images, batch 8: 4 iterations an epoch; 6 iterations cross an epoch."""
    flags = [f'--dataset_path={css_root}', '--num_iters=6']
    single = read_records(recorded_run(tmp_path, monkeypatch, 'single', flags + ['--loader_num_workers=0']))
    assert sorted(single) == [1, 2, 3, 4, 5, 6]
    for batch in single.values():
        # CSS's pairs: positions 2k and 2k+1 share the source with two modifications.
        assert batch['source'][0::2] == batch['source'][1::2]
        assert all(a != b for a, b in zip(batch['mod'][0::2], batch['mod'][1::2]))
    assert len({tuple(b['source']) for b in single.values()}) == 6

    # Two loader workers, stopped mid-epoch and resumed (each half its own workers): every
    # iteration as with none, straight.
    resumed_path = recorded_run(tmp_path, monkeypatch, 'resumed',
                                [f'--dataset_path={css_root}', '--num_iters=3', '--loader_num_workers=2'])
    ckpt = str(sorted((tmp_path / 'runs').iterdir())[-1] / 'latest_checkpoint.pth')
    assert checkpoints.load(ckpt)['it'] == 3
    result = run_main(FLAGS + flags + ['--loader_num_workers=2', f'--resume={ckpt}'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_records(resumed_path) == single

    env = dict(os.environ, OMP_NUM_THREADS='1')
    env[sampling.RECORD_BATCHES_ENV] = str(tmp_path / 'torchrun')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                             '--nproc_per_node=2', os.path.join(REPO, 'main.py')] + FLAGS + flags
                            + ['--loader_num_workers=0'], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_records(str(tmp_path / 'torchrun'), ranks=2) == single


# --- Each dataset's draw is a function of (seed, epoch, position) ----------------------------

def epoch_keys(size, seed, epoch, batch_size=4):
    sampler = sampling.EpochBatchSampler(size, batch_size, seed)
    sampler.set_epoch(epoch)
    return [key for batch in sampler for key in batch]


def drawn(make_dataset, keys, order=None):
    """(source, target, text) of each key, drawn by a fresh dataset in `order`, after the global
    generators were put in a state of their own: only the key may decide."""
    import random
    import numpy as np
    dataset = make_dataset()
    dataset.get_img = lambda idx, *args, **kwargs: None  # the draws, not the pixels
    random.seed(len(keys) + (0 if order is None else order[0]))
    np.random.seed(len(keys) + (0 if order is None else order[0]))
    order = range(len(keys)) if order is None else order
    found = {}
    for i in order:
        e = dataset[keys[i]]
        found[i] = (e['source_img_id'], e['target_img_id'], e['mod']['str'])
    return [found[i] for i in range(len(keys))]


def assert_keyed(make_dataset, size):
    keys = epoch_keys(size, seed=4, epoch=1)
    expected = drawn(make_dataset, keys)
    # Any order, any split between loaders (odd positions alone: a pair split across processes).
    assert drawn(make_dataset, keys, order=list(reversed(range(len(keys))))) == expected
    odd = list(range(1, len(keys), 2))
    assert drawn(make_dataset, keys, order=odd + list(range(0, len(keys), 2))) == expected
    # The same index at the same position with another epoch or seed: other draws.
    for seed, epoch in ((4, 2), (5, 1)):
        other = [k._replace(seed=seed, epoch=epoch) for k in keys]
        assert drawn(make_dataset, other) != expected
    return keys, expected


def test_fashion200k_draws_depend_only_on_the_key(tmp_path):
    from test_fashion200k import write_fashion_fixture
    root = write_fashion_fixture(str(tmp_path / 'f200k'))
    make = lambda: datasets.Fashion200k(root, 'train')
    size = len(make())
    keys, expected = assert_keyed(make, 4 * size)
    ds = make()
    for key, (source, target, _) in zip(keys, expected):
        if ds.imgs[key.index % size]['modifiable']:
            assert source == key.index % size  # the position's image is the source
        assert ds.imgs[target]['captions'] != ds.imgs[source]['captions']
    assert len(set(expected)) > len(expected) // 3


def test_mitstates_pairs_are_keyed_by_position(tmp_path):
    from test_mitstates import write_mitstates_fixture
    root = write_mitstates_fixture(str(tmp_path / 'mit'))
    make = lambda: datasets.MITStates(root, 'train')
    ds = make()
    keys, expected = assert_keyed(make, 4 * len(ds))
    for k in range(0, len(keys), 2):
        (source, target1, adj1), (source2, target2, adj2) = expected[k], expected[k + 1]
        assert source == source2 == keys[k].index % len(ds)  # the pair's first index
        assert adj1 != adj2
        assert ds.imgs[target1]['noun'] == ds.imgs[target2]['noun'] == ds.imgs[source]['noun']


def test_fashioniq_caption_order_is_keyed_by_position(tmp_path):
    import fashioniq
    from fiq_cirr_fixtures import fiq_layout, write_fiq
    write_fiq(str(tmp_path / 'fiq'), fiq_layout())
    make = lambda: fashioniq.FashionIQ(str(tmp_path / 'fiq'), 'train', datasets.photo_transform())
    ds = make()
    keys, expected = assert_keyed(make, 3 * ds.num_training_examples())
    orders = []
    for key, (source, target, text) in zip(keys, expected):
        t = ds.triplets[key.index % len(ds.triplets)]
        assert (source, target) == (ds.name_to_id[t['candidate']], ds.name_to_id[t['target']])
        first, second = t['captions']
        assert text in (f'{first} and {second}', f'{second} and {first}')
        orders.append(text == f'{first} and {second}')
    assert 0.25 < sum(orders) / len(orders) < 0.75  # both orders, about half each


def torchrun_main(args, cwd, record):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env[sampling.RECORD_BATCHES_ENV] = record
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           '--nproc_per_node=2', os.path.join(REPO, 'main.py')] + list(args),
                          cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_a_fitted_batch_is_the_same_with_two_processes_and_resumes_from_the_users_value(
        tmp_path, monkeypatch):
    """Issue 18.9 and 17.2: 9 training images, --batch_size=32: one batch of all 9 an epoch
    for any number of processes (slices of 4 and 5 under 2); a run of one process resumes under
    torchrun with the original command, fitting the user's 32 again."""
    from conftest import write_css_fixture
    root = str(tmp_path / 'css9')
    write_css_fixture(root, num_scenes=3)
    command = [f'--dataset_path={root}', '--batch_size=32', '--loader_num_workers=0']
    straight = read_records(recorded_run(tmp_path, monkeypatch, 'straight', command + ['--num_iters=4']))
    assert all(len(batch['source']) == 9 for batch in straight.values())

    monkeypatch.setenv(sampling.RECORD_BATCHES_ENV, str(tmp_path / 'first'))
    result = run_main(FLAGS + command + ['--num_iters=2', '--comment=_fit'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'using --batch_size=9' in result.stdout
    (run_dir,) = (tmp_path / 'runs').glob('*_fit')
    path = str(run_dir / 'latest_checkpoint.pth')
    saved = checkpoints.load(path)['opt']
    assert (saved.batch_size, saved.requested_batch_size) == (9, 32)

    resumed = torchrun_main(FLAGS + command + ['--num_iters=4', '--comment=_fit', f'--resume={path}'],
                            tmp_path, str(tmp_path / 'resumed'))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'batch_size=9:' not in resumed.stderr  # never a value the user did not give
    assert '--batch_size=32 is larger than the 9 training examples' in resumed.stdout
    slices = [[json.loads(line) for line in open(tmp_path / f'resumed.rank{r}')] for r in (0, 1)]
    assert [len(lines[0]['source']) for lines in slices] == [4, 5]
    assert read_records(str(tmp_path / 'resumed'), ranks=2) == {it: straight[it] for it in (3, 4)}
    ckpt = checkpoints.load(path)
    assert ckpt['it'] == 4 and (ckpt['opt'].batch_size, ckpt['opt'].requested_batch_size) == (9, 32)


def test_redraws_after_an_unreadable_image_are_keyed_and_keep_a_pair_together(tmp_path, capsys):
    """MIT-States with image 0 truncated: the redrawn examples are the same in any order, and a
    pair whose source was unreadable moves to one fresh source for both its positions."""
    from test_mitstates import write_mitstates_fixture
    root = write_mitstates_fixture(str(tmp_path / 'mit'))
    make = lambda: datasets.MITStates(root, 'train')
    bad = make().imgs[0]['file_path']
    with open(bad, 'rb') as f:
        data = f.read()
    with open(bad, 'wb') as f:
        f.write(data[:len(data) // 2])
    keys = epoch_keys(4 * len(make()), seed=4, epoch=1)

    def draw(order):
        dataset, found = make(), {}
        for i in order:
            e = dataset[keys[i]]
            found[i] = (e['source_img_id'], e['target_img_id'])
        return [found[i] for i in range(len(keys))]

    forward = draw(range(len(keys)))
    assert draw(reversed(range(len(keys)))) == forward
    assert all(0 not in ids for ids in forward)
    redrawn = [k for k in range(0, len(keys), 2) if keys[k].pair_index == 0]
    assert redrawn
    for k in redrawn:
        assert forward[k][0] == forward[k + 1][0] != 0
    assert bad in capsys.readouterr().err
