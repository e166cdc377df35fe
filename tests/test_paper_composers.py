"""The paper's other composition methods and TIRG's ablations (SPEC 3.1, issue 19 items 1, 2, 5):
each forward pass against its formula written out from the model's own submodules, wrong wirings
caught, checkpoints loading strictly, and relationship's per-cell first layer against the plain
layer over the concatenation."""
import io
import os
import subprocess
import sys

import pytest
import torch

import model_registry
import paper_composers

NEW_MODELS = ['show_and_tell', 'param_hashing', 'relationship', 'film', 'attribute_operator',
              'tirg_gate_only', 'tirg_res_only']
DIM = 16
TEXTS = ['make top-left red cube blue', 'add small gray sphere', 'remove it']
# MIT-States: the training texts are "adjective noun" captions, the queries' texts adjectives.
MIT_CAPTIONS = ['red apple', 'green apple', 'sliced bread', 'red bread', 'sliced apple']


def build(name, texts=None, embed_dim=DIM, seed=0):
    torch.manual_seed(seed)
    texts = texts or (MIT_CAPTIONS if name == 'attribute_operator' else TEXTS)
    return model_registry.MODELS[name](texts, embed_dim, pretrained=False)


def query_texts(name):
    return ['red', 'sliced', 'green'] if name == 'attribute_operator' else TEXTS


def images(batch=3, height=64, width=64, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def resnet_map(m, imgs):
    return m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(imgs))))))))


def randomise_batchnorm(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)


def test_registry_holds_the_reference_five_then_the_seven_new_models():
    assert list(model_registry.MODELS) == ['imgonly', 'textonly', 'concat', 'tirg', 'tirg_lastconv'] + NEW_MODELS


# ---------------------------------------------------------------------------------------------
# Each forward pass against its SPEC 3.1 formula.

def show_and_tell_formula(model, imgs, texts):
    """Per text, unpadded: the LSTM over [image feature, word 1, ..., word n], its last output,
    then fc_output."""
    t = model.text_model
    image = model.extract_img_feature(imgs)
    rows = []
    for b, text in enumerate(texts):
        words = t.embedding_layer(torch.tensor(t.vocab.encode_text(text)))
        output, _ = t.lstm(torch.cat([image[b:b + 1], words]).unsqueeze(1))
        rows.append(t.fc_output(output[-1]))
    return torch.cat(rows)


def test_show_and_tell_reads_the_image_then_the_words():
    model = build('show_and_tell').eval()
    imgs = images(batch=4)
    texts = TEXTS + ['']  # lengths 5, 4, 2 and the empty text (one <UNK>)
    with torch.no_grad():
        expected = show_and_tell_formula(model, imgs, texts)
        got = model.compose_img_text(imgs, texts)
        text_only = model.extract_text_feature(texts)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, text_only, atol=1e-3)  # the image step changes the output


def param_hashing_formula(model, imgs, texts):
    """W(t)[i, j] = sign[i, j] * c[hash[i, j]], entry by entry; out(W(t) x + bias)."""
    x = model.extract_img_feature(imgs)
    c = model.text_to_candidates(model.extract_text_feature(texts))
    h, s = model.hash_index, model.hash_sign
    e = x.shape[1]
    w = torch.zeros(x.shape[0], e, e)
    for i in range(e):
        for j in range(e):
            w[:, i, j] = s[i, j] * c[:, h[i, j]]
    y = torch.einsum('bij,bj->bi', w, x) + model.bias
    bn, linear = model.output[0], model.output[2]
    return linear(torch.relu(bn(y)))


def test_param_hashing_builds_the_hashed_weight_matrix():
    model = build('param_hashing', embed_dim=8)
    randomise_batchnorm(model)
    with torch.no_grad():
        model.bias.normal_()
    model.eval()
    imgs = images()
    with torch.no_grad():
        expected = param_hashing_formula(model, imgs, TEXTS)
        got = model.compose_img_text(imgs, TEXTS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_param_hashing_hash_is_fixed_by_seed_0_and_kept_in_the_state_dict():
    # torch.Generator().manual_seed(0): randint(4096, (8, 8)), then randint(2, (8, 8)) * 2 - 1.
    model = build('param_hashing', embed_dim=8, seed=1)
    assert model.hash_index.shape == (8, 8)
    assert model.hash_index[0].tolist() == [2732, 2607, 1653, 3264, 835, 763, 1731, 3431]
    assert model.hash_index[7, -3:].tolist() == [2558, 3531, 2930]
    assert model.hash_sign[0].tolist() == [1, -1, -1, -1, -1, -1, 1, 1]
    assert model.text_to_candidates.out_features == 4096
    state = model.state_dict()
    assert torch.equal(state['hash_index'], model.hash_index)
    assert torch.equal(state['hash_sign'], model.hash_sign)
    other = build('param_hashing', embed_dim=8, seed=2)  # another global seed: the same hash
    assert torch.equal(other.hash_index, model.hash_index)


def cells_written_out(feature_map):
    """[channels, row, column] of each cell, row-major, rows and columns spaced over [-1, 1]."""
    b, c, h, w = feature_map.shape
    cells = []
    for r in range(h):
        for k in range(w):
            row = -1 + 2 * r / (h - 1) if h > 1 else 0.0
            col = -1 + 2 * k / (w - 1) if w > 1 else 0.0
            coords = torch.tensor([row, col]).expand(b, 2)
            cells.append(torch.cat([feature_map[:, :, r, k], coords], dim=1))
    return torch.stack(cells, dim=1)


def relationship_formula(model, imgs, texts):
    """The straightforward relation network: g over the concatenation [cell_i, cell_j, t] of
    every ordered pair, mean over the pairs, f."""
    cells = cells_written_out(resnet_map(model.img_model, imgs))
    t = model.extract_text_feature(texts)
    n = cells.shape[1]
    pairs = torch.stack([torch.cat([cells[:, i], cells[:, j], t], dim=1)
                         for i in range(n) for j in range(n)], dim=1)
    return model.f(model.g(pairs).mean(dim=1))


@pytest.mark.parametrize('height, width', [(96, 64), (64, 64), (32, 64)])  # 3x2, 2x2, 1x2 maps
def test_relationship_per_cell_first_layer_equals_the_layer_over_the_concatenation(height, width):
    model = build('relationship').eval()
    assert model.g[0].in_features == 2 * (512 + 2) + DIM
    imgs = images(height=height, width=width)
    with torch.no_grad():
        expected = relationship_formula(model, imgs, TEXTS)
        got = model.compose_img_text(imgs, TEXTS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_relationship_coordinates_of_a_3_by_2_map():
    cells = paper_composers.cells_with_coordinates(torch.zeros(1, 1, 3, 2))
    assert cells[0, :, 1:].tolist() == [[-1, -1], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 1]]


def film_formula(model, imgs, texts):
    m = model.img_model
    feature_map = resnet_map(m, imgs)
    c = feature_map.shape[1]
    generated = model.film_generator(model.extract_text_feature(texts))
    dgamma, beta = generated[:, :c, None, None], generated[:, c:, None, None]
    h = torch.relu(model.block_conv1(feature_map))
    y = model.block_conv2(h)
    bn = model.block_bn  # eval: running statistics, no affine parameters
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = torch.relu((1 + dgamma) * y + beta)
    return m.fc[0]((h + y).mean(dim=(2, 3)))


def test_film_is_one_film_residual_block_on_the_layer4_map():
    model = build('film')
    assert model.block_bn.affine is False
    assert model.film_generator.out_features == 2 * 512
    randomise_batchnorm(model)
    model.eval()
    imgs = images(height=96, width=64)
    with torch.no_grad():
        expected = film_formula(model, imgs, TEXTS)
        got = model.compose_img_text(imgs, TEXTS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_attribute_operator_applies_the_adjective_s_matrix_and_identity_when_unseen():
    model = build('attribute_operator').eval()
    imgs = images(batch=4)
    texts = ['red', 'Sliced', 'blue', 'green']  # blue: no operator (not a training adjective)
    with torch.no_grad():
        x = model.extract_img_feature(imgs)
        torch.testing.assert_close(model.compose_img_text(imgs, texts), x)  # identity at start
        model.operators.normal_()
        ops = model.operators  # one per training adjective, sorted: green, red, sliced
        assert ops.shape == (3, DIM, DIM)
        expected = torch.stack([ops[1] @ x[0], ops[2] @ x[1], x[2], ops[0] @ x[3]])
        got = model.compose_img_text(imgs, texts)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='single attribute words'):
        model.compose_img_text(imgs[:1], ['red apple'])


def test_attribute_operator_keys_an_adjective_by_its_tokenised_form():
    """Issue 23 item 18: tokenising drops non-ASCII letters, so 'très' has the operator of
    'trs'; 'ç' is no word and has none (its captions' nouns get none either)."""
    captions = ['très apple', 'ç apple', 'Red apple', 'red bread', 'ç bread', 'très bread']
    model = build('attribute_operator', texts=captions).eval()
    vocab = model.text_model.vocab.word2id
    assert sorted(vocab) == ['<UNK>', 'apple', 'bread', 'red', 'trs']
    assert model.operators.shape == (2, DIM, DIM)  # red, trs: not apple, not bread
    assert model.operator_index.tolist() == [-1 if w not in ('red', 'trs') else ('red', 'trs').index(w)
                                             for w in sorted(vocab, key=vocab.get)]
    imgs = images(batch=5)
    with torch.no_grad():
        model.operators.normal_()
        ops, x = model.operators, model.extract_img_feature(imgs)
        got = model.compose_img_text(imgs, ['très', 'trs', 'ç', 'RED', 'apple'])
    expected = torch.stack([ops[1] @ x[0], ops[1] @ x[1], x[2], ops[0] @ x[3], x[4]])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def tirg_branches(model, imgs, texts):
    x = model.extract_img_feature(imgs)
    xt = torch.cat([x, model.extract_text_feature(texts)], dim=1)
    return x, xt


def test_tirg_gate_only_is_a0_sigmoid_gate_times_image():
    model = build('tirg_gate_only')
    assert not hasattr(model, 'res_info_composer')
    with torch.no_grad():
        model.a.copy_(torch.tensor([0.7, 3.0, 5.0, -5.0]))
    randomise_batchnorm(model)
    model.eval()
    imgs = images()
    with torch.no_grad():
        x, xt = tirg_branches(model, imgs, TEXTS)
        g = model.gated_feature_composer
        expected = 0.7 * torch.sigmoid(g[3](torch.relu(g[1](xt)))) * x
        got = model.compose_img_text(imgs, TEXTS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tirg_res_only_is_a1_times_residual():
    model = build('tirg_res_only')
    assert not hasattr(model, 'gated_feature_composer')
    with torch.no_grad():
        model.a.copy_(torch.tensor([0.7, 3.0, 5.0, -5.0]))
    randomise_batchnorm(model)
    model.eval()
    imgs = images()
    with torch.no_grad():
        x, xt = tirg_branches(model, imgs, TEXTS)
        r = model.res_info_composer
        expected = 3.0 * r[5](torch.relu(r[3](torch.relu(r[1](xt)))))
        got = model.compose_img_text(imgs, TEXTS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_ablations_keep_tirg_s_names_and_shapes():
    tirg = build('tirg').state_dict()
    for name, branch in [('tirg_gate_only', 'gated_feature_composer.'),
                         ('tirg_res_only', 'res_info_composer.')]:
        state = build(name).state_dict()
        expected = [k for k in tirg if not k.startswith(('gated_feature_composer.', 'res_info_composer.'))
                    or k.startswith(branch)]
        assert sorted(state) == sorted(expected)
        for key in state:
            assert state[key].shape == tirg[key].shape, key
        assert state['a'].tolist() == [1.0, 10.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Wrong wirings fail the formula tests (each encoded as a broken copy of the forward pass).

ORIGINAL_RELATIONS = paper_composers.Relationship.relations


def relations_without_coordinates(self, cells, text):
    return ORIGINAL_RELATIONS(self, torch.cat([cells[..., :-2], 0 * cells[..., -2:]], dim=-1), text)


def film_without_residual(self, imgs, texts):
    feature_map = paper_composers.layer4_map(self.img_model, imgs)
    dgamma, beta = self.film_generator(self.extract_text_feature(texts)).chunk(2, dim=1)
    h = torch.relu(self.block_conv1(feature_map))
    y = torch.relu((1 + dgamma[:, :, None, None]) * self.block_bn(self.block_conv2(h))
                   + beta[:, :, None, None])
    return paper_composers.pool_and_fc(self.img_model, y)  # h + y lost its h


@pytest.mark.parametrize('name, attribute, broken, formula', [
    ('relationship', 'relations', relations_without_coordinates, relationship_formula),
    ('film', 'compose_img_text', film_without_residual, film_formula),
])
def test_a_wrong_wiring_fails_the_formula(name, attribute, broken, formula, monkeypatch):
    model = build(name)
    randomise_batchnorm(model)
    model.eval()
    cls = type(model)
    monkeypatch.setattr(cls, attribute, broken)
    imgs = images(height=96, width=64)
    with torch.no_grad():
        assert not torch.allclose(model.compose_img_text(imgs, TEXTS), formula(model, imgs, TEXTS),
                                  rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoints, losses, gradients.

@pytest.mark.parametrize('name', NEW_MODELS)
def test_state_dict_loads_strictly_into_a_fresh_model(name):
    state = build(name, seed=1).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other = build(name, seed=2)
    result = other.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key


# A parameter of each model's own that the loss must train.
OWN_PARAMETERS = {
    'show_and_tell': ['text_model.lstm.weight_ih_l0', 'text_model.fc_output.1.weight'],
    'param_hashing': ['text_to_candidates.weight', 'bias', 'output.2.weight'],
    'relationship': ['g.0.weight', 'g.4.weight', 'f.2.weight', 'text_model.lstm.weight_ih_l0'],
    'film': ['film_generator.weight', 'block_conv1.weight', 'block_conv2.weight'],
    'attribute_operator': ['operators'],
    'tirg_gate_only': ['gated_feature_composer.3.weight'],
    'tirg_res_only': ['res_info_composer.5.weight'],
}


@pytest.mark.parametrize('name', NEW_MODELS)
def test_both_losses_train_the_model_s_own_parameters(name):
    model = build(name).train()
    params = dict(model.named_parameters())
    texts = query_texts(name)
    for soft_triplet in (True, False):
        model.zero_grad(set_to_none=True)
        loss = model.compute_loss(images(height=32, width=32, seed=1), texts,
                                  images(height=32, width=32, seed=2), soft_triplet_loss=soft_triplet)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        for key in OWN_PARAMETERS[name] + ['img_model.conv1.weight', 'img_model.fc.0.weight']:
            grad = params[key].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key
        text_grads = [p.grad for k, p in params.items() if k.startswith('text_model.')]
        # attribute_operator's adjective picks an operator: its text encoder is never read (and
        # main.py tells DistributedDataParallel so).
        unused = name in model_registry.UNUSED_PARAMETERS
        assert all(g is None for g in text_grads) == unused


@pytest.mark.parametrize('name', NEW_MODELS)
def test_batch_of_one_in_eval_and_any_image_size(name):
    """retrieve.py composes one query at a time; CSS images are 64 px, photos 224."""
    model = build(name).eval()
    with torch.no_grad():
        for height, width in [(64, 64), (80, 48)]:
            out = model.compose_img_text(images(batch=1, height=height, width=width),
                                         query_texts(name)[:1])
            assert out.shape == (1, DIM) and torch.isfinite(out).all()


@pytest.mark.slow
def test_models_reading_the_layer4_map_take_its_channels_from_a_resnet50_encoder():
    """C = 2048 under --img_backbone=resnet50: no 512 hard-coded."""
    torch.manual_seed(0)
    relationship = model_registry.MODELS['relationship'](TEXTS, DIM, pretrained=False, backbone='resnet50').eval()
    film = model_registry.MODELS['film'](TEXTS, DIM, pretrained=False, backbone='resnet50')
    assert relationship.g[0].in_features == 2 * (2048 + 2) + DIM
    assert film.film_generator.out_features == 2 * 2048
    assert film.block_conv2.in_channels == film.block_conv2.out_channels == 2048
    randomise_batchnorm(film)
    film.eval()
    imgs = images(batch=2, height=64, width=64)
    with torch.no_grad():
        torch.testing.assert_close(relationship.compose_img_text(imgs, TEXTS[:2]),
                                   relationship_formula(relationship, imgs, TEXTS[:2]),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(film.compose_img_text(imgs, TEXTS[:2]),
                                   film_formula(film, imgs, TEXTS[:2]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_every_new_model_trains_under_torchrun_and_the_processes_agree(tmp_path):
    """DistributedDataParallel: attribute_operator's unused text encoder must be declared (it
    fails at the second iteration otherwise), and both processes end with the same weights."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               os.path.join(repo, 'tests', 'ddp_model_checks.py'), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    assert sorted(ranks[0]) == sorted(NEW_MODELS)
    for name in NEW_MODELS:
        first, second = ranks[0][name], ranks[1][name]
        trained = build(name, texts=MIT_CAPTIONS, embed_dim=8).state_dict()
        for key, value in first.items():
            if 'running_' in key or 'num_batches_tracked' in key:
                continue  # BatchNorm statistics are each process's own (main.py broadcasts them)
            torch.testing.assert_close(second[key], value, msg=f'{name} {key}')
        assert not torch.equal(first['img_model.fc.0.weight'], trained['img_model.fc.0.weight'])
