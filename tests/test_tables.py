"""options.json in every run folder and results_table.py (issue 19 section 4, SPEC 10)."""
import json
import os
import subprocess

import pytest
import torch

from conftest import REPO, TINY, run_main

import main
import run_folder

# pytest-xdist: one worker runs them all, building the module-scoped real run once.
pytestmark = pytest.mark.xdist_group('test_tables')


def run_dirs(cwd):
    return sorted(os.path.join(cwd, 'runs', d) for d in os.listdir(os.path.join(cwd, 'runs')))


# ---------------------------------------------------------------------------------------------
# options.json

@pytest.mark.slow
def test_options_json_is_written_at_the_start_and_resume_in_place_keeps_it(css_root, tmp_path):
    args = TINY + [f'--dataset_path={css_root}', '--num_iters=2', '--seed=5', '--comment=_opts',
                   '--learning_rate=0.02']
    assert run_main(args, cwd=tmp_path).returncode == 0
    (run_dir,) = run_dirs(str(tmp_path))
    path = os.path.join(run_dir, 'options.json')
    record = json.load(open(path))
    options = record['options']
    assert options['seed'] == 5 and record['seed'] == 5
    assert options['learning_rate'] == 0.02 and options['embed_dim'] == 16
    assert options['model'] == 'tirg' and options['num_iters'] == 2
    assert options['dataset_path'] == os.path.abspath(css_root)
    assert options['loss'] == 'soft_triplet'  # the defaults too, not only the flags given
    assert record['torch_version'] == torch.__version__
    head = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True, text=True)
    assert record['project_version'] == head.stdout.strip() and len(record['project_version']) == 40
    assert record['device'] == 'cpu' and record['device_name'] == 'cpu'
    assert record['processes'] == 1
    before = open(path, 'rb').read()
    resumed = run_main(args[:-4] + ['--num_iters=4', '--resume=' + os.path.join(run_dir, 'latest_checkpoint.pth')],
                       cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert open(path, 'rb').read() == before
    assert not [n for n in os.listdir(run_dir) if n.endswith('.tmp')]


def test_project_version_outside_git_or_without_git(tmp_path, monkeypatch):
    assert run_folder.project_version(str(tmp_path)) == (None, None)
    monkeypatch.setenv('PATH', str(tmp_path))  # no git program at all
    assert run_folder.project_version(REPO) == (None, None)


def test_a_failed_options_write_leaves_no_file(tmp_path, monkeypatch):
    opt = main.parse_opt(['--seed=1'])

    def fail(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(main.checkpoints.os, 'replace', fail)  # the write done, its rename fails
    with pytest.raises(OSError, match='options.json: cannot write \\(No space left on device\\)'):
        run_folder.write_options_file(str(tmp_path), opt, torch.device('cpu'))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# results_table.py: one real run (concat), and run folders in the exact format main.py writes
# (options.json from the real run, metrics.jsonl lines as evaluate() appends them, the real
# finished checkpoint linked in).

import argparse
import csv
import io
import shutil

import results_table

NAMES = [f'recall_top{k}_correct_composition' for k in (1, 5, 10, 50, 100)]


@pytest.fixture(scope='module')
def real_run(tmp_path_factory):
    from conftest import write_css_fixture
    base = tmp_path_factory.mktemp('tables')
    root = str(base / 'css')
    write_css_fixture(root)
    work = base / 'work'
    work.mkdir()
    result = run_main(TINY + [f'--dataset_path={root}', '--num_iters=4', '--seed=11',
                              '--model=concat', '--comment=_real'], cwd=str(work))
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(str(work))
    return run_dir


def metrics_line(it, recalls, prefix='test', epoch=0, names=NAMES):
    """A line as main.evaluate appends it: train metrics, then test metrics."""
    line = {'it': it, 'epoch': epoch}
    line.update({f'train {n}': 0.5 for n in names})
    line.update({f'{prefix} {n}': r for n, r in zip(names, recalls)})
    return line


def synthetic_run(parent, name, real_run, lines, finished=True, record_fields=None, **options):
    """`record_fields`: options.json's own fields beyond "options" ("data", ...; None removes)."""
    run_dir = os.path.join(parent, name)
    os.makedirs(run_dir)
    record = json.load(open(os.path.join(real_run, 'options.json')))
    record['options'].update(options)
    record['seed'] = record['options']['seed']
    for field, value in (record_fields or {}).items():
        if value is None:
            record.pop(field, None)
        else:
            record[field] = value
    with open(os.path.join(run_dir, 'options.json'), 'w') as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
        for line in lines:
            f.write(json.dumps(line) + '\n')
    ckpt = os.path.join(run_dir, 'latest_checkpoint.pth')
    if finished:
        os.link(os.path.join(real_run, 'latest_checkpoint.pth'), ckpt)
    else:
        torch.save({'it': 2, 'opt': argparse.Namespace(**record['options']), 'finished': False,
                    'model_state_dict': {}}, ckpt)
    return run_dir


def five(r1):
    """R@1 .. R@100 from R@1: +0.1 each step up to 1."""
    return [min(1.0, r1 + 0.1 * i) for i in range(5)]


@pytest.fixture
def runs(real_run, tmp_path):
    """tirg and imgonly, three seeds each (seed 2 on other paths, workers, device; seed 3 resumed
    to 4 iterations from --num_iters=2), the finished concat run, and runs to leave out."""
    parent = str(tmp_path / 'runs')
    tirg = {1: (0.80, 0.70), 2: (0.75, 0.72), 3: (0.60, 0.77)}  # seed: (R@1 at it 2, at it 4)
    for seed, (early, final) in tirg.items():
        extra = ({'dataset_path': '/elsewhere/css', 'loader_num_workers': 3, 'device': 'cuda',
                  'comment': '_other'} if seed == 2 else {'num_iters': 2} if seed == 3 else {})
        synthetic_run(parent, f'tirg_{seed}', real_run,
                      [metrics_line(2, five(early)), metrics_line(4, five(final), epoch=1)],
                      model='tirg', seed=seed, **extra)
    for seed, final in {1: 0.10, 2: 0.12, 3: 0.14}.items():
        synthetic_run(parent, f'imgonly_{seed}', real_run,
                      [metrics_line(2, five(0.5)), metrics_line(4, five(final))],
                      model='imgonly', seed=seed)
    os.symlink(real_run, os.path.join(parent, 'concat_real'))
    synthetic_run(parent, 'tirg_unfinished', real_run, [metrics_line(2, five(0.9))],
                  finished=False, model='tirg', seed=4)
    synthetic_run(parent, 'tirg_no_final_line', real_run, [metrics_line(2, five(0.9))],
                  model='tirg', seed=5)
    synthetic_run(parent, 'tirg_other_lr', real_run, [metrics_line(4, five(0.5))],
                  model='tirg', seed=1, learning_rate=0.05)
    synthetic_run(parent, 'test_only', real_run, [metrics_line(0, five(0.9))],
                  model='tirg', seed=6, test_only=True)
    old = synthetic_run(parent, 'before_options_json', real_run, [metrics_line(4, five(0.9))],
                        model='tirg', seed=7)
    os.remove(os.path.join(old, 'options.json'))
    return parent


def table_cli(args, capsys):
    code = results_table.main_cli(args)
    out, err = capsys.readouterr()
    return code, out, err


def markdown_row(out, method, table=0):
    body = out.split('### ')[1 + table]
    (row,) = [line for line in body.splitlines() if line.startswith(f'| {method} |')]
    return [c.strip() for c in row.strip('|').split('|')][1:]


def test_mean_and_sample_std_of_the_final_test_recalls(runs, real_run, capsys):
    code, out, err = table_cli([runs], capsys)
    assert code == 0, err
    assert out.count('### ') == 2  # the learning-rate run is another experiment: its own table
    title = out.split('### ')[1].splitlines()[0]
    assert title.startswith('css3d, --learning_rate=0.01 (4 iterations; final test recalls')
    assert '| method | R@1 | R@5 | R@10 | R@50 | R@100 |' in out
    # tirg R@1: 70, 72, 77 -> mean 73.0, sample std sqrt((9 + 1 + 16) / 2) = 3.61
    assert markdown_row(out, 'tirg')[0] == '73.0 ± 3.6 (3 runs)'
    # R@5 = R@1 + 10: 80, 82, 87
    assert markdown_row(out, 'tirg')[1] == '83.0 ± 3.6 (3 runs)'
    # imgonly R@1: 10, 12, 14 -> 12.0 +- 2.0
    assert markdown_row(out, 'imgonly')[0] == '12.0 ± 2.0 (3 runs)'
    real = [json.loads(line) for line in open(os.path.join(real_run, 'metrics.jsonl'))][-1]
    concat = markdown_row(out, 'concat')
    for value, name in zip(concat, NAMES):
        assert value == f'{100 * real["test " + name]:.1f} (1 run)'
    # The paper's row order: imgonly, concat, tirg.
    first = out.split('### ')[1]
    assert first.index('| imgonly') < first.index('| concat') < first.index('| tirg')
    assert markdown_row(out, 'tirg', table=1)[0] == '50.0 (1 run)'
    assert '--learning_rate=0.05' in out.split('### ')[2].splitlines()[0]
    lines = err.strip().splitlines()
    for name, reason in [('tirg_unfinished', 'unfinished: its last checkpoint is at iteration 2'),
                         ('tirg_no_final_line', 'no final test line'),
                         ('test_only', 'a --test_only evaluation'),
                         ('before_options_json', 'no options.json')]:
        (line,) = [l for l in lines if os.sep + name + ':' in l]
        assert line.startswith('left out ') and reason in line
    assert '(1 run: no standard deviation)' in lines


def test_pick_best_takes_the_best_tracked_test_and_says_so(runs, capsys):
    code, out, err = table_cli([runs, '--pick=best'], capsys)
    assert code == 0, err
    assert 'the test with the best test recall_top1_correct_composition' in out.split('### ')[1].splitlines()[0]
    # tirg best R@1 per seed: 80 (it 2), 75 (it 2), 77 (it 4) -> 77.3 +- 2.5
    assert markdown_row(out, 'tirg')[0] == '77.3 ± 2.5 (3 runs)'
    assert markdown_row(out, 'tirg')[1] == '87.3 ± 2.5 (3 runs)'
    assert 'tirg_unfinished' in err and 'tirg_no_final_line' in err
    assert markdown_row(out, 'imgonly')[0] == '50.0 ± 0.0 (3 runs)'


def test_csv_and_latex(runs, capsys):
    code, out, err = table_cli([runs, '--format=csv'], capsys)
    assert code == 0, err
    rows = [r for r in csv.DictReader(io.StringIO(out.split('\n\n')[0]))]
    (tirg,) = [r for r in rows if r['method'] == 'tirg']
    assert (tirg['runs'], tirg['R@1'], tirg['R@1 std'], tirg['R@100']) == ('3', '73.0', '3.6', '100.0')
    (concat,) = [r for r in rows if r['method'] == 'concat']
    assert concat['runs'] == '1' and concat['R@1 std'] == ''
    code, out, err = table_cli([runs, '--format=latex'], capsys)
    assert code == 0, err
    assert r'\begin{tabular}{lccccc}' in out and out.count(r'\end{tabular}') == 2
    assert r'tirg & 73.0 $\pm$ 3.6 (3 runs) & 83.0 $\pm$ 3.6 (3 runs)' in out


def test_columns_follow_the_dataset_metrics(real_run, tmp_path, capsys):
    """FashionIQ's per-category recalls, in metrics.jsonl order; best = the best recall_mean."""
    names = ['recall_top10_dress', 'recall_top50_dress', 'recall_top10_mean', 'recall_mean']
    parent = str(tmp_path / 'fiq')
    synthetic_run(parent, 'fiq', real_run,
                  [metrics_line(2, [0.9, 0.1, 0.1, 0.1], names=names),
                   metrics_line(4, [0.2, 0.4, 0.3, 0.35], names=names)],
                  model='tirg', seed=1, dataset='fashioniq')
    code, out, err = table_cli([parent, '--pick=best'], capsys)
    assert code == 0, err
    assert '| method | R@10 dress | R@50 dress | R@10 mean | mean |' in out
    assert markdown_row(out, 'tirg') == ['20.0 (1 run)', '40.0 (1 run)', '30.0 (1 run)', '35.0 (1 run)']
    assert 'best test recall_mean' in out
    assert results_table.short_name('recall_top5_correct_adj') == 'R@5 adj'
    assert results_table.short_name('recall_subset_top2') == 'Rs@2'
    assert results_table.short_name('recall_avg') == 'avg'


@pytest.mark.parametrize('case', ['empty', 'foreign', 'missing', 'only_unfinished'])
def test_bad_folders(real_run, tmp_path, capsys, case):
    folder = tmp_path / 'x'
    if case != 'missing':
        folder.mkdir()
    if case == 'foreign':
        (folder / 'notes.txt').write_text('hello')
        (folder / 'sub').mkdir()
        (folder / 'sub' / 'data.json').write_text('{}')
    if case == 'only_unfinished':
        synthetic_run(str(folder), 'u', real_run, [metrics_line(2, five(0.9))], finished=False,
                      model='tirg', seed=1)
    code, out, err = table_cli([str(folder)], capsys)
    assert code == 1 and out == ''
    lines = err.strip().splitlines()
    assert lines[-1].startswith('results_table.py: error: ')
    if case == 'only_unfinished':
        assert len(lines) == 2 and 'unfinished' in lines[0]
    else:
        assert len(lines) == 1 and str(folder) in lines[0]


def test_2d_to_3d_runs_get_their_own_table_and_a_repeated_seed_is_noted(real_run, tmp_path, capsys):
    parent = str(tmp_path / 'css')
    for name, queries, seed, r1 in [('a', '3d', 1, 0.6), ('b', '2d', 1, 0.3), ('c', '2d', 1, 0.4)]:
        synthetic_run(parent, name, real_run, [metrics_line(4, five(r1))], model='tirg', seed=seed,
                      css_query_images=queries)
    code, out, err = table_cli([parent], capsys)
    assert code == 0, err
    titles = [t.splitlines()[0] for t in out.split('### ')[1:]]
    assert titles[0].startswith('css3d, --css_query_images=2d (')
    assert titles[1].startswith('css3d, --css_query_images=3d (')
    # 2D->3D: 30 and 40 -> 35.0 +- 7.1; 3D->3D: 60.
    assert markdown_row(out, 'tirg', table=0)[0] == '35.0 ± 7.1 (2 runs)'
    assert markdown_row(out, 'tirg', table=1)[0] == '60.0 (1 run)'
    (note,) = [line for line in err.splitlines() if line.startswith('note: ')]
    assert os.path.join(parent, 'c') in note and os.path.join(parent, 'b') in note


# ---------------------------------------------------------------------------------------------
# Issue 23 items 2-8: what a table may pool, and what it reads.

import math
import socket
import sys

import data_identity
from conftest import write_css_fixture


def tables_by_data(out):
    """{data line: the table's text} of a markdown output."""
    found = {}
    for part in out.split('### ')[1:]:
        (data,) = [line for line in part.splitlines() if line.startswith('data: ')]
        found[data] = part
    return found


def row_of(part, method):
    (row,) = [line for line in part.splitlines() if line.startswith(f'| {method} |')]
    return [c.strip() for c in row.strip('|').split('|')][1:]


def test_a_run_whose_folder_is_locked_by_a_live_process_is_training_and_left_out(runs, capsys):
    held = os.path.join(runs, 'tirg_1')
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys; sys.path.insert(0, sys.argv[1]); import run_lock; '
         'run_lock.acquire(sys.argv[2]); print("locked", flush=True); sys.stdin.read()', REPO, held],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'locked\n'
        code, out, err = table_cli([runs], capsys)
        assert code == 0, err
        (line,) = [line for line in err.splitlines() if os.sep + 'tirg_1:' in line]
        assert line == f'left out {held}: training: held by {socket.gethostname()}, pid {holder.pid}'
        # Seeds 2 and 3 only: 72 and 77.
        assert markdown_row(out, 'tirg')[0] == '74.5 ± 3.5 (2 runs)'
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    code, out, err = table_cli([runs], capsys)
    assert markdown_row(out, 'tirg')[0] == '73.0 ± 3.6 (3 runs)' and 'training:' not in err
    assert not os.path.exists(os.path.join(runs, 'imgonly_1', 'run.lock'))  # the probe writes nothing


def test_the_same_data_at_two_paths_pools_and_other_data_never_does(real_run, tmp_path, capsys):
    """A real-CSS-like run at 70 % and one on other data at 10 % are never one row '40.0 ± 42.4'."""
    root = str(tmp_path / 'css')
    write_css_fixture(root)
    moved = str(tmp_path / 'moved' / 'css')
    shutil.copytree(root, moved)
    modified = str(tmp_path / 'css_modified')
    shutil.copytree(root, modified)
    npy = os.path.join(modified, 'css_toy_dataset_novel2_small.dup.npy')
    data = bytearray(open(npy, 'rb').read())
    data[-3] ^= 1
    open(npy, 'wb').write(bytes(data))
    parent = str(tmp_path / 'runs')
    for name, path, seed, r1, recorded in [('a', root, 1, 0.7, True), ('b', moved, 2, 0.8, True),
                                           ('c', modified, 3, 0.1, True),
                                           ('old_1', '/old/css', 4, 0.3, False),
                                           ('old_2', '/other/css', 5, 0.5, False)]:
        synthetic_run(parent, name, real_run, [metrics_line(4, five(r1))], model='tirg', seed=seed,
                      dataset_path=path,
                      record_fields={'data': data_identity.identify('css3d', path) if recorded else None})
    code, out, err = table_cli([parent], capsys)
    assert code == 0, err
    same = data_identity.short(data_identity.identify('css3d', root)['digest'])
    other = data_identity.short(data_identity.identify('css3d', modified)['digest'])
    assert same != other
    tables = tables_by_data(out)
    assert sorted(tables) == sorted([
        f'data: {same} ({root}, {moved})', f'data: {other} ({modified})',
        'data: not recorded (runs from before options.json named their data, pooled whatever '
        'their --dataset_path) (/old/css, /other/css)'])
    assert row_of(tables[f'data: {same} ({root}, {moved})'], 'tirg')[0] == '75.0 ± 7.1 (2 runs)'
    assert row_of(tables[f'data: {other} ({modified})'], 'tirg')[0] == '10.0 (1 run)'
    (old,) = [part for data, part in tables.items() if 'not recorded' in data]
    assert row_of(old, 'tirg')[0] == '40.0 ± 14.1 (2 runs)'
    code, out, err = table_cli([parent, '--format=latex'], capsys)
    assert f'% data: {same} ({root.replace("_", chr(92) + "_")}, ' in out
    code, out, err = table_cli([parent, '--format=csv'], capsys)
    data_cells = {r['data'] for r in csv.DictReader(io.StringIO(out.split('\n\n')[0]))}
    assert len(data_cells) == 1 and data_cells.pop().startswith('data: ')


def test_a_run_from_a_checkpoints_weights_is_its_own_experiment_keyed_by_its_content(real_run, tmp_path, capsys):
    parent = str(tmp_path / 'runs')
    first, second = 'a1' * 32, 'b2' * 32
    for name, checkpoint, digest, r1 in [('scratch', None, None, 0.5), ('from_1', '/x/a.pth', first, 0.6),
                                         ('from_1_moved', '/y/copy.pth', first, 0.8),
                                         ('from_2', '/x/a.pth', second, 0.9),
                                         ('from_old', '/z/old.pth', None, 0.3)]:
        start = {'path': checkpoint, 'digest': digest} if digest else None
        synthetic_run(parent, name, real_run, [metrics_line(4, five(r1))], model='tirg', seed=1,
                      checkpoint=checkpoint, record_fields={'initial_checkpoint': start})
    code, out, err = table_cli([parent], capsys)
    assert code == 0, err
    tables = {part.splitlines()[0]: part for part in out.split('### ')[1:]}
    suffix = ' (4 iterations; final test recalls, in %)'
    assert sorted(tables) == sorted(['css3d, no --checkpoint' + suffix,
                                     'css3d, --checkpoint=content a1a1a1a1a1a1' + suffix,
                                     'css3d, --checkpoint=content b2b2b2b2b2b2' + suffix,
                                     'css3d, --checkpoint=file /z/old.pth (its content not recorded)' + suffix])
    assert row_of(tables['css3d, --checkpoint=content a1a1a1a1a1a1' + suffix], 'tirg')[0] == '70.0 ± 14.1 (2 runs)'
    assert row_of(tables['css3d, no --checkpoint' + suffix], 'tirg')[0] == '50.0 (1 run)'


def edit_options(run_dir, remove=()):
    path = os.path.join(run_dir, 'options.json')
    record = json.load(open(path))
    for name in remove:
        del record['options'][name]
    json.dump(record, open(path, 'w'))


SHOES_NAMES = ['recall_top1', 'recall_top10', 'recall_top50', 'recall_mean']
FIQ_NAMES = ['recall_top10_dress', 'recall_top50_dress', 'recall_top10_mean', 'recall_top50_mean',
             'recall_mean']


def test_an_option_from_before_its_flag_is_its_default_and_titles_name_the_datasets_own(real_run, tmp_path, capsys):
    parent = str(tmp_path / 'runs')
    old = synthetic_run(parent, 'old', real_run, [metrics_line(4, five(0.6))], model='tirg', seed=1)
    edit_options(old, remove=['img_backbone', 'css_query_images', 'shoes_protocol', 'fiq_protocol'])
    synthetic_run(parent, 'new', real_run, [metrics_line(4, five(0.8))], model='tirg', seed=2,
                  img_backbone='resnet18', css_query_images='3d', fiq_protocol='val')  # not CSS's
    for seed, protocol, r in [(1, 'split', 0.2), (2, 'val', 0.4)]:
        synthetic_run(parent, f'fiq_{protocol}', real_run, [metrics_line(4, [r] * 5, names=FIQ_NAMES)],
                      model='tirg', seed=seed, dataset='fashioniq', fiq_protocol=protocol)
    shoes_run = synthetic_run(parent, 'shoes', real_run, [metrics_line(4, [0.3] * 4, names=SHOES_NAMES)],
                              model='tirg', seed=1, dataset='shoes', fiq_protocol='split')
    edit_options(shoes_run, remove=['shoes_protocol'])
    code, out, err = table_cli([parent], capsys)
    assert code == 0, err
    suffix = ' (4 iterations; final test recalls, in %)'
    tables = {part.splitlines()[0]: part for part in out.split('### ')[1:]}
    assert sorted(tables) == ['css3d' + suffix, 'fashioniq, --fiq_protocol=split' + suffix,
                              'fashioniq, --fiq_protocol=val' + suffix, 'shoes' + suffix]
    assert row_of(tables['css3d' + suffix], 'tirg')[0] == '70.0 ± 14.1 (2 runs)'
    assert row_of(tables['shoes' + suffix], 'tirg') == ['30.0 (1 run)'] * 4


def test_only_the_datasets_own_finite_recalls_are_read(real_run, tmp_path, capsys):
    parent = str(tmp_path / 'runs')
    foreign = metrics_line(4, five(0.6))
    foreign.update({'test accuracy': 0.99, 'test loss': float('nan'), 'test recall_top1_dress': 0.4,
                    'test note': 'not read'})
    synthetic_run(parent, 'foreign', real_run, [foreign], model='tirg', seed=1)
    bad = {'true': True, 'text': '0.5', 'nan': float('nan'), 'huge': 10 ** 400, 'inf': float('inf')}
    for name, value in bad.items():
        line = metrics_line(4, five(0.9))
        line['test recall_top5_correct_composition'] = value
        run_dir = synthetic_run(parent, f'bad_{name}', real_run, [metrics_line(2, five(0.1)), line],
                                model='concat', seed=1)
        with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:  # NaN and Infinity as Python writes them
            f.write(json.dumps(metrics_line(2, five(0.1))) + '\n' + json.dumps(line) + '\n')
    code, out, err = table_cli([parent], capsys)
    assert code == 0, err
    assert '| method | R@1 | R@5 | R@10 | R@50 | R@100 |' in out and 'accuracy' not in out
    assert markdown_row(out, 'tirg')[0] == '60.0 (1 run)'
    shown = {'true': 'true', 'text': '"0.5"', 'nan': 'NaN', 'huge': '1' + '0' * 36 + '...', 'inf': 'Infinity'}
    for name in bad:
        path = os.path.join(parent, f'bad_{name}', 'metrics.jsonl')
        (note,) = [line for line in err.splitlines() if line.startswith(path)]
        assert note == (f'{path}: line 2: "test recall_top5_correct_composition" is {shown[name]}, '
                        f'not a finite number; skipped')
        (left,) = [line for line in err.splitlines() if line.startswith(f'left out {os.path.dirname(path)}:')]
        assert left.endswith('no final test line (the last test is at iteration 2, the run finished at 4)')
    assert '| concat |' not in out


def test_pick_best_never_takes_a_nan_and_keeps_the_earlier_of_tied_lines(real_run, tmp_path, capsys):
    parent = str(tmp_path / 'runs')
    nan_line = metrics_line(2, [float('nan'), 0.9, 0.9, 0.9, 0.9])
    run_dir = synthetic_run(parent, 'nan', real_run, [], model='tirg', seed=1)
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
        f.write(json.dumps(nan_line) + '\n' + json.dumps(metrics_line(4, five(0.3))) + '\n')
    # Tied R@1 (the tracked recall) at iterations 2 and 4; R@5 tells which line was taken.
    synthetic_run(parent, 'tie', real_run, [metrics_line(2, [0.6, 0.9, 0.9, 0.9, 0.9]),
                                            metrics_line(4, [0.6, 0.7, 0.7, 0.7, 0.7])],
                  model='concat', seed=1)
    code, out, err = table_cli([parent, '--pick=best'], capsys)
    assert code == 0, err
    assert markdown_row(out, 'tirg')[:2] == ['30.0 (1 run)', '40.0 (1 run)']
    assert markdown_row(out, 'concat')[:2] == ['60.0 (1 run)', '90.0 (1 run)']


@pytest.mark.parametrize('finished', ['no', 1, 'yes'])
def test_finished_means_the_value_true(real_run, tmp_path, capsys, finished):
    parent = str(tmp_path / 'runs')
    run_dir = synthetic_run(parent, 'run', real_run, [metrics_line(4, five(0.6))], model='tirg', seed=1)
    ckpt = os.path.join(run_dir, 'latest_checkpoint.pth')
    os.remove(ckpt)
    torch.save({'it': 4, 'finished': finished, 'model_state_dict': {}}, ckpt)
    code, out, err = table_cli([parent], capsys)
    assert code == 1
    assert f'left out {run_dir}: unfinished: its last checkpoint is at iteration 4 of 4' in err


def test_methods_come_in_the_papers_order(real_run, tmp_path, capsys):
    paper = ['imgonly', 'textonly', 'concat', 'show_and_tell', 'param_hashing', 'attribute_operator',
             'relationship', 'film', 'tirg', 'tirg_lastconv', 'tirg_gate_only', 'tirg_res_only']
    parent = str(tmp_path / 'runs')
    for n, model in enumerate(['zz_custom', 'aa_custom'] + sorted(paper)):
        synthetic_run(parent, f'{n}_{model}', real_run, [metrics_line(4, five(0.5))], model=model, seed=1)
    code, out, err = table_cli([parent], capsys)
    assert code == 0, err
    methods = [line.split('|')[1].strip() for line in out.splitlines()[6:]]
    assert methods == paper + ['aa_custom', 'zz_custom']


# ---------------------------------------------------------------------------------------------
# Issue 23 item 8: any folder a user can point it at.

def escape_checks(fmt, out):
    if fmt == 'latex':
        assert '\\input' not in out and '\\write18' not in out
        for line in out.splitlines():  # only the table's own commands
            assert re.fullmatch(r'(|% .*|\\begin\{tabular\}\{l+c*\}|\\hline|\\end\{tabular\}|.* \\\\)', line), line
    elif fmt == 'markdown':  # every row of a table has its header's cells (the walk of / finds others' runs)
        for table in out.split('### ')[1:]:
            cells = [len(re.findall(r'(?<!\\)\|', line)) for line in table.splitlines() if line.startswith('|')]
            assert len(set(cells)) == 1, table
    else:
        for row in csv.reader(io.StringIO(out)):
            for value in row[:3]:
                assert not value[:1] in ('=', '+', '-', '@'), row


import contextlib
import random
import re


def hostile_folder(real_run, base, token):
    """Runs in every way a folder can be wrong, beside two good ones whose names, options and
    metric names carry LaTeX, markdown and spreadsheet syntax.  `token` (digits) makes the good
    runs' learning rates this folder's own: the walk of / also finds the copies that earlier test
    sessions left in the temporary folder, and they must not join these runs' groups."""
    parent = os.path.join(base, 'runs')
    name = '=HYPERLINK("x")|\\input{/etc/passwd}\n\\write18{id}\ud800'
    synthetic_run(parent, 'good', real_run, [metrics_line(4, five(0.6))], model=name, seed=1,
                  learning_rate=f'$\\write18{{rm -rf ~}}$ & 100% #1 ^_^ {{x}} {token}')
    line = metrics_line(4, five(0.5))
    line['test \\input{/etc/passwd}'] = 0.5
    nan = metrics_line(2, five(0.5))
    nan['test recall_top1_correct_composition'] = float('nan')
    synthetic_run(parent, 'good2', real_run, [nan, line], model='-2+3', seed=2,
                  learning_rate=float(f'0.05{token}'))
    os.symlink('/', os.path.join(parent, 'root'))
    fifo = os.path.join(parent, 'fifo_options')
    os.makedirs(fifo)
    os.mkfifo(os.path.join(fifo, 'options.json'))
    for fifo_file in ('latest_checkpoint.pth', 'metrics.jsonl'):
        run_dir = synthetic_run(parent, f'fifo_{fifo_file}', real_run, [metrics_line(4, five(0.6))],
                                model='tirg', seed=3)
        os.remove(os.path.join(run_dir, fifo_file))
        os.mkfifo(os.path.join(run_dir, fifo_file))
    for case, content in [('bytes', b'{"options": {"model": "\xff\xfe"}}'), ('deep', b'[' * 100000 + b']' * 100000),
                          ('unhashable', json.dumps({'options': {'model': ['tirg'], 'dataset': 'css3d'}}).encode())]:
        run_dir = synthetic_run(parent, f'options_{case}', real_run, [metrics_line(4, five(0.6))],
                                model='tirg', seed=4)
        with open(os.path.join(run_dir, 'options.json'), 'wb') as f:
            f.write(content)
    run_dir = synthetic_run(os.fsdecode(parent.encode() + b'/bad\xffname'), 'run', real_run,
                            [metrics_line(4, five(0.6))], model='tirg', seed=5)
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'ab') as f:
        f.write(b'\xff\xfe not text\n' + b'[' * 100000 + b']' * 100000 + b'\n')
    return parent


@pytest.mark.slow
def test_a_hostile_folder_in_every_format(real_run, tmp_path):
    """A link to /, FIFOs, bad bytes, 100,000-deep JSON, a NaN and LaTeX in names: each format
    done within two minutes, no traceback, nothing injected."""
    token = str(random.SystemRandom().randrange(10 ** 8, 10 ** 9))
    parent = hostile_folder(real_run, str(tmp_path), token)
    env = dict(os.environ, LC_ALL='C.UTF-8', PYTHONIOENCODING='utf-8', OMP_NUM_THREADS='1')
    # The script as a user runs it, once, with the walk of / (bounded: MAX_FOLDERS); the walk is
    # the same in every format, so the other two run in this process without the link.
    result = subprocess.run([sys.executable, os.path.join(REPO, 'results_table.py'), parent,
                             '--format=markdown'], capture_output=True, env=env, timeout=120)
    results = {'markdown': (result.returncode, result.stdout.decode('utf-8'), result.stderr.decode('utf-8'))}
    os.remove(os.path.join(parent, 'root'))
    for fmt in ('latex', 'csv'):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = results_table.main_cli([parent, f'--format={fmt}'])
        results[fmt] = (code, out.getvalue(), err.getvalue())
    for fmt, (code, out, err) in results.items():
        assert code == 0 and 'Traceback' not in err, (fmt, err[-3000:])
        escape_checks(fmt, out)
        for case, reason in [('fifo_options', 'options.json is not a regular file'),
                             ('fifo_latest_checkpoint.pth', 'latest_checkpoint.pth is not a regular file'),
                             ('fifo_metrics.jsonl', 'metrics.jsonl is not a regular file'),
                             ('options_bytes', 'options.json unreadable (not UTF-8 text (byte 23))'),
                             ('options_deep', 'options.json unreadable (nested too deeply)'),
                             ('options_unhashable', 'options.json: "model" is not a name')]:
            assert f'left out {os.path.join(parent, case)}: {reason}\n' in err, (fmt, case, err[-3000:])
        bad_name = os.path.join(parent, 'bad\\xffname', 'run')
        assert f'{bad_name}/metrics.jsonl: line 2 is not JSON (not UTF-8 text (byte 0)); skipped' in err
        assert f'{bad_name}/metrics.jsonl: line 3 is not JSON (nested too deeply); skipped' in err
    markdown = results['markdown'][1]
    assert '| =HYPERLINK("x")\\|\\\\input{/etc/passwd}\\\\n\\\\write18{id}\\\\ud800 | 60.0 (1 run) |' in markdown
    # (The walk of / finds other runs, so titles name more options than the learning rate.)
    assert f'--learning_rate=$\\\\write18{{rm -rf ~}}$ & 100% #1 ^_^ {{x}} {token}' in markdown
    assert '| \'-2+3 |' not in markdown and '| -2+3 | 50.0 (1 run) |' in markdown  # the NaN line skipped
    assert f'--learning_rate=0.05{token}' in markdown
    latex = results['latex'][1]
    assert ('=HYPERLINK("x")|\\textbackslash{}input\\{/etc/passwd\\}\\textbackslash{}n\\textbackslash{}'
            'write18\\{id\\}\\textbackslash{}ud800 & 60.0 (1 run)') in latex
    assert ('--learning\\_rate=\\$\\textbackslash{}write18\\{rm -rf \\textasciitilde{}\\}\\$ \\& '
            f'100\\% \\#1 \\textasciicircum{{}}\\_\\textasciicircum{{}} \\{{x\\}} {token}') in latex
    rows = list(csv.reader(io.StringIO(results['csv'][1])))
    methods = [row[2] for row in rows if len(row) > 2 and row[0].startswith(("'css3d", 'css3d'))]
    assert '\'=HYPERLINK("x")|\\input{/etc/passwd}\\n\\write18{id}\\ud800' in methods
    assert "'-2+3" in methods


def test_ctrl_c_and_a_closed_pipe_are_one_line(runs, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(results_table, 'read_run', interrupted)
    code, out, err = table_cli([runs], capsys)
    assert code == 130 and err == '\nresults_table.py: interrupted\n' and out == ''


@pytest.mark.slow
def test_a_fifo_checkpoint_is_one_line_in_main_and_retrieve(tmp_path):
    """checkpoints.load refuses it before torch.load would wait for a writer for ever."""
    fifo = str(tmp_path / 'latest_checkpoint.pth')
    os.mkfifo(fifo)
    # main.py in forked children (a hang is a timeout, not a stuck test); retrieve.py's command line.
    from conftest import fork_main
    processes = {'retrieve.py': subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'retrieve.py'), f'--checkpoint={fifo}', '--query_index=0'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))}
    processes['main.py --resume'] = fork_main([f'--resume={fifo}'], tmp_path)
    processes['main.py --test_only'] = fork_main(['--test_only', f'--checkpoint={fifo}'], tmp_path)
    try:
        for name, process in processes.items():
            out, err = process.communicate(timeout=120)
            assert process.returncode == 1 and len(err.splitlines()) == 1 and fifo in err, err
            if name.startswith('retrieve'):
                assert err == f'retrieve.py: error: {fifo}: not a checkpoint file (a FIFO)\n'
    finally:
        for process in processes.values():
            process.kill()
    assert not os.path.exists(tmp_path / 'runs')


def test_the_walk_stays_off_pseudo_file_systems_visits_a_folder_once_and_stops_deep(real_run, tmp_path, monkeypatch):
    parent = tmp_path / 'walk'
    synthetic_run(str(parent / 'a'), 'run', real_run, [metrics_line(4, five(0.5))], model='tirg', seed=1)
    for name, target in [('proc', '/proc'), ('sys', '/sys'), ('dev', '/dev'), ('loop', str(parent)),
                         ('again', str(parent / 'a'))]:
        os.symlink(target, parent / name)
    chain = parent / 'd1'
    for i in range(2, results_table.MAX_DEPTH):
        chain = chain / f'd{i}'
    # A run MAX_DEPTH folders below is found, one a folder further is not.
    synthetic_run(str(chain), 'edge', real_run, [metrics_line(4, five(0.5))], model='tirg', seed=2)
    synthetic_run(str(chain / 'beyond'), 'too_deep', real_run, [metrics_line(4, five(0.5))], model='tirg', seed=3)
    listed = []
    real_scandir = os.scandir

    def scandir(path):
        listed.append(os.path.realpath(path))
        return real_scandir(path)
    monkeypatch.setattr(results_table.os, 'scandir', scandir)
    notes = []
    runs, _ = results_table.find_run_folders([str(parent)], notes)
    assert runs == [str(parent / 'a' / 'run'), str(chain / 'edge')]
    # (This folder itself may be under /dev: the tests' temporary folders can be in /dev/shm.)
    assert not [p for p in listed if (p in ('/proc', '/sys', '/dev') or p.startswith(('/proc/', '/sys/', '/dev/')))
                and not p.startswith(str(parent))]
    assert len(listed) == len(set(listed))
    (note,) = notes
    assert note == (f'note: not searched deeper than {results_table.MAX_DEPTH} folders below the folders '
                    f'given (1 places, first: {chain / "beyond"})')
    monkeypatch.setattr(results_table, 'MAX_FOLDERS', 3)
    notes = []
    results_table.find_run_folders([str(parent)], notes)
    assert notes[0].startswith('note: stopped searching after 3 folders (runs further on, from ')
    assert len(listed) == len(set(listed)) + 3


def test_bfloat16_runs_get_their_own_table_and_older_runs_take_theirs_from_the_device(real_run, tmp_path, capsys):
    """options.json's precision (issue 25) splits tables; a run from before it was recorded
    computed in bfloat16 only where --amp ran on CUDA."""
    parent = str(tmp_path / 'runs')
    for name, seed, r1, options, device in [
            ('float32', 1, 0.6, {'precision': 'float32'}, 'cpu'),
            ('fell_back', 2, 0.4, {'precision': 'float32', 'amp': True}, 'cpu'),
            ('bfloat16', 3, 0.7, {'precision': 'bfloat16', 'amp': True}, 'cpu'),
            ('old_cpu_amp', 4, 0.5, {'amp': True}, 'cpu'),
            ('old_cuda_amp', 5, 0.9, {'amp': True}, 'cuda:1'),
            ('old_cuda', 6, 0.55, {'amp': False}, 'cuda')]:
        run_dir = synthetic_run(parent, name, real_run, [metrics_line(4, five(r1))], model='tirg',
                                seed=seed, record_fields={'device': device}, **options)
        if 'precision' not in options:
            edit_options(run_dir, remove=['precision'])
    code, out, err = table_cli([parent], capsys)
    assert code == 0, err
    suffix = ' (4 iterations; final test recalls, in %)'
    tables = {part.splitlines()[0]: part for part in out.split('### ')[1:]}
    assert sorted(tables) == ['css3d, in bfloat16' + suffix, 'css3d, in float32' + suffix]
    assert row_of(tables['css3d, in bfloat16' + suffix], 'tirg')[0] == '80.0 ± 14.1 (2 runs)'
    # 60, 40, 50, 55.
    assert row_of(tables['css3d, in float32' + suffix], 'tirg')[0] == '51.2 ± 8.5 (4 runs)'
