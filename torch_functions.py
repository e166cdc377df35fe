"""Normalisation layer and the soft-triplet loss (SPEC sections 3 and 4)."""
import torch
import torch.nn.functional as F


def pairwise_distances(x, y=None):
    """Squared Euclidean distances between rows, clamped at 0 (the reference formula)."""
    x_norm = (x ** 2).sum(1).view(-1, 1)
    if y is None:
        y, y_norm = x, x_norm.view(1, -1)
    else:
        y_norm = (y ** 2).sum(1).view(1, -1)
    return torch.clamp(x_norm + y_norm - 2.0 * x @ y.t(), min=0.0)


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
        weight = (torch.sigmoid(margin) / len(triplets)).unsqueeze(1)
        pull = weight * (features[anchor] - features[positive])
        push = weight * (features[anchor] - features[negative])
        grad = torch.zeros_like(features)
        grad.index_add_(0, anchor, pull - push)
        grad.index_add_(0, positive, -pull)
        grad.index_add_(0, negative, push)
        return grad * grad_output, None


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


def sample_triplets(batch_size, num_negatives=3, generator=None, device='cpu'):
    """Triplets for features stacked as [query; target] (2B rows, row i and i+B share a label).

    Every row is an anchor with its one positive and `num_negatives` negatives drawn uniformly
    without repeats from the 2B - 2 rows of other labels, as the reference did with a shuffle.
    """
    rows = 2 * batch_size
    anchor = torch.arange(rows, device=device)
    positive = (anchor + batch_size) % rows
    # Rank random keys; rows sharing the anchor's label get +inf so they are never chosen.
    keys = torch.rand((rows, rows), generator=generator, device=device)
    same_label = (anchor.view(-1, 1) % batch_size) == (anchor.view(1, -1) % batch_size)
    keys.masked_fill_(same_label, float('inf'))
    count = min(num_negatives, rows - 2)
    negative = keys.topk(count, dim=1, largest=False).indices
    return torch.stack([anchor.repeat_interleave(count), positive.repeat_interleave(count),
                        negative.reshape(-1)], dim=1)
