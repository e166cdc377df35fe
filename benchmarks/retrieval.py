"""retrieval: test_retrieval.test() against the reference's per-query numpy loop (dot product,
full argsort per query, captions, recall@k) on precomputed features served by a stand-in model and
dataset, so that the protocol is measured, not a CNN; plus an estimate for the full Fashion200k
test (33,480 queries x 29,789 images).  The recalls of both must be identical (asserted)."""
import argparse
import math
import statistics
import time

import numpy as np
import torch

import test_retrieval
from benchmarks.common import fmt_seconds, median_time, timed

FASHION200K_TEST_QUERIES = 33480
FASHION200K_TEST_IMAGES = 29789
RECALL_KS = (1, 5, 10, 50, 100)


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


def measure(args, device, tmp):
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
