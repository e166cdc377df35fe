"""The reference's constants, written out here and never read from the code under test (issue 17,
section 4): the text encoder's dropout rate, ImageNet normalisation (RGB order) and the photo
transform (Resize(224) of the shorter side, CenterCrop(224)), computed independently with PIL."""
import numpy as np
import PIL.Image
import pytest
import torch

import datasets
import text_model

# The reference (and torchvision's ImageNet weights): RGB order.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TEXT_DROPOUT = 0.1


def normalised(pixels):
    """uint8 H x W x 3 -> float 3 x H x W: /255, then (x - mean) / std per RGB channel."""
    x = pixels.astype(np.float64) / 255.0
    return torch.from_numpy(((x - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)).float()


def random_rgb(height, width, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)


def test_css_transform_normalises_with_the_imagenet_constants_in_rgb_order():
    # Channels far apart, so a BGR mean (0.406 on red) shows on every pixel.
    pixels = np.zeros((5, 7, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 250, 128, 3
    pixels[2, 3] = (17, 99, 201)
    got = datasets.css_transform()(PIL.Image.fromarray(pixels))
    assert got.shape == (3, 5, 7)  # CSS: no resize
    torch.testing.assert_close(got, normalised(pixels), rtol=0, atol=1e-6)
    assert got[0, 0, 0].item() == pytest.approx((250 / 255 - 0.485) / 0.229, abs=1e-6)
    assert got[2, 0, 0].item() == pytest.approx((3 / 255 - 0.406) / 0.225, abs=1e-6)


@pytest.mark.parametrize('size, resized, box', [
    # (width, height) -> the shorter side to 224, the longer one in proportion (int), then the
    # centre 224 x 224: 300 x 200 -> 336 x 224, columns 56 to 280; and a portrait photo.
    ((300, 200), (336, 224), (56, 0, 280, 224)),
    ((180, 270), (224, 336), (0, 56, 224, 280)),
])
def test_photo_transform_is_resize_224_centre_crop_224_then_normalise(size, resized, box):
    img = PIL.Image.fromarray(random_rgb(size[1], size[0], seed=size[0]))
    expected = normalised(np.asarray(img.resize(resized, PIL.Image.BILINEAR).crop(box)))
    got = datasets.photo_transform()(img)
    assert got.shape == (3, 224, 224)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def write_photo_dataset(dataset, root):
    from fiq_cirr_fixtures import cirr_layout, fiq_layout, write_cirr, write_fiq
    from shoes_fixtures import small_lists, write_shoes
    from test_fashion200k import write_fashion_fixture
    from test_mitstates import write_mitstates_fixture
    writers = {'fashion200k': write_fashion_fixture, 'mitstates': write_mitstates_fixture,
               'fashioniq': lambda r: write_fiq(r, fiq_layout()),
               'cirr': lambda r: write_cirr(r, cirr_layout()),
               'shoes': lambda r: write_shoes(r, *small_lists())}
    writers[dataset](root)


@pytest.mark.parametrize('dataset', ['fashion200k', 'mitstates', 'fashioniq', 'cirr', 'shoes'])
def test_every_photo_dataset_is_read_through_the_photo_transform(dataset, tmp_path):
    """The run's datasets (experiment.load_dataset, as main.py and retrieve.py build them) give
    224 x 224 images from fixtures of small photos, in both splits.  The end-to-end tests of these
    datasets run at 64 px (conftest.small_photos) and so rely on this one."""
    import experiment
    import main
    root = str(tmp_path / dataset)
    write_photo_dataset(dataset, root)
    opt = main.parse_opt([f'--dataset={dataset}', f'--dataset_path={root}', '--img_weights=none'])
    for split in experiment.load_dataset(opt):
        img = split.get_img(0)
        assert tuple(img.shape) == (3, 224, 224), (split.split, tuple(img.shape))


def test_text_encoder_dropout_is_0_1_before_its_linear_layer():
    """In training mode: the LSTM's output at the last token, dropout at rate 0.1 (the surviving
    values scaled by 1 / 0.9), then the linear layer.  The same random stream on both sides, so
    the masks are the same exactly when the rates are."""
    texts = ['make the top left cube red', 'add a small sphere', 'remove it', 'a b c d e f g']
    torch.manual_seed(0)
    model = text_model.TextLSTMModel(texts, word_embed_dim=16, lstm_hidden_dim=64).train()
    with torch.no_grad():
        last_outputs = []
        for text in texts:
            ids = torch.tensor(model.vocab.encode_text(text))
            out, _ = model.lstm(model.embedding_layer(ids).unsqueeze(1))
            last_outputs.append(out[-1, 0])
        last_outputs = torch.stack(last_outputs)
        linear = model.fc_output[-1]
        torch.manual_seed(7)
        got = model(texts)
        torch.manual_seed(7)
        expected = linear(torch.nn.functional.dropout(last_outputs, p=TEXT_DROPOUT, training=True))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The rate shows in the result itself: invert the linear layer to see the dropped values.
    dropped = torch.linalg.lstsq(linear.weight, (got - linear.bias).t()).solution.t()
    zero = dropped.abs() < 1e-4
    assert 0.03 < zero.float().mean().item() < 0.2, zero.float().mean().item()
    torch.testing.assert_close(dropped[~zero], last_outputs[~zero] / 0.9, rtol=1e-3, atol=1e-4)
