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
