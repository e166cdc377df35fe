"""The paper's other composition methods and its two ablations of TIRG (SPEC section 3.1).

The paper compares TIRG with these methods but gives no layer sizes for them; the sizes here are
this project's choice, following each method's own paper (docs/baselines.md: "The paper's other
methods"; how each differs from its authors' code, and why: "How each method differs from its
authors' code").
Every model keeps the reference's image and text encoders (`img_model`, `text_model`), losses and
normalisation; targets go through the plain image encoder.  Models that read the layer4 map M
take its channel count C from the image encoder they built (512 for ResNet-18, 2048 for
ResNet-50), never a constant.

model_registry.MODELS names them for `--model`.
"""
import torch
import torch.nn.functional as F

import img_text_composition_models as itcm
import text_model

HASH_CANDIDATES = 4096  # K, param_hashing's candidate weights
HASH_SEED = 0
RELATION_DIM = 512  # relationship's g and f width


def image_channels(img_model):
    """C: the channels of the layer4 map, which the encoder's fc reads after pooling."""
    return img_model.fc[0].in_features


def values_outside(name, values, low, high, meaning):
    """A phrase naming the first entry of buffer `name` that is not an integer in low..high."""
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        return f'its buffer {name} holds {values.dtype} values, expected integer indices ({meaning})'
    bad = (values < low) | (values > high)
    if not bad.any():
        return None
    where = bad.nonzero()[0].tolist()
    return (f'its buffer {name} holds {values[tuple(where)].item()} at {where}, outside '
            f'{low}..{high} ({meaning})')


def layer4_map(img_model, imgs):
    """The ResNet's last convolutional map M (B x C x H x W), before pooling."""
    m = img_model
    x = m.maxpool(m.relu(m.bn1(m.conv1(imgs))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def pool_and_fc(img_model, feature_map):
    """The image encoder's own head (global average pool, fc) over a map."""
    return img_model.fc(torch.flatten(img_model.avgpool(feature_map), 1))


class _PaperComposer(itcm.ImgEncoderTextEncoderBase):
    """Takes the reference models' constructor arguments; other keywords (the image backbone) go
    to the encoders' base class."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None, **kwargs):
        super().__init__(texts, embed_dim, pretrained, vocab, **kwargs)


class ShowAndTell(_PaperComposer):
    """The text encoder's LSTM reads the image feature as its first step, then the words."""

    def compose_img_text(self, imgs, texts):
        image = self.extract_img_feature(imgs)
        t = self.text_model
        ids = texts  # strings, or lists of token ids as the text encoder takes them
        if texts and isinstance(texts[0], str):
            ids = [t.vocab.encode_text(text) for text in texts]
        lengths = torch.tensor([len(i) for i in ids], device=image.device)
        padded = torch.zeros((int(lengths.max()), len(ids)), dtype=torch.long)
        for b, text_ids in enumerate(ids):
            padded[:len(text_ids), b] = torch.as_tensor(text_ids, dtype=torch.long)
        words = t.embedding_layer(padded.to(image.device, non_blocking=True))
        steps = torch.cat([image.unsqueeze(0).to(words.dtype), words])
        # Step 0 is the image, so a text's last word is at step len(text); padding comes after it.
        output, _ = t.lstm(steps)
        last = output[lengths, torch.arange(len(ids), device=image.device)]
        return t.fc_output(last)


class ParamHashing(_PaperComposer):
    """The text predicts an E x E weight matrix through the hashing trick (DPPnet):
    W(t)[i, j] = sign[i, j] * c[hash[i, j]], c = Linear(t); query = out(W(t) x + bias)."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None, **kwargs):
        super().__init__(texts, embed_dim, pretrained, vocab, **kwargs)
        self.text_to_candidates = torch.nn.Linear(embed_dim, HASH_CANDIDATES)
        generator = torch.Generator().manual_seed(HASH_SEED)
        self.register_buffer('hash_index', torch.randint(
            HASH_CANDIDATES, (embed_dim, embed_dim), generator=generator))
        self.register_buffer('hash_sign', torch.randint(
            2, (embed_dim, embed_dim), generator=generator).float() * 2 - 1)
        self.bias = torch.nn.Parameter(torch.zeros(embed_dim))
        self.output = torch.nn.Sequential(
            torch.nn.BatchNorm1d(embed_dim), torch.nn.ReLU(), torch.nn.Linear(embed_dim, embed_dim))

    def state_dict_out_of_range(self, state_dict):
        candidates = self.text_to_candidates.out_features
        problem = values_outside('hash_index', state_dict['hash_index'], 0, candidates - 1,
                                 f'one of the {candidates} candidate weights')
        if problem:
            return problem
        sign = state_dict['hash_sign']
        bad = (sign != 1) & (sign != -1)
        if bad.any():
            where = bad.nonzero()[0].tolist()
            return f'its buffer hash_sign holds {sign[tuple(where)].item()} at {where}, expected -1 or 1'
        return None

    def text_weights(self, text_features):
        """W(t), B x E x E."""
        candidates = self.text_to_candidates(text_features)
        return candidates[:, self.hash_index] * self.hash_sign.to(candidates.dtype)

    def compose_img_text(self, imgs, texts):
        image = self.extract_img_feature(imgs)
        weights = self.text_weights(self.extract_text_feature(texts))
        projected = torch.bmm(weights, image.to(weights.dtype).unsqueeze(2)).squeeze(2)
        return self.output(projected + self.bias)


def cells_with_coordinates(feature_map):
    """B x (H*W) x (C+2): each cell's channels, then its row and column scaled to [-1, 1]
    (a single row or column sits at 0); cells in row-major order."""
    b, _, h, w = feature_map.shape
    rows = torch.linspace(-1, 1, h) if h > 1 else torch.zeros(1)
    cols = torch.linspace(-1, 1, w) if w > 1 else torch.zeros(1)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing='ij'))  # 2 x H x W
    grid = grid.to(feature_map.device, feature_map.dtype).expand(b, -1, -1, -1)
    return torch.cat([feature_map, grid], dim=1).flatten(2).transpose(1, 2)


class Relationship(_PaperComposer):
    """Relation network: g over every ordered pair of layer4 cells with the text, mean, then f."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None, **kwargs):
        super().__init__(texts, embed_dim, pretrained, vocab, **kwargs)
        self.cell_dim = image_channels(self.img_model) + 2
        d = RELATION_DIM
        self.g = torch.nn.Sequential(
            torch.nn.Linear(2 * self.cell_dim + embed_dim, d), torch.nn.ReLU(),
            torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, d), torch.nn.ReLU())
        self.f = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, embed_dim))

    def compose_img_text(self, imgs, texts):
        cells = cells_with_coordinates(layer4_map(self.img_model, imgs))
        text = self.extract_text_feature(texts).to(cells.dtype)
        return self.f(self.relations(cells, text).mean(dim=(1, 2)))

    def relations(self, cells, text):
        """g([cell_i, cell_j, t]) for every pair, B x N x N x 512.  g's first layer is linear, so
        its term for cell_i, for cell_j and for t is computed once and the terms are added per
        pair: N^2 sums instead of N^2 products with a (2(C+2)+E)-wide input."""
        first = self.g[0]
        w_i, w_j, w_t = first.weight.split([self.cell_dim, self.cell_dim, text.shape[1]], dim=1)
        as_first = F.linear(cells, w_i)  # B x N x 512
        as_second = F.linear(cells, w_j)
        with_text = F.linear(text, w_t, first.bias)  # B x 512
        pairs = as_first[:, :, None] + as_second[:, None, :] + with_text[:, None, None]
        return self.g[1:](pairs)


class FiLM(_PaperComposer):
    """One FiLM residual block on the layer4 map, its BatchNorm's scale and shift from the text."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None, **kwargs):
        super().__init__(texts, embed_dim, pretrained, vocab, **kwargs)
        c = image_channels(self.img_model)
        self.film_generator = torch.nn.Linear(embed_dim, 2 * c)
        self.block_conv1 = torch.nn.Conv2d(c, c, 1)
        self.block_conv2 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.block_bn = torch.nn.BatchNorm2d(c, affine=False)

    def compose_img_text(self, imgs, texts):
        feature_map = layer4_map(self.img_model, imgs)
        dgamma, beta = self.film_generator(self.extract_text_feature(texts)).chunk(2, dim=1)
        h = F.relu(self.block_conv1(feature_map))
        y = self.block_bn(self.block_conv2(h))
        y = F.relu((1 + dgamma[:, :, None, None]) * y + beta[:, :, None, None])
        return pool_and_fc(self.img_model, h + y)


def adjective_word(text):
    """The word by which an adjective's operator is found: its tokenised form, as the text
    encoder reads it (SPEC 3), or None when tokenising leaves nothing.  Tokenising drops
    non-ASCII letters and punctuation, so 'très' is 'trs', and an adjective of those alone
    ('ç') is no word: it has no operator, as an adjective not seen in training.  A text of
    several words is not an adjective: a ValueError."""
    words = text_model.tokenize_text(text)
    if len(words) > 1:
        raise ValueError(f'attribute_operator composes single attribute words; got {text!r}')
    return words[0] if words else None


class AttributeOperator(_PaperComposer):
    """One E x E operator per adjective of the training texts (MIT-States' "adjective noun"
    captions), starting at the identity; query = A[adjective] x.  An adjective without an
    operator (not seen in training) leaves x as it is."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None, **kwargs):
        super().__init__(texts, embed_dim, pretrained, vocab, **kwargs)
        word2id = self.text_model.vocab.word2id
        # A caption's adjective is its first word before tokenising: a caption's first token
        # would be the noun where the adjective tokenises to nothing.
        words = {adjective_word(text.split()[0]) for text in texts if text.split()}
        adjectives = sorted(word for word in words if word in word2id)
        self.operators = torch.nn.Parameter(torch.eye(embed_dim).repeat(len(adjectives), 1, 1))
        # Vocabulary id -> operator row (-1: none); in the state dict, so that a checkpoint
        # knows which words have operators whatever texts it is loaded with.
        index = torch.full((len(word2id),), -1, dtype=torch.long)
        for row, adjective in enumerate(adjectives):
            index[word2id[adjective]] = row
        self.register_buffer('operator_index', index)

    def state_dict_out_of_range(self, state_dict):
        count = self.operators.shape[0]
        return values_outside('operator_index', state_dict['operator_index'], -1, count - 1,
                              f'-1 for none or one of the {count} operators')

    def operator_rows(self, texts, device):
        word2id = self.text_model.vocab.word2id
        # None (no word) is <UNK>'s id, 0, which has no operator.
        ids = torch.tensor([word2id.get(adjective_word(text), 0) for text in texts], device=device)
        return self.operator_index[ids]

    def compose_img_text(self, imgs, texts):
        image = self.extract_img_feature(imgs)
        rows = self.operator_rows(texts, image.device)
        operators = self.operators[rows.clamp(min=0)].to(image.dtype)
        composed = torch.bmm(operators, image.unsqueeze(2)).squeeze(2)
        return torch.where((rows >= 0)[:, None], composed, image)


def check_dataset(model, dataset_name):
    """attribute_operator composes one adjective per query, which only MIT-States' queries are
    (SPEC 3.1); a ValueError naming the dataset otherwise.  Decided by the dataset, not by a
    look at its texts: single-word captions elsewhere are no adjectives, and an MIT-States
    adjective of non-ASCII letters alone tokenises to no word at all."""
    if model == 'attribute_operator' and dataset_name != 'mitstates':
        raise ValueError(f"--model=attribute_operator: composes single attribute words, "
                         f"MIT-States' adjectives (--dataset=mitstates); not for "
                         f"--dataset={dataset_name}")


class TIRGGateOnly(_PaperComposer):
    """TIRG's gating branch alone: a[0] * sigmoid(gate) * x (names as in tirg)."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None, **kwargs):
        super().__init__(texts, embed_dim, pretrained, vocab, **kwargs)
        self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))
        self.gated_feature_composer = itcm.gated_feature_composer(embed_dim)

    def compose_img_text(self, imgs, texts):
        image = self.extract_img_feature(imgs)
        gate = self.gated_feature_composer((image, self.extract_text_feature(texts)))
        return self.a[0] * torch.sigmoid(gate) * image


class TIRGResOnly(_PaperComposer):
    """TIRG's residual branch alone: a[1] * residual (names as in tirg)."""

    def __init__(self, texts, embed_dim, pretrained=True, vocab=None, **kwargs):
        super().__init__(texts, embed_dim, pretrained, vocab, **kwargs)
        self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))
        self.res_info_composer = itcm.res_info_composer(embed_dim)

    def compose_img_text(self, imgs, texts):
        image = self.extract_img_feature(imgs)
        return self.a[1] * self.res_info_composer((image, self.extract_text_feature(texts)))
