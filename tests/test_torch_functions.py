"""Soft-triplet loss, triplet sampling, normalisation layer and the batch classification loss
(SPEC sections 3 and 4), against per-triplet implementations of the reference."""
import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import img_text_composition_models as itcm
import torch_functions

B = 8  # 2B = 16 rows
DIM = 32


def normalized_features(rows=2 * B, dim=DIM, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g)
    return scale * x / x.norm(dim=1, keepdim=True)


def reference_pairwise_distances(x):
    """The reference's formula, in float32: x_norm + y_norm - 2 x.y, clamped at 0."""
    x = x.detach().float()
    x_norm = (x ** 2).sum(1).view(-1, 1)
    dist = x_norm + x_norm.view(1, -1) - 2.0 * torch.mm(x, x.t())
    return torch.clamp(dist, 0.0, np.inf).numpy()


def reference_triplet_loss(x, triplets, grad_output=1.0):
    """Per-triplet loop of the reference's forward and hand-written backward."""
    triplets = [tuple(int(v) for v in t) for t in triplets]
    distances = reference_pairwise_distances(x)
    features = x.detach().double().numpy()
    count = len(triplets)
    loss = 0.0
    for i, j, k in triplets:
        loss += np.log(1 + np.exp(np.float64(distances[i, j]) - np.float64(distances[i, k])))
    loss /= count
    grad = np.zeros_like(features)
    for i, j, k in triplets:
        f = 1.0 - 1.0 / (1.0 + np.exp(np.float64(distances[i, j]) - np.float64(distances[i, k])))
        grad[i] += f * (features[i] - features[j]) / count
        grad[j] += f * (features[j] - features[i]) / count
        grad[i] += -f * (features[i] - features[k]) / count
        grad[k] += -f * (features[k] - features[i]) / count
    return loss, grad * grad_output


def loss_and_grad(x, triplets, grad_output=1.0):
    x = x.clone().requires_grad_(True)
    loss = torch_functions.TripletLoss()(x, triplets)
    (loss * grad_output).backward()
    return loss, x.grad


def random_triplets(rows, count, seed):
    rng = np.random.RandomState(seed)
    out = []
    while len(out) < count:
        i, j, k = rng.randint(rows, size=3)
        if len({i, j, k}) == 3:
            out.append([int(i), int(j), int(k)])
    return out


@pytest.mark.parametrize('form', ['list', 'tensor'])
@pytest.mark.parametrize('source', ['random', 'sampled'])
def test_triplet_loss_value_and_gradient_equal_reference(form, source):
    x = normalized_features(seed=3)
    if source == 'random':
        triplets = random_triplets(2 * B, 50, seed=4)
    else:
        triplets = torch_functions.sample_triplets(B, generator=torch.Generator().manual_seed(5)).tolist()
    given = triplets if form == 'list' else torch.tensor(triplets, dtype=torch.long)
    loss, grad = loss_and_grad(x, given)
    ref_loss, ref_grad = reference_triplet_loss(x, triplets)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-5, atol=1e-5)
    assert np.abs(ref_grad).max() > 1e-3  # not a vacuous comparison


def test_triplet_loss_gradient_scales_with_grad_output():
    x = normalized_features(seed=6)
    triplets = torch_functions.sample_triplets(B, generator=torch.Generator().manual_seed(7))
    _, grad = loss_and_grad(x, triplets, grad_output=2.5)
    _, ref_grad = reference_triplet_loss(x, triplets.tolist(), grad_output=2.5)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-5, atol=1e-5)


def test_triplet_loss_on_unnormalized_features_and_repeated_triplets():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2 * B, DIM, generator=g) * 0.3
    triplets = random_triplets(2 * B, 20, seed=9)
    triplets = triplets + triplets[:5]  # repeats accumulate
    loss, grad = loss_and_grad(x, triplets)
    ref_loss, ref_grad = reference_triplet_loss(x, triplets)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-5, atol=1e-5)


def test_triplet_loss_gradient_is_half_the_true_gradient():
    x = normalized_features(seed=10)
    triplets = torch_functions.sample_triplets(B, generator=torch.Generator().manual_seed(11))
    _, grad = loss_and_grad(x, triplets)

    y = x.clone().requires_grad_(True)
    a, p, n = triplets.unbind(1)
    d_ap = ((y[a] - y[p]) ** 2).sum(1)
    d_an = ((y[a] - y[n]) ** 2).sum(1)
    true_loss = F.softplus(d_ap - d_an).mean()
    true_loss.backward()
    torch.testing.assert_close(grad, 0.5 * y.grad, rtol=1e-4, atol=1e-5)
    loss, _ = loss_and_grad(x, triplets)
    assert loss.item() == pytest.approx(true_loss.item(), rel=1e-5, abs=1e-5)


def test_triplet_loss_does_not_overflow_on_large_margins():
    x = torch.zeros(4, 2)
    x[0] = torch.tensor([0.0, 0.0])
    x[1] = torch.tensor([30.0, 0.0])   # far positive
    x[2] = torch.tensor([0.1, 0.0])    # near negative
    x[3] = torch.tensor([0.0, 0.2])
    loss, grad = loss_and_grad(x, [[0, 1, 2], [0, 1, 3]])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # softplus(m) ~ m for a large margin m = 900 - 0.01 and 900 - 0.04
    assert loss.item() == pytest.approx((900 - 0.01 + 900 - 0.04) / 2, rel=1e-5)


def test_triplet_loss_rejects_no_triplets():
    with pytest.raises(ValueError):
        torch_functions.TripletLoss()(normalized_features(), [])


def test_triplet_loss_pre_layer_is_applied():
    layer = torch_functions.NormalizationLayer(normalize_scale=4.0, learn_scale=False)
    x = torch.randn(2 * B, DIM, generator=torch.Generator().manual_seed(12))
    triplets = random_triplets(2 * B, 10, seed=13)
    with_layer = torch_functions.TripletLoss(pre_layer=layer)(x, triplets)
    without = torch_functions.TripletLoss()(layer(x), triplets)
    assert with_layer.item() == pytest.approx(without.item(), rel=1e-6)


def test_pairwise_distances_match_reference_formula():
    x = normalized_features(seed=14)
    got = torch_functions.pairwise_distances(x)
    np.testing.assert_allclose(got.numpy(), reference_pairwise_distances(x), rtol=1e-6, atol=1e-5)
    direct = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(got, direct, rtol=1e-4, atol=1e-4)
    assert (got >= 0).all()
    y = normalized_features(rows=5, seed=15)
    cross = torch_functions.pairwise_distances(x, y)
    torch.testing.assert_close(cross, ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# sample_triplets
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('batch_size', [2, 3, 8, 32])
def test_sample_triplets_structure(batch_size):
    rows = 2 * batch_size
    count = min(3, rows - 2)
    triplets = torch_functions.sample_triplets(batch_size)
    assert triplets.dtype == torch.long
    assert tuple(triplets.shape) == (rows * count, 3)
    anchor, positive, negative = triplets[:, 0], triplets[:, 1], triplets[:, 2]
    # Anchors in order, each with `count` triplets (as the reference appended them).
    assert anchor.tolist() == [i for i in range(rows) for _ in range(count)]
    assert positive.tolist() == [(i + batch_size) % rows for i in anchor.tolist()]
    for i in range(rows):
        negs = negative[anchor == i].tolist()
        assert len(set(negs)) == count  # distinct
        assert all(0 <= n < rows and n % batch_size != i % batch_size for n in negs)


def test_sample_triplets_generator_is_deterministic():
    a = torch_functions.sample_triplets(8, generator=torch.Generator().manual_seed(1))
    b = torch_functions.sample_triplets(8, generator=torch.Generator().manual_seed(1))
    c = torch_functions.sample_triplets(8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_triplets_negatives_are_uniform():
    batch_size, draws = 4, 3000
    rows = 2 * batch_size
    g = torch.Generator().manual_seed(0)
    counts = collections.Counter()
    for _ in range(draws):
        t = torch_functions.sample_triplets(batch_size, generator=g)
        counts.update(zip(t[:, 0].tolist(), t[:, 2].tolist()))
    # Each anchor has 2B - 2 = 6 candidates, 3 chosen: each one with probability 1/2.
    for i in range(rows):
        for n in range(rows):
            if n % batch_size == i % batch_size:
                assert counts[(i, n)] == 0
            else:
                assert abs(counts[(i, n)] / draws - 0.5) < 0.05, (i, n, counts[(i, n)])


# --------------------------------------------------------------------------------------------
# NormalizationLayer
# --------------------------------------------------------------------------------------------

def test_normalization_layer_output_norm_equals_scale():
    layer = torch_functions.NormalizationLayer(normalize_scale=4.0, learn_scale=True)
    assert isinstance(layer.norm_s, torch.nn.Parameter) and layer.norm_s.requires_grad
    assert layer.norm_s.tolist() == [4.0]
    x = torch.randn(10, DIM, generator=torch.Generator().manual_seed(0)) * 7
    out = layer(x)
    torch.testing.assert_close(out.norm(dim=1), torch.full((10,), 4.0))
    torch.testing.assert_close(out / 4.0, x / x.norm(dim=1, keepdim=True))
    with torch.no_grad():
        layer.norm_s.fill_(2.5)
    torch.testing.assert_close(layer(x).norm(dim=1), torch.full((10,), 2.5))
    # s is learnt: d(sum of outputs)/ds = sum of x / ||x||
    layer(x).sum().backward()
    assert layer.norm_s.grad.item() == pytest.approx((x / x.norm(dim=1, keepdim=True)).sum().item(), rel=1e-4)


def test_normalization_layer_fixed_scale():
    layer = torch_functions.NormalizationLayer(normalize_scale=3.0, learn_scale=False)
    assert not list(layer.parameters())
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x).norm(dim=1), torch.full((5,), 3.0))


def test_models_normalization_layer_starts_at_4():
    base = itcm.ImgTextCompositionBase()
    assert isinstance(base.normalization_layer.norm_s, torch.nn.Parameter)
    assert base.normalization_layer.norm_s.tolist() == [4.0]
    assert 'normalization_layer.norm_s' in dict(base.named_parameters())


# --------------------------------------------------------------------------------------------
# The two losses as the models compute them
# --------------------------------------------------------------------------------------------

class FixedFeatures(itcm.ImgTextCompositionBase):
    """compose_img_text / extract_img_feature return the given tensors."""

    def compose_img_text(self, imgs, texts):
        return imgs

    def extract_img_feature(self, imgs):
        return imgs


def test_batch_based_classification_loss_is_cross_entropy_of_scores():
    g = torch.Generator().manual_seed(0)
    query, target = torch.randn(6, DIM, generator=g), torch.randn(6, DIM, generator=g)
    model = FixedFeatures()
    loss = model.compute_batch_based_classification_loss_(query, target)
    expected = F.cross_entropy(query @ target.T, torch.arange(6))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    logits = (query @ target.T).double()
    by_hand = -(logits.diagonal() - logits.logsumexp(dim=1)).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)

    # compute_loss normalises query and target (s = 4) first.
    loss = model.compute_loss(query, None, target, soft_triplet_loss=False)
    qn, tn = 4 * F.normalize(query, dim=1), 4 * F.normalize(target, dim=1)
    expected = F.cross_entropy(qn @ tn.T, torch.arange(6))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_compute_loss_soft_triplet_uses_sampled_triplets_on_stacked_features(monkeypatch):
    g = torch.Generator().manual_seed(1)
    query, target = torch.randn(B, DIM, generator=g), torch.randn(B, DIM, generator=g)
    seen = []
    original = torch_functions.sample_triplets

    def recording(batch_size, *args, **kwargs):
        seen.append(batch_size)
        t = original(batch_size, *args, **kwargs)
        seen.append(t)
        return t

    monkeypatch.setattr(torch_functions, 'sample_triplets', recording)
    model = FixedFeatures()
    loss = model.compute_loss(query, None, target, soft_triplet_loss=True)
    assert seen[0] == B
    stacked = torch.cat([4 * F.normalize(query, dim=1), 4 * F.normalize(target, dim=1)])
    ref_loss, _ = reference_triplet_loss(stacked, seen[1].tolist())
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
