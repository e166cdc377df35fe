"""TIRG and the baseline composition models (SPEC section 3).

Module names and nesting reproduce the reference exactly so that its released checkpoints load
with `load_state_dict(strict=True)`.
"""
import argparse
import functools
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


class Backbone:
    """A torchvision ResNet the image encoder can be built on (SPEC 3.2)."""

    def __init__(self, title, build, imagenet_weights, file_name, channels):
        self.title = title                        # as messages name it: ResNet-18
        self.build = build                        # torchvision constructor
        self.imagenet_weights = imagenet_weights  # torchvision's IMAGENET1K_V1 entry
        self.file_name = file_name                # that entry's file in torch's hub cache
        self.channels = channels                  # layer4 channels: img_model.fc's input

    @functools.cached_property
    def shapes(self):
        """{key: shape} of the network's state dict, fc included, from a weightless (meta) copy."""
        with torch.device('meta'):
            return {k: tuple(v.shape) for k, v in self.build(weights=None).state_dict().items()}


BACKBONES = {
    'resnet18': Backbone('ResNet-18', torchvision.models.resnet18,
                         torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 'resnet18-f37072fd.pth', 512),
    'resnet50': Backbone('ResNet-50', torchvision.models.resnet50,
                         torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 'resnet50-0676ba61.pth', 2048),
}


def backbone_of_state_dict(state_dict, prefix=''):
    """The name of the backbone whose layers (fc aside) the keys under `prefix` hold with the same
    shapes, or None."""
    layers = {k[len(prefix):]: tuple(v.shape) for k, v in state_dict.items()
              if k.startswith(prefix) and not k.startswith(prefix + 'fc.')}
    for name, backbone in BACKBONES.items():
        if layers == {k: v for k, v in backbone.shapes.items() if not k.startswith('fc.')}:
            return name
    return None


def load_resnet(backbone, pretrained):
    """The torchvision ResNet `backbone` ('resnet18' or 'resnet50') with ImageNet weights when
    `pretrained` is True (torchvision's cache under TORCH_HOME, downloading if it can), the
    weights of a state dict file when it is a path, or no weights."""
    spec = BACKBONES[backbone]
    if pretrained is False or pretrained is None:
        return spec.build(weights=None)
    if isinstance(pretrained, (str, os.PathLike)):
        return _resnet_from_file(backbone, os.fspath(pretrained))
    cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
    cached = os.path.join(cache, spec.file_name)
    if os.path.isfile(cached):
        return _resnet_from_file(backbone, cached, flag='--img_weights=imagenet: ')
    try:
        # weights_only: a downloaded file is never unpickled with code in it.
        spec.imagenet_weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # the download raises URLError, OSError, ... depending on the failure
        raise WeightsUnavailableError(
            f'ImageNet weights for {spec.title} are not in {cache} and could not be downloaded '
            f'({type(e).__name__}); put {spec.file_name} there, pass '
            f'--img_weights=PATH to a {spec.title} state dict, or train from scratch with '
            f'--img_weights=none') from None
    return _resnet_from_file(backbone, cached, flag='--img_weights=imagenet: ')


def load_resnet18(pretrained):
    return load_resnet('resnet18', pretrained)


def _resnet_from_file(backbone, path, flag='--img_weights='):
    """The ResNet `backbone` with the weights of a state dict file; any other file is a one-line
    WeightsUnavailableError (main.py checks --img_weights before loading any data)."""
    spec = BACKBONES[backbone]

    def fail(reason):
        raise WeightsUnavailableError(f'{flag}{path}: {reason}; expected a torchvision '
                                      f'{spec.title} state dict (such as {spec.file_name})')
    state = _load_tensors(path, fail)
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if isinstance(state, dict) and 'model_state_dict' in state:
        fail('a TIRG checkpoint (load it with --checkpoint)')
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        fail('a dict whose values are not all tensors' if isinstance(state, dict)
             else f'it holds a {type(state).__name__} object, not a dict of named tensors')
    other = backbone_of_state_dict(state)
    if other not in (None, backbone):
        fail(f'{BACKBONES[other].title} weights, but --img_backbone={backbone} needs '
             f'{spec.title} ones (or give --img_backbone={other})')
    model = spec.build(weights=None)
    mismatch = checkpoints.describe_state_dict_mismatch(model, state)
    if mismatch:
        fail(f'not {spec.title} weights ({mismatch})')
    # NaN weights would only show as a NaN loss, which reads like a learning rate too high.
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        fail(f'the weights file holds non-finite values (NaN or infinity), in {bad}')
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
        if checkpoints.is_unsafe_pickle_error(e):
            fail(f'not loaded: {checkpoints.describe_unsafe_content(path, e)}')
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

    def state_dict_out_of_range(self, state_dict):
        """A phrase naming a buffer of `state_dict` (shaped as this model's own) whose values
        this model would index with out of their range, or None.  Loading copies any values, so
        a crafted or corrupt file would otherwise fail at the first query, after the run began."""
        return None

    def forward(self, imgs_query, modification_texts, imgs_target, soft_triplet_loss=True,
                slice_rows=None):
        """The training loss, so that DistributedDataParallel, which wraps forward, can train it.
        `slice_rows`: every process's rows, where the global batch does not divide evenly."""
        return self.compute_loss(imgs_query, modification_texts, imgs_target, soft_triplet_loss,
                                 slice_rows)

    def compute_loss(self, imgs_query, modification_texts, imgs_target, soft_triplet_loss=True,
                     slice_rows=None):
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
            query = distributed.gather_with_grad(query, slice_rows)
            target = distributed.gather_with_grad(target, slice_rows)
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
    """ResNet image encoder (ResNet-18, the reference's, or ResNet-50: `backbone`) and LSTM text
    encoder.  Composers that read the layer4 map take its channel count from `img_channels`
    (= img_model.fc[0].in_features: 512 or 2048)."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None, backbone='resnet18'):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f'backbone={backbone!r}: expected one of {", ".join(BACKBONES)}')
        img_model = load_resnet(backbone, pretrained)
        img_model.avgpool = GlobalAvgPool2d()
        img_model.fc = torch.nn.Sequential(torch.nn.Linear(BACKBONES[backbone].channels, embed_dim))
        self.img_model = img_model
        self.backbone = backbone
        self.img_channels = BACKBONES[backbone].channels
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

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None, **kwargs):
        super().__init__(texts, embed_dim, pretrained, vocab, **kwargs)
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

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None, **kwargs):
        super().__init__(texts, embed_dim, pretrained, vocab, **kwargs)
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


def _conv_composer(channels, embed_dim):
    return torch.nn.Sequential(
        torch.nn.BatchNorm2d(channels + embed_dim),
        torch.nn.Conv2d(channels + embed_dim, channels + embed_dim, [3, 3], padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(channels + embed_dim, channels, [3, 3], padding=1))


class TIRGLastConv(ImgEncoderTextEncoderBase):
    """TIRG applied to the ResNet's last convolutional map (C = 512 or 2048), before pooling."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None, **kwargs):
        super().__init__(texts, embed_dim, pretrained, vocab, **kwargs)
        self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))
        self.mod2d = _conv_composer(self.img_channels, embed_dim)
        self.mod2d_gate = _conv_composer(self.img_channels, embed_dim)

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
