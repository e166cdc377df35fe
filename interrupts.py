"""Ctrl-C and SIGTERM during training (SPEC 7): the first signal finishes the iteration, saves and
exits; beside distributed.py, through which every process stops at the same iteration."""
import contextlib
import signal
import sys
import time


class InterruptFlag:
    """First Ctrl-C or SIGTERM (sent by torchrun and cluster schedulers before they kill): finish
    the iteration, save and exit.  Another signal later than REPEAT_WINDOW seconds: abort at once.
    Signals within the window are one request: under torchrun, or SLURM, a worker receives the
    same request twice at once (from the terminal or scheduler, and forwarded by torchrun).

    Inside `interruptible()` (a retrieval test, which changes no state and may take minutes) the
    first signal stops at once with KeyboardInterrupt, and the caller saves."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_WINDOW = 1.0

    def __init__(self):
        self.received = []
        self.first_time = None
        self.immediate = False
        self.aborted = False

    @property
    def raised(self):
        return bool(self.received)

    def exit_code(self):
        return 128 + int(self.received[0]) if self.received else 130

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    @contextlib.contextmanager
    def interruptible(self):
        self.immediate = True
        try:
            yield
        finally:
            self.immediate = False

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.first_time is None:
            self.first_time = now
            self.received.append(signum)
            name = 'Interrupted' if signum == signal.SIGINT else 'Terminated (SIGTERM)'
            if self.immediate:
                print(f'\n{name}: stopping the retrieval test and saving now; the resumed run '
                      f'redoes the test (Ctrl-C again to abort)', file=sys.stderr, flush=True)
                raise KeyboardInterrupt
            print(f'\n{name}: finishing this iteration, then saving (Ctrl-C again to abort)',
                  file=sys.stderr, flush=True)
        elif now - self.first_time > self.REPEAT_WINDOW:
            self.aborted = True
            raise KeyboardInterrupt
