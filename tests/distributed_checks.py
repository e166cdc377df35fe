"""Run under torchrun by tests/test_distributed.py (2 gloo processes on CPU); each process saves
what it computed to OUT_DIR/rank<r>.pt and the test compares it with one process.  Also imported
by the test for the shared fixtures: the tiny model, its batch and the image list."""
import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import distributed  # noqa: E402
import img_text_composition_models  # noqa: E402
import test_retrieval  # noqa: E402

GLOBAL_BATCH = 6
UNEVEN_BATCH = 5
TRIPLET_SEED = 11
NUM_GALLERY = 7  # 3 + 4 over two processes
NUM_QUERIES = 3  # 1 + 2


class TinyModel(img_text_composition_models.ImgTextCompositionBase):
    """Linear image encoder and a text term, so every parameter gets a gradient; records its
    latest query and target features to read the gradient that reaches them."""

    def __init__(self):
        super().__init__()
        self.img = torch.nn.Linear(4, 5)
        self.text = torch.nn.Embedding(8, 5)
        self.recorded = {}

    def _record(self, name, features):
        if features.requires_grad:
            features.retain_grad()
            self.recorded[name] = features
        return features

    def extract_img_feature(self, imgs):
        return self._record('target', self.img(imgs))

    def compose_img_text(self, imgs, texts):
        words = torch.tensor([len(t) % 8 for t in texts])
        return self._record('query', torch.tanh(self.img(imgs)) + self.text(words))


def tiny_model_and_batch():
    torch.manual_seed(0)
    model = TinyModel()
    query_imgs, target_imgs = torch.randn(GLOBAL_BATCH, 4), torch.randn(GLOBAL_BATCH, 4)
    texts = ['x' * i for i in range(GLOBAL_BATCH)]
    return model, query_imgs, texts, target_imgs


def loss_and_gradients(train_model, model, query_imgs, texts, target_imgs, soft_triplet, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = train_model(query_imgs, texts, target_imgs, soft_triplet_loss=soft_triplet, **kwargs)
    loss.backward()
    return {'loss': loss.detach(),
            'query_grad': model.recorded['query'].grad, 'target_grad': model.recorded['target'].grad,
            'param_grads': {name: p.grad.clone() for name, p in model.named_parameters()}}


class ImageList:
    """The dataset API the feature extraction reads (imgs, get_img), noting what it reads."""

    def __init__(self, size):
        self.imgs = [{'captions': [f'image {i}']} for i in range(size)]
        self.read = []

    def get_img(self, idx, raw_img=False):
        self.read.append(idx)
        return torch.arange(4, dtype=torch.float32) * (idx + 1) - idx ** 2


def queries():
    return [{'source_img_id': i, 'mod': {'str': 'y' * i}} for i in (6, 2, 4)]


def features_of(model):
    """Query, gallery and one-image (a process with nothing to do) features, and the ids read."""
    dataset = ImageList(NUM_GALLERY)
    query = test_retrieval.compute_query_features(model, dataset, queries(), batch_size=2)
    read_for_queries, dataset.read = dataset.read, []
    gallery = test_retrieval.compute_gallery_features(model, dataset, batch_size=2)
    read_for_gallery, dataset.read = dataset.read, []
    one = test_retrieval.compute_gallery_features(model, dataset, batch_size=2, ids=[5])
    return {'query': query, 'gallery': gallery, 'one': one,
            'read_for_queries': read_for_queries, 'read_for_gallery': read_for_gallery}


def dropout_kept():
    """Which of 1000 units a training-mode dropout layer keeps (its mask)."""
    return torch.nn.Dropout(0.5).train()(torch.ones(1000)) != 0


def main():
    import experiment  # its seeding, as training uses it
    import main as main_module  # main.py: its DDP wrapping, as training uses it
    device = distributed.device_for_process(torch.device('cpu'))
    rank, world = distributed.rank(), distributed.world_size()
    results = {'world_size': world}

    experiment.seed_process(argparse.Namespace(seed=5), rank)
    results['dropout_kept'] = dropout_kept()

    model, query_imgs, texts, target_imgs = tiny_model_and_batch()
    share = distributed.shard_range(GLOBAL_BATCH)
    local = slice(share.start, share.stop)
    wrapped = main_module.wrap_for_training(argparse.Namespace(sync_bn=False, model='tirg'),
                                            model, device)
    for name, soft_triplet in (('soft_triplet', True), ('batch_based_classification', False)):
        # Each process's torch stream in another state: the triplets must still be the first's.
        torch.manual_seed(TRIPLET_SEED + 1000 * rank)
        results[name] = loss_and_gradients(wrapped, model, query_imgs[local], texts[local],
                                           target_imgs[local], soft_triplet)
    # A global batch that does not divide by the processes (fitted to a small training set):
    # UNEVEN_BATCH rows, 2 and 3.
    rows = distributed.slice_rows(UNEVEN_BATCH)
    start = sum(rows[:rank])
    local = slice(start, start + rows[rank])
    torch.manual_seed(TRIPLET_SEED + 1000 * rank)
    results['uneven'] = loss_and_gradients(wrapped, model, query_imgs[local], texts[local],
                                           target_imgs[local], True, slice_rows=rows)

    model.eval()
    results['features'] = features_of(model)
    torch.save(results, os.path.join(sys.argv[1], f'rank{rank}.pt'))
    distributed.cleanup()


if __name__ == '__main__':
    main()
