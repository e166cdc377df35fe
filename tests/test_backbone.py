"""--img_backbone=resnet18|resnet50 (SPEC 3.2, issue 20 section 2): the ResNet-50 image encoder for
every model, in checkpoints, --resume, --test_only and retrieve.py, and its weights files."""
import argparse
import glob
import json
import os

import pytest
import torch
import torchvision

from conftest import run_main, write_css_fixture

import experiment
import img_text_composition_models as itcm
import main
import model_registry
import retrieve

# pytest-xdist: one worker runs them all, building the module-scoped ResNet-50 run and models once.
pytestmark = pytest.mark.xdist_group('test_backbone')

LAYOUT_CANDIDATES = [
    os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                 'shared', 'reference', 'state_dict_layout.json'),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reference', 'state_dict_layout.json'),
]
MODEL_NAMES = ['imgonly', 'textonly', 'concat', 'tirg', 'tirg_lastconv']
TEXTS = ['make top-left red cube blue', 'add small gray sphere', 'remove it']
ADJECTIVES = ['ripe', 'sliced', 'wet']
E = 8
# 64 px images and a 4-scene CSS tree keep ResNet-50 cheap on a CPU.
R50 = ['--dataset=css3d', '--batch_size=4', f'--embed_dim={E}', '--loader_num_workers=0',
       '--img_weights=none', '--img_backbone=resnet50', '--seed=5']
RESNET50_FILE = 'resnet50-0676ba61.pth'
RESNET18_FILE = 'resnet18-f37072fd.pth'


def run_folders(cwd, comment):
    return sorted(glob.glob(os.path.join(str(cwd), 'runs', f'*{comment}')))


def one_line_error(result, expected):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines() == [f'main.py: error: {expected}'], result.stderr


# ---------------------------------------------------------------------------------------------
# The models

# Shapes that follow the layer4 map's C channels (2048 here), beyond img_model.
RESNET50_MAP_SHAPES = {
    'tirg_lastconv': {'mod2d.0.weight': (2048 + E,), 'mod2d.1.weight': (2048 + E, 2048 + E, 3, 3),
                      'mod2d.3.weight': (2048, 2048 + E, 3, 3), 'mod2d_gate.0.weight': (2048 + E,),
                      'mod2d_gate.1.weight': (2048 + E, 2048 + E, 3, 3),
                      'mod2d_gate.3.weight': (2048, 2048 + E, 3, 3)},
    'relationship': {'g.0.weight': (512, 2 * (2048 + 2) + E)},
    'film': {'film_generator.weight': (2 * 2048, E), 'block_conv1.weight': (2048, 2048, 1, 1),
             'block_conv2.weight': (2048, 2048, 3, 3), 'block_bn.running_var': (2048,)},
}


@pytest.fixture(scope='module')
def lastconv50():
    """tirg_lastconv on ResNet-50: 175 M parameters, built once."""
    torch.manual_seed(1)
    return itcm.TIRGLastConv(TEXTS, E, pretrained=False, backbone='resnet50')


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(model_registry.MODELS))
def test_every_model_on_resnet50_has_a_2048_to_E_fc_and_composers_at_E(name, request):
    texts = ADJECTIVES if name == 'attribute_operator' else TEXTS  # it composes single words
    torch.manual_seed(0)
    model = (request.getfixturevalue('lastconv50') if name == 'tirg_lastconv' else
             model_registry.MODELS[name](texts, E, pretrained=False, backbone='resnet50'))
    state = model.state_dict()
    assert model.backbone == 'resnet50' and model.img_channels == 2048
    assert model.img_model.fc[0].in_features == 2048  # what composers reading layer4 use
    assert state['img_model.fc.0.weight'].shape == (E, 2048)
    # ResNet-50's bottleneck blocks: 3, 4, 6, 3 of them, 1x1 convs around the 3x3.
    assert state['img_model.layer1.0.conv3.weight'].shape == (256, 64, 1, 1)
    assert state['img_model.layer3.5.conv1.weight'].shape == (256, 1024, 1, 1)
    assert state['img_model.layer4.2.bn3.weight'].shape == (2048,)
    assert 'img_model.layer4.3.conv1.weight' not in state
    # Outside the image encoder and the map composers: the ResNet-18 model's shapes (at E).
    map_shapes = RESNET50_MAP_SHAPES.get(name, {})
    for key, shape in map_shapes.items():
        assert state[key].shape == shape, key
    torch.manual_seed(0)
    small = model_registry.MODELS[name](texts, E, pretrained=False).state_dict()
    assert small['img_model.fc.0.weight'].shape == (E, 512)
    assert set(small) - {k for k in small if k.startswith('img_model.')} == \
        set(state) - {k for k in state if k.startswith('img_model.')}
    map_modules = {key.rsplit('.', 1)[0] for key in map_shapes}  # their biases and statistics too
    for key, value in small.items():
        if not key.startswith('img_model.') and key.rsplit('.', 1)[0] not in map_modules:
            assert state[key].shape == value.shape, key
    model.eval()
    with torch.no_grad():
        imgs = torch.randn(2, 3, 64, 48)
        assert model.compose_img_text(imgs, texts[:2]).shape == (2, E)
        assert model.extract_img_feature(imgs).shape == (2, E)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_resnet18_given_explicitly_keeps_the_reference_layout(name):
    path = next(p for p in LAYOUT_CANDIDATES if os.path.isfile(p))
    with open(path) as f:
        layout = json.load(f)
    model = model_registry.MODELS[name](layout['texts'], layout['embed_dim'], pretrained=False,
                              backbone='resnet18')
    got = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    assert got == layout['models'][name]['keys']
    assert model.img_channels == 512


@pytest.mark.slow
def test_tirg_lastconv_on_resnet50_composes_the_2048_channel_map(lastconv50):
    model = lastconv50
    with torch.no_grad():
        model.a.copy_(torch.tensor([0.5, 2.0, 7.0, 7.0]))
    model.eval()
    imgs = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    m = model.img_model
    with torch.no_grad():
        txt = model.extract_text_feature(TEXTS)
        x = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(imgs))))))))
        assert x.shape == (3, 2048, 2, 3)
        z = torch.cat([x, txt[:, :, None, None].repeat(1, 1, 2, 3)], dim=1)
        x = 0.5 * torch.sigmoid(model.mod2d_gate(z)) * x + 2.0 * model.mod2d(z)
        expected = m.fc[0](x.mean(dim=(2, 3)))
        got = model.compose_img_text(imgs, TEXTS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dataset', ['css3d', 'fashioniq'])
def test_parameter_groups_with_resnet50(dataset):
    opt = main.parse_opt([f'--dataset={dataset}', '--learning_rate=0.5', '--img_backbone=resnet50'])
    model = itcm.TIRG(TEXTS, E, pretrained=False, backbone='resnet50')
    optimizer = main.create_optimizer(opt, model)
    seen = [id(p) for g in optimizer.param_groups for p in g['params']]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    if dataset == 'css3d':
        assert [g['lr'] for g in optimizer.param_groups] == [0.5]
        return
    fc, backbone, rest = optimizer.param_groups
    assert (fc['lr'], backbone['lr'], rest['lr']) == (0.5, pytest.approx(0.05), 0.5)
    assert [tuple(p.shape) for p in fc['params']] == [(E, 2048), (E,)]
    assert len(backbone['params']) == 159  # ResNet-50's 161 parameters less its fc
    assert sum(p.numel() for p in backbone['params']) == 23508032


# ---------------------------------------------------------------------------------------------
# Training, resuming, --test_only and retrieve.py on synthetic CSS

@pytest.fixture(scope='module')
def resnet50_run(tmp_path_factory):
    """A TIRG run on ResNet-50: 2 iterations, then resumed with the original command to 3."""
    cwd = tmp_path_factory.mktemp('r50')
    root = str(cwd / 'css')
    write_css_fixture(root, num_scenes=4)
    command = R50 + [f'--dataset_path={root}', '--comment=_r50', '--model=tirg']
    first = run_main(command + ['--num_iters=2'], cwd=cwd)
    assert first.returncode == 0, first.stderr
    (run_dir,) = run_folders(cwd, '_r50')
    ckpt = os.path.join(run_dir, 'latest_checkpoint.pth')
    resumed = run_main(command + ['--num_iters=3', f'--resume={ckpt}'], cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    return {'cwd': cwd, 'root': root, 'command': command, 'run_dir': run_dir, 'ckpt': ckpt,
            'resumed': resumed}


@pytest.mark.slow
def test_resnet50_trains_saves_resumes_and_test_only_repeats_the_final_test(resnet50_run):
    r = resnet50_run
    assert 'Resuming at iteration 2' in r['resumed'].stdout
    assert run_folders(r['cwd'], '_r50') == [r['run_dir']]  # resumed in place
    ckpt = torch.load(r['ckpt'], map_location='cpu', weights_only=False)
    assert ckpt['it'] == 3 and ckpt['opt'].img_backbone == 'resnet50'
    state = ckpt['model_state_dict']
    assert state['img_model.fc.0.weight'].shape == (E, 2048)
    assert state['img_model.layer4.2.conv3.weight'].shape == (2048, 512, 1, 1)
    with open(os.path.join(r['run_dir'], 'metrics.jsonl')) as f:
        lines = [json.loads(line) for line in f]
    assert [line['it'] for line in lines] == [2, 3]  # the final test of each session
    final = {k: v for k, v in lines[-1].items() if k.startswith('test ')}
    # No --img_backbone, --model or --embed_dim: all from the checkpoint.
    result = run_main(['--test_only', f'--checkpoint={r["ckpt"]}', '--loader_num_workers=0',
                       '--batch_size=4', '--comment=_r50eval'], cwd=r['cwd'])
    assert result.returncode == 0, result.stderr
    (eval_dir,) = run_folders(r['cwd'], '_r50eval')
    with open(os.path.join(eval_dir, 'test_results.json')) as f:
        tested = json.load(f)
    assert tested['it'] == 3 and tested['metrics'] == final


@pytest.mark.slow
def test_a_resnet50_run_resumed_with_another_backbone_is_refused(resnet50_run):
    r = resnet50_run
    changed = [a.replace('resnet50', 'resnet18') for a in r['command']]
    result = run_main(changed + ['--num_iters=5', f'--resume={r["ckpt"]}'], cwd=r['cwd'])
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f'main.py: error: --img_backbone=resnet18: the run in '
                                    f'{r["ckpt"]} used --img_backbone=resnet50;'), result.stderr
    assert torch.load(r['ckpt'], weights_only=False)['it'] == 3


@pytest.mark.slow
def test_a_resnet50_checkpoint_with_resnet18_given_names_both(resnet50_run):
    r = resnet50_run
    before = os.listdir(os.path.join(r['cwd'], 'runs'))
    result = run_main(['--test_only', f'--checkpoint={r["ckpt"]}', '--img_backbone=resnet18',
                       '--loader_num_workers=0'], cwd=r['cwd'])
    one_line_error(result, f'--img_backbone=resnet18: {r["ckpt"]} records '
                           f'--img_backbone=resnet50; leave --img_backbone out to use the '
                           f'checkpoint\'s')
    assert os.listdir(os.path.join(r['cwd'], 'runs')) == before


@pytest.mark.slow
def test_retrieve_takes_the_backbone_from_the_checkpoint(resnet50_run, capsys):
    r = resnet50_run
    base = [f'--checkpoint={r["ckpt"]}', '--query_index=0', '--topk=3', '--no_cache',
            '--loader_num_workers=0', '--batch_size=4']
    assert retrieve.main_cli(base) == 0
    out, err = capsys.readouterr()
    assert 'rank' in out, out + err
    assert retrieve.main_cli(base + ['--img_backbone=resnet18']) == 1
    err = capsys.readouterr().err
    assert err == (f'retrieve.py: error: --img_backbone=resnet18: {r["ckpt"]} records '
                   f'--img_backbone=resnet50; leave --img_backbone out to use the checkpoint\'s\n')


def released_style_checkpoint(path, texts, backbone, saved_backbone=None):
    """Our options (or the released ones, without img_backbone) over a chosen backbone's weights."""
    model = itcm.TIRG(texts, E, pretrained=False, backbone=backbone)
    opt = argparse.Namespace(dataset='css3d', model='tirg', embed_dim=E)
    if saved_backbone is not None:
        opt.img_backbone = saved_backbone
    torch.save({'it': 7, 'opt': opt, 'model_state_dict': model.state_dict()}, path)


@pytest.mark.parametrize('weights, saved, expected', [
    ('resnet18', 'resnet50', 'ResNet-18 (--img_backbone=resnet18), but the model is built with '
                             '--img_backbone=resnet50 as its options say'),
    ('resnet50', None, "ResNet-50 (--img_backbone=resnet50), but the model is built with "
                       "--img_backbone=resnet18 (its options name no backbone: ResNet-18, the "
                       "reference's)"),
])
def test_checkpoint_weights_of_the_other_backbone_are_one_line_errors(tmp_path, weights, saved,
                                                                        expected):
    import datasets
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=4)
    path = str(tmp_path / 'ckpt.pth')
    released_style_checkpoint(path, datasets.CSSDataset(root, 'train').get_all_texts(), weights, saved)
    result = run_main(['--test_only', f'--checkpoint={path}', f'--dataset_path={root}',
                       '--loader_num_workers=0'], cwd=tmp_path)
    one_line_error(result, f'{path}: its image encoder weights are {expected}')
    assert not os.path.exists(tmp_path / 'runs')


# ---------------------------------------------------------------------------------------------
# --img_weights files and the ImageNet cache

@pytest.fixture(scope='module')
def resnet50_file(tmp_path_factory):
    torch.manual_seed(3)
    path = str(tmp_path_factory.mktemp('weights') / 'r50.pth')
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope='module')
def resnet18_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('weights') / 'r18.pth')
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_a_resnet50_state_dict_is_accepted_and_loaded(resnet50_file):
    saved = torch.load(resnet50_file, weights_only=True)
    experiment.check_img_weights(main.parse_opt(['--img_backbone=resnet50', f'--img_weights={resnet50_file}']))
    model = itcm.TIRG(TEXTS, E, pretrained=resnet50_file, backbone='resnet50')
    assert torch.equal(model.img_model.layer4[2].conv3.weight, saved['layer4.2.conv3.weight'])
    assert torch.equal(model.img_model.bn1.running_var, saved['bn1.running_var'])
    assert model.img_model.fc[0].weight.shape == (E, 2048)  # the new head, not ImageNet's


@pytest.mark.parametrize('backbone', ['resnet18', 'resnet50'])
def test_a_state_dict_of_the_other_backbone_is_refused_naming_both(backbone, resnet18_file,
                                                                     resnet50_file, tmp_path):
    path, given, given_file = ((resnet50_file, 'ResNet-50', RESNET18_FILE) if backbone == 'resnet18'
                               else (resnet18_file, 'ResNet-18', RESNET50_FILE))
    wanted = 'ResNet-18' if backbone == 'resnet18' else 'ResNet-50'
    other = 'resnet50' if backbone == 'resnet18' else 'resnet18'
    expected = (f'--img_weights={path}: {given} weights, but --img_backbone={backbone} needs '
                f'{wanted} ones (or give --img_backbone={other}); expected a torchvision '
                f'{wanted} state dict (such as {given_file})')
    with pytest.raises(itcm.WeightsUnavailableError) as info:
        itcm.load_resnet(backbone, path)
    assert str(info.value) == expected
    result = run_main([f'--img_backbone={backbone}', f'--img_weights={path}', '--num_iters=1',
                       f'--dataset_path={tmp_path}/none'], cwd=tmp_path)
    one_line_error(result, expected)
    assert not os.path.exists(tmp_path / 'runs')


def test_imagenet_resnet50_missing_says_which_file_to_put_where(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError('network is unreachable')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 'get_state_dict', offline)
    folder = os.path.join(str(tmp_path / 'torch'), 'hub', 'checkpoints')
    expected = (f'ImageNet weights for ResNet-50 are not in {folder} and could not be downloaded '
                f'(OSError); put {RESNET50_FILE} there, pass --img_weights=PATH to a ResNet-50 '
                f'state dict, or train from scratch with --img_weights=none')
    with pytest.raises(itcm.WeightsUnavailableError) as info:
        itcm.load_resnet('resnet50', True)
    assert str(info.value) == expected
    root = str(tmp_path / 'css')
    write_css_fixture(root, num_scenes=4)
    result = run_main(['--img_backbone=resnet50', f'--dataset_path={root}', '--num_iters=1',
                       '--loader_num_workers=0'], cwd=tmp_path)
    one_line_error(result, expected)
    assert not os.path.exists(tmp_path / 'runs')


def test_imagenet_resnet50_in_the_cache_is_loaded_without_a_download(monkeypatch, tmp_path,
                                                                      resnet50_file, resnet18_file):
    def no_download(*args, **kwargs):
        raise AssertionError('the cached file should have been used')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 'get_state_dict',
                        no_download)
    folder = tmp_path / 'hub' / 'checkpoints'
    folder.mkdir(parents=True)
    cached = folder / RESNET50_FILE
    os.symlink(resnet50_file, cached)
    model = itcm.load_resnet('resnet50', True)
    saved = torch.load(resnet50_file, weights_only=True)
    assert torch.equal(model.layer2[3].conv2.weight, saved['layer2.3.conv2.weight'])
    # A wrong file under that name is refused, naming it.
    cached.unlink()
    os.symlink(resnet18_file, cached)
    with pytest.raises(itcm.WeightsUnavailableError) as info:
        itcm.load_resnet('resnet50', True)
    assert str(info.value).startswith(f'--img_weights=imagenet: {cached}: ResNet-18 weights, but '
                                      f'--img_backbone=resnet50 needs ResNet-50 ones')


def test_the_cache_file_names_are_those_torchvision_downloads_to():
    # torch.hub saves a download under its URL's last component: the name looked for first.
    assert os.path.basename(itcm.BACKBONES['resnet18'].imagenet_weights.url) == RESNET18_FILE
    assert os.path.basename(itcm.BACKBONES['resnet50'].imagenet_weights.url) == RESNET50_FILE
    assert itcm.BACKBONES['resnet50'].file_name == RESNET50_FILE
    assert itcm.BACKBONES['resnet18'].file_name == RESNET18_FILE


# ---------------------------------------------------------------------------------------------
# Shoes

@pytest.mark.slow
def test_resnet50_on_shoes_trains_resumes_and_test_only_repeats_the_final_test(tmp_path, monkeypatch):
    import torchvision.transforms as T
    import datasets
    from shoes_fixtures import larger_lists, write_shoes
    # ResNet-50 at 224 px costs ~4 GFLOPs an image forward; the photo transform is not what this
    # test is about (tests/test_shoes*.py check it), so the images are cut to 64 px.
    monkeypatch.setattr(datasets, 'photo_transform', lambda: T.Compose([
        T.Resize(64), T.CenterCrop(64), T.ToTensor(),
        T.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)]))
    root = str(tmp_path / 'shoes')
    write_shoes(root, *larger_lists(), layout='attributedata')
    command = [a for a in R50 if a != '--dataset=css3d'] + [
        '--dataset=shoes', f'--dataset_path={root}', '--comment=_shoes50', '--model=tirg']
    assert run_main(command + ['--num_iters=2'], cwd=tmp_path).returncode == 0
    (run_dir,) = run_folders(tmp_path, '_shoes50')
    ckpt_path = os.path.join(run_dir, 'latest_checkpoint.pth')
    resumed = run_main(command + ['--num_iters=3', f'--resume={ckpt_path}'], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert 'Resuming at iteration 2' in resumed.stdout
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt['it'] == 3 and ckpt['opt'].img_backbone == 'resnet50'
    assert ckpt['model_state_dict']['img_model.fc.0.weight'].shape == (E, 2048)
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        final = json.loads(f.readlines()[-1])
    assert final['it'] == 3
    result = run_main(['--test_only', f'--checkpoint={ckpt_path}', '--loader_num_workers=0',
                       '--batch_size=4', '--comment=_shoes50eval'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (eval_dir,) = run_folders(tmp_path, '_shoes50eval')
    with open(os.path.join(eval_dir, 'test_results.json')) as f:
        tested = json.load(f)
    assert tested['dataset'] == 'shoes'
    assert tested['metrics'] == {k: v for k, v in final.items() if k.startswith('test ')}
    assert set(tested['metrics']) == {'test recall_top1', 'test recall_top10', 'test recall_top50',
                                      'test recall_mean'}

