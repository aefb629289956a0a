"""Peer side of the AnomalyDINO check: dammsi/AnomalyDINO (runs in the anomalib venv with the checkout on PYTHONPATH).

Reads {ref [R, P, D], test [T, P, D] DINO patch tokens (the same tokens our side scores), grid (h, w), size}. Runs
AnomalyDINO's own pieces from src/backbones.py, src/post_eval.py and src/utils.py: DINOv2Wrapper.compute_background_mask
(PCA first component > 10, centre check, dilate / close; threshold 10, masking_type True), then the zero-/few-shot
scoring of src/detection.run_anomaly_detection with knn_metric 'L2_normalized', k 1: faiss.normalize_L2, the squared
L2 search of IndexFlatL2 (faiss is not in the peer venv: the exact search is torch's, squared distances as faiss
returns them), distances / 2, mean_top1p image score, dists2map map. The DINOv2 hub model is never loaded (the tokens
are the input), so the wrapper is created without load_model."""
import sys

import numpy as np
import torch

from src.backbones import DINOv2Wrapper
from src.post_eval import mean_top1p
from src.utils import dists2map

inp = torch.load(sys.argv[1])
wrapper = DINOv2Wrapper.__new__(DINOv2Wrapper)  # compute_background_mask uses no model state
grid, size = tuple(inp["grid"]), inp["size"]
ref = [t.numpy().astype(np.float32) for t in inp["ref"]]
test = [t.numpy().astype(np.float32) for t in inp["test"]]
out = {"mask_ref": [], "mask_test": [], "patch": {}, "image": {}, "map": {}}
for f in ref:
    out["mask_ref"].append(torch.from_numpy(wrapper.compute_background_mask(f, grid, threshold=10, masking_type=True)))
for f in test:
    out["mask_test"].append(torch.from_numpy(wrapper.compute_background_mask(f, grid, threshold=10, masking_type=True)))


def normalize_l2(x):  # faiss.normalize_L2 (in place there)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


for masking in (False, True):
    bank = np.concatenate([f[m.numpy()] if masking else f for f, m in zip(ref, out["mask_ref"])]).astype("float32")
    bank = normalize_l2(bank)
    patches, images, maps = [], [], []
    for f, m in zip(test, out["mask_test"]):
        mask2 = m.numpy() if masking else np.ones(f.shape[0], dtype=bool)
        q = normalize_l2(f[mask2])
        d2 = torch.cdist(torch.from_numpy(q).double(), torch.from_numpy(bank).double()).pow(2).min(1).values
        distances = (d2.float().numpy() / 2)[:, None]
        output_distances = np.zeros_like(mask2, dtype=float)
        output_distances[mask2] = distances.squeeze()
        d_masked = output_distances.reshape(grid)
        patches.append(torch.from_numpy(output_distances))
        images.append(float(mean_top1p(output_distances.flatten())))
        maps.append(torch.from_numpy(dists2map(d_masked, (size, size))))
    key = "masked" if masking else "unmasked"
    out["patch"][key], out["image"][key], out["map"][key] = torch.stack(patches), torch.tensor(images), torch.stack(maps)
torch.save(out, sys.argv[2])
