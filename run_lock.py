"""An exclusive lock on a run folder for the run's whole life, so that two processes never write
into one run (two --resume of the same run, or a resume while the run still trains).

The lock is fcntl.flock on `run.lock` inside the folder, held on a file descriptor this process
keeps open: the kernel releases it when the process ends, however it ends (kill -9 included), so
no stale lock is ever left to clean up.  The file names the holder (host and pid) for the refusal.
"""
import fcntl
import os
import socket
import stat
import time

LOCK_FILE = 'run.lock'

_held = {}  # folder -> file descriptor holding its lock


class FolderInUse(Exception):
    """Another process holds the run folder: one line naming it."""


def acquire(folder):
    """Lock `folder` for this process, or raise FolderInUse naming the holder.  Nothing in the
    folder is written when the lock is refused."""
    folder = os.path.abspath(folder)
    if folder in _held:
        return
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise FolderInUse(f'{folder}: this run folder is in use by {holder}; two processes never '
                          f'write into one run: wait for it to end (or stop it), then resume') from None
    except BaseException:
        os.close(fd)
        raise
    try:
        holder = f'{socket.gethostname()} {os.getpid()}\n'.encode()
        os.pwrite(fd, holder, 0)  # over the previous holder's name: the file is never empty again
        os.ftruncate(fd, len(holder))
    except OSError as e:  # a full disk
        os.close(fd)
        raise OSError(f'{os.path.join(folder, LOCK_FILE)}: cannot write ({e.strerror})') from None
    _held[folder] = fd


def _read_holder(fd):
    named = _holder_name(fd)
    return 'another process' if named is None else f'process {named[1]} on {named[0]}'


def _holder_name(fd, attempts=20):
    """(host, pid) the holder wrote, or None; a holder that has just taken a new lock writes it a
    moment later."""
    for _ in range(attempts):
        try:
            host, pid = os.pread(fd, 4096, 0).decode().split()
            return host, int(pid)
        except (OSError, ValueError, UnicodeDecodeError):
            time.sleep(0.05)
    return None


def holder(folder):
    """(host, pid) of the live process that holds `folder`'s lock ((None, None) when it wrote no
    name), or None when no process does.  Nothing is created or written: the folder may be
    another user's.  The probe takes a shared lock for an instant, so a run starting in that
    very instant is refused as if the folder were in use (it says so; started again, it runs)."""
    try:
        fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None  # never locked (a run from before the lock), or not readable by this user
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # no run made it: no process can hold it as a lock
        if os.path.abspath(folder) in _held:
            return socket.gethostname(), os.getpid()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_name(fd) or (None, None)
        return None
    finally:
        os.close(fd)  # the shared lock goes with it


def release(folder):
    fd = _held.pop(os.path.abspath(folder), None)
    if fd is not None:
        os.close(fd)


def release_all():
    """At the end of main(): a later run in the same interpreter (tests, notebooks) may lock the
    folder again."""
    for folder in list(_held):
        release(folder)


def _forget_in_child():
    """A forked child (a DataLoader worker) does not keep the lock alive after this process dies:
    flock locks belong to the open file, which the child shares until it closes its copy."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)
