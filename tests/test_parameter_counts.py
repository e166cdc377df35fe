"""docs/baselines.md states every model's own parameter count per backbone (issue 23 item 17):
the numbers written there are checked against models built here, so they cannot drift."""
import os
import re

import pytest
import torch

import model_registry

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                   'baselines.md')
SECTION = '## Parameters of each model'
BACKBONES = ('resnet18', 'resnet50')
SHARED = ('img_model', 'text_model', 'normalization_layer')
EMBED_DIM = 512
ADJECTIVES, NOUNS = 115, 884  # 999 words and <UNK>: the documented 1,000-word vocabulary
CAPTIONS = [f'a{i % ADJECTIVES:03d} n{i:03d}' for i in range(NOUNS)]  # "adjective noun"


def documented_rows():
    """{first cell's `name`: (ResNet-18 count, ResNet-50 count)} from the section's tables."""
    with open(DOC, encoding='utf-8') as f:
        text = f.read()
    section = text[text.index(SECTION):]
    following = section.find('\n## ', len(SECTION))
    section = section if following < 0 else section[:following]
    rows = {}
    for line in section.splitlines():
        match = re.fullmatch(r'\| `([a-z0-9_]+)`[^|]* \| ([\d,]+) \| ([\d,]+) \|', line.strip())
        if match:
            name, r18, r50 = match.groups()
            assert name not in rows, f'{name} listed twice'
            rows[name] = (int(r18.replace(',', '')), int(r50.replace(',', '')))
    return rows


def build(name, backbone):
    # On the meta device: shapes without memory (ResNet-50's tirg_lastconv holds 240 M).
    with torch.device('meta'):
        return model_registry.MODELS[name](CAPTIONS, EMBED_DIM, pretrained=False, backbone=backbone)


def own_parameters(model):
    return sum(p.numel() for name, p in model.named_parameters()
               if name.split('.')[0] not in SHARED)


def test_the_documented_table_lists_every_model_in_the_registry_s_order():
    rows = [name for name in documented_rows() if name not in SHARED]
    assert rows == list(model_registry.MODELS)


@pytest.mark.parametrize('backbone', BACKBONES)
def test_every_model_s_own_parameters_are_as_documented(backbone):
    documented = documented_rows()
    column = BACKBONES.index(backbone)
    counted = {}
    for name in model_registry.MODELS:
        model = build(name, backbone)
        assert model.text_model.vocab.get_size() == 1000
        if name == 'attribute_operator':
            assert model.operators.shape[0] == ADJECTIVES
        counted[name] = own_parameters(model)
    assert counted == {name: documented[name][column] for name in model_registry.MODELS}


@pytest.mark.parametrize('backbone', BACKBONES)
def test_the_shared_encoders_are_as_documented(backbone):
    documented = documented_rows()
    model = build('imgonly', backbone)
    column = BACKBONES.index(backbone)
    for part in ('img_model', 'text_model'):
        counted = sum(p.numel() for p in getattr(model, part).parameters())
        assert counted == documented[part][column], part
