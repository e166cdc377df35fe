"""checkpoints.save_atomic: a failed write (a full disk) keeps the previous file and is an OSError
of one line; files follow the umask; temporary files of killed saves are removed."""
import contextlib
import os
import resource
import signal

import pytest
import torch

import checkpoints


@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past `nbytes` fail with EFBIG, as a full disk fails them with ENOSPC: a real write
    error from the operating system, no mock."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@contextlib.contextmanager
def umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def test_a_failed_write_keeps_the_previous_file_and_is_one_line(tmp_path):
    path = str(tmp_path / 'latest_checkpoint.pth')
    checkpoints.save_atomic({'it': 1, 'w': torch.ones(10)}, path)
    with open(path, 'rb') as f:
        before = f.read()
    with file_size_limit(64 * 1024):
        with pytest.raises(checkpoints.CheckpointWriteError) as info:
            checkpoints.save_atomic({'it': 2, 'w': torch.ones(1 << 20)}, path)
    assert isinstance(info.value, OSError)  # main.py reports OSErrors as one line
    message = str(info.value)
    assert message.startswith(f'{path}: cannot write (File too large)')
    assert message.endswith('the previous file is unchanged') and '\n' not in message
    with open(path, 'rb') as f:
        assert f.read() == before
    assert os.listdir(tmp_path) == ['latest_checkpoint.pth']  # no temporary file left
    assert torch.load(path, weights_only=True)['it'] == 1


def test_a_first_save_that_fails_leaves_nothing(tmp_path):
    path = str(tmp_path / 'best_checkpoint.pth')
    with file_size_limit(4096):
        with pytest.raises(OSError, match='nothing written'):
            checkpoints.save_atomic({'w': torch.ones(1 << 16)}, path)
    assert os.listdir(tmp_path) == []


def test_an_unwritable_folder_is_a_one_line_oserror(tmp_path):
    with pytest.raises(checkpoints.CheckpointWriteError, match='no/such/folder/c.pth: cannot write'):
        checkpoints.save_atomic({'w': torch.ones(1)}, str(tmp_path / 'no' / 'such' / 'folder' / 'c.pth'))


@pytest.mark.parametrize('mask, mode', [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_files_follow_the_umask(tmp_path, mask, mode):
    path = str(tmp_path / 'c.pth')
    with umask(mask):
        checkpoints.save_atomic({'w': torch.ones(1)}, path)
    assert os.stat(path).st_mode & 0o777 == mode


def test_temporaries_of_killed_saves_are_removed_at_the_next_save(tmp_path):
    leftovers = ['.c.pth.4242-0badcafe.tmp', '.c.pthab_12cd9.tmp']  # ours, and mkstemp's
    others = ['.c.pth2.4242-0badcafe.tmp', '.d.pth.4242-0badcafe.tmp', 'c.pth.tmp', 'notes.tmp']
    for name in leftovers + others:
        (tmp_path / name).write_bytes(b'partial')
    checkpoints.save_atomic({'w': torch.ones(1)}, str(tmp_path / 'c.pth'))
    assert sorted(os.listdir(tmp_path)) == sorted(others + ['c.pth'])


# ---------------------------------------------------------------------------------------------
# --img_weights files that are not ResNet-18 state dicts (issue 12, item 9)

def _write_weights_case(case, path):
    import argparse
    import pickle
    import torchvision
    if case == 'TIRG checkpoint':
        torch.save({'it': 3, 'opt': argparse.Namespace(model='tirg'),
                    'model_state_dict': {'w': torch.ones(1)}}, path)
    elif case == 'text':
        with open(path, 'w') as f:
            f.write('conv1.weight 0.1 0.2\n')
    elif case == 'empty':
        open(path, 'w').close()
    elif case == 'a plain pickle':
        with open(path, 'wb') as f:
            pickle.dump({'conv1.weight': {1, 2}}, f)
    elif case == 'an int':
        torch.save(3, path)
    elif case == 'strings for tensors':
        torch.save({'conv1.weight': 'x'}, path)
    elif case == 'ResNet-34':
        torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    elif case == 'a NaN':
        state = torchvision.models.resnet18(weights=None).state_dict()
        state['layer3.1.bn2.weight'][7] = float('nan')
        torch.save(state, path)
    elif case == 'truncated':
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
        with open(path, 'r+b') as f:
            f.truncate(100000)


WEIGHTS_CASES = {
    'TIRG checkpoint': 'a TIRG checkpoint (load it with --checkpoint)',
    'text': 'not a torch weights file',
    'empty': 'an empty file',
    'a plain pickle': 'not loaded: it holds pickle instructions the safe loader does not run',
    'an int': 'it holds a int object',
    'strings for tensors': 'a dict whose values are not all tensors',
    'ResNet-34': 'not ResNet-18 weights (96 unexpected keys',
    'truncated': 'not a torch weights file',
    'a NaN': 'the weights file holds non-finite values (NaN or infinity), in layer3.1.bn2.weight',
    'a folder': 'cannot read it (Is a directory)',
    'missing': 'cannot read it (No such file or directory)',
}


@pytest.mark.parametrize('case', sorted(WEIGHTS_CASES))
def test_img_weights_that_are_not_resnet18_weights_are_one_line_errors(tmp_path, case):
    import img_text_composition_models
    path = str(tmp_path / 'weights')
    if case == 'a folder':
        os.mkdir(path)
    else:
        _write_weights_case(case, path)
    with pytest.raises(img_text_composition_models.WeightsUnavailableError) as info:
        img_text_composition_models.load_resnet18(path)
    message = str(info.value)
    assert message.startswith(f'--img_weights={path}: {WEIGHTS_CASES[case]}')
    assert message.endswith('expected a torchvision ResNet-18 state dict (such as '
                            'resnet18-f37072fd.pth)')
    assert '\n' not in message


@pytest.mark.parametrize('case, expected', [
    ('a folder', 'a folder, not a file'),
    ('missing', 'no such file'),
    ('a NaN', 'the weights file holds non-finite values (NaN or infinity), in layer3.1.bn2.weight'),
])
def test_main_says_what_is_wrong_with_img_weights_before_any_run_folder(tmp_path, capsys, monkeypatch,
                                                                         case, expected):
    """Issue 23 item 19: a folder read "no such file"; NaN weights trained to a NaN loss whose
    advice was a lower --learning_rate."""
    import main
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / 'weights')
    if case == 'a folder':
        os.mkdir(path)
    elif case == 'a NaN':
        _write_weights_case(case, path)
    assert main.main([f'--img_weights={path}', f'--dataset_path={tmp_path}/none']) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'main.py: error: --img_weights={path}: {expected}')
    assert 'learning_rate' not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / 'runs')


def test_main_reports_a_checkpoint_given_as_img_weights_in_one_line(tmp_path, capsys):
    import main
    path = str(tmp_path / 'latest_checkpoint.pth')
    _write_weights_case('TIRG checkpoint', path)
    assert main.main([f'--img_weights={path}', f'--dataset_path={tmp_path}/none']) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'main.py: error: --img_weights={path}: ')
    assert 'a TIRG checkpoint (load it with --checkpoint)' in err
    assert err.count('--img_weights=') == 1, err  # the flag is named once, not twice
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Checkpoints of a newer format, and unsafe files said without torch's advice (issue 18, 6 and 7)

def _small_checkpoint(**extra):
    import img_text_composition_models
    model = img_text_composition_models.TIRG(['make red'], 16, pretrained=False)
    return {'it': 3, 'model_state_dict': model.state_dict(), **extra}


def test_a_checkpoint_of_a_newer_format_is_refused_naming_both_versions(tmp_path, capsys, monkeypatch):
    import main
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / 'future.pth')
    torch.save(_small_checkpoint(format_version=checkpoints.FORMAT_VERSION + 1), path)
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.load(path)
    assert str(info.value) == (f'{path}: checkpoint format version 2, newer than this code reads '
                               f'(version 1); update the code to use it')
    for args in (['--test_only', f'--checkpoint={path}'], [f'--resume={path}']):
        assert main.main(args + [f'--dataset_path={tmp_path}']) == 1
        err = capsys.readouterr().err
        assert err == f'main.py: error: {info.value}\n'
    assert not os.path.exists('runs')
    torch.save(_small_checkpoint(format_version='1'), path)
    with pytest.raises(checkpoints.CheckpointError, match="format_version '1' is not a version"):
        checkpoints.load(path)
    torch.save(_small_checkpoint(format_version=1), path)  # this code's own, and none, load
    assert checkpoints.load(path)['it'] == 3
    torch.save(_small_checkpoint(), path)
    assert checkpoints.load(path)['it'] == 3


class _RunsCode:
    def __reduce__(self):
        return (print, ('this ran',))


@pytest.mark.parametrize('kind', ['global', 'plain pickle'])
def test_an_unsafe_checkpoint_says_what_it_holds_without_the_advice_to_load_it(tmp_path, kind, capsys):
    import pickle
    import img_text_composition_models
    import main
    path = str(tmp_path / 'unsafe.pth')
    if kind == 'global':
        torch.save(_small_checkpoint(extra=_RunsCode()), path)
        holds = 'it holds Python objects besides tensors (print)'
    else:
        with open(path, 'wb') as f:
            pickle.dump(_small_checkpoint(extra=_RunsCode()), f, protocol=4)
        holds = 'it holds pickle instructions the safe loader does not run (Unsupported operand 149)'
    messages = []
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.load(path)
    messages.append(str(info.value))
    with pytest.raises(img_text_composition_models.WeightsUnavailableError) as info:
        img_text_composition_models.load_resnet18(path)
    messages.append(str(info.value))
    assert main.main(['--test_only', f'--checkpoint={path}', f'--dataset_path={tmp_path}']) == 1
    messages.append(capsys.readouterr().err.strip())
    assert messages[0] == (f'{path}: not loaded: {holds}, and unpickling them could run code '
                           f'(only tensors, numbers, strings and containers are read)')
    assert messages[1].startswith(f'--img_weights={path}: not loaded: {holds}, ')
    assert messages[2] == f'main.py: error: {messages[0]}'
    for message in messages:
        assert '\n' not in message and 'weights_only' not in message
        assert 'succeed' not in message and 'trust' not in message and '\x1b' not in message
    assert 'this ran' not in capsys.readouterr().out
