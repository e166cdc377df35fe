"""memory: peak resident memory of a train-split evaluation (test_retrieval.test on an
MIT-States tree at 224 px, --memory_counts sampled examples, a stand-in model that costs nothing
per image) against the plain way (a list of the examples with their images, then their
features), each in a forked process (Linux: exact start and peak)."""
import argparse
import os

import numpy as np
import torch

import datasets
import test_retrieval
from benchmarks.fixtures import write_mitstates_tree
from benchmarks.peak_memory import peak_memory


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


def measure(args, device, tmp):
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
