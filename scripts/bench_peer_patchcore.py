"""Peer side of the scale benchmark: anomalib 2.7.0 PatchCore fit + test timed on given feature maps (anomalib venv).

    /tmp/fidelity/anomalib/bin/python scripts/bench_peer_patchcore.py in.pt out.pt

in.pt: {train: [f1, f2], test: [f1, f2]} (two CNN levels of the same backbone and weights as ours, finest first,
float32 [N, C, h, w]), ratio (coreset sampling ratio), seed. The model is driven by scripts/fidelity/patchcore_driver.py, shared
with peer_knn.py (feature_pooler + generate_embedding + reshape_embedding, KCenterGreedy, nearest neighbours,
compute_anomaly_score with num_neighbors 9); the backbone forward is not run here (the caller times ours, the same
network). out.pt: fit seconds (embedding + coreset), test seconds (embedding + search + image score), bank sizes,
image scores [N_test], patch score maps [N_test, h, w]."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fidelity"))
from patchcore_driver import build, embed, fit, score  # noqa: E402

inp = torch.load(sys.argv[1])
model = build()
with torch.no_grad():
    t0 = time.perf_counter()
    _, bank = embed(model, inp["train"])
    picks = fit(model, bank, inp["ratio"], inp["seed"]).picks
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid_test, queries = embed(model, inp["test"])
    b, _, h, w = grid_test.shape
    patch, image = score(model, grid_test, queries)
    t_test = time.perf_counter() - t0
torch.save({"fit_seconds": t_fit, "test_seconds": t_test, "bank": bank.shape[0], "coreset": len(picks),
            "image": image, "patch": patch.reshape(b, h, w)}, sys.argv[2])
