"""Peer side of the scale benchmark: anomalib 2.7.0 PatchCore fit + test timed on given feature maps (anomalib venv).

    /tmp/fidelity/anomalib/bin/python scripts/bench_peer_patchcore.py in.pt out.pt

in.pt: {train: [f1, f2], test: [f1, f2]} (two CNN levels of the same backbone and weights as ours, finest first,
float32 [N, C, h, w]), ratio (coreset sampling ratio), seed. The model is driven as scripts/fidelity/peer_knn.py
drives it (feature_pooler + generate_embedding + reshape_embedding, KCenterGreedy, nearest neighbours,
compute_anomaly_score with num_neighbors 9); the backbone forward is not run here (the caller times ours, the same
network). out.pt: fit seconds (embedding + coreset), test seconds (embedding + search + image score), bank sizes,
image scores [N_test], patch score maps [N_test, h, w]."""
import sys
import time

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
    t0 = time.perf_counter()
    _, bank = embed(inp["train"])
    torch.manual_seed(inp["seed"])
    picks = KCenterGreedy(embedding=bank, sampling_ratio=inp["ratio"]).select_coreset_idxs()
    model.memory_bank = bank[picks]
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid_test, queries = embed(inp["test"])
    b, _, h, w = grid_test.shape
    patch, loc = model.nearest_neighbors(embedding=queries, n_neighbors=1)
    patch, loc = patch.reshape(b, -1), loc.reshape(b, -1)
    image = model.compute_anomaly_score(patch, loc, queries)
    t_test = time.perf_counter() - t0
torch.save({"fit_seconds": t_fit, "test_seconds": t_test, "bank": bank.shape[0], "coreset": len(picks),
            "image": image, "patch": patch.reshape(b, h, w)}, sys.argv[2])
