"""Models (SPEC section 3): checkpoint layout, forward shapes, losses, TIRG composition and the
LSTM text encoder."""
import io
import json
import math
import os

import pytest
import torch

import model_registry
import text_model
import torch_functions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project's shared reference beside the checkout when present, else the copy kept in tests/reference.
LAYOUT_CANDIDATES = [
    os.path.join(os.path.dirname(REPO), 'shared', 'reference', 'state_dict_layout.json'),
    os.path.join(REPO, 'tests', 'reference', 'state_dict_layout.json'),
]
MODEL_NAMES = ['imgonly', 'textonly', 'concat', 'tirg', 'tirg_lastconv']
SMALL_DIM = 32
TEXTS = ['make top-left red cube blue', 'add small gray sphere', 'remove it']


def _load_layout():
    path = next(p for p in LAYOUT_CANDIDATES if os.path.isfile(p))
    with open(path) as f:
        return json.load(f)


LAYOUT = _load_layout()


def build(name, texts=TEXTS, embed_dim=SMALL_DIM, seed=0):
    torch.manual_seed(seed)
    return model_registry.MODELS[name](texts, embed_dim, pretrained=False)


def small_images(batch=3, height=64, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=g)


def test_model_registry_starts_with_the_five_reference_models():
    assert list(model_registry.MODELS)[:5] == MODEL_NAMES  # then the paper's other methods (SPEC 3.1)


# --------------------------------------------------------------------------------------------
# Checkpoint layout (embed_dim 512, the JSON's texts)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', MODEL_NAMES)
def test_state_dict_layout_matches_reference_and_round_trips(name):
    ref = LAYOUT['models'][name]
    model = build(name, texts=LAYOUT['texts'], embed_dim=LAYOUT['embed_dim'], seed=1)
    state = model.state_dict()
    got = [[key, list(value.shape), str(value.dtype)] for key, value in state.items()]
    assert got == ref['keys']  # same keys, same order, same shapes and dtypes
    assert model.text_model.vocab.word2id == ref['vocab']
    assert model.text_model.vocab.get_size() == ref['vocab_size'] == len(ref['vocab'])

    # Saved from one instance, loaded strictly into another (different initialisation).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    other = build(name, texts=LAYOUT['texts'], embed_dim=LAYOUT['embed_dim'], seed=2)
    assert not torch.equal(other.state_dict()['img_model.conv1.weight'], state['img_model.conv1.weight'])
    result = other.load_state_dict(saved, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key


# --------------------------------------------------------------------------------------------
# Forward passes and losses on a small model
# --------------------------------------------------------------------------------------------

# Parameters that must receive a gradient from the loss, per model.
USED_PARAMETERS = {
    'imgonly': ['img_model.conv1.weight', 'img_model.fc.0.weight', 'normalization_layer.norm_s'],
    'textonly': ['img_model.fc.0.weight', 'text_model.embedding_layer.weight',
                 'text_model.lstm.weight_ih_l0', 'text_model.fc_output.1.weight',
                 'normalization_layer.norm_s'],
    'concat': ['img_model.fc.0.weight', 'text_model.lstm.weight_ih_l0', 'composer.m.2.weight',
               'composer.m.6.weight', 'normalization_layer.norm_s'],
    'tirg': ['img_model.fc.0.weight', 'text_model.lstm.weight_ih_l0',
             'gated_feature_composer.3.weight', 'res_info_composer.5.weight', 'a',
             'normalization_layer.norm_s'],
    'tirg_lastconv': ['img_model.conv1.weight', 'img_model.fc.0.weight',
                      'text_model.lstm.weight_ih_l0', 'mod2d.1.weight', 'mod2d.3.weight',
                      'mod2d_gate.3.weight', 'a', 'normalization_layer.norm_s'],
}


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_forward_shapes_and_losses(name):
    model = build(name)
    imgs = small_images()  # batch 3, 64 x 64
    model.eval()
    with torch.no_grad():
        assert model.compose_img_text(imgs, TEXTS).shape == (3, SMALL_DIM)
        assert model.extract_img_feature(imgs).shape == (3, SMALL_DIM)
        assert model.extract_text_feature(TEXTS).shape == (3, SMALL_DIM)

    # Both losses in training mode: a finite scalar, with gradients where the model uses them.
    model.train()
    params = dict(model.named_parameters())
    for soft_triplet in (True, False):
        model.zero_grad(set_to_none=True)
        loss = model.compute_loss(small_images(seed=1, height=32, width=32), TEXTS,
                                  small_images(seed=2, height=32, width=32),
                                  soft_triplet_loss=soft_triplet)
        assert loss.dim() == 0
        assert math.isfinite(loss.item())
        loss.backward()
        for key in USED_PARAMETERS[name]:
            grad = params[key].grad
            assert grad is not None, (soft_triplet, key)
            assert torch.isfinite(grad).all(), (soft_triplet, key)
            assert grad.abs().sum() > 0, (soft_triplet, key)
        if name in ('tirg', 'tirg_lastconv'):
            assert (model.a.grad[:2] != 0).all()  # a[0] and a[1] are used, a[2:] are not
        if name == 'imgonly':
            assert all(p.grad is None or not p.grad.any()
                       for k, p in params.items() if k.startswith('text_model.'))


def test_tirg_composition_equals_formula_from_submodules():
    model = build('tirg')
    with torch.no_grad():
        model.a.copy_(torch.tensor([0.7, 3.0, 5.0, -5.0]))  # make a[0], a[1] visible
        for bn in (model.gated_feature_composer[1], model.res_info_composer[1]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    imgs = small_images()
    with torch.no_grad():
        img = model.extract_img_feature(imgs)
        txt = model.extract_text_feature(TEXTS)
        x = torch.cat([img, txt], dim=1)
        g, r = model.gated_feature_composer, model.res_info_composer
        gate = g[3](torch.relu(g[1](x)))
        residual = r[5](torch.relu(r[3](torch.relu(r[1](x)))))
        expected = torch.sigmoid(gate) * img * 0.7 + residual * 3.0
        got = model.compose_img_text(imgs, TEXTS)
        got_features = model.compose_img_text_features(img, txt)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_features, expected, rtol=1e-5, atol=1e-5)


def resnet_feature(m, imgs):
    """ResNet-18 with the global average pool and the fc Sequential, from its layers."""
    x = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(imgs))))))))
    return m.fc[0](x.mean(dim=(2, 3)))


def lstm_feature(t, texts):
    """The LSTM's output at each text's last token, then fc_output (Dropout, Linear)."""
    outputs = []
    for text in texts:
        ids = torch.tensor(t.vocab.encode_text(text))
        out, _ = t.lstm(t.embedding_layer(ids).unsqueeze(1))
        outputs.append(out[-1, 0])
    return t.fc_output[1](t.fc_output[0](torch.stack(outputs)))


def test_image_only_query_is_the_image_feature_whatever_the_text():
    model = build('imgonly').eval()
    imgs = small_images()
    with torch.no_grad():
        expected = resnet_feature(model.img_model, imgs)
        torch.testing.assert_close(model.compose_img_text(imgs, TEXTS), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.compose_img_text(imgs, TEXTS[::-1]), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.extract_img_feature(imgs), expected, rtol=1e-5, atol=1e-5)


def test_text_only_query_is_the_text_feature_whatever_the_image():
    model = build('textonly').eval()
    with torch.no_grad():
        expected = lstm_feature(model.text_model, TEXTS)
        for seed in (0, 1):
            got = model.compose_img_text(small_images(seed=seed), TEXTS)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # Target images still go through the image encoder.
        imgs = small_images(seed=2)
        torch.testing.assert_close(model.extract_img_feature(imgs),
                                   resnet_feature(model.img_model, imgs), rtol=1e-5, atol=1e-5)


def concat_formula(model, img, txt, training):
    """SPEC 3: BatchNorm, ReLU, Linear 2E->2E, BatchNorm, ReLU, Dropout 0.1, Linear 2E->E over
    [image feature, text feature] (that order)."""
    m = model.composer.m

    def batch_norm(bn, x):
        return torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                              training=training, momentum=0.0, eps=bn.eps)

    x = torch.cat([img, txt], dim=1)
    x = m[2](torch.relu(batch_norm(m[0], x)))
    x = torch.nn.functional.dropout(torch.relu(batch_norm(m[3], x)), p=0.1, training=training)
    return m[6](x)


def test_concat_composition_equals_formula_from_submodules():
    model = build('concat')
    with torch.no_grad():
        for bn in (model.composer.m[0], model.composer.m[3]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    imgs = small_images()
    with torch.no_grad():
        img = model.extract_img_feature(imgs)
        txt = model.extract_text_feature(TEXTS)
        expected = concat_formula(model, img, txt, training=False)
        torch.testing.assert_close(model.compose_img_text(imgs, TEXTS), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.compose_img_text_features(img, txt), expected, rtol=1e-5, atol=1e-5)


def test_concat_dropout_in_training_is_the_formula_at_rate_0_1():
    """The same random stream on both sides: the text encoder's dropout, then the composer's."""
    model = build('concat').train()
    imgs = small_images(batch=8)
    texts = (TEXTS * 3)[:8]
    with torch.no_grad():
        img = resnet_feature(model.img_model, imgs)  # BatchNorm on batch statistics: no randomness
        torch.manual_seed(5)
        txt = lstm_feature(model.text_model, texts)
        expected = concat_formula(model, img, txt, training=True)
        torch.manual_seed(5)
        got = model.compose_img_text(imgs, texts)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tirg_lastconv_composition_equals_formula_from_submodules():
    model = build('tirg_lastconv')
    with torch.no_grad():
        model.a.copy_(torch.tensor([0.5, 2.0, 7.0, 7.0]))
    model.eval()
    imgs = small_images(height=64, width=96)
    m = model.img_model
    with torch.no_grad():
        txt = model.extract_text_feature(TEXTS)
        x = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(imgs))))))))
        y = txt[:, :, None, None].repeat(1, 1, x.shape[2], x.shape[3])
        z = torch.cat([x, y], dim=1)
        x = 0.5 * torch.sigmoid(model.mod2d_gate(z)) * x + 2.0 * model.mod2d(z)
        expected = m.fc(x.mean(dim=(2, 3)))
        got = model.compose_img_text(imgs, TEXTS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tirg_lastconv_accepts_non_square_images():
    model = build('tirg_lastconv')
    with torch.no_grad():
        for training, (height, width) in [(True, (64, 96)), (False, (80, 48)), (False, (33, 65))]:
            model.train(training)
            imgs = small_images(height=height, width=width)
            out = model.compose_img_text(imgs, TEXTS)
            assert out.shape == (3, SMALL_DIM)
            assert torch.isfinite(out).all()
            # Target images of any size too (global average pool).
            assert model.extract_img_feature(imgs).shape == (3, SMALL_DIM)


def test_model_normalisation_scale_starts_at_4_and_is_learnable():
    model = build('tirg')
    s = model.normalization_layer.norm_s
    assert isinstance(s, torch.nn.Parameter) and s.requires_grad
    assert s.shape == (1,) and s.item() == 4.0
    assert any(p is s for p in model.parameters())
    assert model.a.tolist() == [1.0, 10.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------

def test_tokenize_drops_non_ascii_lowercases_and_deletes_punctuation():
    assert text_model.tokenize_text('Make the CAFÉ top-left, blue!') == ['make', 'the', 'caf', 'topleft', 'blue']
    assert text_model.tokenize_text("  it's\tA\ntest... ") == ['its', 'a', 'test']
    assert text_model.tokenize_text('日本 語') == []
    assert text_model.tokenize_text('!?&*') == []
    assert text_model.tokenize_text('') == []


def test_vocab_is_unk_then_sorted_tokens_and_unknown_words_map_to_0():
    vocab = text_model.SimpleVocab.from_texts(['b a c', 'A! d', 'c b'])
    assert vocab.word2id == {'<UNK>': 0, 'a': 1, 'b': 2, 'c': 3, 'd': 4}
    assert vocab.encode_text('D, a zebra C') == [4, 1, 0, 3]
    assert vocab.encode_text('zebra') == [0]
    assert len(vocab) == vocab.get_size() == 5


def test_vocab_from_reference_texts_and_words_round_trip():
    vocab = text_model.SimpleVocab.from_texts(LAYOUT['texts'])
    assert vocab.word2id == LAYOUT['models']['tirg']['vocab']
    words = vocab.words()
    assert '<UNK>' not in words and words == sorted(words)
    assert text_model.SimpleVocab(words).word2id == vocab.word2id


def test_vocab_words_round_trip_with_unsorted_vocab():
    vocab = text_model.SimpleVocab(['zeta', 'alpha', 'mid'])
    assert vocab.word2id == {'<UNK>': 0, 'zeta': 1, 'alpha': 2, 'mid': 3}
    assert vocab.words() == ['zeta', 'alpha', 'mid']
    assert text_model.SimpleVocab(vocab.words()).word2id == vocab.word2id


@pytest.fixture
def lstm_model():
    torch.manual_seed(0)
    model = text_model.TextLSTMModel(TEXTS, word_embed_dim=16, lstm_hidden_dim=16)
    model.eval()
    return model


def test_text_in_padded_batch_equals_text_alone(lstm_model):
    batch = ['remove it', 'make top-left red cube blue and add small gray sphere', 'add', 'red cube']
    with torch.no_grad():
        together = lstm_model(batch)
        assert together.shape == (4, 16)
        for i, text in enumerate(batch):
            alone = lstm_model([text])
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-6)
        # Texts differ, so their features differ (the output is not read at a padding position).
        assert not torch.allclose(together[0], together[1])


def test_empty_text_equals_single_unknown_token(lstm_model):
    with torch.no_grad():
        unk = lstm_model(['<UNK>'])
        assert torch.isfinite(unk).all()
        torch.testing.assert_close(lstm_model(['']), unk)
        torch.testing.assert_close(lstm_model(['!!!']), unk)
        torch.testing.assert_close(lstm_model(['zebra']), unk)
        torch.testing.assert_close(lstm_model.forward_encoded_texts([[]]), unk)
        batch = lstm_model(['', 'make top-left red cube blue', ''])
        torch.testing.assert_close(batch[0:1], unk, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch[2:3], unk, rtol=1e-5, atol=1e-6)


def test_text_model_accepts_token_ids(lstm_model):
    vocab = lstm_model.vocab
    with torch.no_grad():
        by_text = lstm_model(TEXTS)
        by_ids = lstm_model([vocab.encode_text(t) for t in TEXTS])
    torch.testing.assert_close(by_text, by_ids)


def test_text_model_reads_lstm_output_at_last_token(lstm_model):
    """Output = fc_output(LSTM output at the text's last token), LSTM from a zero state."""
    text = 'make top-left red cube blue'
    ids = torch.tensor(lstm_model.vocab.encode_text(text))
    with torch.no_grad():
        out, _ = lstm_model.lstm(lstm_model.embedding_layer(ids).unsqueeze(1))
        expected = lstm_model.fc_output(out[-1])
        torch.testing.assert_close(lstm_model([text]), expected)


def test_text_model_uses_given_vocab():
    vocab = text_model.SimpleVocab(['x', 'y'])
    model = text_model.TextLSTMModel(['ignored texts here'], 8, 8, vocab=vocab)
    assert model.vocab is vocab
    assert model.embedding_layer.weight.shape == (3, 8)


def test_model_normalization_layer_is_torch_functions_layer():
    model = build('imgonly')
    assert isinstance(model.normalization_layer, torch_functions.NormalizationLayer)
