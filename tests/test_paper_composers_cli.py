"""The seven new --model values through main.py as a user runs them (issue 19 items 1, 2): each
trains 8 iterations on the synthetic CSS data and on a FashionIQ fixture (attribute_operator: on
a MIT-States fixture), evaluates, saves, resumes with the original command (4 iterations, then on
to 8), and --test_only of its checkpoint repeats its final test; attribute_operator on other
data is a one-line error before any run folder exists; retrieve.py ranks with a new model's
checkpoint."""
import glob
import json
import os

import pytest
import torchvision.transforms as T

from conftest import read_scalars, run_main, write_css_fixture
from fiq_cirr_fixtures import fiq_layout, write_fiq
from test_mitstates import write_mitstates_fixture

import checkpoints
import datasets
import retrieve
import test_retrieval

SMALL = ['--batch_size=4', '--embed_dim=8', '--loader_num_workers=0', '--img_weights=none',
         '--seed=2']
CSS_MODELS = ['show_and_tell', 'param_hashing', 'relationship', 'film', 'tirg_gate_only',
              'tirg_res_only']
CASES = ([(m, 'css3d') for m in CSS_MODELS] + [(m, 'fashioniq') for m in CSS_MODELS]
         + [('attribute_operator', 'mitstates')])


@pytest.fixture(autouse=True)
def small_photos(monkeypatch):
    """Photos at 64 px (the composers see a 2 x 2 layer4 map) and 8 sampled training examples
    a train-split test: the protocol is what is tested here, not the resolution."""
    monkeypatch.setattr(datasets, 'photo_transform', lambda: T.Compose([
        T.Resize(64), T.CenterCrop(64), T.ToTensor(),
        T.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)]))
    monkeypatch.setattr(test_retrieval, 'NUM_SAMPLED_TRAIN_EXAMPLES', 8)


def write_dataset(dataset, root):
    if dataset == 'css3d':
        write_css_fixture(root, num_scenes=8)
    elif dataset == 'fashioniq':
        write_fiq(root, fiq_layout({'dress': 12, 'shirt': 6, 'toptee': 6}))
    else:
        write_mitstates_fixture(root)
    return root


def only_run_folder(cwd, comment):
    found = glob.glob(os.path.join(str(cwd), 'runs', f'*{comment}'))
    assert len(found) == 1, found
    return found[0]


def metric_lines(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize('name, dataset', CASES)
def test_trains_resumes_with_the_original_command_and_test_only_repeats_the_final_test(
        name, dataset, tmp_path):
    root = write_dataset(dataset, str(tmp_path / dataset))
    command = SMALL + [f'--dataset={dataset}', f'--dataset_path={root}', f'--model={name}',
                       '--comment=_run']
    first = run_main(command + ['--num_iters=4'], cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    run_dir = only_run_folder(tmp_path, '_run')
    ckpt_path = os.path.join(run_dir, 'latest_checkpoint.pth')
    assert checkpoints.load(ckpt_path)['it'] == 4

    resumed = run_main(command + ['--num_iters=8', f'--resume={ckpt_path}'], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert only_run_folder(tmp_path, '_run') == run_dir  # continued in its own folder
    ckpt = checkpoints.load(ckpt_path)
    assert ckpt['it'] == 8 and ckpt['finished'] and ckpt['opt'].model == name
    assert os.path.isfile(os.path.join(run_dir, 'best_checkpoint.pth'))
    final = metric_lines(run_dir)[-1]
    assert final['it'] == 8
    final_test = {k: v for k, v in final.items() if k.startswith('test ')}
    assert final_test and any(k.startswith('train ') for k in final)
    assert any(tag.startswith('test') for tag in read_scalars(run_dir))  # tensorboard

    # --test_only: the model (and its size) from the checkpoint, loaded strictly.
    tested = run_main(['--test_only', f'--checkpoint={ckpt_path}', '--loader_num_workers=0',
                       '--batch_size=4', '--comment=_test'], cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout[-2000:] + tested.stderr[-3000:]
    with open(os.path.join(only_run_folder(tmp_path, '_test'), 'test_results.json')) as f:
        results = json.load(f)
    assert results['model'] == name and results['it'] == 8
    assert results['metrics'].keys() == final_test.keys()
    for metric, value in final_test.items():
        assert results['metrics'][metric] == pytest.approx(value, abs=1e-9), metric


@pytest.mark.parametrize('dataset', ['css3d', 'fashioniq'])
def test_attribute_operator_on_another_dataset_is_one_line_and_no_run_folder(dataset, tmp_path):
    """Refused by the dataset's name (issue 23 item 18), not by its texts: FashionIQ-style
    single-word captions would pass a look at the texts."""
    root = write_dataset(dataset, str(tmp_path / dataset))
    result = run_main(SMALL + [f'--dataset={dataset}', f'--dataset_path={root}',
                               '--model=attribute_operator', '--num_iters=2'], cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "main.py: error: --model=attribute_operator: composes single attribute words, "
        f"MIT-States' adjectives (--dataset=mitstates); not for --dataset={dataset}"]
    assert not os.path.exists(tmp_path / 'runs')


@pytest.mark.slow
def test_attribute_operator_trains_on_mit_states_with_a_non_ascii_adjective(tmp_path):
    """Issue 23 item 18: 'ç' tokenises to no word (non-ASCII letters are dropped): it has no
    operator, its queries are their image's feature; the run is neither refused nor broken."""
    from test_mitstates import FOLDERS
    root = write_mitstates_fixture(str(tmp_path / 'mitstates'),
                                   dict(FOLDERS, **{'ç fig': 2, 'ç apple': 2, 'très tea': 2,
                                                     'très apple': 2}))
    assert {'ç', 'très'} <= {q['mod']['str'] for q in
                             datasets.MITStates(root, 'test').get_test_queries()}
    result = run_main(SMALL + ['--dataset=mitstates', f'--dataset_path={root}',
                               '--model=attribute_operator', '--num_iters=4', '--comment=_nonascii'],
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = checkpoints.load(os.path.join(only_run_folder(tmp_path, '_nonascii'),
                                         'latest_checkpoint.pth'))
    vocab = ckpt['vocab']
    assert 'trs' in vocab and 'ç' not in vocab
    index = ckpt['model_state_dict']['operator_index']
    assert index[1 + vocab.index('trs')] >= 0  # 'très' has its operator, as 'trs'
    assert index[1 + vocab.index('apple')] == -1  # 'ç apple' gives its noun none


@pytest.mark.slow
def test_an_attribute_operator_checkpoint_in_retrieve_py_and_on_sentences(tmp_path, capsys):
    root = write_dataset('mitstates', str(tmp_path / 'mitstates'))
    result = run_main(SMALL + ['--dataset=mitstates', f'--dataset_path={root}',
                               '--model=attribute_operator', '--num_iters=2'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (ckpt,) = glob.glob(str(tmp_path / 'runs' / '*' / 'latest_checkpoint.pth'))
    cache = ['--cache_dir', str(tmp_path / 'cache'), '--loader_num_workers=0']
    query, results = retrieve.retrieve(retrieve.parse_opt(
        [f'--checkpoint={ckpt}', '--query_index=0', '--topk=3', '--device=cpu'] + cache))
    assert query['text'] == 'ripe' and len(results) == 3  # MIT-States' first test query
    image = os.path.join(root, 'images', 'ripe fig', 'image_0.jpg')
    code = retrieve.main_cli([f'--checkpoint={ckpt}', f'--query_img={image}',
                          '--query_text=make it ripe', '--device=cpu'] + cache)
    err = capsys.readouterr().err
    assert code == 1 and 'Traceback' not in err
    assert err.strip().splitlines()[-1:] == [  # after the lines naming the dataset
        "retrieve.py: error: --query_text='make it ripe': attribute_operator composes single "
        "attribute words; got 'make it ripe'"]
    # An adjective that tokenises to nothing has no operator: the image's own feature, said.
    code = retrieve.main_cli([f'--checkpoint={ckpt}', f'--query_img={image}', '--query_text=ç',
                              '--device=cpu'] + cache)
    err = capsys.readouterr().err
    assert code == 0, err
    assert ("warning: --query_text='ç' is no word once tokenised (non-ASCII letters and "
            "punctuation are dropped): no operator, the query is the image's feature") in err

    # --test_only of the checkpoint (its model adopted) on CSS: refused before any run folder.
    css = write_dataset('css3d', str(tmp_path / 'css'))
    runs = sorted(os.listdir(tmp_path / 'runs'))
    result = run_main([f'--checkpoint={ckpt}', '--test_only', '--dataset=css3d',
                       f'--dataset_path={css}', '--loader_num_workers=0'], cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        'main.py: error: --model=attribute_operator: composes single attribute words')
    assert sorted(os.listdir(tmp_path / 'runs')) == runs
