"""options.json in every run folder and results_table.py (issue 19 section 4, SPEC 10)."""
import json
import os
import subprocess

import pytest
import torch

from conftest import REPO, TINY, run_main

import main
import run_folder


def run_dirs(cwd):
    return sorted(os.path.join(cwd, 'runs', d) for d in os.listdir(os.path.join(cwd, 'runs')))


# ---------------------------------------------------------------------------------------------
# options.json

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


def synthetic_run(parent, name, real_run, lines, finished=True, **options):
    run_dir = os.path.join(parent, name)
    os.makedirs(run_dir)
    record = json.load(open(os.path.join(real_run, 'options.json')))
    record['options'].update(options)
    record['seed'] = record['options']['seed']
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
