"""Peer side of the patch-kNN check: anomalib 2.7.0 PatchCore (runs in the anomalib venv).

Reads {train: [f1, f2], test: [f1, f2]} feature maps (two CNN levels, finest first), ratio, seed; runs
PatchcoreModel's feature_pooler + generate_embedding + reshape_embedding, KCenterGreedy (torch seeded), the
nearest-neighbour patch scores and compute_anomaly_score (num_neighbors 9): patchcore_driver.py."""
import sys

import torch

from patchcore_driver import build, embed, fit, score

inp = torch.load(sys.argv[1])
model = build()
with torch.no_grad():
    grid_train, bank = embed(model, inp["train"])
    grid_test, queries = embed(model, inp["test"])
    sampler = fit(model, bank, inp["ratio"], inp["seed"])
    patch, image = score(model, grid_test, queries)
torch.save({"grid_train": grid_train, "grid_test": grid_test, "proj": sampler.features,
            "picks": torch.tensor(sampler.picks), "coreset_size": sampler.coreset_size, "patch": patch,
            "image": image}, sys.argv[2])
