"""The paper's tables from repeated runs (SPEC section 10): one row per method, a column per
recall, mean +- sample standard deviation over the runs that differ only in seed (and in what
does not change the experiment: comment, paths, workers, device).

    python results_table.py runs/                          # every run folder below runs/
    python results_table.py runs/A runs/B --pick=best --format=latex

A run folder is a folder with options.json (main.py writes it at the start of every run).  Runs
left out (training now, unfinished, a --test_only evaluation, no test result) are named on
stderr, one line each.  Runs pool only on the same data (options.json's "data" digest, see
data_identity.py) and the same starting weights (--checkpoint's content digest).
"""
import argparse
import csv
import functools
import json
import math
import os
import re
import stat
import statistics
import sys
import unicodedata

import torch

import checkpoints
import cirr
import data_identity
import fashioniq
import main
import run_folder
import run_lock
import shoes
import test_retrieval

# Options that do not change what a run computes, beyond those a resume may change: a run's
# iteration count is its last checkpoint's (--num_iters may have grown on resume).  --checkpoint
# is replaced by its file's content digest.
IGNORED_OPTIONS = ((checkpoints.RESUMABLE_FLAGS - {'num_iters'})
                   | {'seed', 'checkpoint', 'initial_checkpoint', 'resume', 'resume_it',
                      'checkpoint_it', 'test_only', 'test_split', 'explicit_flags'})
# Options that only some datasets read: elsewhere they neither split tables nor name one.
DATASET_OPTIONS = {'css_query_images': {'css3d'}, 'f200k_label_order': {'fashion200k'},
                   'fiq_category': {'fashioniq'}, 'fiq_protocol': {'fashioniq'},
                   'shoes_protocol': {'shoes'}, 'skip_missing_images': {'fashioniq', 'cirr', 'shoes'}}
# The rows of the paper's tables, in its order (TIRG last of its comparisons, then its
# ablations); a model it has no row for comes after them.
PAPER_ORDER = ['imgonly', 'textonly', 'concat', 'show_and_tell', 'param_hashing',
               'attribute_operator', 'relationship', 'film', 'tirg', 'tirg_lastconv',
               'tirg_gate_only', 'tirg_res_only']
# A folder walk stays off these (and off every pseudo file system mounted elsewhere), goes at
# most MAX_DEPTH folders down and stops after MAX_FOLDERS: a link to / is not a reason to read
# the whole machine.
PSEUDO_FOLDERS = ('/proc', '/sys', '/dev')
PSEUDO_FILE_SYSTEMS = {'proc', 'sysfs', 'devtmpfs', 'devpts', 'cgroup', 'cgroup2', 'debugfs',
                       'tracefs', 'securityfs', 'pstore', 'bpf', 'configfs', 'fusectl', 'mqueue',
                       'hugetlbfs', 'autofs', 'binfmt_misc', 'efivarfs', 'rpc_pipefs', 'nsfs',
                       'selinuxfs'}
MAX_DEPTH = 12
MAX_FOLDERS = 100_000
# A float holds an integer exactly up to this; a larger one is no recall.
MAX_EXACT_INT = 2 ** 53


class TableError(Exception):
    """Nothing to tabulate: one line, exit 1."""


class LeftOut(Exception):
    """A run that is not in any table, and why."""


def get_args_parser():
    p = argparse.ArgumentParser(
        description="The paper's tables: mean +- sample std (n runs) of each method's test recalls "
                    "over runs that differ only in seed, comment, paths, workers and device.",
        allow_abbrev=False)
    p.add_argument('folders', nargs='+', metavar='RUN_FOLDER',
                   help='run folders, or folders holding them (searched recursively for '
                        f'options.json, at most {MAX_DEPTH} folders down)')
    p.add_argument('--pick', choices=['final', 'best'], default='final',
                   help="each run's final test (the last test line of its metrics.jsonl) or its test "
                        "with the best tracked recall (default: %(default)s)")
    p.add_argument('--format', choices=['markdown', 'csv', 'latex'], default='markdown',
                   help='output format (default: %(default)s)')
    return p


def printable(text):
    """One line of text: control characters (newlines, terminal escapes) and surrogates shown as
    escapes; a path's undecodable byte (a surrogate escape) as that byte, \\xff."""
    def shown(c):
        if 0xdc80 <= ord(c) <= 0xdcff:
            return f'\\x{ord(c) - 0xdc00:02x}'
        return repr(c)[1:-1] if unicodedata.category(c) in ('Cc', 'Cs', 'Zl', 'Zp') else c
    return ''.join(shown(c) for c in str(text))


# ---------------------------------------------------------------------------------------------
# Finding run folders.

def pseudo_devices():
    """The devices (st_dev) of pseudo file systems: PSEUDO_FOLDERS and every mount point of one
    in /proc/self/mounts (where it can be read)."""
    points = set(PSEUDO_FOLDERS)
    try:
        with open('/proc/self/mounts', encoding='utf-8', errors='surrogateescape') as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2] in PSEUDO_FILE_SYSTEMS:
                    # Spaces and the like are octal escapes there (\040).
                    points.add(re.sub(r'\\([0-7]{3})', lambda m: chr(int(m.group(1), 8)), fields[1]))
    except OSError:
        pass
    devices = set()
    root = os.stat('/').st_dev
    for point in points:
        try:
            device = os.stat(point).st_dev
        except OSError:
            continue
        if device != root:  # a container may show /dev or /sys as a folder of /
            devices.add(device)
    return devices


def find_run_folders(paths, notes):
    """(run folders, folders that look like runs but have no options.json), each sorted.  Linked
    folders are followed (runs gathered by symbolic links), each real folder visited once; a run
    folder's own subfolders (feature_cache/) hold no runs."""
    runs, without_options, visited = set(), set(), set()
    pseudo = pseudo_devices()
    unreadable, too_deep, visits = [], [], 0
    for path in paths:
        if not os.path.isdir(path):
            raise TableError(f'{printable(path)}: no such folder')
    stack = [(path, 0) for path in reversed(paths)]
    while stack:
        folder, depth = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as e:
            unreadable.append(f'{printable(folder)} ({e.strerror or e})')
            continue
        if (st.st_dev, st.st_ino) in visited or st.st_dev in pseudo:
            continue
        if visits >= MAX_FOLDERS:
            notes.append(f'note: stopped searching after {MAX_FOLDERS} folders (runs further on, '
                         f'from {printable(folder)}, are not in the tables)')
            break
        visited.add((st.st_dev, st.st_ino))
        visits += 1
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
                names = {e.name for e in entries}
                subfolders = [e.path for e in entries if e.is_dir()]
        except OSError as e:
            unreadable.append(f'{printable(folder)} ({e.strerror or e})')
            continue
        if run_folder.OPTIONS_FILE in names:
            runs.add(os.path.realpath(folder))
            continue
        if 'metrics.jsonl' in names or 'latest_checkpoint.pth' in names:
            without_options.add(os.path.realpath(folder))
        if subfolders and depth >= MAX_DEPTH:
            too_deep.append(printable(folder))
            continue
        stack += [(sub, depth + 1) for sub in reversed(subfolders)]
    if unreadable:
        notes.append(f'note: {len(unreadable)} folders could not be read (first: {unreadable[0]})')
    if too_deep:
        notes.append(f'note: not searched deeper than {MAX_DEPTH} folders below the folders given '
                     f'({len(too_deep)} places, first: {too_deep[0]})')
    if not runs:
        raise TableError(f'{printable(" ".join(paths))}: no run folders here (folders with '
                         f'{run_folder.OPTIONS_FILE}, which main.py writes at the start of every run)')
    return sorted(runs), sorted(without_options)


# ---------------------------------------------------------------------------------------------
# Reading a run.

def open_regular(path, what):
    """A regular file opened for binary reading; a FIFO, a device or a folder is refused without
    waiting on it (a FIFO opened for reading would wait for a writer for ever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LeftOut(f'{what} unreadable ({e.strerror or e})') from None
    f = os.fdopen(fd, 'rb')
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise LeftOut(f'{what} is not a regular file')
    return f


def parse_json(data):
    """A JSON document of UTF-8 bytes; ValueError with the reason otherwise."""
    try:
        return json.loads(data.decode('utf-8'))
    except UnicodeDecodeError as e:
        raise ValueError(f'not UTF-8 text (byte {e.start})') from None
    except RecursionError:
        raise ValueError('nested too deeply') from None


@functools.lru_cache(maxsize=None)
def parser_defaults():
    return vars(main.get_args_parser().parse_args([]))


def option_defaults():
    """Today's default of every flag: an options.json written before a flag existed ran with
    what the flag's default still is (the flags were added without changing the behaviour)."""
    return dict(parser_defaults())


def read_record(run_dir):
    f = open_regular(os.path.join(run_dir, run_folder.OPTIONS_FILE), run_folder.OPTIONS_FILE)
    if f is None:
        raise LeftOut(f'no {run_folder.OPTIONS_FILE}')
    with f:
        data = f.read()
    try:
        record = parse_json(data)
    except ValueError as e:
        raise LeftOut(f'{run_folder.OPTIONS_FILE} unreadable ({printable(e)})') from None
    if not isinstance(record, dict) or not isinstance(record.get('options'), dict):
        raise LeftOut(f'{run_folder.OPTIONS_FILE} is not a run\'s options (no "options")')
    options = {**option_defaults(), **record['options']}
    for name in ('dataset', 'model'):
        if not isinstance(options.get(name), str):
            raise LeftOut(f'{run_folder.OPTIONS_FILE}: "{name}" is not a name')
    if options['dataset'] not in DATASET_METRICS:
        raise LeftOut(f'{run_folder.OPTIONS_FILE}: unknown dataset "{printable(options["dataset"])}"')
    return record, options


def data_key(record):
    """The digest of the run's data, or None for a run from before options.json recorded it."""
    data = record.get('data')
    if data is None:
        return None
    if isinstance(data, dict) and 'digest' not in data and isinstance(data.get('error'), str):
        raise LeftOut(f'its data could not be identified when it started ({printable(data["error"])})')
    if (not isinstance(data, dict) or not isinstance(data.get('digest'), str)
            or not re.fullmatch(r'[0-9a-f]{64}', data['digest'])):
        raise LeftOut(f'{run_folder.OPTIONS_FILE}: "data" is not a data digest')
    return f'{data.get("version")}:{data["digest"]}'


def weights_key(record, options):
    """What the run's weights started from, beyond --img_weights: None, or the content digest of
    the --checkpoint file (its path for a run from before options.json recorded the digest)."""
    start = record.get('initial_checkpoint')
    if start is not None:
        if not isinstance(start, dict) or not isinstance(start.get('digest'), str) \
                or not re.fullmatch(r'[0-9a-f]{64}', start['digest']):
            raise LeftOut(f'{run_folder.OPTIONS_FILE}: "initial_checkpoint" is not a checkpoint digest')
        return f'content {data_identity.short(start["digest"])}'
    path = options.get('checkpoint')
    return None if path in (None, '') else f'file {path} (its content not recorded)'


def run_is_training(run_dir):
    holder = run_lock.holder(run_dir)
    if holder is not None:
        host, pid = holder
        if host is None:
            raise LeftOut('training: held by another process (which wrote no name)')
        raise LeftOut(f'training: held by {printable(host)}, pid {pid}')


def last_checkpoint(run_dir):
    """(iteration, finished, --num_iters or None) of the run's latest checkpoint; the weights
    are mapped, not read."""
    path = os.path.join(run_dir, 'latest_checkpoint.pth')
    f = open_regular(path, 'latest_checkpoint.pth')
    if f is None:
        raise LeftOut('unfinished: no latest_checkpoint.pth')
    f.close()
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # an older file format cannot be mapped: the checked loader reads it all
        try:
            ckpt = checkpoints.load(path)
        except checkpoints.CheckpointError as e:
            raise LeftOut(f'unreadable checkpoint ({printable(e)})') from None
    it = ckpt.get('it') if isinstance(ckpt, dict) else None
    if not checkpoints.is_count(it):
        raise LeftOut('latest_checkpoint.pth holds no iteration number')
    # What the run now trains to (a resume may have raised options.json's --num_iters).
    target = getattr(ckpt.get('opt'), 'num_iters', None)
    return it, ckpt.get('finished') is True, target if checkpoints.is_count(target) else None


def dataset_metrics(dataset):
    """The recall names a dataset's test reports, in the order it reports them."""
    if dataset in ('css3d', 'fashion200k'):
        return [f'recall_top{k}_correct_composition' for k in test_retrieval.RECALL_KS]
    if dataset == 'mitstates':
        return [f'recall_top{k}_correct_{family}' for k in test_retrieval.RECALL_KS
                for family in ('composition', 'adj', 'noun')]
    if dataset == 'fashioniq':
        return ([f'recall_top{k}_{c}' for c in fashioniq.CATEGORIES for k in fashioniq.RECALL_KS]
                + [f'recall_top{k}_mean' for k in fashioniq.RECALL_KS] + ['recall_mean'])
    if dataset == 'cirr':
        return ([f'recall_top{k}' for k in cirr.RECALL_KS]
                + [f'recall_subset_top{k}' for k in cirr.SUBSET_KS] + ['recall_avg'])
    if dataset == 'shoes':
        return [f'recall_top{k}' for k in shoes.RECALL_KS] + ['recall_mean']
    raise ValueError(dataset)


DATASET_METRICS = {d: dataset_metrics(d) for d in ('css3d', 'fashion200k', 'mitstates',
                                                    'fashioniq', 'cirr', 'shoes')}


def is_recall(value):
    """A finite real number (JSON's true, strings, NaN and integers beyond a float's are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return abs(value) <= MAX_EXACT_INT
    return math.isfinite(value)


def tested_lines(run_dir, names, notes):
    """The metrics.jsonl lines with test recalls of the dataset's own names, in file order, each
    as {'it', 'metrics': {name: value}}; a line with a value that is no recall is skipped."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    f = open_regular(path, 'metrics.jsonl')
    if f is None:
        raise LeftOut('no test result (no metrics.jsonl)')
    lines = []
    with f:
        for number, text in enumerate(f, 1):
            try:
                record = parse_json(text)
            except ValueError as e:
                notes.append(f'{printable(path)}: line {number} is not JSON ({printable(e)}); skipped')
                continue
            if not isinstance(record, dict):
                continue
            found = {n: record[f'test {n}'] for n in names if f'test {n}' in record}
            if not found:
                continue
            bad = [(n, v) for n, v in found.items() if not is_recall(v)]
            if bad:
                name, value = bad[0]
                shown = json.dumps(value)
                shown = shown if len(shown) <= 40 else shown[:37] + '...'
                notes.append(f'{printable(path)}: line {number}: "test {name}" is {printable(shown)}, '
                             f'not a finite number; skipped')
                continue
            lines.append({'it': record.get('it'), 'metrics': {n: float(v) for n, v in found.items()}})
    if not lines:
        raise LeftOut('no test result in metrics.jsonl')
    return lines


def tracked_metric(options):
    return checkpoints.tracked_metric(options.get('dataset'))


def pick_line(lines, options, pick, final_it):
    """A finished run tested at its last iteration; without that line its metrics.jsonl is
    incomplete, whichever test is picked."""
    last_it = lines[-1]['it']
    if isinstance(last_it, bool) or last_it != final_it:
        raise LeftOut(f'no final test line (the last test is at iteration '
                      f'{printable(json.dumps(last_it))[:40]}, the run finished at {final_it})')
    if pick == 'final':
        return lines[-1]
    tracked = tracked_metric(options)[len('test '):]
    scored = [line for line in lines if tracked in line['metrics']]
    if not scored:
        raise LeftOut(f'no "test {tracked}" in metrics.jsonl')
    best = scored[0]
    for line in scored[1:]:  # the first of equal ones, as best_checkpoint.pth keeps it
        if line['metrics'][tracked] > best['metrics'][tracked]:
            best = line
    return best


def read_run(run_dir, pick, notes):
    """{'dir', 'options', 'data', 'weights', 'iterations', 'metrics': {name: recall}}, or LeftOut."""
    run_is_training(run_dir)
    record, options = read_record(run_dir)
    if options.get('test_only') is not False:
        raise LeftOut('a --test_only evaluation, not a training run')
    it, finished, target = last_checkpoint(run_dir)
    if not finished:
        raise LeftOut(f'unfinished: its last checkpoint is at iteration {it} of '
                      f'{printable(options.get("num_iters") if target is None else target)}')
    line = pick_line(tested_lines(run_dir, DATASET_METRICS[options['dataset']], notes),
                     options, pick, it)
    return {'dir': run_dir, 'options': options, 'data': data_key(record),
            'weights': weights_key(record, options), 'precision': precision_of(record, options),
            'iterations': it, 'metrics': line['metrics'], 'picked_it': line['it']}


def precision_of(record, options):
    """What the run computed in (bfloat16 and float32 runs are different experiments):
    options.json's `precision`, or for a run from before it was recorded, bfloat16 where --amp
    ran on CUDA (the only place it acted then) and float32 elsewhere."""
    if 'precision' in options:
        return options['precision']
    return 'bfloat16' if options.get('amp') and str(record.get('device')).startswith('cuda') else 'float32'


# ---------------------------------------------------------------------------------------------
# Grouping: one experiment per set of options that shape it, one table per experiment minus model.

def applies(option, dataset):
    return dataset in DATASET_OPTIONS.get(option, {dataset})


def experiment_options(run):
    dataset = run['options']['dataset']
    options = {k: v for k, v in run['options'].items()
               if k not in IGNORED_OPTIONS and applies(k, dataset)}
    options['num_iters'] = run['iterations']
    options['checkpoint'] = run['weights']
    options['precision'] = run['precision']
    return options


def key_of(value):
    return json.dumps(value, sort_keys=True, default=str)


def model_order(model):
    return (PAPER_ORDER.index(model), '') if model in PAPER_ORDER else (len(PAPER_ORDER), model)


def build_tables(runs):
    """[(table options, data key, {model: [runs]})], tables in a stable order: one per set of
    options and data (runs from before options.json recorded their data form their own)."""
    tables = {}
    for run in runs:
        options = experiment_options(run)
        model = options.pop('model')
        table = tables.setdefault(key_of([options, run['data']]), (options, run['data'], {}))
        table[2].setdefault(model, []).append(run)
    return [tables[k] for k in sorted(tables)]


def title_part(name, value):
    if name == 'checkpoint':
        return 'no --checkpoint' if value is None else f'--checkpoint={value}'
    if name == 'precision':  # not a flag: what --amp computed in
        return f"in {printable(str(value))}"
    return f'--{name}={value}'


def table_title(options, all_options, pick):
    """The dataset, then the options this table differs in from the others of its dataset (only
    options that apply to the dataset are in `options`; the iterations are said after them)."""
    differing = sorted({k for other in all_options if other['dataset'] == options['dataset']
                        for k in options if other.get(k) != options[k]} - {'num_iters'})
    parts = [str(options.get('dataset'))] + [title_part(k, options.get(k)) for k in differing]
    picked = ('final test recalls' if pick == 'final'
              else f'the test with the best {tracked_metric(options)}')
    return f'{", ".join(parts)} ({options.get("num_iters")} iterations; {picked}, in %)'


def data_line(data, groups):
    """Which data the table's runs used: its digest and the folders the runs found it in."""
    paths = sorted({str(run['options'].get('dataset_path')) for runs in groups.values() for run in runs})
    shown = ', '.join(paths[:3]) + (f' and {len(paths) - 3} more' if len(paths) > 3 else '')
    if data is None:
        return (f'data: not recorded (runs from before options.json named their data, pooled '
                f'whatever their --dataset_path) ({shown})')
    return f'data: {data_identity.short(data.split(":", 1)[1])} ({shown})'


def short_name(metric):
    """recall_top1_correct_composition -> R@1, recall_top10_correct_adj -> R@10 adj,
    recall_subset_top1 -> Rs@1, recall_top10_dress -> R@10 dress, recall_avg -> avg."""
    m = re.fullmatch(r'recall_(subset_)?top(\d+)(?:_correct)?(?:_(\w+))?', metric)
    if m:
        suffix = '' if m.group(3) in (None, 'composition') else ' ' + m.group(3).replace('_', ' ')
        return f'{"Rs" if m.group(1) else "R"}@{m.group(2)}{suffix}'
    return re.sub(r'^recall_', '', metric).replace('_', ' ')


def columns(options, groups):
    """The dataset's recall names that some run of the table reports, in the dataset's order,
    with short headers (the full names when two would read the same)."""
    reported = {n for runs in groups.values() for run in runs for n in run['metrics']}
    names = [n for n in DATASET_METRICS[options['dataset']] if n in reported]
    headers = [short_name(n) for n in names]
    if len(set(headers)) < len(headers):
        headers = list(names)
    return names, headers


def summary(values):
    """(mean, sample std or None, n) in percent."""
    percent = [100 * v for v in values]
    std = statistics.stdev(percent) if len(percent) > 1 else None
    return statistics.fmean(percent), std, len(percent)


def cell(values, plus_minus):
    if not values:
        return '-'
    mean, std, n = summary(values)
    runs = f'({n} run{"s" if n != 1 else ""})'
    return f'{mean:.1f} {runs}' if std is None else f'{mean:.1f} {plus_minus} {std:.1f} {runs}'


def rows(groups, names):
    for model in sorted(groups, key=model_order):
        runs = groups[model]
        yield model, [[r['metrics'][n] for r in runs if n in r['metrics']] for n in names]


# ---------------------------------------------------------------------------------------------
# Output: every name and title escaped for its format (they come from files anyone may write).

def markdown_escape(text):
    return re.sub(r'([\\|<>])', r'\\\1', printable(text))


def markdown_table(title, data, groups, names, headers):
    lines = [f'### {markdown_escape(title)}', '', markdown_escape(data), '',
             '| method | ' + ' | '.join(markdown_escape(h) for h in headers) + ' |',
             '| --- |' + ' --- |' * len(headers)]
    for model, values in rows(groups, names):
        lines.append(f'| {markdown_escape(model)} | ' + ' | '.join(cell(v, '±') for v in values) + ' |')
    return '\n'.join(lines) + '\n'


LATEX_SPECIALS = {'\\': r'\textbackslash{}', '{': r'\{', '}': r'\}', '^': r'\textasciicircum{}',
                  '~': r'\textasciitilde{}', '$': r'\$', '&': r'\&', '#': r'\#', '_': r'\_',
                  '%': r'\%'}


def latex_escape(text):
    return re.sub(r'[\\{}^~$&#_%]', lambda m: LATEX_SPECIALS[m.group()], printable(text))


def latex_table(title, data, groups, names, headers):
    lines = [f'% {latex_escape(title)}', f'% {latex_escape(data)}',
             r'\begin{tabular}{l' + 'c' * len(headers) + '}', r'\hline',
             'Method & ' + ' & '.join(latex_escape(h) for h in headers) + r' \\', r'\hline']
    for model, values in rows(groups, names):
        lines.append(latex_escape(model) + ' & ' + ' & '.join(cell(v, '$\\pm$') for v in values) + r' \\')
    lines += [r'\hline', r'\end{tabular}']
    return '\n'.join(lines) + '\n'


def csv_text(text):
    """A text cell that no spreadsheet reads as a formula (OWASP: a leading quote)."""
    text = printable(text)
    return "'" + text if text[:1] in ('=', '+', '-', '@', '\t', '\r') else text


def csv_table(title, data, groups, names, headers, out):
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(['table', 'data', 'method', 'runs']
                    + [csv_text(h) for header in headers for h in (header, f'{header} std')])
    for model, values in rows(groups, names):
        n = max(len(v) for v in values)
        cells = []
        for v in values:
            if not v:
                cells += ['', '']
                continue
            mean, std, _ = summary(v)
            cells += [f'{mean:.1f}', '' if std is None else f'{std:.1f}']
        writer.writerow([csv_text(title), csv_text(data), csv_text(model), n] + cells)


def write_tables(tables, fmt, pick, out):
    all_options = [options for options, _, _ in tables]
    for number, (options, data, groups) in enumerate(tables):
        if number:
            out.write('\n')
        title = table_title(options, all_options, pick)
        data_text = data_line(data, groups)
        names, headers = columns(options, groups)
        if fmt == 'markdown':
            out.write(markdown_table(title, data_text, groups, names, headers))
        elif fmt == 'latex':
            out.write(latex_table(title, data_text, groups, names, headers))
        else:
            csv_table(title, data_text, groups, names, headers, out)


def seed_notes(tables):
    """Two runs of one experiment with the same seed (say, a run and its continuation from its
    best checkpoint in a new folder) are most likely not independent samples."""
    for _, _, groups in tables:
        for runs in groups.values():
            seen = {}
            for run in runs:
                seed = key_of(run['options'].get('seed'))
                if seed in seen:
                    yield (f'note: {printable(run["dir"])} has the seed of {printable(seen[seed])} '
                           f'({printable(seed)}); both are counted')
                seen.setdefault(seed, run['dir'])


def make_tables(paths, pick):
    """(tables, runs left out, lines for stderr)."""
    notes = []
    run_dirs, without_options = find_run_folders(paths, notes)
    runs, messages = [], []
    for run_dir in run_dirs:
        try:
            runs.append(read_run(run_dir, pick, notes))
        except LeftOut as e:
            messages.append(f'left out {printable(run_dir)}: {e}')
    messages += [f'left out {printable(d)}: no {run_folder.OPTIONS_FILE} (a run from before it was '
                 f'written, or not a run folder)' for d in without_options]
    tables = build_tables(runs)
    return tables, len(messages), messages + notes + list(seed_notes(tables))


def main_cli(argv=None):
    opt = get_args_parser().parse_args(argv)
    try:
        tables, left_out, messages = make_tables(opt.folders, opt.pick)
        for message in messages:
            print(message, file=sys.stderr)
        if not tables:
            raise TableError(f'none of the {left_out} runs found has a final test result (each '
                             f'is named above with the reason)')
        write_tables(tables, opt.format, opt.pick, sys.stdout)
        sys.stdout.flush()
        if any(len(runs) == 1 for _, _, groups in tables for runs in groups.values()):
            print('(1 run: no standard deviation)', file=sys.stderr)
        return 0
    except TableError as e:
        print(f'results_table.py: error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('\nresults_table.py: interrupted', file=sys.stderr)
        return 130
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == '__main__':
    sys.exit(main_cli())
