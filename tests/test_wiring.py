"""How the pieces are put together (issue 9, section 7): each test here fails on a wiring mistake
that the unit tests of the pieces let through.  Runs go through the command line (main.py, or
main.main in-process where a test must see inside) and are read back from the run folder
(checkpoints, metrics.jsonl, tensorboard events), so that they do not depend on main.py's inner
functions."""
import json
import os

import pytest
import torch

from conftest import TINY, metrics_lines, only_run_folder, read_scalars, run_main, write_css_fixture
from test_fashion200k import SAMPLED
from test_mitstates import write_mitstates_fixture

import datasets
import main

# pytest-xdist: one worker runs them all, building the module-scoped schedule run once.
pytestmark = pytest.mark.xdist_group('test_wiring')


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def css_data(tmp_path, num_scenes):
    """`num_scenes` scenes, each with two colour changes: 3 * num_scenes images a split."""
    root = str(tmp_path / f'css{num_scenes}')
    write_css_fixture(root, num_scenes=num_scenes)
    return root


# --------------------------------------------------------------------------------------------
# The training batch
# --------------------------------------------------------------------------------------------

def test_collated_batch_keeps_each_examples_text_with_its_images():
    def example(i):
        return {'source_img_id': i, 'source_img_data': torch.full((3, 2, 2), float(i)),
                'target_img_id': 100 + i, 'target_img_data': torch.full((3, 2, 2), 100.0 + i),
                'mod': {'str': f'text {i}'}, 'target_caption': f'caption {100 + i}'}

    order = [3, 0, 4, 1, 2]
    batch = datasets.collate_training_batch([example(i) for i in order])
    assert batch['source_img_id'].tolist() == order
    assert batch['target_img_id'].tolist() == [100 + i for i in order]
    assert batch['mod_str'] == [f'text {i}' for i in order]
    assert batch['source_img_data'][:, 0, 0, 0].tolist() == [float(i) for i in order]
    assert batch['target_img_data'][:, 0, 0, 0].tolist() == [100.0 + i for i in order]


@pytest.mark.slow
def test_loader_workers_draw_different_examples(tmp_path):
    """The reference's workers inherited one numpy state and loaded the same examples.  With a
    model that cannot change (learning rate 0) and has no randomness (image only, classification
    loss), a batch's loss depends on its examples only; the two workers load alternate batches."""
    result = run_main(['--dataset=css3d', f'--dataset_path={css_data(tmp_path, 12)}',
                       '--batch_size=8', '--embed_dim=16', '--img_weights=none',
                       '--model=imgonly', '--loss=batch_based_classification',
                       '--learning_rate=0', '--loader_num_workers=2', '--num_iters=4', '--seed=1',
                       '--comment=_workers'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    losses = load(os.path.join(only_run_folder(tmp_path, '_workers'), 'latest_checkpoint.pth'))['losses']
    values = losses['batch_based_classification']
    assert len(values) == 4  # one epoch of 36 // 8 batches: all of them
    assert values[0] != values[1] and values[2] != values[3], values


@pytest.mark.slow
def test_each_epoch_passes_over_every_example_in_a_new_order(tmp_path, monkeypatch):
    """In-process, to see the indices the training loader asks the dataset for."""
    asked = []
    original = datasets.CSSDataset.__getitem__

    def recording(self, idx):
        if self.split == 'train':
            asked.append(idx.index)  # a datasets.DrawKey
        return original(self, idx)

    monkeypatch.setattr(datasets.CSSDataset, '__getitem__', recording)
    monkeypatch.chdir(tmp_path)
    # 4 scenes: 12 training images, 3 batches of 4 an epoch.
    assert main.main(TINY + [f'--dataset_path={css_data(tmp_path, 4)}', '--num_iters=9',
                             '--seed=3', '--comment=_order']) == 0
    epochs = [asked[i:i + 12] for i in range(0, 36, 12)]
    assert len(asked) == 36
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


# --------------------------------------------------------------------------------------------
# The optimizer: learning-rate schedule and weight decay, as the run applies them
# --------------------------------------------------------------------------------------------

# 12 training images at batch 6: an epoch start (and a learning_rate scalar) every 2 iterations.
# The lr drops 10x after iterations 3 and 6 (SPEC 5): a decay one iteration early shows at step
# 2, one iteration late at step 6.
DECAY_FREQUENCY, WEIGHT_DECAY, LEARNING_RATE, ITERATIONS = 3, 0.5, 0.01, 8


@pytest.fixture(scope='module')
def schedule_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp('schedule')
    result = run_main(['--dataset=css3d', f'--dataset_path={css_data(tmp_path, 4)}',
                       '--batch_size=6', '--embed_dim=16', '--img_weights=none', '--model=tirg',
                       '--loader_num_workers=0', f'--num_iters={ITERATIONS}', '--seed=1',
                       f'--learning_rate={LEARNING_RATE}', f'--weight_decay={WEIGHT_DECAY}',
                       f'--learning_rate_decay_frequency={DECAY_FREQUENCY}',
                       '--comment=_schedule'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return only_run_folder(tmp_path, '_schedule')


def learning_rate_during(it):
    """SPEC 5: the lr of iteration `it` (from 1): decayed after every multiple of the frequency."""
    return LEARNING_RATE * 0.1 ** ((it - 1) // DECAY_FREQUENCY)


@pytest.mark.slow
def test_logged_learning_rate_decays_after_the_iteration_the_spec_names(schedule_run):
    logged = dict(read_scalars(schedule_run)['learning_rate'])
    assert sorted(logged) == [0, 2, 4, 6, 8]
    # At an epoch start after iteration `it`, the lr the next iteration will use.
    expected = {it: learning_rate_during(it + 1) for it in logged}
    assert expected == pytest.approx({0: 0.01, 2: 0.01, 4: 0.001, 6: 1e-4, 8: 1e-4})
    assert logged == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_weight_decay_and_momentum_reach_the_optimizer(schedule_run):
    """TIRG's a[2] and a[3] are in no formula: their gradient is 0, so only weight decay (through
    SGD's momentum 0.9) moves them, by an amount known in advance."""
    expected = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([expected], lr=LEARNING_RATE, momentum=0.9, weight_decay=WEIGHT_DECAY)
    for it in range(1, ITERATIONS + 1):
        optimizer.param_groups[0]['lr'] = learning_rate_during(it)
        expected.grad = torch.zeros(1)
        optimizer.step()
    a = load(os.path.join(schedule_run, 'latest_checkpoint.pth'))['model_state_dict']['a']
    assert expected.item() < 0.99  # visibly decayed
    torch.testing.assert_close(a[2:], expected.detach().expand(2), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Resume and the best checkpoint
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mitstates_resume_with_a_pending_pair_gives_the_same_weights(tmp_path, monkeypatch):
    """MIT-States draws examples in pairs; at batch 3 a checkpoint after 5 iterations (15
    examples) falls between the two of a pair, which the resumed run must draw second.  In this
    process, one run after the other (each seeds and restores every generator itself), with
    photos at 64 px and SAMPLED training examples in the train-split test."""
    import test_retrieval
    from conftest import small_photos
    sample = test_retrieval.sample_training_examples
    monkeypatch.setattr(test_retrieval, 'sample_training_examples',
                        lambda dataset, count=SAMPLED, seed=0: sample(dataset, SAMPLED, seed))
    root = write_mitstates_fixture(str(tmp_path / 'mitstates'))
    common = ['--dataset=mitstates', f'--dataset_path={root}', '--img_weights=none',
              '--batch_size=3', '--embed_dim=16', '--loader_num_workers=0', '--seed=4']

    def run(args, cwd):
        os.makedirs(tmp_path / cwd, exist_ok=True)
        with small_photos():
            result = run_main(common + args, cwd=str(tmp_path / cwd))
        assert result.returncode == 0, result.stderr
        return result

    run(['--num_iters=8', '--comment=_s'], 'straight')
    run(['--num_iters=5', '--comment=_c'], 'cut')
    cut_path = os.path.join(only_run_folder(tmp_path / 'cut', '_c'), 'latest_checkpoint.pth')
    run([f'--resume={cut_path}', '--num_iters=8'], 'cut')
    resumed = load(cut_path)
    straight = load(os.path.join(only_run_folder(tmp_path / 'straight', '_s'), 'latest_checkpoint.pth'))
    assert resumed['it'] == straight['it'] == 8
    for key, value in straight['model_state_dict'].items():
        torch.testing.assert_close(resumed['model_state_dict'][key], value, rtol=0, atol=1e-5, msg=key)


TRACKED = 'test recall_top1_correct_composition'
# The tracked recall each evaluation logs, scripted: the best is first reached in the middle
# (iteration 4), tied at the next evaluation (a >= comparison would move it to 7) and beaten
# neither first nor last, whatever the machine's arithmetic makes of a tiny run's recalls.
SCRIPTED_RECALLS = [0.25, 0.5, 0.5, 0.375]


@pytest.mark.slow
def test_best_checkpoint_holds_the_best_logged_recall(tmp_path, monkeypatch):
    """6 training images at batch 6, one batch an epoch: tests at iterations 1, 4, 7 (epochs 1,
    4, 7) and 8 (the end).  The evaluation really runs; only the tracked value it returns is
    replaced by SCRIPTED_RECALLS, so that what main.py logs, compares and saves is its own."""
    data = css_data(tmp_path, 2)
    scripted, real_recalls, weights = iter(SCRIPTED_RECALLS), [], []
    original = main.evaluate_split

    def scripted_evaluation(opt, model, dataset, features=None):
        metrics = original(opt, model, dataset, features)
        if dataset.split != 'test':
            return metrics
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        name = TRACKED[len('test '):]
        real_recalls.append(dict(metrics)[name])
        return [(n, next(scripted) if n == name else value) for n, value in metrics]

    with monkeypatch.context() as patch:
        patch.setattr(main, 'evaluate_split', scripted_evaluation)
        result = run_main(['--dataset=css3d', f'--dataset_path={data}', '--batch_size=6',
                           '--embed_dim=16', '--img_weights=none', '--loader_num_workers=0',
                           '--num_iters=8', '--seed=3', '--comment=_best'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = only_run_folder(tmp_path, '_best')
    logged = [(line['it'], line[TRACKED]) for line in metrics_lines(folder)]
    assert logged == list(zip([1, 4, 7, 8], SCRIPTED_RECALLS))
    best = load(os.path.join(folder, 'best_checkpoint.pth'))
    assert best['it'] == 4 and best['best_recall'] == 0.5
    # The weights as they were evaluated at iteration 4, not as training left them later.
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    for key, value in weights[1].items():
        assert torch.equal(best['model_state_dict'][key], value), key

    # Its weights score iteration 4's real recall again (in-process: one interpreter start less).
    monkeypatch.chdir(tmp_path)
    assert main.main([f'--checkpoint={os.path.join(folder, "best_checkpoint.pth")}', '--test_only',
                      f'--dataset_path={data}', '--loader_num_workers=0', '--comment=_again']) == 0
    with open(os.path.join(only_run_folder(tmp_path, '_again'), 'test_results.json')) as f:
        assert json.load(f)['metrics'][TRACKED] == pytest.approx(real_recalls[1], abs=1e-6)
