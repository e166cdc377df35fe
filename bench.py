"""Speed of this implementation against the reference's algorithms, side by side in one run.

    python bench.py                       # CPU, default sizes (a few minutes on a small machine)
    python bench.py --device cuda         # the same on a GPU
    python bench.py --quick               # tiny sizes (the test suite runs this)
    python bench.py --only retrieval,loss --queries 300 --gallery 3000 --json out.json
    python bench.py --only ddp             # 1 process against 2 under torchrun (gloo)
    python bench.py --only backbones       # ResNet-18 against ResNet-50 (--backbone_size 224)
    python bench.py --only models          # every --model's training iteration against TIRG's

Sections (one line per figure: both timings and their ratio):

  retrieval  test_retrieval.test() against the reference's per-query numpy loop (dot product,
             full argsort per query, captions, recall@k) on precomputed features served by a
             stand-in model and dataset, so that the protocol is measured, not a CNN; plus an
             estimate for the full Fashion200k test (33,480 queries x 29,789 images).  The recalls
             of both must be identical (asserted).
  loss       the soft-triplet loss forward + backward (model.compute_soft_triplet_loss_: triplet
             sampling on the device, TripletLoss) against the reference's per-triplet Python loops
             (nested loops and np.random.shuffle to build the triplets, numpy distances, forward
             and hand-written backward loops), at batch 32 and 128; values and gradients checked.
  train      one iteration of main.py's training loop (next batch from main.make_train_loader with
             0 workers over a synthetic CSS dataset drawn at 64x64, then main.train_one_iteration:
             TIRG, --img_weights=none, soft triplet, SGD) against a bare ResNet-18 forward +
             backward + SGD step on the same 2B images already in memory: overhead ratio.
  backbones  --img_backbone=resnet18 against resnet50 in TIRG: one training iteration
             (main.train_one_iteration, soft triplet, SGD with the photo datasets' parameter
             groups) on the same 2B random images at --backbone_size, and feature extraction
             (extract_img_feature, eval, inference mode) on B of them, interleaved; then the
             parameter counts and a training iteration's peak memory beyond its start (CUDA: the
             allocator's; CPU: a forked process's resident memory).  Ratios ResNet-50/ResNet-18.
  data       images per second of the Fashion200k image pipeline (datasets.open_photo, then
             datasets.photo_transform: Resize(224), CenterCrop(224), ToTensor, Normalize) on
             generated JPEGs, with 0 and N DataLoader workers, fast decode off and on; then
             training triplets per second of the FashionIQ, CIRR and Shoes loaders (main.py's
             training loader over fashioniq.FashionIQ / cirr.CIRR / shoes.Shoes train, batch
             --batch_size), 0 against N workers, on generated trees in their layouts (FashionIQ
             and Shoes JPEGs, CIRR PNGs) or on real ones given with --fiq_path / --cirr_path /
             --shoes_path.
  memory     peak resident memory of a train-split evaluation (test_retrieval.test on an MIT-States
             tree at 224 px, --memory_counts sampled examples, a stand-in model that costs nothing
             per image) against the plain way (a list of the examples with their images, then
             their features), each in a forked process (Linux: exact start and peak).
  ddp        training throughput (images/s) of main.py's path under torchrun with 2 gloo processes
             on the CPU (DistributedDataParallel, gathered loss, each process its slice of the
             global --batch_size) against 1 plain process, the same threads in all, shared out.
  models     one training iteration (soft-triplet loss, backward, SGD step) of every --model
             (the reference's five, the paper's other methods, TIRG's ablations) at embed_dim 512,
             batch --batch_size at --model_image_size px (default 224, the photo datasets' crop),
             random images in memory, --img_weights=none; median over --model_iters rounds that
             time every model once each, as a ratio to TIRG's; and each model's peak resident
             memory during its first iteration, in a forked child (CPU): the process holds all
             the models, so the peak is an upper bound of one model's.

Timings are wall-clock (time.perf_counter), after warm-up, medians of repeats where cheap; on
CUDA the device is synchronised around every timed region.  Machines shared with other work give
noisy numbers: compare the two columns of one line, measured in the same run.
"""
import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.abspath(__file__))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import datasets  # noqa: E402
import distributed  # noqa: E402
import experiment  # noqa: E402
import fashioniq  # noqa: E402
import img_text_composition_models  # noqa: E402
import model_registry  # noqa: E402
import main  # noqa: E402
import make_css_dataset  # noqa: E402
import shoes  # noqa: E402
import test_retrieval  # noqa: E402

FASHION200K_TEST_QUERIES = 33480
FASHION200K_TEST_IMAGES = 29789
RECALL_KS = (1, 5, 10, 50, 100)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, result) of one call, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def median_time(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        timed(fn, device)
    return statistics.median(timed(fn, device)[0] for _ in range(repeats))


def fmt_seconds(s):
    if s >= 100:
        return f'{s:.0f} s'
    if s >= 1:
        return f'{s:.2f} s'
    if s >= 1e-3:
        return f'{s * 1e3:.2f} ms'
    return f'{s * 1e6:.1f} us'


def device_description(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    name = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def autocast(amp, device):
    if amp and device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# 1. Retrieval test
# ---------------------------------------------------------------------------------------------

# Features are integer vectors of squared norm exactly 2^24 (norm 4096).  L2 normalisation then
# divides by a power of two (exact), every dot product is an integer / 2^24 whose partial sums
# stay within float32's 24-bit mantissa (exact in any summation order, on any BLAS or GPU), so
# both implementations see bitwise the same scores.  Gallery vectors are K * h (h a random sparse
# integer direction) plus their caption's residue r_c < K in one dimension where every query has
# a 1: score = K * (q . h) + r_c, so two images can only tie if they share a caption, and the
# captions of the top-k (hence the recalls) cannot depend on how either implementation orders
# ties.  Random floats would differ in the last bits between numpy and torch and, at this size,
# now and then swap two near-tied images at a recall boundary.
NORM2 = 2 ** 24
NORM = 2 ** 12
RESIDUE_BASE = 512          # K: at most this many distinct captions
MAX_H_NORM2 = (NORM2 - (RESIDUE_BASE - 1) ** 2) // RESIDUE_BASE ** 2   # 63
PAD_DIMS = 4                # any non-negative integer is a sum of 4 squares
SPECIAL_DIMS = 1 + 2 * PAD_DIMS


def four_squares(n):
    """Non-negative integers (a, b, c, d) with a^2 + b^2 + c^2 + d^2 == n."""
    if n == 0:
        return 0, 0, 0, 0
    if n % 4 == 0:  # n = 4m: twice a representation of m
        return tuple(2 * v for v in four_squares(n // 4))
    a = math.isqrt(n)
    while a >= 0:
        r1 = n - a * a
        b = math.isqrt(r1)
        for b in range(b, max(-1, b - 50), -1):
            r2 = r1 - b * b
            c = math.isqrt(r2)
            for c in range(c, max(-1, c - 50), -1):
                r3 = r2 - c * c
                d = math.isqrt(r3)
                if d * d == r3:
                    return a, b, c, d
        a -= 1
    raise AssertionError(n)


def pad_to_norm(vectors, pad_start):
    """Fill PAD_DIMS dims from pad_start so that every row's squared norm is exactly NORM2."""
    norms = (vectors.astype(np.int64) ** 2).sum(1)
    assert (norms <= NORM2).all()
    for i, n in enumerate(norms.tolist()):
        vectors[i, pad_start:pad_start + PAD_DIMS] = four_squares(NORM2 - n)
    assert ((vectors.astype(np.int64) ** 2).sum(1) == NORM2).all()
    return vectors


def make_retrieval_problem(num_queries, num_gallery, dim, seed=0):
    """(gallery features, query features, gallery captions, queries) as described above."""
    if dim < SPECIAL_DIMS + 4:
        raise SystemExit(f'bench.py: --dim={dim}: need at least {SPECIAL_DIMS + 4}')
    if num_gallery < 120:
        raise SystemExit('bench.py: --gallery must be at least 120 (the ranking keeps 110)')
    rng = np.random.default_rng(seed)
    main_dims = dim - SPECIAL_DIMS
    residue_dim, gallery_pad, query_pad = main_dims, main_dims + 1, main_dims + 1 + PAD_DIMS
    num_captions = int(min(RESIDUE_BASE, max(2, num_gallery // 60)))
    captions_of = rng.integers(0, num_captions, num_gallery)
    captions_of[:num_captions] = np.arange(num_captions)  # every caption used

    # Sparse integer directions h with 1 <= |h|^2 <= 63.
    sigma = math.sqrt(0.75 * MAX_H_NORM2 / main_dims)
    h = np.rint(rng.standard_normal((num_gallery, main_dims)) * sigma).astype(np.int64)
    norms = (h ** 2).sum(1)
    for i in np.flatnonzero((norms > MAX_H_NORM2) | (norms == 0)).tolist():
        row = h[i]
        if not row.any():
            row[rng.integers(main_dims)] = 1
        while (row ** 2).sum() > MAX_H_NORM2:
            nz = np.flatnonzero(row)
            j = nz[rng.integers(len(nz))]
            row[j] -= np.sign(row[j])
    gallery = np.zeros((num_gallery, dim), dtype=np.int64)
    gallery[:, :main_dims] = RESIDUE_BASE * h
    gallery[:, residue_dim] = captions_of  # residue r_c = caption index < K
    pad_to_norm(gallery, gallery_pad)

    # Query = target direction + Gaussian noise scaled so that the target's cosine is about the
    # expected best cosine of a random image: recalls in the middle of the range.
    sources = rng.integers(0, num_gallery, num_queries)
    targets = (sources + rng.integers(1, num_gallery, num_queries)) % num_gallery
    rho = min(0.9, 0.8 * math.sqrt(2 * math.log(num_gallery) / main_dims))
    noise_scale = math.sqrt(1 / rho ** 2 - 1)
    direction = h[targets] / np.sqrt((h[targets] ** 2).sum(1, keepdims=True))
    v = direction + noise_scale * rng.standard_normal((num_queries, main_dims)) / math.sqrt(main_dims)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    query = np.zeros((num_queries, dim), dtype=np.int64)
    query[:, :main_dims] = np.rint(v * (NORM - 64))
    query[:, residue_dim] = 1
    pad_to_norm(query, query_pad)
    assert not (gallery[:, query_pad:] != 0).any() and not (query[:, gallery_pad:query_pad] != 0).any()

    gallery_captions = [f'caption {c}' for c in captions_of.tolist()]
    queries = [{'source_img_id': int(s), 'target_caption': gallery_captions[t],
                'mod': {'str': str(i)}} for i, (s, t) in enumerate(zip(sources, targets))]
    return (torch.from_numpy(gallery.astype(np.float32)), torch.from_numpy(query.astype(np.float32)),
            gallery_captions, queries)


class StandInModel(torch.nn.Module):
    """Precomputed features: images by the id the image tensor carries, compositions by the query
    index the modification text carries."""

    def __init__(self, gallery_features, query_features):
        super().__init__()
        self.register_buffer('gallery_features', gallery_features)
        self.register_buffer('query_features', query_features)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def extract_img_feature(self, imgs):
        return self.gallery_features[imgs[:, 0].round().long()]

    def compose_img_text(self, imgs, texts):
        ids = torch.tensor([int(t) for t in texts], device=self.query_features.device)
        return self.query_features[ids]


class StandInDataset:
    """The dataset API test_retrieval.test uses: imgs (captions), get_test_queries(), get_img()."""

    def __init__(self, captions, queries):
        self.imgs = [{'captions': [c]} for c in captions]
        self.queries = queries

    def get_test_queries(self):
        return self.queries

    def get_img(self, idx, raw_img=False):
        return torch.tensor([float(idx)])


def reference_retrieval_test(model, testset, batch_size=32):
    """The reference's test protocol: features batch by batch, then one query at a time: numpy
    dot product with the gallery, source image scored -10e10, full argsort, 110 nearest, their
    captions, recall@k.  Returns ((name, recall) list, {phase: seconds})."""
    phases = {}
    start = time.perf_counter()
    model.eval()
    device = model.anchor.device
    test_queries = testset.get_test_queries()
    with torch.no_grad():
        all_queries, imgs, mods = [], [], []
        for t in test_queries:
            imgs += [testset.get_img(t['source_img_id'])]
            mods += [t['mod']['str']]
            if len(imgs) >= batch_size or t is test_queries[-1]:
                imgs = torch.stack(imgs).float().to(device)
                all_queries += [model.compose_img_text(imgs, mods).data.cpu().numpy()]
                imgs, mods = [], []
        all_queries = np.concatenate(all_queries)
        all_target_captions = [t['target_caption'] for t in test_queries]
        all_imgs, imgs = [], []
        for i in range(len(testset.imgs)):
            imgs += [testset.get_img(i)]
            if len(imgs) >= batch_size or i == len(testset.imgs) - 1:
                imgs = torch.stack(imgs).float().to(device)
                all_imgs += [model.extract_img_feature(imgs).data.cpu().numpy()]
                imgs = []
        all_imgs = np.concatenate(all_imgs)
        all_captions = [img['captions'][0] for img in testset.imgs]
    for i in range(all_queries.shape[0]):
        all_queries[i, :] /= np.linalg.norm(all_queries[i, :])
    for i in range(all_imgs.shape[0]):
        all_imgs[i, :] /= np.linalg.norm(all_imgs[i, :])
    phases['features'] = time.perf_counter() - start

    start = time.perf_counter()
    nn_result = []
    for i in range(all_queries.shape[0]):
        sims = all_queries[i:(i + 1), :].dot(all_imgs.T)
        sims[0, test_queries[i]['source_img_id']] = -10e10  # remove query image
        nn_result.append(np.argsort(-sims[0, :])[:110])
    phases['ranking'] = time.perf_counter() - start

    start = time.perf_counter()
    out = []
    nn_result = [[all_captions[nn] for nn in nns] for nns in nn_result]
    for k in RECALL_KS:
        r = 0.0
        for i, nns in enumerate(nn_result):
            if all_target_captions[i] in nns[:k]:
                r += 1
        out += [('recall_top' + str(k) + '_correct_composition', r / len(nn_result))]
    phases['recall'] = time.perf_counter() - start
    return out, phases


def bench_retrieval(args, device):
    q, n, d = args.queries, args.gallery, args.dim
    gallery, query, captions, queries = make_retrieval_problem(q, n, d, seed=args.seed)
    model = StandInModel(gallery, query).to(device)
    testset = StandInDataset(captions, queries)
    opt = argparse.Namespace(dataset='fashion200k', batch_size=32, loader_num_workers=0)

    ours_time, ours = None, None
    times = []
    for _ in range(1 + args.repeats):  # the first run is the warm-up
        seconds, ours = timed(lambda: test_retrieval.test(opt, model, testset), device)
        times.append(seconds)
    ours_time = statistics.median(times[1:])
    # The ranking alone (features already computed and normalised), for the record.
    qf = torch.nn.functional.normalize(query.to(device), dim=1)
    gf = torch.nn.functional.normalize(gallery.to(device), dim=1)
    exclude = torch.tensor([x['source_img_id'] for x in queries], device=device)
    ours_ranking = median_time(lambda: test_retrieval.nearest_neighbours(qf, gf, exclude),
                               device, max(1, args.repeats))

    ref_time, (ref, ref_phases) = timed(lambda: reference_retrieval_test(model, testset), device)
    # Same metrics with the same number of hits (ours is a float32 mean, the reference a float64
    # fraction: the count, not the float, is what must be identical).
    identical = ([name for name, _ in ours] == [name for name, _ in ref] and
                 all(round(a * q) == round(b * q) and abs(a - b) < 1e-6
                     for (_, a), (_, b) in zip(ours, ref)))
    if not identical:
        raise AssertionError(f'recalls differ:\n  ours      {ours}\n  reference {ref}')

    scale = (FASHION200K_TEST_QUERIES / q) * (FASHION200K_TEST_IMAGES / n)
    recalls = dict(ours)
    label = f'retrieval {q}x{n}x{d}'
    lines = [
        f'{label}: ours {fmt_seconds(ours_time)}, per-query numpy {fmt_seconds(ref_time)}, '
        f'speed-up {ref_time / ours_time:.1f}x  (ranking only: ours {fmt_seconds(ours_ranking)}, '
        f'numpy {fmt_seconds(ref_phases["ranking"])}; recall@1/10/100 '
        f'{recalls["recall_top1_correct_composition"]:.3f}/'
        f'{recalls["recall_top10_correct_composition"]:.3f}/'
        f'{recalls["recall_top100_correct_composition"]:.3f})',
        f'retrieval estimate Fashion200k {FASHION200K_TEST_QUERIES}x{FASHION200K_TEST_IMAGES}x{d}: '
        f'ours {fmt_seconds(ours_time * scale)}, per-query numpy {fmt_seconds(ref_time * scale)}, '
        f'speed-up {ref_time / ours_time:.1f}x  (per-query time x queries x gallery/{n})',
        'recalls identical: yes',
    ]
    result = {
        'queries': q, 'gallery': n, 'dim': d,
        'ours_s': ours_time, 'ours_runs_s': times, 'ours_ranking_s': ours_ranking,
        'reference_s': ref_time, 'reference_phases_s': ref_phases,
        'speedup': ref_time / ours_time,
        'fashion200k_estimate': {'queries': FASHION200K_TEST_QUERIES,
                                 'gallery': FASHION200K_TEST_IMAGES,
                                 'ours_s': ours_time * scale, 'reference_s': ref_time * scale},
        'recalls': recalls, 'recalls_identical': identical,
    }
    return lines, result


# ---------------------------------------------------------------------------------------------
# 2. Soft-triplet loss
# ---------------------------------------------------------------------------------------------

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


def bench_loss(args, device):
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


# ---------------------------------------------------------------------------------------------
# 3. Training iteration
# ---------------------------------------------------------------------------------------------

class BareResNet18Step:
    """ResNet-18 (fc 512 -> embed_dim, as the model's image encoder) forward + backward + SGD on a
    batch already on the device; loss = mean square of the output."""

    def __init__(self, embed_dim, device, opt):
        import torchvision
        net = torchvision.models.resnet18(weights=None)
        net.fc = torch.nn.Linear(512, embed_dim)
        self.net = net.to(device).train()
        if opt.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=opt.learning_rate, momentum=0.9,
                                         weight_decay=opt.weight_decay)
        self.amp, self.device = opt.amp, device

    def __call__(self, imgs):
        with autocast(self.amp, self.device):
            loss = self.net(imgs).float().pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def bench_train(args, device, tmp):
    data_dir = os.path.join(tmp, 'css')
    make_css_dataset.generate_css_dataset(data_dir, base_scenes=100, verbose=False)
    flags = ['--dataset=css3d', f'--dataset_path={data_dir}', '--model=tirg',
             '--img_weights=none', '--loss=soft_triplet', '--loader_num_workers=0',
             f'--batch_size={args.batch_size}', f'--seed={args.seed}', f'--device={device}']
    flags += ['--amp'] * args.amp + ['--channels_last'] * args.channels_last
    opt = main.parse_opt(flags)
    main.seed_everything(opt.seed)
    trainset = datasets.CSSDataset(opt.dataset_path, split='train', transform=datasets.css_transform())
    with contextlib.redirect_stdout(io.StringIO()):
        model = main.create_model(opt, trainset.get_all_texts()).to(device)
    if opt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = main.create_optimizer(opt, model)
    sampler = main.EpochBatchSampler(len(trainset), opt.batch_size, opt.seed)
    loader = main.make_train_loader(opt, trainset, sampler, device)
    bare = BareResNet18Step(opt.embed_dim, device, opt)
    model.train()

    state = {'epoch': 0, 'it': iter(loader)}

    def next_batch():
        try:
            return next(state['it'])
        except StopIteration:
            state['epoch'] += 1
            sampler.set_epoch(state['epoch'])
            state['it'] = iter(loader)
            return next(state['it'])

    def loop_iteration():
        batch = next_batch()
        main.train_one_iteration(opt, model, optimizer, batch, device)
        return batch

    loop_times, bare_times = [], []
    for i in range(args.warmup + args.iters):
        seconds, batch = timed(loop_iteration, device)
        # The same 2B images, already tensors on the device.
        imgs = torch.cat([batch['source_img_data'], batch['target_img_data']]).to(device)
        synchronize(device)
        bare_seconds, _ = timed(lambda: bare(imgs), device)
        if i >= args.warmup:  # interleaved, so that load on the machine hits both alike
            loop_times.append(seconds)
            bare_times.append(bare_seconds)
    loop_mean, bare_mean = statistics.mean(loop_times), statistics.mean(bare_times)
    ratio = loop_mean / bare_mean
    line = (f'train iteration batch {opt.batch_size} (TIRG, 2x{opt.batch_size} CSS images 64x64, '
            f'0 workers): main.py loop {fmt_seconds(loop_mean)}, bare ResNet-18 step '
            f'{fmt_seconds(bare_mean)}, overhead {ratio:.2f}x  (medians '
            f'{fmt_seconds(statistics.median(loop_times))} / '
            f'{fmt_seconds(statistics.median(bare_times))}, {args.iters} iterations after '
            f'{args.warmup} warm-up)')
    result = {'batch_size': opt.batch_size, 'iters': args.iters, 'warmup': args.warmup,
              'loop_mean_s': loop_mean, 'bare_mean_s': bare_mean, 'overhead': ratio,
              'loop_times_s': loop_times, 'bare_times_s': bare_times}
    return [line], result


# ---------------------------------------------------------------------------------------------
# 3b. Image backbones
# ---------------------------------------------------------------------------------------------

BACKBONE_TEXTS = ['make top-left red cube blue', 'add small gray sphere', 'remove the circle',
                  'is more blue and has short sleeves']


def backbone_model(args, device, backbone):
    """main.py's TIRG on `backbone` (--img_weights=none) with its optimiser (the SPEC 5 groups
    of the photo datasets), ready to train."""
    flags = ['--dataset=fashioniq', '--model=tirg', '--img_weights=none', '--loss=soft_triplet',
             f'--img_backbone={backbone}', f'--batch_size={args.batch_size}', f'--device={device}']
    flags += ['--amp'] * args.amp + ['--channels_last'] * args.channels_last
    opt = main.parse_opt(flags)
    torch.manual_seed(args.seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = main.create_model(opt, BACKBONE_TEXTS).to(device)
    if opt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return opt, model, main.create_optimizer(opt, model)


def training_memory_growth(step, device):
    """Bytes a training iteration holds at its peak beyond what is held before it (activations,
    gradients): on CUDA the allocator's peak, on the CPU a forked child's resident peak."""
    if device.type == 'cuda':
        step()
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    measured = peak_memory(step, warmup=step)
    return None if measured['start_bytes'] is None else measured['peak_bytes'] - measured['start_bytes']


def bench_backbones(args, device):
    """ResNet-18 against ResNet-50 in TIRG: main.train_one_iteration on the same 2B random
    images, and extract_img_feature (eval, inference mode) on B of them, interleaved."""
    size, batch_size = args.backbone_size, args.batch_size
    generator = torch.Generator().manual_seed(args.seed)
    batch = {'source_img_data': torch.randn(batch_size, 3, size, size, generator=generator),
             'target_img_data': torch.randn(batch_size, 3, size, size, generator=generator),
             'mod_str': [BACKBONE_TEXTS[i % len(BACKBONE_TEXTS)] for i in range(batch_size)]}
    imgs = batch['source_img_data'].to(device)
    if args.channels_last:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    names = ('resnet18', 'resnet50')
    titles = {name: img_text_composition_models.BACKBONES[name].title for name in names}
    runs = {name: backbone_model(args, device, name) for name in names}

    def train_step(name):
        opt, model, optimizer = runs[name]
        model.train()
        return main.train_one_iteration(opt, model, optimizer, batch, device)

    def extract(name):
        model = runs[name][1]
        model.eval()
        with torch.inference_mode(), autocast(args.amp, device):
            return model.extract_img_feature(imgs)

    # Memory first: a forked child reuses the heap its parent freed (after the timed iterations,
    # an iteration's activations fit in it), and that grows no resident memory.
    memory = {name: training_memory_growth(lambda: train_step(name), device) for name in names}
    times = {(kind, name): [] for kind in ('train', 'extract') for name in names}
    for i in range(args.warmup + args.iters):
        for name in names:  # interleaved, so that load on the machine hits both alike
            for kind, fn in (('train', train_step), ('extract', extract)):
                seconds, _ = timed(lambda: fn(name), device)
                if i >= args.warmup:
                    times[kind, name].append(seconds)
    mean = {key: statistics.mean(values) for key, values in times.items()}
    params = {name: sum(p.numel() for p in runs[name][1].parameters()) for name in names}

    def compare(what, values, show):
        ratio = values['resnet50'] / values['resnet18']
        return (f'backbones {what}: {titles["resnet18"]} {show(values["resnet18"])}, '
                f'{titles["resnet50"]} {show(values["resnet50"])}, ResNet-50/ResNet-18 {ratio:.2f}x')

    where = f'{args.iters} iterations after {args.warmup} warm-up'
    lines = [
        compare(f'train iteration batch {batch_size} (TIRG, 2x{batch_size} images {size}x{size}, '
                f'soft triplet, SGD; means of {where})',
                {n: mean['train', n] for n in names}, fmt_seconds),
        compare(f'feature extraction batch {batch_size} ({size}x{size}, eval; means of {where})',
                {n: mean['extract', n] for n in names},
                lambda s: f'{fmt_seconds(s)} ({batch_size / s:.1f} img/s)'),
        compare(f'parameters (TIRG, embed_dim {runs["resnet18"][0].embed_dim})', params,
                lambda n: f'{n / 1e6:.1f} M'),
    ]
    if all(memory.values()):  # None: no /proc to measure with
        lines.append(compare(f'training memory, peak over the start of an iteration ('
                             f'{"CUDA allocator" if device.type == "cuda" else "resident, forked process"})',
                             memory, lambda b: f'{b / 2 ** 20:.0f} MB'))
    result = {'batch_size': batch_size, 'image_size': size, 'iters': args.iters,
              'warmup': args.warmup, 'parameters': params, 'train_memory_growth_bytes': memory}
    for name in names:
        result[name] = {'train_mean_s': mean['train', name], 'extract_mean_s': mean['extract', name],
                        'train_times_s': times['train', name],
                        'extract_times_s': times['extract', name]}
    result['train_ratio'] = mean['train', 'resnet50'] / mean['train', 'resnet18']
    result['extract_ratio'] = mean['extract', 'resnet50'] / mean['extract', 'resnet18']
    return lines, result


# ---------------------------------------------------------------------------------------------
# 4. Image loading
# ---------------------------------------------------------------------------------------------

def write_jpegs(folder, count, width, height, seed):
    """Smooth random colour fields with fine grain: photo-like JPEG sizes."""
    import PIL.Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        low = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
        img = np.asarray(PIL.Image.fromarray(low).resize((width, height), PIL.Image.BICUBIC),
                         dtype=np.int16)
        img = img + rng.normal(0, 5, (height, width, 1)).astype(np.int16)
        path = os.path.join(folder, f'img_{i:04d}.jpg')
        PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


class PhotoList(torch.utils.data.Dataset):
    """What Fashion200k.get_img does per image: open_photo, then photo_transform; index i reads
    file i % len(paths), so one long pass can cycle over a few files."""

    def __init__(self, paths, fast_decode, length):
        self.paths, self.fast_decode, self.length = paths, fast_decode, length
        self.transform = datasets.photo_transform()

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.transform(datasets.open_photo(self.paths[i % len(self.paths)], self.fast_decode))


def images_per_second(paths, fast_decode, workers, passes, batch_size=8):
    """One pass of a DataLoader over `passes + 1` cycles of the files; the first batches (worker
    start, file cache, libjpeg set-up: at least one cycle of the files) are not timed."""
    warmup_batches = max(2 * workers + 1, math.ceil(len(paths) / batch_size))
    timed_batches = max(1, math.ceil(passes * len(paths) / batch_size))
    length = (warmup_batches + timed_batches) * batch_size
    loader = torch.utils.data.DataLoader(
        PhotoList(paths, fast_decode, length), batch_size=batch_size, num_workers=workers)
    count, start = 0, None
    for b, batch in enumerate(loader):
        if b == warmup_batches - 1:
            start = time.perf_counter()
        elif b >= warmup_batches:
            count += batch.shape[0]
    return count / (time.perf_counter() - start)


def bench_data(args, tmp):
    width, height = args.image_size
    paths = write_jpegs(os.path.join(tmp, 'jpegs'), args.data_images, width, height, args.seed)
    kb = statistics.mean(os.path.getsize(p) for p in paths) / 1024
    label = f'data {width}x{height} JPEG q90 ({kb:.0f} KB) -> 224x224'
    lines, result = [], {'image_size': [width, height], 'images': len(paths), 'mean_kb': kb}
    rates = {}
    for fast in (False, True):
        for workers in (0, args.workers):
            rates[fast, workers] = images_per_second(paths, fast, workers, args.data_passes)
        r0, rn = rates[fast, 0], rates[fast, args.workers]
        lines.append(f'{label}, fast_decode {"on" if fast else "off"}: 0 workers {r0:.1f} img/s, '
                     f'{args.workers} workers {rn:.1f} img/s, speed-up {rn / r0:.2f}x')
        result[f'fast_decode_{"on" if fast else "off"}'] = {
            'workers_0_img_per_s': r0, f'workers_{args.workers}_img_per_s': rn}
    for workers in (0, args.workers):
        off, on = rates[False, workers], rates[True, workers]
        lines.append(f'data fast_decode on vs off ({workers} workers): {on:.1f} vs {off:.1f} img/s, '
                     f'speed-up {on / off:.2f}x')
    # How much fast decoding changes the network's input (normalised units; 1/255 of a pixel
    # level is about 0.017 of them).
    transform = datasets.photo_transform()
    diffs = [(transform(datasets.open_photo(p, False)) - transform(datasets.open_photo(p, True)))
             .abs().mean().item() for p in paths]
    lines.append(f'pixels fast_decode vs exact: mean |difference| = {statistics.mean(diffs):.4f} '
                 f'(normalised input units, {statistics.mean(diffs) * 0.226 * 255:.2f} of 255 levels)')
    result['fast_decode_mean_abs_diff'] = statistics.mean(diffs)
    # What a training iteration at the default batch (2 x 32 images) needs from the pipeline.
    best = max(rates.values())
    lines.append(f'data images for one Fashion200k iteration (2x32): {64 / best:.3f} s at the best '
                 f'rate above ({best:.1f} img/s)')
    for name, tree in (('fashioniq', args.fiq_path), ('cirr', args.cirr_path), ('shoes', args.shoes_path)):
        generated = tree is None
        if generated:
            tree = write_triplet_tree(name, os.path.join(tmp, name), paths)
        line, result[name] = bench_triplet_loader(args, name, tree, generated)
        lines.append(line)
    return lines, result


def write_triplet_tree(dataset_name, root, jpegs):
    """A FashionIQ, CIRR or Shoes train split in the real layout over the generated photos, 2
    triplets per image (each image a source twice and a target twice); FashionIQ's and Shoes' as
    JPEGs, CIRR's as PNGs, as their downloads hold.  Shoes: the last 2 photos are the eval list,
    the others the train list with the triplets among them (4 examples each under --shoes_protocol
    =val: every triplet is listed under both its images)."""
    import PIL.Image

    def write(path, content):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(content, f)
    names = [f'img{i:04d}' for i in range(len(jpegs))]
    pairs = [(names[i], names[(i + step) % len(names)]) for step in (1, 2) for i in range(len(names))]
    if dataset_name == 'shoes':
        return write_shoes_tree(root, jpegs, write)
    if dataset_name == 'fashioniq':
        for name, jpeg in zip(names, jpegs):
            os.makedirs(os.path.join(root, 'images'), exist_ok=True)
            shutil.copy(jpeg, os.path.join(root, 'images', name + '.jpg'))
        write(fashioniq.captions_file(root, 'dress', 'train'),
              [{'candidate': a, 'target': b, 'captions': [f'is longer {i}', f'has stripes {i}']}
               for i, (a, b) in enumerate(pairs)])
        write(fashioniq.split_file(root, 'dress', 'train'), names)
        for category in fashioniq.CATEGORIES[1:]:  # one triplet each: the loader reads every file
            write(fashioniq.captions_file(root, category, 'train'),
                  [{'candidate': names[0], 'target': names[1], 'captions': ['a', 'b']}])
            write(fashioniq.split_file(root, category, 'train'), names[:2])
        return root
    paths = {name: f'./train/0/{name}.png' for name in names}
    for name, jpeg in zip(names, jpegs):
        os.makedirs(os.path.join(root, 'train', '0'), exist_ok=True)
        PIL.Image.open(jpeg).save(os.path.join(root, paths[name]))
    write(os.path.join(root, 'cirr', 'captions', 'cap.rc2.train.json'),
          [{'pairid': i, 'reference': a, 'target_hard': b, 'caption': f'make it brighter {i}',
            'img_set': {'id': i, 'members': [a, b]}} for i, (a, b) in enumerate(pairs)])
    write(os.path.join(root, 'cirr', 'image_splits', 'split.rc2.train.json'), paths)
    return root


def write_shoes_tree(root, jpegs, write):
    """Shoes' release files, and its images in the attributedata/womens_<category>/{0,1}/ layout."""
    categories = ('clogs', 'pumps', 'boots')
    names = [f'img_womens_{categories[i % 3]}_{i}.jpg' for i in range(len(jpegs))]
    for i, (name, jpeg) in enumerate(zip(names, jpegs)):
        folder = os.path.join(root, 'attributedata', f'womens_{categories[i % 3]}', str(i % 2))
        os.makedirs(folder, exist_ok=True)
        shutil.copy(jpeg, os.path.join(folder, name))
    train = names[:-2]
    pairs = [(train[i], train[(i + step) % len(train)]) for step in (1, 2) for i in range(len(train))]
    write(os.path.join(root, shoes.CAPTIONS_FILE),
          [{'ImageName': b, 'ReferenceImageName': a, 'RelativeCaption': f'has a higher heel {i}'}
           for i, (a, b) in enumerate(pairs)])
    for split, listed in (('train', train), ('test', names[-2:])):
        with open(shoes.list_path(root, split), 'w') as f:
            f.write(''.join(name + '\n' for name in listed))
    return root


def triplets_per_second(opt, trainset, batches):
    """Training examples (2 images each) per second through main.py's training loader; the
    first batches (worker start, file cache) are not timed."""
    sampler = main.EpochBatchSampler(main.num_training_examples(trainset), opt.batch_size, opt.seed)
    loader = main.make_train_loader(opt, trainset, sampler, torch.device('cpu'))
    warmup = 2 * opt.loader_num_workers + 1
    count, start = 0, None
    for b, batch in enumerate(endless_batches(loader, sampler)):
        if b == warmup - 1:
            start = time.perf_counter()
        elif b >= warmup:
            count += batch['source_img_data'].shape[0]
            if count >= batches * opt.batch_size:
                break
    return count / (time.perf_counter() - start)


def bench_triplet_loader(args, dataset_name, root, generated):
    opt = main.parse_opt([f'--dataset={dataset_name}', f'--dataset_path={root}',
                          f'--batch_size={args.batch_size}', f'--seed={args.seed}',
                          '--img_weights=none', '--fiq_category=all'])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            trainset, _ = experiment.load_dataset(opt, 'train')
            main.fit_batch_size(opt, trainset)  # a tree smaller than the batch: one batch an epoch
    except (experiment.UserError, datasets.DatasetError) as e:
        flag = {'fashioniq': 'fiq', 'cirr': 'cirr', 'shoes': 'shoes'}[dataset_name]
        raise SystemExit(f'bench.py: --{flag}_path: {e}') from None
    rates = {}
    for workers in (0, args.workers):
        opt.loader_num_workers = workers
        rates[workers] = triplets_per_second(opt, trainset, args.data_batches)
    r0, rn = rates[0], rates[args.workers]
    source = 'generated' if generated else root
    line = (f'data {dataset_name} train loader ({main.num_training_examples(trainset)} triplets, '
            f'{len(trainset.imgs)} images, {source}), batch {opt.batch_size}: 0 workers '
            f'{r0:.1f} triplets/s, {args.workers} workers {rn:.1f} triplets/s, speed-up '
            f'{rn / r0:.2f}x')
    return line, {'triplets': main.num_training_examples(trainset), 'images': len(trainset.imgs),
                  'workers_0_triplets_per_s': r0, f'workers_{args.workers}_triplets_per_s': rn}


# ---------------------------------------------------------------------------------------------
# 5. Memory of a train-split evaluation
# ---------------------------------------------------------------------------------------------

def _resident_kb(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise OSError(f'/proc/self/status has no {field}')


def _fix_malloc_mmap_threshold():
    """glibc raises its mmap threshold after each large block freed, so that later image-sized
    blocks come from the heap, whose holes can grow it by ~1 MB a batch with 0 workers (a real
    ResNet's larger activations break that pattern; it is not memory held).  A fixed threshold
    (glibc's initial 128 KB) makes the figure measure what the code holds."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _measure_in_child(fn, warmup, conn):
    import resource
    torch.set_num_threads(1)  # as DataLoader workers do after a fork
    _fix_malloc_mmap_threshold()
    try:
        if warmup is not None:
            warmup()
        try:  # Linux: reset the high-water mark to the current resident size
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            start_kb = _resident_kb('VmRSS')
        except OSError:
            start_kb = None
        fn()
        if start_kb is not None:
            start, peak = start_kb * 1024, _resident_kb('VmHWM') * 1024
        else:  # inherited from the parent's peak: an upper bound of the start
            scale = 1 if sys.platform == 'darwin' else 1024
            start, peak = None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        conn.send({'start_bytes': start, 'peak_bytes': peak})
    except BaseException as e:  # noqa: B036 - reported to the parent, which raises
        conn.send({'error': f'{type(e).__name__}: {e}'})
    finally:
        conn.close()


def peak_memory(fn, warmup=None):
    """{'start_bytes', 'peak_bytes'}: resident memory of a forked child at the start of fn() and
    at its peak while fn() runs; the parent's own memory is left as it was.  `warmup()` runs
    first, unmeasured: a forked child maps the parent's library code again as it first runs it."""
    import multiprocessing
    context = multiprocessing.get_context('fork')
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_measure_in_child, args=(fn, warmup, send))
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {'error': 'the measuring process died (out of memory?)'}
    child.join()
    if 'error' in result:
        raise RuntimeError(f'peak_memory: {result["error"]}')
    return result


class PooledImageModel(torch.nn.Module):
    """A stand-in for the composition model that costs next to nothing per image (4x4 average
    pool, one projection; texts hashed to fixed vectors), so that images dominate memory."""

    def __init__(self, dim=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.projection = torch.nn.Parameter(torch.randn(48, dim, generator=g))

    def extract_img_feature(self, imgs):
        return torch.nn.functional.adaptive_avg_pool2d(imgs, 4).flatten(1) @ self.projection

    def compose_img_text(self, imgs, texts):
        import zlib
        text = torch.stack([torch.randn(self.projection.shape[1], generator=torch.Generator()
                                        .manual_seed(zlib.crc32(t.encode()))) for t in texts])
        return self.extract_img_feature(imgs) + text.to(imgs.device)


def write_mitstates_tree(root, images_per_folder, seed):
    """Two train nouns with two adjectives each, plus a test noun: MIT-States' layout."""
    for i, folder in enumerate(['ripe apple', 'sliced apple', 'small cake', 'whole cake',
                                'ripe fig', 'dried fig']):
        write_jpegs(os.path.join(root, 'images', folder), images_per_folder, 256, 256, seed + i)
    return root


def plain_example_features(model, dataset, count, batch_size):
    """Before issue 9: every sampled example, with its two image tensors, in one list, then the
    features (the same examples: seeds and sampler state as test_retrieval's sample)."""
    import random
    dataset.reset_sampler_state()
    random.seed(test_retrieval.SAMPLE_SEED)
    np.random.seed(test_retrieval.SAMPLE_SEED)
    torch.manual_seed(test_retrieval.SAMPLE_SEED)
    examples = [dataset[i] for i in range(count)]
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            batch = examples[start:start + batch_size]
            model.compose_img_text(torch.stack([e['source_img_data'] for e in batch]),
                                   [e['mod']['str'] for e in batch])
            model.extract_img_feature(torch.stack([e['target_img_data'] for e in batch]))
    return examples


def bench_memory(args, tmp):
    root = write_mitstates_tree(os.path.join(tmp, 'mitstates'), 4, args.seed)
    trainset = datasets.MITStates(root, 'train', transform=datasets.photo_transform())
    model = PooledImageModel()
    opt = argparse.Namespace(dataset='mitstates', batch_size=32, loader_num_workers=0)

    def ours(count):
        test_retrieval.NUM_SAMPLED_TRAIN_EXAMPLES = count  # in the child only
        test_retrieval.test(opt, model, trainset)

    mb = 2 ** 20
    lines, result = [], {'counts': args.memory_counts, 'image_bytes': 3 * 224 * 224 * 4}
    for count in args.memory_counts:
        mine = peak_memory(lambda: ours(count))
        plain = peak_memory(lambda: plain_example_features(model, trainset, count, 32))
        grow = {name: None if m['start_bytes'] is None else (m['peak_bytes'] - m['start_bytes']) / mb
                for name, m in (('ours', mine), ('plain', plain))}
        growth = ('' if grow['ours'] is None else
                  f' (+{grow["ours"]:.0f} MB vs +{grow["plain"]:.0f} MB over the start)')
        lines.append(f'memory train-split evaluation, MIT-States 224 px, {count} sampled examples: '
                     f'peak ours {mine["peak_bytes"] / mb:.0f} MB, plain list of examples '
                     f'{plain["peak_bytes"] / mb:.0f} MB{growth}, plain/ours '
                     f'{plain["peak_bytes"] / mine["peak_bytes"]:.2f}x')
        result[str(count)] = {'ours_peak_mb': mine['peak_bytes'] / mb, 'plain_peak_mb':
                              plain['peak_bytes'] / mb, 'ours_growth_mb': grow['ours'],
                              'plain_growth_mb': grow['plain']}
    return lines, result


# ---------------------------------------------------------------------------------------------
# 7. Every composition model: one training iteration, relative to TIRG
# ---------------------------------------------------------------------------------------------

MODEL_TEXTS = ['make top-left red cube blue', 'add small gray sphere', 'remove middle object']
MODEL_CAPTIONS = ['ripe apple', 'sliced apple', 'dried fig', 'ripe fig']  # attribute_operator's


def model_training_step(name, args, device):
    """One SGD iteration of the soft-triplet loss (main.py's) of --model=`name`, random images
    already on the device: the composer's cost, not the data's."""
    torch.manual_seed(args.seed)
    captions = MODEL_CAPTIONS if name == 'attribute_operator' else MODEL_TEXTS
    model = model_registry.MODELS[name](captions, 512, pretrained=False).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed)
    size, b = args.model_image_size, args.batch_size
    source, target = (torch.randn(b, 3, size, size, generator=g).to(device) for _ in range(2))
    words = [c.split()[0] for c in captions] if name == 'attribute_operator' else captions
    texts = [words[i % len(words)] for i in range(b)]

    def step():
        with autocast(args.amp, device):
            loss = model(source, texts, target, soft_triplet_loss=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_models(args, device):
    """Each model's peak resident memory during one iteration, in a forked child (CPU); then every
    model's iteration, timed in rounds (each round times every model once, so that the machine's
    load hits all alike), median over rounds."""
    names = list(model_registry.MODELS)
    steps = {name: model_training_step(name, args, device) for name in names}
    memory = {}
    if device.type == 'cpu' and not args.skip_model_memory:
        # Before any iteration here: each child's first iteration allocates its activations,
        # gradients and momentum afresh instead of reusing what this process freed.
        memory = {name: peak_memory(steps[name]) for name in names}
    times = {name: [] for name in names}
    for r in range(1 + args.model_iters):  # the first round warms up
        for name in names:
            seconds, _ = timed(steps[name], device)
            if r:
                times[name].append(seconds)
    base = statistics.median(times['tirg'])
    lines, result = [], {'image_size': args.model_image_size, 'batch_size': args.batch_size,
                         'iters': args.model_iters, 'models': {}}
    for name in names:
        t = statistics.median(times[name])
        entry = {'median_s': t, 'times_s': times[name], 'vs_tirg': t / base}
        line = (f'models {name}: one training iteration, batch {args.batch_size} at '
                f'{args.model_image_size}x{args.model_image_size}: {fmt_seconds(t)}, '
                f'{t / base:.2f}x TIRG')
        if name in memory:
            peak, start = memory[name]['peak_bytes'], memory[name]['start_bytes']
            entry.update(peak_bytes=peak, start_bytes=start)
            line += f', peak resident {peak / 2 ** 30:.2f} GiB'
            if start is not None:
                line += f' (+{(peak - start) / 2 ** 30:.2f} GiB for the iteration)'
        result['models'][name] = entry
        lines.append(line)
    return lines, result


# ---------------------------------------------------------------------------------------------
# 6. Several processes (torchrun, DistributedDataParallel, gloo on the CPU)
# ---------------------------------------------------------------------------------------------

DDP_PROCESSES = 2


def ddp_worker(args):
    """One process of the ddp section (this file run again, under torchrun or alone): main.py's
    training path (seeding, DDP wrapping, sliced sampler, loader, iteration) on the CSS set in
    --ddp_data; the first process writes the timing of args.iters iterations after the warm-up."""
    torch.set_num_threads(args.threads)
    device = distributed.device_for_process(torch.device('cpu'))
    rank, world = distributed.rank(), distributed.world_size()
    opt = main.parse_opt(['--dataset=css3d', f'--dataset_path={args.ddp_data}', '--model=tirg',
                          '--img_weights=none', '--loss=soft_triplet', '--loader_num_workers=0',
                          f'--batch_size={args.batch_size}', f'--seed={args.seed}', '--device=cpu'])
    main.seed_process(opt, rank)
    trainset = datasets.CSSDataset(opt.dataset_path, split='train', transform=datasets.css_transform())
    with contextlib.redirect_stdout(io.StringIO()):
        model = main.create_model(opt, trainset.get_all_texts()).to(device)
    train_model = main.wrap_for_training(opt, model, device)
    optimizer = main.create_optimizer(opt, model)
    sampler = main.EpochBatchSampler(len(trainset), opt.batch_size, opt.seed, rank, world)
    loader = main.make_train_loader(opt, trainset, sampler, device, rank)
    model.train()
    batches = endless_batches(loader, sampler)
    for _ in range(args.warmup):
        main.train_one_iteration(opt, train_model, optimizer, next(batches), device)
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(args.iters):
        main.train_one_iteration(opt, train_model, optimizer, next(batches), device)
    seconds = time.perf_counter() - start  # the last step's gradient all-reduce has completed
    if distributed.is_main_process():
        with open(args.ddp_worker, 'w') as f:
            json.dump({'processes': world, 'threads_per_process': torch.get_num_threads(),
                       'seconds': seconds, 'iters': args.iters}, f)
    distributed.cleanup()
    return 0


def endless_batches(loader, sampler):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_ddp(args, tmp):
    data_dir = os.path.join(tmp, 'css_ddp')
    make_css_dataset.generate_css_dataset(data_dir, base_scenes=100, verbose=False)
    total_threads = torch.get_num_threads()
    runs = {}
    for processes in (1, DDP_PROCESSES):
        out = os.path.join(tmp, f'ddp_{processes}.json')
        threads = max(1, total_threads // processes)  # the same cores, shared out
        worker = [os.path.abspath(__file__), f'--ddp_worker={out}', f'--ddp_data={data_dir}',
                  f'--batch_size={args.batch_size}', f'--iters={args.iters}',
                  f'--warmup={args.warmup}', f'--seed={args.seed}', f'--threads={threads}']
        # One process: the plain single-process path, no launcher and no process group.
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, '-m', 'torch.distributed.run', '--standalone',
            f'--nproc_per_node={processes}']
        result = subprocess.run(launcher + worker, capture_output=True, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if result.returncode != 0:
            raise RuntimeError(f'ddp section, {processes} process(es) failed:\n{result.stderr[-3000:]}')
        with open(out) as f:
            runs[processes] = json.load(f)
        runs[processes]['img_per_s'] = 2 * args.batch_size * args.iters / runs[processes]['seconds']
    one, many = runs[1], runs[DDP_PROCESSES]
    ratio = many['img_per_s'] / one['img_per_s']
    line = (f'ddp train iterations, global batch {args.batch_size} (TIRG, CSS 64x64, gloo on CPU, '
            f'{total_threads} threads in all): 1 process {one["img_per_s"]:.1f} img/s '
            f'({fmt_seconds(one["seconds"] / args.iters)}/it), {DDP_PROCESSES} processes under '
            f'torchrun {many["img_per_s"]:.1f} img/s ({fmt_seconds(many["seconds"] / args.iters)}/it, '
            f'{many["threads_per_process"]} threads each), scaling {ratio:.2f}x  '
            f'({args.iters} iterations after {args.warmup} warm-up)')
    return [line], {'batch_size': args.batch_size, 'runs': {str(k): v for k, v in runs.items()},
                    'scaling': ratio}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

SECTIONS = ('retrieval', 'loss', 'train', 'backbones', 'data', 'memory', 'ddp', 'models')


def parse_size(text):
    try:
        w, h = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: expected WIDTHxHEIGHT, e.g. 1000x750') from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f'{text!r}: at least 16x16')
    return w, h


def parse_batches(text):
    try:
        sizes = [int(v) for v in text.split(',')]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f'{text!r}: expected batch sizes of at least 2, e.g. 32,128')
    return sizes


def parse_counts(text):
    try:
        counts = [int(v) for v in text.split(',')]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: expected positive counts, e.g. 300,3000')
    return counts


def get_args_parser():
    p = argparse.ArgumentParser(description='Benchmark this TIRG implementation against the '
                                            "reference's algorithms.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    p.add_argument('--queries', type=int, default=3000, help='retrieval: test queries')
    p.add_argument('--gallery', type=int, default=30000, help='retrieval: gallery images')
    p.add_argument('--dim', type=int, default=512, help='retrieval: feature dimension')
    p.add_argument('--repeats', type=int, default=3, help='retrieval: timed runs of ours (median)')
    p.add_argument('--loss_batches', type=parse_batches, default='32,128',
                   help='loss: comma-separated batch sizes (features 2B x 512)')
    p.add_argument('--loss_repeats', type=int, default=50, help='loss: timed runs of ours (median)')
    p.add_argument('--batch_size', type=int, default=32, help='train: batch size B')
    p.add_argument('--iters', type=int, default=10, help='train: timed iterations')
    p.add_argument('--warmup', type=int, default=2, help='train: warm-up iterations')
    p.add_argument('--backbone_size', type=int, default=224,
                   help='backbones: image size (square) for both backbones')
    p.add_argument('--workers', type=int, default=2, help='data: DataLoader workers (vs 0)')
    p.add_argument('--image_size', type=parse_size, default='1000x750',
                   help='data: generated JPEG size, WIDTHxHEIGHT')
    p.add_argument('--data_images', type=int, default=48, help='data: JPEG files generated')
    p.add_argument('--data_passes', type=int, default=2, help='data: timed passes over them')
    p.add_argument('--data_batches', type=int, default=6,
                   help='data: timed training batches of the FashionIQ, CIRR and Shoes loaders')
    p.add_argument('--fiq_path', default=None,
                   help='data: a FashionIQ tree to time instead of a generated one')
    p.add_argument('--cirr_path', default=None,
                   help='data: a CIRR tree to time instead of a generated one')
    p.add_argument('--shoes_path', default=None,
                   help='data: a Shoes tree to time instead of a generated one (--shoes_protocol=val)')
    p.add_argument('--memory_counts', type=parse_counts, default='300,3000',
                   help='memory: comma-separated numbers of sampled training examples')
    p.add_argument('--threads', type=int, default=0,
                   help="torch CPU threads (0: torch's default, which follows OMP_NUM_THREADS); "
                        'on a machine shared with other work, 1 avoids OpenMP threads thrashing')
    p.add_argument('--amp', action='store_true', help='train: bfloat16 autocast (CUDA only)')
    p.add_argument('--channels_last', action='store_true',
                   help='train: channels-last memory format for both the loop and the bare step')
    p.add_argument('--model_image_size', type=int, default=224,
                   help='models: square image size (224: the photo datasets\' crop)')
    p.add_argument('--model_iters', type=int, default=2,
                   help='models: timed rounds (every model once a round, after one warm-up round)')
    p.add_argument('--skip_model_memory', action='store_true',
                   help='models: skip the peak-memory measurement (default: measured on CPU)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quick', action='store_true', help='tiny sizes (seconds; for tests)')
    p.add_argument('--only', default=','.join(SECTIONS),
                   help='comma-separated sections: ' + ','.join(SECTIONS))
    p.add_argument('--json', default=None, metavar='FILE', help='also write the results here')
    # The ddp section runs this file again, once per process: what to do there.
    p.add_argument('--ddp_worker', default=None, help=argparse.SUPPRESS)
    p.add_argument('--ddp_data', default=None, help=argparse.SUPPRESS)
    return p


QUICK = {'queries': 200, 'gallery': 2000, 'dim': 64, 'repeats': 1, 'loss_repeats': 10,
         'batch_size': 4, 'iters': 2, 'warmup': 1, 'backbone_size': 64, 'image_size': (320, 240),
         'data_images': 8, 'data_passes': 1, 'data_batches': 2, 'memory_counts': [20, 200],
         'model_image_size': 64, 'model_iters': 1}


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.quick:
        given = {a.split('=')[0].lstrip('-') for a in (sys.argv[1:] if argv is None else argv)
                 if a.startswith('--')}
        for name, value in QUICK.items():
            if name not in given:
                setattr(args, name, value)
    args.sections = [s.strip() for s in args.only.split(',') if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f'--only: unknown section(s) {", ".join(unknown)} (choose from {", ".join(SECTIONS)})')
    for name in ('queries', 'gallery', 'dim', 'repeats', 'loss_repeats', 'iters', 'data_images',
                 'data_passes', 'data_batches', 'backbone_size', 'model_image_size', 'model_iters'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1')
    if args.batch_size < 2:
        parser.error('--batch_size must be at least 2 (soft triplet loss)')
    if 'ddp' in args.sections and args.batch_size % DDP_PROCESSES:
        parser.error(f'--batch_size={args.batch_size}: the ddp section splits the batch over '
                     f'{DDP_PROCESSES} processes; give a multiple of {DDP_PROCESSES}')
    if args.workers < 1:
        parser.error('--workers must be at least 1 (0 workers is always measured)')
    if args.warmup < 0 or args.threads < 0:
        parser.error('--warmup and --threads must be 0 or more')
    return args


def check_device(name):
    """The torch device --device names; a one-line exit before anything is measured."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise SystemExit(f'bench.py: --device={name}: expected cpu or cuda[:N]')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'bench.py: --device={name} but CUDA is not available')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f'bench.py: --device={name}: this machine has {torch.cuda.device_count()} '
                         f'CUDA devices')
    return device


def check_json_path(path):
    """--json must be writable before the minutes of measuring, not after them."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f'bench.py: --json={path}: no such folder {folder}')
    if os.path.isdir(path):
        raise SystemExit(f'bench.py: --json={path}: is a folder, expected a file name')
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise SystemExit(f'bench.py: --json={path}: cannot write there (permission denied)')


def write_json(path, results):
    """Through a temporary file: a failed write leaves an earlier file of that name whole."""
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        with open(tmp, 'w') as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f'bench.py: --json={path}: cannot write ({e.strerror or e}); the '
                         f'results are printed above') from None


def run(args):
    device = check_device(args.device)
    if args.json:
        check_json_path(args.json)
    if device.type == 'cuda':
        # Exact float32 (the default): the retrieval comparison relies on it.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    header = {
        'device': str(device), 'device_name': device_description(device),
        'torch': torch.__version__, 'numpy': np.__version__, 'python': platform.python_version(),
        'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
        'amp': bool(args.amp and device.type == 'cuda'),
        'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
    }
    print(f'device {device} ({header["device_name"]}), torch {torch.__version__}, '
          f'numpy {np.__version__}, {header["threads"]} threads, {os.cpu_count()} CPUs, '
          f'load average {" ".join(f"{v:.2f}" for v in header["load_average"] or [])}'
          + (', bf16 autocast' if header['amp'] else ''), flush=True)
    results = {'header': header, 'args': {k: v for k, v in vars(args).items()}}
    tmp = tempfile.mkdtemp(prefix='tirg_bench_')
    try:
        for section in SECTIONS:
            if section not in args.sections:
                continue
            start = time.perf_counter()
            if section == 'retrieval':
                lines, result = bench_retrieval(args, device)
            elif section == 'loss':
                lines, result = bench_loss(args, device)
            elif section == 'train':
                lines, result = bench_train(args, device, tmp)
            elif section == 'backbones':
                lines, result = bench_backbones(args, device)
            elif section == 'memory':
                lines, result = bench_memory(args, tmp)
            elif section == 'ddp':
                lines, result = bench_ddp(args, tmp)
            elif section == 'models':
                lines, result = bench_models(args, device)
            else:
                lines, result = bench_data(args, tmp)
            result['section_wall_s'] = time.perf_counter() - start
            results[section] = result
            for line in lines:
                print(line, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        write_json(args.json, results)
        print('Wrote', args.json)
    return results


def main_cli(argv=None):
    args = parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(args)
    run(args)
    return 0


if __name__ == '__main__':
    sys.exit(main_cli())
