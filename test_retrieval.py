"""Retrieval test and recall@k (SPEC section 6).

The reference looped over queries in numpy with a full argsort of the gallery per query.  Here
features are computed once under inference mode, and scores and top-k run in torch on the model's
device, a chunk of queries at a time so memory stays bounded.  Results equal the per-query
implementation (tests/test_test_retrieval.py checks it).
"""
import contextlib
import os
import random

import numpy as np
import torch
from tqdm import tqdm

import datasets
import distributed
import amp

RECALL_KS = (1, 5, 10, 50, 100)


def num_sampled_train_examples(environ):
    """SPEC 6: 10,000.  TIRG_NUM_SAMPLED_TRAIN_EXAMPLES lowers it for tests on tiny fixtures."""
    return int(environ.get('TIRG_NUM_SAMPLED_TRAIN_EXAMPLES', 10000))


NUM_SAMPLED_TRAIN_EXAMPLES = num_sampled_train_examples(os.environ)
# Every generator is seeded with this before the sample, so each evaluation draws the same examples.
SAMPLE_SEED = 0
# Score given to a query's own source image, as in the reference (it stays in the ranking, last).
SOURCE_IMAGE_SCORE = -10e10
# Upper bound on the number of query x gallery scores held at once (float32: 4 bytes each).
MAX_SCORES_PER_CHUNK = 2 ** 25


def model_device(model):
    return next(model.parameters()).device


def query_image(dataset, idx, raw_img=False):
    """Image `idx` as the source of a query: the gallery's image, except where the dataset
    shows queries otherwise (CSS 2D->3D draws them in 2D).  Any object with get_img works."""
    read = getattr(dataset, 'get_query_img', None)
    return dataset.get_img(idx, raw_img) if read is None else read(idx, raw_img)


class _ImageList(torch.utils.data.Dataset):

    def __init__(self, dataset, ids, queries=False):
        self.dataset, self.ids, self.queries = dataset, ids, queries

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        if self.queries:
            return torch.as_tensor(query_image(self.dataset, self.ids[i])).float()
        return torch.as_tensor(self.dataset.get_img(self.ids[i])).float()


def _image_batches(dataset, ids, batch_size, num_workers, desc='Images', queries=False):
    # Its own generator: creating a loader must not draw from the global torch stream, which
    # training (dropout, triplet sampling) depends on; an evaluation must not change a run.
    loader = torch.utils.data.DataLoader(
        _ImageList(dataset, ids, queries), batch_size=batch_size, num_workers=num_workers,
        generator=torch.Generator(), worker_init_fn=datasets.worker_init_fn)
    # disable=None: a progress bar on a terminal only, none in logs and tests; under torchrun
    # the first process's only.
    disable = None if distributed.is_main_process() else True
    return iter(tqdm(loader, desc=desc, leave=False, disable=disable, mininterval=2.0))


def _own_share(items):
    """The contiguous share of `items` this process extracts features for (all without torchrun)."""
    share = distributed.shard_range(len(items))
    return items[share.start:share.stop]


def _all_shares(features, device):
    """The features of every process's share, gathered in the single-process order."""
    local = torch.cat(features) if features else torch.empty(0, 0, device=device)
    return distributed.gather_rows(local)


@torch.inference_mode()
def compute_query_features(model, dataset, queries, batch_size, num_workers=0,
                           precision=amp.FLOAT32):
    """Composed features of `queries`, float32 whatever `precision` the model ran in (the
    ranking and the recalls are float32)."""
    device = model_device(model)
    queries = _own_share(queries)
    source_ids = [q['source_img_id'] for q in queries]
    texts = [q['mod']['str'] for q in queries]
    features = []
    for start, imgs in zip(range(0, len(queries), batch_size),
                           _image_batches(dataset, source_ids, batch_size, num_workers,
                                          'Query features', queries=True)):
        imgs = imgs.to(device, non_blocking=True)
        with amp.autocast(precision, device.type):
            composed = model.compose_img_text(imgs, texts[start:start + batch_size])
        features.append(composed.float())
    return _all_shares(features, device)


@torch.inference_mode()
def compute_gallery_features(model, dataset, batch_size, num_workers=0, ids=None,
                             precision=amp.FLOAT32):
    """Image features of `ids` (default: every image), float32 whatever `precision`."""
    device = model_device(model)
    ids = _own_share(list(range(len(dataset.imgs)) if ids is None else ids))
    features = []
    for imgs in _image_batches(dataset, ids, batch_size, num_workers, 'Gallery features'):
        with amp.autocast(precision, device.type):
            extracted = model.extract_img_feature(imgs.to(device, non_blocking=True))
        features.append(extracted.float())
    return _all_shares(features, device)


@torch.inference_mode()
def compute_example_features(model, dataset, examples, batch_size, num_workers=0,
                             precision=amp.FLOAT32):
    """Query and target features of sampled training examples (splits without test queries),
    read by image id through the same batched paths as the test queries: only the features are
    kept, so memory does not grow with the number of examples."""
    queries = compute_query_features(model, dataset, examples, batch_size, num_workers, precision)
    targets = compute_gallery_features(model, dataset, batch_size, num_workers,
                                       ids=[e['target_img_id'] for e in examples],
                                       precision=precision)
    return queries, targets


@contextlib.contextmanager
def _image_reading(dataset, read):
    """The datasets read images through `self.get_img`; an instance attribute shadows it so that
    drawing an example decodes nothing (or decodes and drops the image, to find unreadable
    ones).  Reading draws no random number, so the same examples are drawn either way."""
    missing = object()
    own = vars(dataset).get('get_img', missing)
    real = dataset.get_img

    def get_img(idx, *args, **kwargs):
        if read:
            real(idx)
        return None

    dataset.get_img = get_img
    try:
        yield
    finally:
        if own is missing:
            del dataset.get_img
        else:
            dataset.get_img = own


@contextlib.contextmanager
def _training_streams_kept(dataset):
    """Whatever the sample draws, training continues with the generators and the dataset's
    sampler state it had: Python, numpy, torch on the CPU and on every accelerator."""
    py_state, np_state = random.getstate(), np.random.get_state()
    # Only CUDA devices already in use: querying the others would create a context on each.
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
    # Stateful samplers (a pending pair) start fresh and resume afterwards.  Any object with the
    # dataset API works; these hooks are optional.
    sampler_state = getattr(dataset, 'get_sampler_state', dict)()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda_devices, device_type='cuda'))
        if mps:
            stack.enter_context(torch.random.fork_rng(devices=['mps'], device_type='mps'))
        try:
            yield
        finally:
            getattr(dataset, 'set_sampler_state', lambda state: None)(sampler_state)
            random.setstate(py_state)
            np.random.set_state(np_state)


def draw_training_examples(dataset, count, seed=SAMPLE_SEED, read_images=False):
    """`count` training examples drawn with every generator seeded with `seed`, without their
    images: source and target ids, text, captions."""
    with _training_streams_kept(dataset):
        getattr(dataset, 'reset_sampler_state', lambda: None)()
        random.seed(seed)
        np.random.seed(seed)
        # The CPU generator only: torch.manual_seed would also reseed CUDA and MPS.
        torch.default_generator.manual_seed(seed)
        with _image_reading(dataset, read_images):
            examples = [dataset[i] for i in range(count)]
    return [{key: value for key, value in e.items() if not key.endswith('_img_data')}
            for e in examples]


def sample_training_examples(dataset, count=None, seed=SAMPLE_SEED):
    """The same `count` (default NUM_SAMPLED_TRAIN_EXAMPLES) examples at every evaluation, as
    descriptors (no images); the generators and sampler state that training draws from are left
    exactly as they were."""
    count = NUM_SAMPLED_TRAIN_EXAMPLES if count is None else count
    # FashionIQ and CIRR (beyond the reference) train on a list of triplets: never draw more than
    # there are (real data has 18,000 and 28,800; a small tree would repeat each hundreds of times).
    triplets = getattr(dataset, 'num_training_examples', None)
    if triplets is not None:
        count = min(count, triplets())
    return draw_training_examples(dataset, count, seed)


def training_example_features(model, dataset, batch_size, num_workers, precision=amp.FLOAT32):
    """(examples, query features, target features) of the sampled training examples."""
    examples = sample_training_examples(dataset)
    try:
        return (examples,) + compute_example_features(model, dataset, examples, batch_size,
                                                      num_workers, precision)
    except datasets.ImageReadError:
        # Training draws another example when an image cannot be read, and so did the
        # reference's sample, which read images while drawing: draw again, reading them.
        examples = draw_training_examples(dataset, len(examples), read_images=True)
        return (examples,) + compute_example_features(model, dataset, examples, batch_size,
                                                      num_workers, precision)


def nearest_neighbours(queries, gallery, exclude=None, k=110):
    """Indices of the k highest dot-product scores per query (features already L2-normalised),
    with `exclude[i]` (the query's source image) scored SOURCE_IMAGE_SCORE."""
    k = min(k, gallery.shape[0])
    rows_per_chunk = max(1, MAX_SCORES_PER_CHUNK // max(1, gallery.shape[0]))
    results = []
    for start in range(0, queries.shape[0], rows_per_chunk):
        scores = queries[start:start + rows_per_chunk] @ gallery.t()
        if exclude is not None:
            rows = torch.arange(scores.shape[0], device=scores.device)
            scores[rows, exclude[start:start + rows_per_chunk]] = SOURCE_IMAGE_SCORE
        results.append(scores.topk(k, dim=1).indices)
    return torch.cat(results)


def top_k_with_scores(queries, gallery, k, exclude=None, exclude_ranks_last=False):
    """(scores, indices), each queries x k, of the k best gallery images per query (features
    already L2-normalised), best first.  `exclude[i]` (query i's source image) is left out of its
    results altogether, so at most len(gallery) - 1 come back then; with `exclude_ranks_last` it
    scores -inf and stays in, last (Shoes' protocols, as VAL's and ARTEMIS's code rank it)."""
    removed = exclude is not None and not exclude_ranks_last
    k = min(k, gallery.shape[0] - (1 if removed else 0))
    scores = queries @ gallery.t()
    if exclude is not None:
        rows = torch.arange(scores.shape[0], device=scores.device)
        scores[rows, torch.as_tensor(exclude, device=scores.device)] = float('-inf')
    return scores.topk(max(k, 0), dim=1)


def _label_ids(gallery_labels, target_labels, device):
    """Map strings to ints; a target label absent from the gallery can never be matched."""
    index = {label: i for i, label in enumerate(dict.fromkeys(gallery_labels))}
    gallery_ids = torch.tensor([index[label] for label in gallery_labels], device=device)
    target_ids = torch.tensor([index.get(label, -1) for label in target_labels], device=device)
    return gallery_ids, target_ids


def recalls_at_k(neighbours, gallery_labels, target_labels, ks=RECALL_KS):
    """Fraction of queries whose target label is among their top-k neighbours' labels."""
    gallery_ids, target_ids = _label_ids(gallery_labels, target_labels, neighbours.device)
    hits = (gallery_ids[neighbours] == target_ids.unsqueeze(1)).cumsum(1) > 0
    return [float(hits[:, min(k, hits.shape[1]) - 1].float().mean()) for k in ks]


def recall_metrics(neighbours, gallery_captions, target_captions, dataset_name):
    metrics = {}
    families = [('composition', gallery_captions, target_captions)]
    if dataset_name == 'mitstates':
        families.append(('adj', [c.split()[0] for c in gallery_captions],
                         [c.split()[0] for c in target_captions]))
        families.append(('noun', [c.split()[1] for c in gallery_captions],
                         [c.split()[1] for c in target_captions]))
    for family, gallery_labels, labels in families:
        for k, value in zip(RECALL_KS, recalls_at_k(neighbours, gallery_labels, labels)):
            metrics[f'recall_top{k}_correct_{family}'] = value
    # The reference's order: for each k, composition then adj then noun.
    return [(f'recall_top{k}_correct_{family}', metrics[f'recall_top{k}_correct_{family}'])
            for k in RECALL_KS for family, _, _ in families]


def test(opt, model, testset, features=None):
    """Retrieval test of `model` on `testset`: a list of (metric name, recall).

    A dict given as `features` receives the L2-normalised 'query' and 'gallery' features and
    'exclude' (each query's source image id, or None), for callers that show some results.
    The features are computed in `opt.precision` (main.py's decision for --amp; float32 without)."""
    was_training = model.training
    model.eval()
    batch_size = opt.batch_size
    num_workers = getattr(opt, 'loader_num_workers', 0)
    precision = getattr(opt, 'precision', amp.FLOAT32)
    try:
        queries = testset.get_test_queries()
        if queries:
            query_features = compute_query_features(model, testset, queries, batch_size,
                                                    num_workers, precision)
            gallery_features = compute_gallery_features(model, testset, batch_size, num_workers,
                                                        precision=precision)
            gallery_captions = [img['captions'][0] for img in testset.imgs]
            target_captions = [q['target_caption'] for q in queries]
            exclude = torch.tensor([q['source_img_id'] for q in queries],
                                   device=query_features.device)
        else:
            examples, query_features, gallery_features = training_example_features(
                model, testset, batch_size, num_workers, precision)
            gallery_captions = target_captions = [e['target_caption'] for e in examples]
            exclude = None
        query_features = torch.nn.functional.normalize(query_features, dim=1)
        gallery_features = torch.nn.functional.normalize(gallery_features, dim=1)
        if features is not None:
            features.update(query=query_features, gallery=gallery_features, exclude=exclude)
        neighbours = nearest_neighbours(query_features, gallery_features, exclude)
        return recall_metrics(neighbours, gallery_captions, target_captions, opt.dataset)
    finally:
        model.train(was_training)
