"""The paper's tables from repeated runs (SPEC section 10): one row per method, a column per
recall, mean +- sample standard deviation over the runs that differ only in seed (and in what
does not change the experiment: comment, paths, workers, device).

    python results_table.py runs/                          # every run folder below runs/
    python results_table.py runs/A runs/B --pick=best --format=latex

A run folder is a folder with options.json (main.py writes it at the start of every run).  Runs
left out (unfinished, a --test_only evaluation, no test result) are named on stderr, one line each.
"""
import argparse
import csv
import json
import os
import re
import statistics
import sys

import torch

import checkpoints
import run_folder
from model_registry import MODELS

# Options that do not change what a run computes, beyond those a resume may change: a run's
# iteration count is its last checkpoint's (--num_iters may have grown on resume).
IGNORED_OPTIONS = ((checkpoints.RESUMABLE_FLAGS - {'num_iters'})
                   | {'seed', 'checkpoint', 'resume', 'resume_it', 'checkpoint_it', 'test_only',
                      'test_split', 'explicit_flags'})


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
                   help='run folders, or folders holding them (searched recursively for options.json)')
    p.add_argument('--pick', choices=['final', 'best'], default='final',
                   help="each run's final test (the last test line of its metrics.jsonl) or its test "
                        "with the best tracked recall (default: %(default)s)")
    p.add_argument('--format', choices=['markdown', 'csv', 'latex'], default='markdown',
                   help='output format (default: %(default)s)')
    return p


# ---------------------------------------------------------------------------------------------
# Finding and reading runs.

def find_run_folders(paths):
    """(run folders, folders that look like runs but have no options.json), each sorted."""
    runs, without_options, visited = set(), set(), set()
    for path in paths:
        if not os.path.isdir(path):
            raise TableError(f'{path}: no such folder')
        # Linked folders are followed (runs gathered by symbolic links), each visited once.
        for folder, subfolders, files in os.walk(path, followlinks=True):
            real = os.path.realpath(folder)
            if real in visited:
                subfolders[:] = []
                continue
            visited.add(real)
            if run_folder.OPTIONS_FILE in files:
                runs.add(real)
                subfolders[:] = []  # a run's own subfolders (feature_cache/) hold no runs
            elif 'metrics.jsonl' in files or 'latest_checkpoint.pth' in files:
                without_options.add(real)
            subfolders.sort()
    if not runs:
        raise TableError(f'{" ".join(paths)}: no run folders here (folders with '
                         f'{run_folder.OPTIONS_FILE}, which main.py writes at the start of every run)')
    return sorted(runs), sorted(without_options)


def read_options(run_dir):
    path = os.path.join(run_dir, run_folder.OPTIONS_FILE)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise LeftOut(f'{run_folder.OPTIONS_FILE} unreadable ({e})') from None
    if not isinstance(record, dict) or not isinstance(record.get('options'), dict):
        raise LeftOut(f'{run_folder.OPTIONS_FILE} is not a run\'s options (no "options")')
    return record['options']


def last_checkpoint(run_dir):
    """(iteration, finished) of the run's latest checkpoint; the weights are mapped, not read."""
    path = os.path.join(run_dir, 'latest_checkpoint.pth')
    if not os.path.isfile(path):
        raise LeftOut('unfinished: no latest_checkpoint.pth')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # an older file format cannot be mapped: the checked loader reads it all
        try:
            ckpt = checkpoints.load(path)
        except checkpoints.CheckpointError as e:
            raise LeftOut(f'unreadable checkpoint ({e})') from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('it'), int):
        raise LeftOut('latest_checkpoint.pth holds no iteration number')
    return ckpt['it'], bool(ckpt.get('finished', False))


def tested_lines(run_dir, notes):
    """The metrics.jsonl lines with test recalls, in file order."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    if not os.path.isfile(path):
        raise LeftOut('no test result (no metrics.jsonl)')
    lines = []
    with open(path) as f:
        for number, text in enumerate(f, 1):
            try:
                record = json.loads(text)
            except ValueError:
                notes.append(f'{path}: line {number} is not JSON; skipped')
                continue
            if isinstance(record, dict) and any(k.startswith('test ') for k in record):
                lines.append(record)
    if not lines:
        raise LeftOut('no test result in metrics.jsonl')
    return lines


def tracked_metric(options):
    return checkpoints.tracked_metric(options.get('dataset'))


def pick_line(lines, options, pick, final_it):
    """A finished run tested at its last iteration; without that line its metrics.jsonl is
    incomplete, whichever test is picked."""
    if lines[-1].get('it') != final_it:
        raise LeftOut(f'no final test line (the last test is at iteration {lines[-1].get("it")}, '
                      f'the run finished at {final_it})')
    if pick == 'final':
        return lines[-1]
    tracked = tracked_metric(options)
    scored = [line for line in lines if isinstance(line.get(tracked), (int, float))]
    if not scored:
        raise LeftOut(f'no "{tracked}" in metrics.jsonl')
    best = scored[0]
    for line in scored[1:]:  # the first of equal ones, as best_checkpoint.pth keeps it
        if line[tracked] > best[tracked]:
            best = line
    return best


def read_run(run_dir, pick, notes):
    """{'dir', 'options', 'iterations', 'metrics': {name: recall} in file order}, or LeftOut."""
    options = read_options(run_dir)
    if options.get('test_only'):
        raise LeftOut('a --test_only evaluation, not a training run')
    it, finished = last_checkpoint(run_dir)
    if not finished:
        raise LeftOut(f'unfinished: its last checkpoint is at iteration {it} of '
                      f'{options.get("num_iters")}')
    line = pick_line(tested_lines(run_dir, notes), options, pick, it)
    metrics = {k[len('test '):]: v for k, v in line.items()
               if k.startswith('test ') and isinstance(v, (int, float))}
    return {'dir': run_dir, 'options': options, 'iterations': it, 'metrics': metrics,
            'picked_it': line.get('it')}


# ---------------------------------------------------------------------------------------------
# Grouping: one experiment per set of options that shape it, one table per experiment minus model.

def experiment_options(run):
    options = {k: v for k, v in run['options'].items() if k not in IGNORED_OPTIONS}
    options['num_iters'] = run['iterations']
    return options


def key_of(options):
    return json.dumps(options, sort_keys=True, default=str)


def model_order(model):
    names = list(MODELS)
    return (names.index(model), '') if model in names else (len(names), str(model))


def build_tables(runs):
    """[(table options, {model: [runs]})], tables in a stable order."""
    tables = {}
    for run in runs:
        options = experiment_options(run)
        model = options.pop('model', None)
        table = tables.setdefault(key_of(options), (options, {}))
        table[1].setdefault(model, []).append(run)
    return [tables[k] for k in sorted(tables)]


def table_title(options, all_options, pick):
    """The dataset, then the options this table differs in from the others."""
    differing = sorted({k for other in all_options for k in set(options) | set(other)
                        if other.get(k) != options.get(k)} - {'dataset'})
    parts = [str(options.get('dataset'))] + [f'--{k}={options.get(k)}' for k in differing]
    picked = ('final test recalls' if pick == 'final'
              else f'the test with the best {tracked_metric(options)}')
    return f'{", ".join(parts)} ({options.get("num_iters")} iterations; {picked}, in %)'


def short_name(metric):
    """recall_top1_correct_composition -> R@1, recall_top10_correct_adj -> R@10 adj,
    recall_subset_top1 -> Rs@1, recall_top10_dress -> R@10 dress, recall_avg -> avg."""
    m = re.fullmatch(r'recall_(subset_)?top(\d+)(?:_correct)?(?:_(\w+))?', metric)
    if m:
        suffix = '' if m.group(3) in (None, 'composition') else ' ' + m.group(3).replace('_', ' ')
        return f'{"Rs" if m.group(1) else "R"}@{m.group(2)}{suffix}'
    return re.sub(r'^recall_', '', metric).replace('_', ' ')


def columns(groups):
    """Metric names in the order the runs' metrics.jsonl lines hold them, with short headers
    (the full names when two would read the same)."""
    names = []
    for runs in groups.values():
        for run in runs:
            names += [n for n in run['metrics'] if n not in names]
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
# Output.

def markdown_table(title, groups, names, headers):
    lines = [f'### {title}', '', '| method | ' + ' | '.join(headers) + ' |',
             '| --- |' + ' --- |' * len(headers)]
    for model, values in rows(groups, names):
        lines.append(f'| {model} | ' + ' | '.join(cell(v, '±') for v in values) + ' |')
    return '\n'.join(lines) + '\n'


def latex_escape(text):
    return re.sub(r'([_%&#$])', r'\\\1', str(text))


def latex_table(title, groups, names, headers):
    lines = [f'% {title}', r'\begin{tabular}{l' + 'c' * len(headers) + '}', r'\hline',
             'Method & ' + ' & '.join(latex_escape(h) for h in headers) + r' \\', r'\hline']
    for model, values in rows(groups, names):
        lines.append(latex_escape(model) + ' & ' + ' & '.join(cell(v, '$\\pm$') for v in values) + r' \\')
    lines += [r'\hline', r'\end{tabular}']
    return '\n'.join(lines) + '\n'


def csv_table(title, groups, names, headers, out):
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(['table', 'method', 'runs'] + [h for header in headers for h in (header, f'{header} std')])
    for model, values in rows(groups, names):
        n = max(len(v) for v in values)
        cells = []
        for v in values:
            if not v:
                cells += ['', '']
                continue
            mean, std, _ = summary(v)
            cells += [f'{mean:.1f}', '' if std is None else f'{std:.1f}']
        writer.writerow([title, model, n] + cells)


def write_tables(tables, fmt, pick, out):
    all_options = [options for options, _ in tables]
    for number, (options, groups) in enumerate(tables):
        if number:
            out.write('\n')
        title = table_title(options, all_options, pick)
        names, headers = columns(groups)
        if fmt == 'markdown':
            out.write(markdown_table(title, groups, names, headers))
        elif fmt == 'latex':
            out.write(latex_table(title, groups, names, headers))
        else:
            csv_table(title, groups, names, headers, out)


def seed_notes(tables):
    """Two runs of one experiment with the same seed (say, a run and its continuation from its
    best checkpoint in a new folder) are most likely not independent samples."""
    for _, groups in tables:
        for runs in groups.values():
            seen = {}
            for run in runs:
                seed = run['options'].get('seed')
                if seed in seen:
                    yield f'note: {run["dir"]} has the seed of {seen[seed]} ({seed}); both are counted'
                seen.setdefault(seed, run['dir'])


def make_tables(paths, pick):
    """(tables, runs left out, lines for stderr)."""
    run_dirs, without_options = find_run_folders(paths)
    runs, messages, notes = [], [], []
    for run_dir in run_dirs:
        try:
            runs.append(read_run(run_dir, pick, notes))
        except LeftOut as e:
            messages.append(f'left out {run_dir}: {e}')
    messages += [f'left out {d}: no {run_folder.OPTIONS_FILE} (a run from before it was written, or '
                 f'not a run folder)' for d in without_options]
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
        if any(len(runs) == 1 for _, groups in tables for runs in groups.values()):
            print('(1 run: no standard deviation)', file=sys.stderr)
        return 0
    except TableError as e:
        print(f'results_table.py: error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main_cli())
