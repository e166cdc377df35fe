"""Shoes through main.py as a user runs it (issue 20): in each image layout and under each
protocol, training a few iterations and a --test_only whose recalls equal a per-query
implementation on the checkpoint's own features; resume, protocol adoption, --skip_missing_images
and one-line errors before any run folder."""
import argparse
import glob
import json
import os
import re

import pytest
import torch
from PIL import Image

from conftest import read_scalars, small_photos, small_photos_main
from shoes_fixtures import LAYOUTS, larger_lists, write_shoes

import datasets
import experiment
import main
import text_model

SMALL = ['--batch_size=4', '--embed_dim=16', '--loader_num_workers=0', '--img_weights=none', '--seed=0']
NAMES = ['recall_top1', 'recall_top10', 'recall_top50', 'recall_mean']


@pytest.fixture(autouse=True)
def in_tmp_path_with_small_photos(tmp_path, monkeypatch):
    """Photos at 64 px (conftest.small_photos): what is tested here is the protocol."""
    monkeypatch.chdir(tmp_path)
    with small_photos():
        yield


def run_main(args, capsys):
    code = main.main(args)
    out, err = capsys.readouterr()
    return argparse.Namespace(returncode=code, stdout=out, stderr=err)


def only_run_folder(cwd, comment):
    found = glob.glob(os.path.join(str(cwd), 'runs', f'*{comment}'))
    assert len(found) == 1, found
    return found[0]


def results_of(run_dir):
    with open(os.path.join(run_dir, 'test_results.json')) as f:
        results = json.load(f)
    results['metrics'] = {name[len('test '):]: value for name, value in results['metrics'].items()}
    return results


def printed(stdout, split):
    values = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == split:
            values[parts[1]] = float(parts[2])
    return values


def train(tmp_path, capsys, root, comment, *flags, num_iters=3):
    result = run_main(SMALL + ['--dataset=shoes', f'--dataset_path={root}', f'--num_iters={num_iters}',
                               f'--comment={comment}'] + list(flags), capsys)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result, only_run_folder(tmp_path, comment)


def run_test_only(tmp_path, capsys, checkpoint, comment, *flags):
    result = run_main(SMALL + ['--test_only', f'--checkpoint={checkpoint}', f'--comment={comment}']
                      + list(flags), capsys)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result, results_of(only_run_folder(tmp_path, comment))


# ---------------------------------------------------------------------------------------------
# The per-query implementation: each image's and each query's feature on its own, then per query
# a loop over the gallery's names sorted by score, the reference moved to the end (SPEC 2.6: VAL's
# and ARTEMIS's code rank it last).

def checkpoint_model(path):
    ckpt = torch.load(path, weights_only=False)
    opt = argparse.Namespace(**vars(ckpt['opt']))
    opt.img_weights = 'none'
    model = experiment.create_model(opt, [], text_model.SimpleVocab(ckpt['vocab']))
    model.load_state_dict(ckpt['model_state_dict'])
    return model.eval()


def image_tensor(path):
    return datasets.photo_transform()(Image.open(path).convert('RGB')).unsqueeze(0)


def per_query_protocol(names, triplets, protocol):
    if protocol == 'val':
        queries = []
        for name in names:
            for t in triplets:
                if name == t[0] or name == t[1]:
                    queries.append(t)
        return queries, sorted(set(names) | {n for t in queries for n in t[:2]})
    return [t for t in triplets if t[0] in names and t[1] in names], list(names)


@torch.no_grad()
def per_query_recalls(model, paths, queries, gallery, ks=(1, 10, 50)):
    normalize = torch.nn.functional.normalize
    image = {n: normalize(model.extract_img_feature(image_tensor(paths[n])), dim=1)[0] for n in gallery}
    hits = {k: 0 for k in ks}
    for reference, target, caption in queries:
        query = normalize(model.compose_img_text(image_tensor(paths[reference]), [caption]), dim=1)[0]
        scores = {n: float(query @ image[n]) for n in gallery if n != reference}
        ranking = sorted(scores, key=lambda n: -scores[n]) + [reference]
        for k in ks:
            hits[k] += target in ranking[:k]
    recalls = [hits[k] / len(queries) for k in ks]
    return dict(zip(NAMES, recalls + [sum(recalls) / len(recalls)]))


@pytest.mark.slow
@pytest.mark.parametrize('layout, protocol', [(layout, protocol) for layout in sorted(LAYOUTS)
                                              for protocol in ('val', 'unique')])
def test_trains_and_test_only_equals_the_per_query_implementation(tmp_path, capsys, layout, protocol):
    train_names, eval_names, triplets = larger_lists()
    root = tmp_path / 'shoes'
    paths = write_shoes(str(root), train_names, eval_names, triplets, layout=layout)
    result, run_dir = train(tmp_path, capsys, root, 'shoes_train', f'--shoes_protocol={protocol}')
    assert list(printed(result.stdout, 'test')) == NAMES
    assert 'eval_im_names.txt: 14 names' in result.stdout
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        last = [json.loads(line) for line in f][-1]
    assert last['it'] == 3 and {f'test {n}' for n in NAMES} <= set(last)
    assert os.path.isfile(os.path.join(run_dir, 'best_checkpoint.pth'))
    checkpoint = os.path.join(run_dir, 'latest_checkpoint.pth')

    # No --shoes_protocol: the checkpoint's is adopted.
    _, results = run_test_only(tmp_path, capsys, checkpoint, 'shoes_test')
    assert results['dataset'] == 'shoes' and results['shoes_protocol'] == protocol
    assert list(results['metrics']) == NAMES
    queries, gallery = per_query_protocol(eval_names, triplets, protocol)
    assert len(queries) == {'val': 20, 'unique': 9}[protocol]  # see larger_lists
    assert len(gallery) == {'val': 17, 'unique': 14}[protocol]
    expected = per_query_recalls(checkpoint_model(checkpoint), paths, queries, gallery)
    assert results['metrics'] == pytest.approx(expected, abs=1e-6)
    # The training run's final test saw the same weights.
    assert printed(result.stdout, 'test') == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_resume_tensorboard_and_a_changed_protocol(tmp_path, capsys):
    train_names, eval_names, triplets = larger_lists()
    root = tmp_path / 'shoes'
    write_shoes(str(root), train_names, eval_names, triplets)
    command = SMALL + ['--dataset=shoes', f'--dataset_path={root}', '--shoes_protocol=unique',
                       '--comment=shoes_resume']
    assert run_main(command + ['--num_iters=2'], capsys).returncode == 0
    run_dir = only_run_folder(tmp_path, 'shoes_resume')
    checkpoint = os.path.join(run_dir, 'latest_checkpoint.pth')
    refused = run_main([f'--resume={checkpoint}', '--num_iters=4', '--shoes_protocol=val'], capsys)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert f'--shoes_protocol=val: the run in {checkpoint} used --shoes_protocol=unique' in refused.stderr
    resumed = run_main(command + [f'--resume={checkpoint}', '--num_iters=4'], capsys)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt = torch.load(checkpoint, weights_only=False)
    assert ckpt['it'] == 4 and ckpt['opt'].shoes_protocol == 'unique'
    assert 'Shoes test (protocol unique)' in resumed.stdout
    # The data moved: --dataset and --dataset_path given, the protocol still the run's.
    moved = tmp_path / 'moved'
    os.rename(root, moved)
    _, results = run_test_only(tmp_path, capsys, checkpoint, 'shoes_moved', '--dataset=shoes',
                               f'--dataset_path={moved}')
    assert results['shoes_protocol'] == 'unique' and results['it'] == 4
    scalars = read_scalars(run_dir)
    # The first session's final test at 2; the resumed one's start of epoch 1 (8 triplets,
    # batches of 4) at 2 again, as the reference tests every third epoch start; its final at 4.
    assert [step for step, _ in scalars['test_recall_mean']] == [2, 2, 4]
    assert 'test_recall_top50' in scalars


@pytest.mark.slow
def test_skip_missing_images_is_recorded_in_the_options_and_test_results(tmp_path, capsys):
    train_names, eval_names, triplets = larger_lists()
    root = tmp_path / 'shoes'
    # And an eval-list name in no triplet whose image is missing too: a gallery entry dropped.
    distractor = 'img_womens_clogs_999.jpg'
    write_shoes(str(root), train_names, eval_names + [distractor], triplets,
                missing=[eval_names[0], train_names[0], distractor])
    refused = run_main(SMALL + ['--dataset=shoes', f'--dataset_path={root}', '--num_iters=2'], capsys)
    assert refused.returncode == 1 and not os.path.exists(tmp_path / 'runs')
    assert '--skip_missing_images' in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    _, run_dir = train(tmp_path, capsys, root, 'shoes_skip', '--skip_missing_images', num_iters=2)
    ckpt = torch.load(os.path.join(run_dir, 'latest_checkpoint.pth'), weights_only=False)
    # larger_lists: train_names[0] is in train triplets 0 and 5, each listed twice under val (both
    # images in the train list): 4 examples; eval_names[0] in eval triplet 0 only: 2 queries.
    assert ckpt['opt'].skipped_missing_images == {
        'train': {'missing_images': 1, 'dropped_triplets': 4},
        'test': {'missing_images': 2, 'dropped_queries': 2, 'dropped_gallery': 2}}
    _, results = run_test_only(tmp_path, capsys, os.path.join(run_dir, 'latest_checkpoint.pth'),
                           'shoes_skip_test', '--skip_missing_images')
    assert results['skipped_missing_images'] == {'missing_images': 2, 'dropped_queries': 2,
                                                 'dropped_gallery': 2}


@pytest.mark.parametrize('breakage, expected', [
    ('no captions', r'relative_captions_shoes.json: Shoes relative captions file not found'),
    ('malformed', r'relative_captions_shoes.json: malformed JSON'),
    ('no key', r'relative_captions_shoes.json entry 0: missing field "RelativeCaption"'),
    ('unknown name', r'train_im_names.txt line 9: "img_womens_clogs_999.jpg" is in no triplet'),
    ('twice', r'found twice: .* and '),
    ('missing', r'1 of the .* images the Shoes .* split needs are missing .* --skip_missing_images'),
])
def test_bad_input_is_one_line_and_exit_1_before_any_run_folder(tmp_path, capsys, breakage, expected):
    train_names, eval_names, triplets = larger_lists()
    root = tmp_path / 'shoes'
    paths = write_shoes(str(root), train_names, eval_names, triplets)
    captions = os.path.join(str(root), 'relative_captions_shoes.json')
    if breakage == 'no captions':
        os.remove(captions)
    elif breakage in ('malformed', 'no key'):
        with open(captions, 'w') as f:
            f.write('[{"ImageName": "a"' if breakage == 'malformed' else '[{"ImageName": "a", "ReferenceImageName": "b"}]')
    elif breakage == 'unknown name':
        with open(os.path.join(str(root), 'train_im_names.txt'), 'a') as f:
            f.write('img_womens_clogs_999.jpg\n')
    elif breakage == 'twice':
        copy = os.path.join(str(root), 'images', 'womens', 'womens_x', os.path.basename(paths[eval_names[3]]))
        os.makedirs(os.path.dirname(copy))
        os.link(paths[eval_names[3]], copy)
    else:
        os.remove(paths[eval_names[3]])
    result = run_main(SMALL + ['--dataset=shoes', f'--dataset_path={root}', '--num_iters=2'], capsys)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('main.py: error: '), result.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert not os.path.exists(tmp_path / 'runs')



# ---------------------------------------------------------------------------------------------
# retrieve.py: a test query ranks its protocol's gallery, its reference last (score -inf).

@pytest.mark.slow
def test_retrieve_ranks_a_query_against_its_protocols_gallery(tmp_path, capsys):
    import retrieve
    from test_retrieve import ranked_lines
    train_names, eval_names, triplets = larger_lists()
    root = tmp_path / 'shoes'
    paths = write_shoes(str(root), train_names, eval_names, triplets, layout='images')
    _, run_dir = train(tmp_path, capsys, root, 'shoes_retrieve', '--shoes_protocol=unique', num_iters=2)
    checkpoint = os.path.join(run_dir, 'latest_checkpoint.pth')
    model = checkpoint_model(checkpoint)
    for protocol in ('unique', 'val'):
        queries, gallery = per_query_protocol(eval_names, triplets, protocol)
        # unique: the self-pair, its target last with its reference; val: eval triplet 5
        # listed under its target.
        n = len(queries) - 1
        reference, target, caption = queries[n]
        flags = [] if protocol == 'unique' else ['--shoes_protocol=val']  # unique: the checkpoint's
        code = retrieve.main_cli([f'--checkpoint={checkpoint}', f'--query_index={n}', '--topk=100',
                                  '--loader_num_workers=0', f'--cache_dir={tmp_path / "cache"}'] + flags)
        out, err = capsys.readouterr()
        assert code == 0, err
        lines = ranked_lines(out)
        with torch.no_grad():
            query = torch.nn.functional.normalize(
                model.compose_img_text(image_tensor(paths[reference]), [caption]), dim=1)[0]
            scores = {name: float(query @ torch.nn.functional.normalize(
                model.extract_img_feature(image_tensor(paths[name])), dim=1)[0])
                for name in gallery if name != reference}
        expected = sorted(scores, key=lambda name: -scores[name]) + [reference]
        assert [line.caption for line in lines] == expected
        assert [line.score for line in lines[:-1]] == pytest.approx([scores[name] for name in expected[:-1]],
                                                                    abs=1e-4)
        assert lines[-1].score == float('-inf')
        assert len(lines) == {'val': 17, 'unique': 14}[protocol]
        assert [line.caption for line in lines if line.target] == [target]
        assert lines[-1].target == (target == reference) == (protocol == 'unique')
    assert len(os.listdir(tmp_path / 'cache')) == 2  # a gallery cache per protocol
    # A gallery image given as --query_img is ranked last too, and said so.
    reference = eval_names[0]
    code = retrieve.main_cli([f'--checkpoint={checkpoint}', f'--query_img={paths[reference]}',
                              '--query_text=taller', '--topk=100', '--loader_num_workers=0',
                              f'--cache_dir={tmp_path / "cache"}'])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert 'ranked last (score -inf), as in the Shoes protocols' in err
    lines = ranked_lines(out)
    assert len(lines) == 14 and lines[-1].caption == reference and lines[-1].score == float('-inf')


@pytest.mark.slow
def test_two_torchrun_processes_train_and_test_as_one(tmp_path, capsys):
    import subprocess
    import sys
    train_names, eval_names, triplets = larger_lists()
    root = tmp_path / 'shoes'
    write_shoes(str(root), train_names, eval_names, triplets, layout='attributedata')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               small_photos_main(tmp_path)] + SMALL + [
        '--dataset=shoes', f'--dataset_path={root}', '--num_iters=4', '--comment=shoes_ddp']
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('eval_im_names.txt: 14 names') == 1  # the first process prints
    run_dir = only_run_folder(tmp_path, 'shoes_ddp')
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        final = {k[len('test '):]: v for k, v in [json.loads(line) for line in f][-1].items()
                 if k.startswith('test ')}
    assert list(final) == NAMES
    # Each process extracted its share of the features: one process's test gives the same.
    _, results = run_test_only(tmp_path, capsys, os.path.join(run_dir, 'latest_checkpoint.pth'),
                               'shoes_single')
    assert results['shoes_protocol'] == 'val'
    assert results['metrics'] == pytest.approx(final, abs=1e-6)


@pytest.mark.slow
def test_results_table_groups_shoes_runs_by_protocol(tmp_path, capsys):
    import statistics
    import results_table
    train_names, eval_names, triplets = larger_lists()
    root = tmp_path / 'shoes'
    write_shoes(str(root), train_names, eval_names, triplets)
    finals = {}
    for protocol, seed in (('unique', 0), ('unique', 1), ('val', 0)):
        comment = f'shoes_{protocol}_{seed}'
        result = run_main(SMALL[:-1] + [f'--seed={seed}', '--dataset=shoes', f'--dataset_path={root}',
                                        '--num_iters=2', f'--shoes_protocol={protocol}',
                                        f'--comment={comment}'], capsys)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(os.path.join(only_run_folder(tmp_path, comment), 'metrics.jsonl')) as f:
            last = [json.loads(line) for line in f][-1]
        finals.setdefault(protocol, []).append({n: last[f'test {n}'] for n in NAMES})
    code = results_table.main_cli([str(tmp_path / 'runs')])
    out, err = capsys.readouterr()
    assert code == 0, err
    tables = {part.splitlines()[0]: part for part in out.split('### ')[1:]}
    assert sorted(tables) == [
        'shoes, --shoes_protocol=unique (2 iterations; final test recalls, in %)',
        'shoes, --shoes_protocol=val (2 iterations; final test recalls, in %)']
    for title, part in tables.items():
        assert '| method | R@1 | R@10 | R@50 | mean |' in part
        runs = finals['unique' if 'unique' in title else 'val']
        (row,) = [line for line in part.splitlines() if line.startswith('| tirg |')]
        cells = [c.strip() for c in row.strip('|').split('|')][1:]
        for cell, name in zip(cells, NAMES):
            values = [100 * run[name] for run in runs]
            mean = f'{statistics.fmean(values):.1f}'
            assert cell == (f'{mean} ± {statistics.stdev(values):.1f} (2 runs)' if len(runs) == 2
                            else f'{mean} (1 run)'), (title, name)
