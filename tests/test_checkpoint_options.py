"""A checkpoint is input too (issue 18, item 5): its stored options are checked exactly as the
same flags on the command line, and its vocabulary, random state and counters by type, all before
any run folder exists, for --resume, --checkpoint/--test_only and retrieve.py."""
import argparse
import os

import pytest
import torch

from conftest import TINY, run_main, write_css_fixture

import main
import retrieve

# pytest-xdist: one worker runs them all, building the module-scoped trained checkpoint once.
pytestmark = pytest.mark.xdist_group('test_checkpoint_options')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A real checkpoint of 2 iterations (one run for the module): (dataset root, checkpoint)."""
    work = tmp_path_factory.mktemp('trained')
    root = str(work / 'css')
    write_css_fixture(root, num_scenes=4)
    result = run_main(TINY + [f'--dataset_path={root}', '--num_iters=2', '--comment=_src'], cwd=work)
    assert result.returncode == 0, result.stderr
    (run_dir,) = os.listdir(work / 'runs')
    return root, torch.load(work / 'runs' / run_dir / 'latest_checkpoint.pth', weights_only=False)


def small(ckpt):
    """Its options, counters and random state, without the 45 MB of weights (refused before
    they would be read): the cases stay fast."""
    return {**ckpt, 'model_state_dict': {'w': torch.zeros(1)},
            'optimizer_state_dict': {'state': {}, 'param_groups': []}}


def with_options(ckpt, **options):
    opt = argparse.Namespace(**{**vars(ckpt['opt']), **options})
    return {**ckpt, 'opt': opt}


def with_rng(ckpt, part, value):
    return {**ckpt, 'rng': {**ckpt['rng'], part: value}}


CASES = {
    'unknown model': (lambda c: with_options(c, model='tirg_v9'),
                      "argument --model: invalid choice: 'tirg_v9'"),
    'unknown dataset': (lambda c: with_options(c, dataset='imagenet'),
                        "argument --dataset: invalid choice: 'imagenet'"),
    'text embed_dim': (lambda c: with_options(c, embed_dim='16'),
                       "--embed_dim='16': a str, expected an integer"),
    'float embed_dim': (lambda c: with_options(c, embed_dim=16.5),
                        "argument --embed_dim: invalid int value: '16.5'"),
    'batch_size 0': (lambda c: with_options(c, batch_size=0), '--batch_size=0: expected a positive integer'),
    'learning rate beyond float32': (lambda c: with_options(c, learning_rate=1e39),
                                     '--learning_rate=1e+39: expected a number from 0'),
    'integer for a boolean flag': (lambda c: with_options(c, amp=1), '--amp=1: expected True or False'),
    'list for a text flag': (lambda c: with_options(c, loss=['soft_triplet']),
                             "--loss=['soft_triplet']: a list, not a value a flag can take"),
    'comment with a slash': (lambda c: with_options(c, comment='a/b'), '--comment=a/b: it ends'),
    'options not a Namespace': (lambda c: {**c, 'opt': {'model': 'tirg'}},
                                'its options ("opt") are a dict, not an argparse Namespace'),
    'integer vocabulary': (lambda c: {**c, 'vocab': 5}, '"vocab" is not a list of words (a int)'),
    'vocabulary of numbers': (lambda c: {**c, 'vocab': [1, 2]}, '"vocab" is not a list of words'),
    'negative it': (lambda c: {**c, 'it': -3}, '"it" is not an iteration number'),
}
RESUME_CASES = {
    'text epoch': (lambda c: {**c, 'epoch': '0'}, '"epoch" is missing or not an integer of -1 or more'),
    'python random state': (lambda c: with_rng(c, 'python', (3, (1, 2), None)),
                            'its random state is malformed'),
    'numpy random state': (lambda c: with_rng(c, 'numpy', {**c['rng']['numpy'], 'keys': torch.zeros(3, dtype=torch.int64)}),
                           'its random state is malformed'),
    'torch random state': (lambda c: with_rng(c, 'torch', 'seed'), 'its random state is malformed'),
}


def check_refused(result, path, fragment, cwd):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert 'Traceback' not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f'main.py: error: {path}: ') and fragment in line, line
    assert not os.path.exists(os.path.join(cwd, 'runs'))


@pytest.mark.parametrize('case', sorted(CASES) + sorted(RESUME_CASES))
def test_a_bad_checkpoint_is_refused_in_one_line_before_any_folder(trained, tmp_path, case):
    root, ckpt = trained
    change, fragment = {**CASES, **RESUME_CASES}[case]
    path = str(tmp_path / 'crafted.pth')
    torch.save(change(small(ckpt)), path)
    result = run_main(TINY + [f'--dataset_path={root}', f'--resume={path}', '--num_iters=4'], cwd=tmp_path)
    check_refused(result, path, fragment, tmp_path)
    if case in CASES:
        result = run_main(['--test_only', f'--checkpoint={path}', f'--dataset_path={root}',
                           '--loader_num_workers=0'], cwd=tmp_path)
        check_refused(result, path, fragment, tmp_path)


@pytest.mark.parametrize('case', ['unknown model', 'text embed_dim', 'integer vocabulary'])
def test_retrieve_checks_the_checkpoint_the_same_way(trained, tmp_path, capsys, case):
    root, ckpt = trained
    change, fragment = CASES[case]
    path = str(tmp_path / 'crafted.pth')
    torch.save(change(small(ckpt)), path)
    code = retrieve.main_cli([f'--checkpoint={path}', f'--dataset_path={root}', '--query_index=0',
                              '--loader_num_workers=0', f'--cache_dir={tmp_path / "cache"}'])
    err = capsys.readouterr().err
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith(f'retrieve.py: error: {path}: ') and fragment in line, line


def test_the_checkpoints_of_real_runs_pass(trained, tmp_path):
    root, ckpt = trained
    path = str(tmp_path / 'copy.pth')
    torch.save(ckpt, path)
    assert main.load_checkpoint(path)['it'] == 2
    # A released checkpoint's options: the subset the 2019 code stored.
    released = argparse.Namespace(f='', comment='released', dataset='css3d', dataset_path='/data/css',
                                  model='tirg', embed_dim=512, learning_rate=0.01,
                                  learning_rate_decay_frequency=9999999, batch_size=32,
                                  weight_decay=1e-6, num_iters=160000, loss='soft_triplet',
                                  loader_num_workers=4)
    main.check_checkpoint_options({'opt': released}, path)
