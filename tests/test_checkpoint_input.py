"""Checkpoints are input (issue 23 items 9 and 10): a checkpoint's index buffers are checked
before any run folder exists, and an explicit --model, --embed_dim or --img_backbone that
contradicts what the checkpoint records is refused naming both values."""
import argparse
import os

import pytest
import torch

from conftest import run_main, write_css_fixture
from test_mitstates import write_mitstates_fixture
from test_retrieve import ranked_lines

import datasets
import img_text_composition_models
import model_registry
import paper_composers
import retrieve

E = 8


def save(path, model, model_name, dataset, root, **options):
    opt = argparse.Namespace(model=model_name, embed_dim=E, dataset=dataset, dataset_path=root,
                             **options)
    torch.save({'it': 5, 'opt': opt, 'model_state_dict': model.state_dict(),
                'vocab': model.text_model.vocab.words()}, path)


def one_line(result, expected):
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr)
    assert result.stderr.strip().splitlines() == [f'main.py: error: {expected}'], result.stderr


@pytest.fixture(scope='module')
def css(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('data') / 'css')
    write_css_fixture(root, num_scenes=4)
    return root


@pytest.fixture(scope='module')
def mitstates(tmp_path_factory):
    return write_mitstates_fixture(str(tmp_path_factory.mktemp('data') / 'mitstates'))


# ---------------------------------------------------------------------------------------------
# Item 10: index buffers out of range

def param_hashing_file(tmp_path, root, entry, value):
    torch.manual_seed(0)
    model = paper_composers.ParamHashing(datasets.CSSDataset(root, 'train').get_all_texts(), E,
                                         pretrained=False)
    buffer, where = entry
    getattr(model, buffer)[where] = value
    path = str(tmp_path / 'crafted.pth')
    save(path, model, 'param_hashing', 'css3d', root)
    return path


@pytest.mark.parametrize('entry, value, expected', [
    (('hash_index', (3, 5)), 4096,
     'its buffer hash_index holds 4096 at [3, 5], outside 0..4095 (one of the 4096 candidate weights)'),
    # Python's indexing would read -1 as the last candidate, silently.
    (('hash_index', (7, 0)), -1,
     'its buffer hash_index holds -1 at [7, 0], outside 0..4095 (one of the 4096 candidate weights)'),
    (('hash_sign', (2, 6)), 0.5, 'its buffer hash_sign holds 0.5 at [2, 6], expected -1 or 1'),
])
@pytest.mark.parametrize('how', ['test_only', 'train_from'])
def test_a_crafted_param_hashing_buffer_is_one_line_and_no_run_folder(tmp_path, css, entry, value,
                                                                      expected, how):
    path = param_hashing_file(tmp_path, css, entry, value)
    flags = ['--test_only'] if how == 'test_only' else ['--num_iters=2', '--batch_size=4']
    result = run_main(flags + [f'--checkpoint={path}', '--loader_num_workers=0'], cwd=tmp_path)
    one_line(result, f'{path}: {expected}')
    assert not os.path.exists(tmp_path / 'runs')


def test_retrieve_refuses_a_crafted_hash_index_in_one_line(tmp_path, css, capsys):
    path = param_hashing_file(tmp_path, css, ('hash_index', (0, 1)), 10 ** 6)
    code = retrieve.main_cli([f'--checkpoint={path}', '--query_index=0', '--no_cache',
                              '--loader_num_workers=0'])
    out, err = capsys.readouterr()
    assert code == 1 and out == ''
    assert err.splitlines()[-1] == (f'retrieve.py: error: {path}: its buffer hash_index holds '
                                    f'1000000 at [0, 1], outside 0..4095 (one of the 4096 '
                                    f'candidate weights)')


def attribute_operator_file(tmp_path, root, value_for_count):
    texts = datasets.MITStates(root, 'train').get_all_texts()
    model = paper_composers.AttributeOperator(texts, E, pretrained=False)
    word = model.text_model.vocab.word2id['sliced']
    count = model.operators.shape[0]
    model.operator_index[word] = value_for_count(count)
    path = str(tmp_path / 'operators.pth')
    save(path, model, 'attribute_operator', 'mitstates', root)
    return path, word, count


@pytest.mark.parametrize('value_for_count', [lambda count: count, lambda count: -2],
                         ids=['one past the last operator', 'below none'])
def test_a_crafted_operator_index_is_one_line_and_no_run_folder(tmp_path, mitstates,
                                                                value_for_count):
    path, word, count = attribute_operator_file(tmp_path, mitstates, value_for_count)
    assert count == 7  # the fixture's training adjectives
    result = run_main(['--test_only', f'--checkpoint={path}', '--loader_num_workers=0'],
                      cwd=tmp_path)
    one_line(result, f'{path}: its buffer operator_index holds {value_for_count(count)} at '
                     f'[{word}], outside -1..{count - 1} (-1 for none or one of the {count} '
                     f'operators)')
    assert not os.path.exists(tmp_path / 'runs')


@pytest.mark.parametrize('name', list(model_registry.MODELS))
def test_every_model_s_own_state_dict_is_in_range(name):
    model = model_registry.MODELS[name](['a red', 'b blue'], E, pretrained=False)
    assert model.state_dict_out_of_range(model.state_dict()) is None


# ---------------------------------------------------------------------------------------------
# Item 9: --model, --embed_dim and --img_backbone given against what the checkpoint records

def imgonly_file(tmp_path, root, **options):
    """An image-only checkpoint: show_and_tell's state dict has the very same keys and shapes."""
    torch.manual_seed(0)
    model = img_text_composition_models.SimpleModelImageOnly(datasets.CSSDataset(root, 'train').get_all_texts(), E,
                                      pretrained=False)
    path = str(tmp_path / 'imgonly.pth')
    save(path, model, 'imgonly', 'css3d', root, **options)
    return path


def test_imgonly_and_show_and_tell_state_dicts_are_interchangeable():
    """Why a layout check cannot tell them apart."""
    texts = ['make it red', 'make it blue']
    imgonly = img_text_composition_models.SimpleModelImageOnly(texts, E, pretrained=False).state_dict()
    show_and_tell = paper_composers.ShowAndTell(texts, E, pretrained=False).state_dict()
    assert {k: v.shape for k, v in imgonly.items()} == {k: v.shape for k, v in show_and_tell.items()}


CONTRADICTIONS = [
    ('--model=show_and_tell', 'model', 'show_and_tell', 'imgonly'),
    ('--embed_dim=16', 'embed_dim', 16, E),
    ('--img_backbone=resnet50', 'img_backbone', 'resnet50', 'resnet18'),
]


@pytest.mark.parametrize('flag, name, given, recorded', CONTRADICTIONS)
def test_retrieve_refuses_a_flag_that_contradicts_the_checkpoint(tmp_path, css, capsys, flag,
                                                                 name, given, recorded):
    path = imgonly_file(tmp_path, css, img_backbone='resnet18')
    code = retrieve.main_cli([f'--checkpoint={path}', flag, '--query_index=0', '--no_cache',
                              '--loader_num_workers=0'])
    out, err = capsys.readouterr()
    assert code == 1 and out == ''
    assert err == (f'retrieve.py: error: --{name}={given}: {path} records --{name}={recorded}; '
                   f'leave --{name} out to use the checkpoint\'s\n')


def test_retrieve_takes_flags_that_agree_or_that_the_checkpoint_does_not_record(tmp_path, css,
                                                                                capsys):
    path = imgonly_file(tmp_path, css)  # records no backbone, as the released checkpoints
    code = retrieve.main_cli([f'--checkpoint={path}', '--model=imgonly', f'--embed_dim={E}',
                              '--img_backbone=resnet18', '--query_index=0', '--topk=2',
                              '--no_cache', '--loader_num_workers=0'])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [m.rank for m in ranked_lines(out)] == [1, 2]


@pytest.mark.parametrize('flag, name, given, recorded', CONTRADICTIONS)
@pytest.mark.parametrize('how', ['test_only', 'train_from'])
def test_main_refuses_a_flag_that_contradicts_the_checkpoint_before_any_run_folder(
        tmp_path, css, flag, name, given, recorded, how):
    path = imgonly_file(tmp_path, css, img_backbone='resnet18')
    flags = ['--test_only'] if how == 'test_only' else ['--num_iters=2', '--batch_size=4']
    result = run_main(flags + [f'--checkpoint={path}', flag, '--loader_num_workers=0'],
                      cwd=tmp_path)
    one_line(result, f'--{name}={given}: {path} records --{name}={recorded}; leave --{name} out '
                     f'to use the checkpoint\'s')
    assert not os.path.exists(tmp_path / 'runs')


def test_main_takes_flags_that_agree_or_that_the_checkpoint_does_not_record(tmp_path, css):
    path = imgonly_file(tmp_path, css)  # records no backbone, as the released checkpoints
    result = run_main(['--test_only', f'--checkpoint={path}', '--model=imgonly', f'--embed_dim={E}',
                       '--img_backbone=resnet18', '--loader_num_workers=0', '--comment=_told'],
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'test recall_top1_correct_composition' in result.stdout
