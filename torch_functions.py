"""Normalisation layer and the soft-triplet loss (SPEC sections 3 and 4)."""
import torch
import torch.nn.functional as F


def pairwise_distances(x, y=None):
    """Squared Euclidean distances between rows, clamped at 0 (the reference formula)."""
    x_norm = (x * x).sum(1).view(-1, 1)
    if y is None:
        y, y_norm = x, x_norm.view(1, -1)
    else:
        y_norm = (y * y).sum(1).view(1, -1)
    return torch.addmm(x_norm + y_norm, x, y.t(), alpha=-2.0).clamp_(min=0.0)


class NormalizationLayer(torch.nn.Module):
    """x -> s * x / ||x|| with a (learnable) scalar s."""

    def __init__(self, normalize_scale=1.0, learn_scale=True):
        super().__init__()
        self.norm_s = float(normalize_scale)
        if learn_scale:
            self.norm_s = torch.nn.Parameter(torch.FloatTensor((self.norm_s,)))

    def forward(self, x):
        return self.norm_s * x / torch.norm(x, dim=1, keepdim=True).expand_as(x)


class _SoftTripletLossFunction(torch.autograd.Function):
    """mean over triplets of log(1 + exp(d(a,p) - d(a,n))).

    The backward pass is the reference's hand-written one, which returns exactly half of the true
    gradient (it drops the 2 of d's derivative); training dynamics depend on that scale.
    """

    @staticmethod
    def forward(ctx, features, triplets):
        distances = pairwise_distances(features)
        anchor, positive, negative = triplets.unbind(1)
        margin = distances[anchor, positive] - distances[anchor, negative]
        ctx.save_for_backward(features, triplets, margin)
        # The reference summed log(1 + exp(.)) in float64; softplus is the overflow-free form.
        # (MPS has no float64.)
        wide = margin if margin.device.type == 'mps' else margin.double()
        return F.softplus(wide).mean().to(features.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        features, triplets, margin = ctx.saved_tensors
        anchor, positive, negative = triplets.unbind(1)
        # Each triplet adds f * (x_a - x_p) to a, f * (x_p - x_a) to p, -f * (x_a - x_n) to a and
        # -f * (x_n - x_a) to n: symmetric edges (a, p) of weight f and (a, n) of weight -f.
        # Summed, the gradient is (D - W) @ features, W the n x n edge weights and D their row
        # sums: a scatter into n x n and one matrix product, instead of gathering and scattering
        # three feature rows per triplet.
        n = features.shape[0]
        weight = torch.sigmoid(margin).to(features.dtype) * (grad_output / len(triplets))
        edges = torch.zeros((n, n), dtype=features.dtype, device=features.device)
        edges.index_put_((anchor, positive), weight, accumulate=True)
        edges.index_put_((anchor, negative), -weight, accumulate=True)
        edges = edges + edges.t()
        grad = torch.addmm(edges.sum(1, keepdim=True) * features, edges, features, alpha=-1.0)
        return grad, None


class TripletLoss(torch.nn.Module):
    """forward(features, triplets): triplets is a list of [anchor, positive, negative] indices or
    an N x 3 LongTensor."""

    def __init__(self, pre_layer=None):
        super().__init__()
        self.pre_layer = pre_layer

    def forward(self, x, triplets):
        if self.pre_layer is not None:
            x = self.pre_layer(x)
        triplets = torch.as_tensor(triplets, dtype=torch.long, device=x.device).view(-1, 3)
        if len(triplets) == 0:
            raise ValueError('TripletLoss needs at least one triplet')
        return _SoftTripletLossFunction.apply(x, triplets)


# (batch_size, count, device) -> (same-label mask, [anchor, positive] rows of every triplet):
# they depend on the batch size only, and building them each step costs more than the sampling.
_TRIPLET_INDEX_CACHE = {}


def _triplet_index(batch_size, count, device):
    key = (batch_size, count, str(device))
    cached = _TRIPLET_INDEX_CACHE.get(key)
    if cached is None:
        rows = 2 * batch_size
        anchor = torch.arange(rows, device=device)
        same_label = (anchor.view(-1, 1) % batch_size) == (anchor.view(1, -1) % batch_size)
        anchor_positive = torch.stack([anchor, (anchor + batch_size) % rows], dim=1)
        cached = (same_label, anchor_positive.repeat_interleave(count, dim=0))
        _TRIPLET_INDEX_CACHE[key] = cached
    return cached


def sample_triplets(batch_size, num_negatives=3, generator=None, device='cpu'):
    """Triplets for features stacked as [query; target] (2B rows, row i and i+B share a label).

    Every row is an anchor with its one positive and `num_negatives` negatives drawn uniformly
    without repeats from the 2B - 2 rows of other labels, as the reference did with a shuffle.
    """
    rows = 2 * batch_size
    count = min(num_negatives, rows - 2)
    same_label, anchor_positive = _triplet_index(batch_size, count, device)
    # Rank random keys; rows sharing the anchor's label get +inf so they are never chosen.
    keys = torch.rand((rows, rows), generator=generator, device=device)
    keys.masked_fill_(same_label, float('inf'))
    negative = keys.topk(count, dim=1, largest=False).indices
    return torch.cat([anchor_positive, negative.reshape(-1, 1)], dim=1)
