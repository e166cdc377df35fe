"""FashionIQ and CIRR training runs read back from their folders (issue 17, section 4): the best
checkpoint tracks recall_mean (FashionIQ) and recall_avg (CIRR), what --skip_missing_images dropped
travels in the checkpoint's options, and --test_only --checkpoint adopts the run's --fiq_category
and --fiq_protocol.  main.main runs in this process with photos at 64 px (ResNet-18 pools
globally; the pipeline is otherwise unchanged), one batch an epoch, so that the evaluations at
epochs 1, 4 and 7 and at the end come after 8 iterations."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from conftest import metrics_lines, only_run_folder
from fiq_cirr_fixtures import cirr_layout, fiq_layout, triplet, write_cirr, write_fiq

import datasets
import main

# pytest-xdist: one worker runs them all, building the module-scoped FashionIQ and CIRR runs once.
pytestmark = pytest.mark.xdist_group('test_fiq_cirr_runs')

COMMON = ['--embed_dim=16', '--img_weights=none', '--loader_num_workers=0', '--seed=2',
          '--num_iters=8', '--batch_size=64']
EVALUATED_AT = [1, 4, 7, 8]


def small_photos():
    return T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def run_main(args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main.main(args)
    assert code == 0, out.getvalue()[-2000:] + err.getvalue()[-3000:]
    return out.getvalue()


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.fixture(scope='module')
def in_small_photos(tmp_path_factory):
    """The module's working folder, with 64 px photos."""
    tmp = tmp_path_factory.mktemp('fiq_cirr_runs')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, 'photo_transform', small_photos)
        patch.chdir(tmp)
        yield tmp


def fiq_run_layout():
    """Dress: 40 val triplets over 60 names (a gallery past 50 under either protocol)."""
    layout = fiq_layout({'dress': 64, 'shirt': 14, 'toptee': 14}, seed=5)
    rng = np.random.RandomState(6)
    names = layout['dress']['split_val'][:60]
    layout['dress']['val'] = [triplet('dress', i, *rng.choice(names, 2, replace=False)) for i in range(40)]
    return layout


FIQ_MISSING = ('dress_t3', 'dress_v5')  # a train image and a val image


@pytest.fixture(scope='module')
def fiq_run(in_small_photos):
    """A dress-only, val-protocol run on a tree missing one train and one val image."""
    root = str(in_small_photos / 'fiq')
    layout = write_fiq(root, fiq_run_layout(), missing=FIQ_MISSING)
    run_main(COMMON + ['--dataset=fashioniq', f'--dataset_path={root}', '--fiq_category=dress',
                       '--fiq_protocol=val', '--skip_missing_images', '--comment=_fiq'])
    return root, layout, only_run_folder(in_small_photos, '_fiq')


@pytest.fixture(scope='module')
def cirr_run(in_small_photos):
    root = str(in_small_photos / 'cirr')
    write_cirr(root, cirr_layout())
    run_main(COMMON + ['--dataset=cirr', f'--dataset_path={root}', '--comment=_cirr'])
    return only_run_folder(in_small_photos, '_cirr')


@pytest.mark.slow
@pytest.mark.parametrize('run, tracked', [('fiq_run', 'test recall_mean'), ('cirr_run', 'test recall_avg')])
def test_best_checkpoint_holds_the_best_logged_value_of_the_tracked_recall(request, run, tracked):
    """SPEC 2.4 / 2.5: FashionIQ's best checkpoint tracks recall_mean, CIRR's recall_avg."""
    folder = request.getfixturevalue(run)
    folder = folder[-1] if isinstance(folder, tuple) else folder
    logged = [(line['it'], line[tracked]) for line in metrics_lines(folder)]
    assert [it for it, _ in logged] == EVALUATED_AT
    recalls = [recall for _, recall in logged]
    best = max(recalls)
    assert len(set(recalls)) > 1, f'uninformative run: {logged}'
    assert load(os.path.join(folder, 'latest_checkpoint.pth'))['best_recall'] == pytest.approx(best, abs=1e-9)
    best_ckpt = load(os.path.join(folder, 'best_checkpoint.pth'))
    assert best_ckpt['it'] == logged[recalls.index(best)][0]  # the first evaluation that reached it
    assert best_ckpt['best_recall'] == pytest.approx(best, abs=1e-9)


@pytest.mark.slow
def test_skipped_missing_images_are_recorded_in_the_checkpoints_options(fiq_run):
    _, layout, folder = fiq_run
    train_missing, val_missing = FIQ_MISSING
    train_dropped = [t for t in layout['dress']['train'] if train_missing in (t['candidate'], t['target'])]
    val = layout['dress']['val']
    val_dropped = [t for t in val if val_missing in (t['candidate'], t['target'])]
    assert train_dropped and val_dropped

    def names(triplets):
        return {n for t in triplets for n in (t['candidate'], t['target'])}

    expected = {'train': {'missing_images': 1, 'dropped_triplets': len(train_dropped)},
                'test': {'missing_images': 1, 'dropped_queries': 2 * len(val_dropped),
                         'dropped_gallery': len(names(val)) - len(names(t for t in val if t not in val_dropped))}}
    for name in ('latest_checkpoint.pth', 'best_checkpoint.pth'):
        assert load(os.path.join(folder, name))['opt'].skipped_missing_images == expected


@pytest.mark.slow
def test_test_only_with_the_checkpoint_adopts_its_category_and_protocol(fiq_run, in_small_photos):
    """No --fiq_category nor --fiq_protocol: the run's dress and val, with its dataset folder or
    another one given; the recalls are those logged at the best iteration."""
    root, _, folder = fiq_run
    best = os.path.join(folder, 'best_checkpoint.pth')
    best_it = load(best)['it']
    (logged,) = [line for line in metrics_lines(folder) if line['it'] == best_it]
    for comment, flags in (('_adopted', []), ('_adopted_path', [f'--dataset_path={root}'])):
        run_main(['--test_only', f'--checkpoint={best}', '--loader_num_workers=0', '--batch_size=16',
                  '--skip_missing_images', f'--comment={comment}'] + flags)
        with open(os.path.join(only_run_folder(in_small_photos, comment), 'test_results.json')) as f:
            results = json.load(f)
        assert (results['fiq_category'], results['fiq_protocol']) == ('dress', 'val')
        assert list(results['metrics']) == ['test recall_top10_dress', 'test recall_top50_dress',
                                            'test recall_top10_mean', 'test recall_top50_mean',
                                            'test recall_mean']
        for name, value in results['metrics'].items():
            assert value == pytest.approx(logged[name], abs=1e-4), name
