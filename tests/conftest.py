import contextlib
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CELLS = {'top': 1 / 6, 'middle': 3 / 6, 'bottom': 5 / 6, 'left': 1 / 6, 'center': 3 / 6, 'right': 5 / 6}


def obj(shape, color, size, row, col):
    return {'shape': shape, 'color': color, 'size': size, 'pos': (CELLS[row], CELLS[col])}


def css_split(num_scenes, seed, with_labels=True):
    """Scenes of one or two objects; each scene gets two colour changes of its first object."""
    rng = np.random.RandomState(seed)
    colors = ['gray', 'red', 'blue', 'green', 'brown', 'purple', 'cyan', 'yellow']
    shapes = ['rectangle', 'circle', 'triangle']
    rows, cols = ['top', 'middle', 'bottom'], ['left', 'center', 'right']
    scenes = []
    for _ in range(num_scenes):
        r, c = rows[rng.randint(3)], cols[rng.randint(3)]
        scene = [obj(shapes[rng.randint(3)], colors[rng.randint(8)], ['small', 'large'][rng.randint(2)], r, c)]
        scenes.append((scene, r, c))
    objects_img = [s for s, _, _ in scenes]
    mods = []
    for i, (scene, r, c) in enumerate(scenes):
        old = scene[0]['color']
        for new in [x for x in colors if x != old][:2]:
            target = [dict(scene[0], color=new)]
            objects_img.append(target)
            mods.append({'from': [i], 'to': [len(objects_img) - 1],
                         'to_str': f'make {r}-{c} {old} object {new}'})
    split = {'objects_img': objects_img, 'mods': mods}
    if with_labels:
        keys = {}
        split['labels'] = [keys.setdefault(repr(sorted(map(repr, o))), len(keys)) for o in objects_img]
    return split


def write_css_fixture(root, num_scenes=12, pngs=False, with_labels=True):
    import datasets
    os.makedirs(root, exist_ok=True)
    data = {'train': css_split(num_scenes, 0, with_labels), 'test': css_split(num_scenes, 1, with_labels)}
    np.save(os.path.join(root, datasets.CSS_DATA_FILE), np.array(data, dtype=object), allow_pickle=True)
    if pngs:
        from PIL import Image
        os.makedirs(os.path.join(root, 'images'), exist_ok=True)
        for split, content in data.items():
            for i, objects in enumerate(content['objects_img']):
                img = (datasets.draw_css_2d_image(objects) * 255).round().astype(np.uint8)
                Image.fromarray(img).save(os.path.join(root, 'images', 'css_%s_%06d.png' % (split, i)))
    return data


@pytest.fixture
def css_root(tmp_path):
    root = str(tmp_path / 'css')
    write_css_fixture(root)
    return root


def only_run_folder(cwd, comment):
    """The one run folder under cwd/runs whose name ends with `comment`."""
    import glob
    (found,) = glob.glob(os.path.join(str(cwd), 'runs', f'*{comment}'))
    return found


_ITERATIONS_SEEN = {}


def saved_iteration(path):
    """The iteration a checkpoint file holds (None: no file yet, or one being replaced right
    now), loaded again only when the file changed: tests poll it while a run trains, and each
    load of a 90 MB checkpoint costs 0.1 s of the CPU that run needs."""
    import checkpoints
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _ITERATIONS_SEEN:
        try:
            _ITERATIONS_SEEN[key] = checkpoints.load(path)['it']
        except checkpoints.CheckpointError:
            return None
    return _ITERATIONS_SEEN[key]


def metrics_lines(folder):
    """The records of a run's metrics.jsonl, in order."""
    import json
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def read_events(run_dir):
    """Every tensorboard event in the event files of a run folder, in file order."""
    import glob
    import struct
    from tensorboardX.proto import event_pb2
    for path in sorted(glob.glob(os.path.join(run_dir, 'events.out.tfevents.*'))):
        with open(path, 'rb') as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):  # records: length (8), crc (4), data, crc (4)
            (length,) = struct.unpack('<Q', data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            yield event


def read_scalars(run_dir):
    """{tag: [(step, value)]} from the tensorboard event files of a run folder."""
    scalars = {}
    for event in read_events(run_dir):
        for value in event.summary.value:
            if value.HasField('simple_value'):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def run_main(args, cwd, timeout=600, env=None, subprocess=False):
    """main.py with `args` in the folder `cwd`: (returncode, stdout, stderr).  In this process by
    default (importing torch again costs 4-5 s a run); `subprocess=True` (or an `env`) runs the
    real command line, for what only a fresh process shows: warnings (pytest would catch them
    here), signals, the interpreter's exit."""
    if subprocess or env is not None:
        import subprocess as sp
        # One thread: on a 2-core machine shared with the test runner, two threads thrash.
        env = dict(os.environ if env is None else env, OMP_NUM_THREADS='1')
        return sp.run([sys.executable, os.path.join(REPO, 'main.py')] + list(args), cwd=cwd,
                      capture_output=True, text=True, timeout=timeout, env=env)
    import io
    import types
    import main
    out, err, previous = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main.main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        os.chdir(previous)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


class ForkedProcess:
    """`function()` in a forked child of this process, with a subprocess.Popen's interface (pid,
    poll, wait, communicate, send_signal, kill; returncode: what function returns, -N when
    signal N ended the child): a process of its own for what a test does to a process (signals,
    kill -9, locks held by another process, resource limits, a hang that must end in a timeout)
    without a fresh interpreter's 4 s start.  The child runs in `cwd`, its own session when
    `new_session` (Popen's start_new_session).  What only a fresh interpreter shows (warnings,
    the interpreter's exit) needs one: run_main's subprocess=True."""

    def __init__(self, function, cwd, new_session=False):
        import tempfile
        self.args, self.returncode = getattr(function, 'args', []), None
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            self._child(function, cwd, new_session)

    def _child(self, function, cwd, new_session):
        code = 1
        try:
            if new_session:
                os.setsid()
            os.dup2(self._out.fileno(), 1)
            os.dup2(self._err.fileno(), 2)
            sys.stdout = open(1, 'w', buffering=1, closefd=False)
            sys.stderr = open(2, 'w', buffering=1, closefd=False)
            os.chdir(cwd)
            code = function()
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        except BaseException:  # noqa: B036 - the child never returns into pytest
            import traceback
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        import subprocess
        import time
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                self.kill()
                os.waitpid(self.pid, 0)
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def communicate(self, timeout=None):
        self.wait(timeout)
        texts = []
        for f in (self._out, self._err):
            f.seek(0)
            texts.append(f.read().decode('utf-8', 'replace'))
            f.close()
        return tuple(texts)

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self):
        import signal
        self.send_signal(signal.SIGKILL)


def fork_main(args, cwd, prepare=None, new_session=False):
    """main.main(args) in a ForkedProcess; `prepare()` runs first in the child (a hook, a limit)."""
    def run():
        if prepare is not None:
            prepare()
        import main
        return main.main(list(args))
    run.args = list(args)
    return ForkedProcess(run, cwd, new_session)


def small_photo_transform():
    """datasets.photo_transform at 64 px instead of 224: ResNet pools globally, so the pipeline
    is otherwise unchanged, at a twelfth of the arithmetic.  For tests of protocols, flags and
    files; tests/test_reference_constants.py checks the 224 px transform itself, and that every
    photo dataset's run reads its images through it."""
    import torchvision.transforms as T
    import datasets
    return T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(),
                      T.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)])


@contextlib.contextmanager
def small_photos():
    """datasets.photo_transform is small_photo_transform inside (main.main, retrieve.py and the
    datasets a test builds in this process; not a subprocess)."""
    import datasets
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, 'photo_transform', small_photo_transform)
        yield


def small_photos_main(folder):
    """The path of a script, written into `folder`, that runs main.py with small_photo_transform:
    for a command that must start its own interpreters (torchrun)."""
    path = os.path.join(str(folder), 'main_small_photos.py')
    with open(path, 'w') as f:
        f.write(f"""import sys
sys.path[:0] = [{REPO!r}, {os.path.join(REPO, 'tests')!r}]
import conftest
import datasets
datasets.photo_transform = conftest.small_photo_transform
import main
sys.exit(main.main())
""")
    return path


TINY = ['--dataset=css3d', '--batch_size=4', '--embed_dim=16', '--loader_num_workers=0',
        '--img_weights=none']


MEMORY_FOLDER = '/dev/shm'
MEMORY_FOLDER_MIN_FREE = 8 * 2 ** 30


def use_memory_for_temporary_folders(config):
    """The tests' temporary folders in memory (Linux's /dev/shm) where it has room: every run
    they start saves 90 MB checkpoints through fsync, which on a disk waits for the write and
    costs a tenth of the suite's time; in memory it returns at once.  Passed tests' folders are
    removed as they end (pytest.ini), so the memory held stays small.  --basetemp or
    PYTEST_DEBUG_TEMPROOT, when given, decide as always."""
    if config.option.basetemp or 'PYTEST_DEBUG_TEMPROOT' in os.environ:
        return
    try:
        st = os.statvfs(MEMORY_FOLDER)
    except OSError:
        return
    if os.access(MEMORY_FOLDER, os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= MEMORY_FOLDER_MIN_FREE:
        os.environ['PYTEST_DEBUG_TEMPROOT'] = MEMORY_FOLDER


def use_session_scratch_folder(config):
    """A folder of the session's own as every process's temporary folder (TMPDIR), removed when
    the session ends: torchrun leaves a torchelastic_* log folder in it per launch, and a forked
    child that ends through os._exit leaves multiprocessing's pymp-* folder, which would otherwise
    pile up in the user's /tmp.  Dataset identities (data_identity.py) are cached there too, not
    in the user's cache.  pytest's own temporary folders stay where they were (a failed test's is
    kept for the user to look at)."""
    import tempfile
    if not (config.option.basetemp or 'PYTEST_DEBUG_TEMPROOT' in os.environ):
        os.environ['PYTEST_DEBUG_TEMPROOT'] = tempfile.gettempdir()
    config.tirg_test_scratch = tempfile.mkdtemp(prefix='tirg-test-session-')
    os.environ['TMPDIR'] = config.tirg_test_scratch
    tempfile.tempdir = None  # this process too, from now on
    if 'TIRG_CACHE_DIR' not in os.environ:
        os.environ['TIRG_CACHE_DIR'] = os.path.join(config.tirg_test_scratch, 'cache')


def pytest_configure(config):
    """The test machines share a few cores; torch's default of one OpenMP thread per core spins
    against the other processes (pytest-xdist's other worker among them) and makes small CPU
    forward passes ~10x slower.  One thread, here and in the interpreters the tests start."""
    if not hasattr(config, 'workerinput'):  # the controller: pytest-xdist's workers inherit it
        use_memory_for_temporary_folders(config)
        use_session_scratch_folder(config)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def pytest_unconfigure(config):
    """The session's scratch folder goes with it (the workers share the controller's)."""
    created = getattr(config, 'tirg_test_scratch', None)
    if created:
        import shutil
        shutil.rmtree(created, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (each worker collects, and all must agree on the order): the tests
    marked slow first, so that the workers finish together on short tests instead of one waiting
    for the other's last long run.  Without xdist the order stays pytest's, each module's tests
    together (module-scoped fixtures are built once)."""
    if hasattr(config, 'workerinput'):
        items.sort(key=lambda item: item.get_closest_marker('slow') is None)
