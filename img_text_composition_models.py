"""TIRG and the baseline composition models (SPEC section 3).

Module names and nesting reproduce the reference exactly so that its released checkpoints load
with `load_state_dict(strict=True)`.
"""
import argparse
import os
import pickle
import warnings

import torch
import torch.nn.functional as F
import torchvision

import checkpoints
import distributed
import text_model
import torch_functions


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for but cannot be found or downloaded."""


class GlobalAvgPool2d(torch.nn.Module):

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, (1, 1))


class ConCatModule(torch.nn.Module):

    def forward(self, x):
        return torch.cat(x, dim=1)


def load_resnet18(pretrained):
    """ResNet-18 with ImageNet weights when `pretrained` is True (torchvision's cache under
    TORCH_HOME, downloading if it can), a path to a ResNet-18 state dict, or no weights."""
    if pretrained is False or pretrained is None:
        return torchvision.models.resnet18(weights=None)
    if isinstance(pretrained, (str, os.PathLike)):
        return _resnet18_from_file(os.fspath(pretrained))
    try:
        return torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    except Exception as e:  # the download raises URLError, OSError, ... depending on the failure
        cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
        raise WeightsUnavailableError(
            f'ImageNet weights for ResNet-18 are not in {cache} and could not be downloaded '
            f'({type(e).__name__}); put resnet18-f37072fd.pth there, pass '
            f'--img_weights=PATH to a ResNet-18 state dict, or train from scratch with '
            f'--img_weights=none') from None


def _resnet18_from_file(path):
    """ResNet-18 with the weights of a state dict file; any other file is a one-line
    WeightsUnavailableError (main.py checks --img_weights before loading any data)."""
    def fail(reason):
        raise WeightsUnavailableError(f'--img_weights={path}: {reason}; expected a torchvision '
                                      f'ResNet-18 state dict (such as resnet18-f37072fd.pth)')
    state = _load_tensors(path, fail)
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if isinstance(state, dict) and 'model_state_dict' in state:
        fail('a TIRG checkpoint (load it with --checkpoint)')
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        fail('a dict whose values are not all tensors' if isinstance(state, dict)
             else f'it holds a {type(state).__name__} object, not a dict of named tensors')
    model = torchvision.models.resnet18(weights=None)
    mismatch = checkpoints.describe_state_dict_mismatch(model, state)
    if mismatch:
        fail(f'not ResNet-18 weights ({mismatch})')
    model.load_state_dict(state)
    return model


def _load_tensors(path, fail):
    if os.path.isfile(path):
        with open(path, 'rb') as f:
            start = f.read(4)
        if not start:
            fail('an empty file')
        if not start.startswith((b'PK\x03\x04', b'\x80')):  # torch's zip format, or a pickle
            fail('not a torch weights file')
    try:
        # Namespace: to recognise checkpoints; warnings: torch's about plain pickles would come
        # before the one-line error.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except OSError as e:
        fail(f'cannot read it ({e.strerror or e})')
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' in str(e):
            fail('it holds Python objects besides tensors (not loaded: that could run code)')
        fail(f'not a torch weights file ({_first_line(e)})')
    except (KeyError, EOFError):  # what text and truncated pickles raise, with no useful message
        fail('not a torch weights file, or a truncated one')
    except Exception as e:  # a broken zip archive is a RuntimeError, and so on
        fail(f'not a torch weights file ({_first_line(e)})')


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ImgTextCompositionBase(torch.nn.Module):
    """Normalisation and the two losses, shared by every model."""

    def __init__(self):
        super().__init__()
        self.normalization_layer = torch_functions.NormalizationLayer(
            normalize_scale=4.0, learn_scale=True)
        self.soft_triplet_loss = torch_functions.TripletLoss()

    def extract_img_feature(self, imgs):
        raise NotImplementedError

    def extract_text_feature(self, texts):
        raise NotImplementedError

    def compose_img_text(self, imgs, texts):
        raise NotImplementedError

    def forward(self, imgs_query, modification_texts, imgs_target, soft_triplet_loss=True):
        """The training loss, so that DistributedDataParallel, which wraps forward, can train it."""
        return self.compute_loss(imgs_query, modification_texts, imgs_target, soft_triplet_loss)

    def compute_loss(self, imgs_query, modification_texts, imgs_target, soft_triplet_loss=True):
        query = self.compose_img_text(imgs_query, modification_texts)
        target = self.extract_img_feature(imgs_target)
        assert query.shape == target.shape
        # The losses run in float32 even under --amp: distances between nearby points need it.
        with torch.autocast(device_type=query.device.type, enabled=False):
            query = self.normalization_layer(query.float())
            target = self.normalization_layer(target.float())
            # Under torchrun: the loss over the global batch, as with one process.  Each process
            # computes the same loss; the gathers' backward sums their gradients onto its rows and
            # DistributedDataParallel averages over the processes: the single-process gradient.
            query = distributed.gather_with_grad(query)
            target = distributed.gather_with_grad(target)
            if soft_triplet_loss:
                return self.compute_soft_triplet_loss_(query, target)
            return self.compute_batch_based_classification_loss_(query, target)

    def compute_soft_triplet_loss_(self, query, target):
        triplets = distributed.from_first_process(
            torch_functions.sample_triplets(query.shape[0], device=query.device))
        return self.soft_triplet_loss(torch.cat([query, target]), triplets)

    def compute_batch_based_classification_loss_(self, query, target):
        logits = query @ target.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, labels)


class ImgEncoderTextEncoderBase(ImgTextCompositionBase):
    """ResNet-18 image encoder and LSTM text encoder."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None):
        super().__init__()
        img_model = load_resnet18(pretrained)
        img_model.avgpool = GlobalAvgPool2d()
        img_model.fc = torch.nn.Sequential(torch.nn.Linear(512, embed_dim))
        self.img_model = img_model
        self.text_model = text_model.TextLSTMModel(
            texts_to_build_vocab=texts, word_embed_dim=embed_dim, lstm_hidden_dim=embed_dim,
            vocab=vocab)
        self.embed_dim = embed_dim

    def extract_img_feature(self, imgs):
        return self.img_model(imgs)

    def extract_text_feature(self, texts):
        return self.text_model(texts)


class SimpleModelImageOnly(ImgEncoderTextEncoderBase):

    def compose_img_text(self, imgs, texts):
        return self.extract_img_feature(imgs)


class SimpleModelTextOnly(ImgEncoderTextEncoderBase):

    def compose_img_text(self, imgs, texts):
        return self.extract_text_feature(texts)


class Composer(torch.nn.Module):

    def __init__(self, embed_dim):
        super().__init__()
        self.m = torch.nn.Sequential(
            torch.nn.BatchNorm1d(2 * embed_dim), torch.nn.ReLU(),
            torch.nn.Linear(2 * embed_dim, 2 * embed_dim),
            torch.nn.BatchNorm1d(2 * embed_dim), torch.nn.ReLU(),
            torch.nn.Dropout(0.1), torch.nn.Linear(2 * embed_dim, embed_dim))

    def forward(self, x):
        return self.m(torch.cat(x, dim=1))


class Concat(ImgEncoderTextEncoderBase):

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None):
        super().__init__(texts, embed_dim, pretrained, vocab)
        self.composer = Composer(embed_dim)

    def compose_img_text(self, imgs, texts):
        return self.compose_img_text_features(
            self.extract_img_feature(imgs), self.extract_text_feature(texts))

    def compose_img_text_features(self, img_features, text_features):
        return self.composer((img_features, text_features))


def gated_feature_composer(embed_dim):
    """TIRG's gate over [image feature, text feature] (also tirg_gate_only's)."""
    return torch.nn.Sequential(
        ConCatModule(), torch.nn.BatchNorm1d(2 * embed_dim), torch.nn.ReLU(),
        torch.nn.Linear(2 * embed_dim, embed_dim))


def res_info_composer(embed_dim):
    """TIRG's residual over [image feature, text feature] (also tirg_res_only's)."""
    return torch.nn.Sequential(
        ConCatModule(), torch.nn.BatchNorm1d(2 * embed_dim), torch.nn.ReLU(),
        torch.nn.Linear(2 * embed_dim, 2 * embed_dim), torch.nn.ReLU(),
        torch.nn.Linear(2 * embed_dim, embed_dim))


class TIRG(ImgEncoderTextEncoderBase):
    """Gated residual composition: sigmoid(gate) * image * a[0] + residual * a[1]."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None):
        super().__init__(texts, embed_dim, pretrained, vocab)
        self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))
        self.gated_feature_composer = gated_feature_composer(embed_dim)
        self.res_info_composer = res_info_composer(embed_dim)

    def compose_img_text(self, imgs, texts):
        return self.compose_img_text_features(
            self.extract_img_feature(imgs), self.extract_text_feature(texts))

    def compose_img_text_features(self, img_features, text_features):
        gate = self.gated_feature_composer((img_features, text_features))
        residual = self.res_info_composer((img_features, text_features))
        return torch.sigmoid(gate) * img_features * self.a[0] + residual * self.a[1]


def _conv_composer(embed_dim):
    return torch.nn.Sequential(
        torch.nn.BatchNorm2d(512 + embed_dim),
        torch.nn.Conv2d(512 + embed_dim, 512 + embed_dim, [3, 3], padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(512 + embed_dim, 512, [3, 3], padding=1))


class TIRGLastConv(ImgEncoderTextEncoderBase):
    """TIRG applied to ResNet-18's last convolutional map, before pooling."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None):
        super().__init__(texts, embed_dim, pretrained, vocab)
        self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))
        self.mod2d = _conv_composer(embed_dim)
        self.mod2d_gate = _conv_composer(embed_dim)

    def compose_img_text(self, imgs, texts):
        text_features = self.extract_text_feature(texts)
        m = self.img_model
        x = m.maxpool(m.relu(m.bn1(m.conv1(imgs))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        y = text_features.reshape(*text_features.shape, 1, 1).expand(-1, -1, *x.shape[2:])
        z = torch.cat((x, y), dim=1)
        x = self.a[0] * torch.sigmoid(self.mod2d_gate(z)) * x + self.a[1] * self.mod2d(z)
        x = torch.flatten(m.avgpool(x), 1)
        return m.fc(x)


MODELS = {
    'imgonly': SimpleModelImageOnly,
    'textonly': SimpleModelTextOnly,
    'concat': Concat,
    'tirg': TIRG,
    'tirg_lastconv': TIRGLastConv,
}

# The paper's other methods and TIRG's ablations (SPEC 3.1): importing the module adds them to
# MODELS.  At the end, because they subclass the classes above.
import paper_composers  # noqa: E402,F401
