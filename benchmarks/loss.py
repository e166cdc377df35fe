"""loss: the soft-triplet loss forward + backward (model.compute_soft_triplet_loss_: triplet
sampling on the device, TripletLoss) against the reference's per-triplet Python loops (nested
loops and np.random.shuffle to build the triplets, numpy distances, forward and hand-written
backward loops), at batch 32 and 128; values and gradients checked."""
import math

import numpy as np
import torch

import img_text_composition_models
from benchmarks.common import fmt_seconds, median_time


def reference_triplets(batch_size):
    """The reference's compute_soft_triplet_loss_: nested loops, shuffle, 3 negatives each."""
    triplets = []
    labels = list(range(batch_size)) + list(range(batch_size))
    for i in range(len(labels)):
        triplets_i = []
        for j in range(len(labels)):
            if labels[i] == labels[j] and i != j:
                for k in range(len(labels)):
                    if labels[i] != labels[k]:
                        triplets_i.append([i, j, k])
        np.random.shuffle(triplets_i)
        triplets += triplets_i[:3]
    assert triplets and len(triplets) < 2000
    return triplets


def reference_pairwise_distances(x):
    x_norm = (x ** 2).sum(1).reshape(-1, 1)
    return np.clip(x_norm + x_norm.reshape(1, -1) - 2.0 * x.dot(x.T), 0.0, np.inf)


def reference_triplet_loss(features, triplets):
    """The reference's MyTripletLossFunc: per-triplet forward loop, hand-written backward loop
    (half the true gradient), gradient copied back row by row.  Returns (loss, grad tensor)."""
    features_np = features.detach().cpu().numpy()
    distances = reference_pairwise_distances(features_np)
    loss = 0.0
    triplet_count = 0.0
    correct_count = 0.0
    for i, j, k in triplets:
        w = 1.0
        triplet_count += w
        loss += w * np.log(1 + np.exp(float(distances[i, j]) - float(distances[i, k])))
        if distances[i, j] < distances[i, k]:
            correct_count += 1
    loss /= triplet_count

    grad_features = features.detach().clone() * 0.0
    grad_features_np = grad_features.cpu().numpy()
    count = len(triplets)
    for i, j, k in triplets:
        w = 1.0
        f = 1.0 - 1.0 / (1.0 + np.exp(float(distances[i, j]) - float(distances[i, k])))
        grad_features_np[i, :] += w * f * (features_np[i, :] - features_np[j, :]) / count
        grad_features_np[j, :] += w * f * (features_np[j, :] - features_np[i, :]) / count
        grad_features_np[i, :] += -w * f * (features_np[i, :] - features_np[k, :]) / count
        grad_features_np[k, :] += -w * f * (features_np[k, :] - features_np[i, :]) / count
    for i in range(features_np.shape[0]):
        grad_features[i, :] = torch.from_numpy(grad_features_np[i, :])
    return loss, grad_features


def measure(args, device, tmp):
    model = img_text_composition_models.ImgTextCompositionBase().to(device)
    g = torch.Generator().manual_seed(args.seed)
    lines, result = [], {}
    for batch_size in args.loss_batches:
        x = torch.randn(2 * batch_size, 512, generator=g)
        x = (4.0 * x / x.norm(dim=1, keepdim=True)).to(device)
        query, target = x[:batch_size].clone(), x[batch_size:].clone()

        def ours():
            q = query.detach().requires_grad_(True)
            t = target.detach().requires_grad_(True)
            loss = model.compute_soft_triplet_loss_(q, t)
            loss.backward()
            return loss

        def reference():
            features = torch.cat([query, target])
            return reference_triplet_loss(features, reference_triplets(batch_size))

        ours_time = median_time(ours, device, args.loss_repeats, warmup=3)
        ref_time = median_time(reference, device, max(3, args.loss_repeats // 10), warmup=1)

        # Same triplets through both: loss and gradient must agree.
        triplets = torch.tensor(reference_triplets(batch_size), device=device)
        features = torch.cat([query, target]).detach().requires_grad_(True)
        loss = model.soft_triplet_loss(features, triplets)
        loss.backward()
        ref_loss, ref_grad = reference_triplet_loss(features, triplets.tolist())
        loss_ok = math.isclose(float(loss.detach()), ref_loss, rel_tol=1e-5, abs_tol=1e-6)
        grad_ok = torch.allclose(features.grad.float().cpu(), ref_grad.float().cpu(),
                                 rtol=1e-4, atol=1e-6)
        loss = float(loss.detach())
        if not (loss_ok and grad_ok):
            raise AssertionError(f'batch {batch_size}: loss {loss} vs reference {ref_loss}'
                                 f', gradients {"agree" if grad_ok else "differ"}')
        lines.append(f'loss batch {batch_size} (features {2 * batch_size}x512, '
                     f'{len(triplets)} triplets): ours {fmt_seconds(ours_time)}, per-triplet loop '
                     f'{fmt_seconds(ref_time)}, speed-up {ref_time / ours_time:.1f}x  '
                     f'(loss {loss:.6f} = reference {ref_loss:.6f}, gradients agree)')
        result[str(batch_size)] = {'ours_s': ours_time, 'reference_s': ref_time,
                                   'speedup': ref_time / ours_time, 'loss': loss,
                                   'reference_loss': ref_loss, 'values_agree': True}
    return lines, result
