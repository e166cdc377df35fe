"""Run under torchrun by tests/test_paper_composers.py (2 gloo processes on CPU): two training
iterations of every new model through main.wrap_for_training (DistributedDataParallel), each
process its slice of the global batch; saves each model's parameters to OUT_DIR/rank<r>.pt.
DistributedDataParallel fails at the second iteration when a model's loss leaves parameters
unused and it was not told (find_unused_parameters)."""
import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import distributed  # noqa: E402
import main  # noqa: E402
import model_registry  # noqa: E402
import paper_composers  # noqa: E402

GLOBAL_BATCH = 4
PAPER_MODELS = [name for name, cls in model_registry.MODELS.items()
                if cls.__module__ == paper_composers.__name__]
TEXTS = {'attribute_operator': ['red', 'sliced', 'green', 'red']}
CAPTIONS = ['red apple', 'green apple', 'sliced bread', 'red bread']


def train_two_iterations(name, device):
    torch.manual_seed(0)
    model = model_registry.MODELS[name](CAPTIONS, 8, pretrained=False)
    opt = argparse.Namespace(model=name, sync_bn=False)
    train_model = main.wrap_for_training(opt, model, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    share = GLOBAL_BATCH // distributed.world_size()
    rows = slice(distributed.rank() * share, (distributed.rank() + 1) * share)
    texts = TEXTS.get(name, CAPTIONS)[rows]
    for it in range(2):
        g = torch.Generator().manual_seed(it)
        source, target = (torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)[rows] for _ in range(2))
        loss = train_model(source, texts, target, soft_triplet_loss=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main_checks():
    out_dir = sys.argv[1]
    device = distributed.device_for_process(torch.device('cpu'))
    results = {name: train_two_iterations(name, device) for name in PAPER_MODELS}
    torch.save(results, os.path.join(out_dir, f'rank{distributed.rank()}.pt'))
    distributed.cleanup()


if __name__ == '__main__':
    main_checks()
