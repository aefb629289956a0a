"""Peer side of the patch-kNN check: anomalib 2.7.0 PatchCore (runs in the anomalib venv).

Reads {train: [f1, f2], test: [f1, f2]} feature maps (two CNN levels, finest first), ratio, seed; runs
PatchcoreModel's feature_pooler + generate_embedding + reshape_embedding, KCenterGreedy (torch seeded), the
nearest-neighbour patch scores and compute_anomaly_score (num_neighbors 9). The backbone is never run (the
feature maps are the input), so resnet18 without weights is only there to build the module."""
import sys

import torch

from anomalib.models.components.sampling import KCenterGreedy
from anomalib.models.image.patchcore.torch_model import PatchcoreModel

inp = torch.load(sys.argv[1])
model = PatchcoreModel(layers=["layer1", "layer2"], backbone="resnet18", pre_trained=False, num_neighbors=9).eval()


def embed(levels):
    feats = {name: model.feature_pooler(f) for name, f in zip(model.layers, levels)}
    e = model.generate_embedding(feats)
    return e, model.reshape_embedding(e)


with torch.no_grad():
    grid_train, bank = embed(inp["train"])
    grid_test, queries = embed(inp["test"])
    torch.manual_seed(inp["seed"])
    sampler = KCenterGreedy(embedding=bank, sampling_ratio=inp["ratio"])
    picks = sampler.select_coreset_idxs()
    model.memory_bank = bank[picks]
    b, _, h, w = grid_test.shape
    patch, loc = model.nearest_neighbors(embedding=queries, n_neighbors=1)
    patch, loc = patch.reshape(b, -1), loc.reshape(b, -1)
    image = model.compute_anomaly_score(patch, loc, queries)
torch.save({"grid_train": grid_train, "grid_test": grid_test, "proj": sampler.features, "picks": torch.tensor(picks),
            "coreset_size": sampler.coreset_size, "patch": patch, "image": image}, sys.argv[2])
