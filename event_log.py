"""The run's tensorboard writer, failing in one line.  tensorboardX writes events from a thread
and flushes again at exit; on a full disk each of them raised its own traceback, and the error
that reached the user named no file.  Here a failed write is one OSError naming the events file,
raised in the main thread at the next call, and nothing else is printed."""
import glob
import os
import threading

from tensorboardX import SummaryWriter

import checkpoints

_failures = {}  # id(thread) -> the OSError that stopped tensorboardX's writer thread


class EventLog:
    """SummaryWriter's add_scalar, add_text, add_image, flush and close."""

    def __init__(self, logdir, **kwargs):
        pattern = os.path.join(logdir, 'events.out.tfevents.*')
        before = set(glob.glob(pattern))
        self.writer = SummaryWriter(logdir=logdir, **kwargs)
        created = sorted(set(glob.glob(pattern)) - before)
        self.path = created[-1] if created else pattern
        self.failed = False
        file_writer = self.writer.file_writer
        self.threads = [t for t in threading.enumerate() if _from_tensorboardx(t)]
        # tensorboardX's exit handler closes the writer again: a failure is reported once, here.
        close = file_writer.event_writer.close

        def close_once():
            try:
                close()
            except OSError:
                pass
        file_writer.event_writer.close = close_once

    def _check(self):
        for thread in self.threads:
            error = _failures.pop(id(thread), None)
            if error is not None:
                self._fail(error)

    def _fail(self, error):
        self.failed = True
        raise checkpoints.CheckpointWriteError(
            f'{self.path}: cannot write ({error.strerror or error}); the events written before '
            f'are kept') from None

    def _call(self, method, *args, **kwargs):
        if self.failed:
            return None
        self._check()
        try:
            return getattr(self.writer, method)(*args, **kwargs)
        except OSError as e:
            self._fail(e)

    def add_scalar(self, *args, **kwargs):
        return self._call('add_scalar', *args, **kwargs)

    def add_text(self, *args, **kwargs):
        return self._call('add_text', *args, **kwargs)

    def add_image(self, *args, **kwargs):
        return self._call('add_image', *args, **kwargs)

    def flush(self):
        return self._call('flush')

    def close(self):
        if self.failed:
            return
        try:
            self._check()
            self.writer.close()
        except OSError as e:
            self._fail(e)


def _from_tensorboardx(thread):
    return type(thread).__module__.startswith('tensorboardX')


def _hook(args, previous=threading.excepthook):
    """An OSError that ends tensorboardX's writer thread is kept for the main thread to report."""
    if isinstance(args.exc_value, OSError) and args.thread is not None and _from_tensorboardx(args.thread):
        _failures[id(args.thread)] = args.exc_value
        return
    previous(args)


threading.excepthook = _hook
