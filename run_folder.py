"""A run's folder and what it holds (SPEC 7), written by the first process only:
runs/<date>_<time>_<host><comment>, created atomically and locked for the run's whole life
(run_lock.py); options.json; metrics.jsonl, cut back to a checkpoint when a run resumes in its
folder; test_results.json; and the checks, before any data is read, that the run can write
where it will."""
import datetime
import json
import os
import socket
import subprocess
import sys

import torch

import checkpoints
import data_identity
import datasets
import distributed
import run_lock
from experiment import UserError

MAX_FOLDER_NAME = 255  # bytes, on common file systems
OPTIONS_FILE = 'options.json'


def check_comment(comment):
    """The comment ends a folder name: one path component, within the file system's name limit."""
    if os.sep in comment or (os.altsep and os.altsep in comment) or '\0' in comment:
        raise UserError(f'--comment={comment}: it ends the run folder\'s name, so it cannot hold '
                        f'{os.sep!r}; expected a plain name such as _tirg_css')
    longest = len(run_folder_name('Dec31_23-59-59', 999, comment).encode())
    if longest > MAX_FOLDER_NAME:
        raise UserError(f'--comment={comment[:40]}...: the run folder\'s name would be {longest} '
                        f'bytes; expected a comment that keeps it within {MAX_FOLDER_NAME}')


def check_writable_folders(opt):
    """Where the run will write, checked before any data is read: runs/ in the working folder,
    or the folder of a run that continues in place."""
    if opt.resume and resume_in_place(opt.resume):
        folder = os.path.dirname(os.path.abspath(opt.resume))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f'--resume={opt.resume}: its run folder {folder} is not writable; '
                            f'the run continues there, so it must be')
        return
    folder = 'runs' if os.path.exists('runs') else '.'
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f'{os.path.abspath(folder)} is not a writable folder: main.py writes its run '
                        f'folder under runs/ in the working folder; start it from a writable one')


def resume_in_place(path):
    """Only a run's latest checkpoint continues in its folder: resuming from an older one
    (best_checkpoint.pth) there would overwrite the later work, so it gets a new folder."""
    return os.path.basename(path) == 'latest_checkpoint.pth'


def run_folder_name(stamp, n, comment):
    return f'{stamp}_{socket.gethostname()}{"" if n == 1 else f".{n}"}{comment}'


def create_run_folder(comment):
    """tensorboardX's `runs/<date>_<time>_<host><comment>`, created atomically: when the name is
    taken (two runs started in the same second), `.2`, `.3`, ... follow the host name."""
    stamp = datetime.datetime.now().strftime('%b%d_%H-%M-%S')
    os.makedirs('runs', exist_ok=True)
    for n in range(1, 1000):
        path = os.path.join('runs', run_folder_name(stamp, n, comment))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise UserError(f'runs/: cannot create a new run folder for {stamp}{comment}')


class RefusedByFirstProcess(Exception):
    """Under torchrun: the first process refused to start and says why; the others exit quietly."""


def lock_resumed_run_folder(opt):
    """A run continuing in its folder holds the folder's lock from before any data is read until
    it exits (a new run folder is locked as it is created).  Under torchrun the first process,
    the only one that writes, takes it, after the process group exists: every process learns the
    outcome from it, so none waits in a collective for a process that has left."""
    if not (opt.resume and resume_in_place(opt.resume)):
        return
    refusal = None
    if distributed.is_main_process():
        try:
            run_lock.acquire(os.path.dirname(os.path.abspath(opt.resume)))
        except run_lock.FolderInUse as e:
            refusal = str(e)
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        raise run_lock.FolderInUse(refusal) if distributed.is_main_process() else RefusedByFirstProcess()


class NullLogger:
    """What processes other than the first log to: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def open_run(opt):
    """The run folder and its tensorboard writer.  A run resumed from its latest checkpoint keeps
    writing in its own folder, dropping any events logged after that checkpoint."""
    from event_log import EventLog
    if not distributed.is_main_process():
        return NullLogger(), None
    if opt.resume and resume_in_place(opt.resume):
        run_dir = os.path.dirname(os.path.abspath(opt.resume))
        logger = EventLog(run_dir, purge_step=opt.resume_it + 1)
    else:
        run_dir = create_run_folder(opt.comment)
        run_lock.acquire(run_dir)
        logger = EventLog(run_dir)
        for key, value in sorted(vars(opt).items()):
            logger.add_text(key, str(value))
        if opt.resume:
            print(f'{opt.resume} is not its run\'s latest checkpoint: continuing in a new run '
                  f'folder, so the later work of that run is kept')
    print('Run folder:', run_dir)
    return logger, run_dir


def project_version(folder=os.path.dirname(os.path.abspath(__file__))):
    """(git commit, whether tracked files differ from it) of the project's folder, or
    (None, None) outside git or without git."""
    def git(*args):
        result = subprocess.run(['git', '-C', folder] + list(args), capture_output=True, text=True,
                                timeout=30)
        return result.stdout.strip() if result.returncode == 0 else None
    try:
        commit = git('rev-parse', 'HEAD')
        changes = git('status', '--porcelain', '--untracked-files=no') if commit else None
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, None if changes is None else bool(changes)


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return device.type


def initial_checkpoint(path):
    """What a run trained from another checkpoint's weights started from: that file's content
    digest (its path may change, its content is the experiment), kept in the run's options so
    that a continuation in a new folder records it too."""
    return {'path': os.path.abspath(path), 'digest': data_identity.file_digest(path)}


def data_record(opt):
    """What identifies the run's data (data_identity.py), computed once per dataset folder and
    cached; a folder that cannot be identified is recorded as such (the run is then in no table
    with others)."""
    try:
        return data_identity.cached_identity(opt.dataset, opt.dataset_path)
    except (OSError, datasets.DatasetError) as e:
        print(f'note: the data in {opt.dataset_path} could not be identified ({e}); '
              f'results_table.py will not pool this run with others', file=sys.stderr)
        return {'error': str(e)}


def run_record(opt, device):
    """What options.json holds: every option and what else the numbers depend on."""
    commit, modified = project_version()
    return {'options': {k: v for k, v in sorted(vars(opt).items())
                        if k not in ('explicit_flags', 'initial_checkpoint')},
            'data': data_record(opt),
            'initial_checkpoint': getattr(opt, 'initial_checkpoint', None),
            'explicit_flags': getattr(opt, 'explicit_flags', []),
            'seed': opt.seed, 'torch_version': torch.__version__,
            'project_version': commit, 'project_modified': modified,
            'device': str(device), 'device_name': device_name(device),
            'processes': distributed.world_size(), 'host': socket.gethostname(),
            'started': datetime.datetime.now().isoformat(timespec='seconds')}


def write_options_file(run_dir, opt, device):
    """options.json, written once when the run folder is new (a run resumed in its own folder
    keeps the file its start wrote), atomically: never a half-written file."""
    path = os.path.join(run_dir, OPTIONS_FILE)
    if os.path.exists(path):
        return
    # A failed write (a full disk) is one line naming the file.
    checkpoints.write_text_atomic(json.dumps(run_record(opt, device), indent=1, default=str) + '\n',
                                  path)


def redoes_final_evaluation(opt, ckpt):
    """Whether a run resumed from `ckpt` starts by redoing the final evaluation at its iteration
    (the run stopped between that evaluation and the save marking it finished).  An epoch start
    redone after a failed or interrupted evaluation logged nothing at the checkpoint's iteration;
    a finished run's final evaluation stays, as its result."""
    return not ckpt.get('finished', False) and int(ckpt['it']) >= opt.num_iters


def drop_metrics_after_checkpoint(run_dir, ckpt, evaluates_first):
    """metrics.jsonl as it was at the checkpoint, as purge_step does for the tensorboard events:
    an evaluation logged after it (the process was killed before it saved) is written again by
    the resumed run.  Rewritten through a temporary file, so a kill now loses nothing."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    last = int(ckpt['it']) - (1 if evaluates_first else 0)
    kept = [line for n, line in enumerate(lines)
            if not logged_after(line, last, torn=n == len(lines) - 1 and not line.endswith('\n'))]
    if len(kept) < len(lines):
        checkpoints.write_text_atomic(''.join(kept), path)
        print(f'{path}: dropped {len(lines) - len(kept)} lines logged after the checkpoint '
              f'(iteration {ckpt["it"]}); the resumed run writes them again')


def logged_after(line, it, torn=False):
    """A line of an evaluation after iteration `it`, or the torn last line of a killed write."""
    try:
        record = json.loads(line)
    except ValueError:
        return torn  # a line of someone else's stays
    logged = record.get('it') if isinstance(record, dict) else None
    return isinstance(logged, int) and logged > it


def append_metrics_line(run_dir, record):
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


def write_test_results(run_dir, opt, dataset, it, metrics):
    results = {'checkpoint': opt.checkpoint, 'dataset': opt.dataset, 'precision': opt.precision,
               'dataset_path': opt.dataset_path, 'split': opt.test_split, 'model': opt.model,
               'it': it, 'metrics': metrics}
    if opt.dataset == 'fashioniq':
        results.update(fiq_category=opt.fiq_category, fiq_protocol=opt.fiq_protocol)
    if opt.dataset == 'shoes':
        results['shoes_protocol'] = opt.shoes_protocol
    skipped = getattr(dataset, 'skipped', None)
    if skipped:
        results['skipped_missing_images'] = skipped
    path = os.path.join(run_dir, 'test_results.json')
    checkpoints.write_text_atomic(json.dumps(results, indent=1), path)
    print('Wrote', path)
