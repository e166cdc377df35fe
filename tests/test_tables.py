"""options.json in every run folder and results_table.py (issue 19 section 4, SPEC 10)."""
import json
import os
import subprocess

import pytest
import torch

from conftest import REPO, TINY, run_main

import main


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
    assert main.project_version(str(tmp_path)) == (None, None)
    monkeypatch.setenv('PATH', str(tmp_path))  # no git program at all
    assert main.project_version(REPO) == (None, None)


def test_a_failed_options_write_leaves_no_file(tmp_path, monkeypatch):
    opt = main.parse_opt(['--seed=1'])

    def fail(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(main.json, 'dump', fail)
    with pytest.raises(OSError):
        main.write_options_file(str(tmp_path), opt, torch.device('cpu'))
    assert os.listdir(tmp_path) == []
