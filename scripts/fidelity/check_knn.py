"""Patch kNN vs anomalib 2.7.0 PatchCore (models/image/patchcore/torch_model.py, components/sampling/
k_center_greedy.py) on the same two-level feature maps: patch descriptors, coreset size and picks (our greedy loop
on anomalib's own sparse projection from its start index: the projections differ by design), patch scores against
anomalib's coreset bank, PatchCore re-weighted image scores."""
from __future__ import annotations

import torch

from common import Ctx, Row, row, run_peer

SRC = "anomalib 2.7.0 (PyPI) PatchCore"
N_TRAIN, N_TEST, C1, C2, RATIO = 2, 3, 8, 12, 0.1   # 2 x 7 x 7 = 98 bank rows: 9.8 -> int 9 (round: 10)


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def maps(n):
        return [torch.randn(n, C1, 7, 7, generator=g), torch.randn(n, C2, 4, 4, generator=g)]
    return {"train": maps(N_TRAIN), "test": maps(N_TEST), "ratio": RATIO, "seed": seed}


def check(ctx: Ctx) -> list[Row]:
    from anomaly_core.kit.knn import _greedy_picks, _n_select, knn_search, reweight_scores
    from anomaly_core.kit.patches import cnn_patches

    inp = inputs()
    torch.save(inp, ctx.work / "knn_in.pt")
    off = run_peer(ctx, "peer_knn.py", None, ctx.work / "knn_in.pt", ctx.work / "knn_out.pt")
    ctx.save_fixture("knn", {"inputs": inp, "official": off}, note=(
        "made by scripts/fidelity/run.py --only knn --fixtures tests/fixtures/fidelity: seeded feature maps "
        f"(check_knn.inputs, seed 0) through {SRC} (peer_knn.py)"))
    rows: list[Row] = []
    grid_train = cnn_patches(inp["train"], 3, "zeros")   # [N, h, w, D]
    grid_test = cnn_patches(inp["test"], 3, "zeros")
    rows.append(row("knn", SRC, "patch descriptors (3x3 zero-padded mean, bilinear upsampling, concat)",
                    torch.cat([grid_train, grid_test]), torch.cat([off["grid_train"], off["grid_test"]]).permute(0, 2, 3, 1)))
    m = grid_train.shape[0] * grid_train.shape[1] * grid_train.shape[2]
    n_ours = _n_select(m, RATIO)
    rows.append(row("knn", SRC, f"coreset size ({m} rows x {RATIO})", torch.tensor([float(n_ours)]),
                    torch.tensor([float(off["coreset_size"])]), tol=0.0, notes=f"ours {n_ours}, anomalib "
                    f"{off['coreset_size']}"))
    picks = _greedy_picks(off["proj"].float(), int(off["picks"][0]), int(off["coreset_size"]))
    agree = (picks == off["picks"]).float().mean().item()
    rows.append(Row("knn", SRC, "coreset picks (greedy k-center on anomalib's projection and start)",
                    1 - agree, 1 - agree, 0.0, agree == 1.0, f"{agree:.0%} of the picks identical"))
    bank = off["grid_train"].permute(0, 2, 3, 1).reshape(m, -1)[off["picks"]]
    q = grid_test.reshape(N_TEST, -1, grid_test.shape[-1])
    d2, ids = knn_search(q.reshape(-1, q.shape[-1]), bank, 1)
    patch = d2.sqrt().reshape(N_TEST, -1)
    rows.append(row("knn", SRC, "patch scores (nearest coreset row, k=1)", patch, off["patch"]))
    image = reweight_scores(patch, ids.reshape(N_TEST, -1), q, bank, 9)
    rows.append(row("knn", SRC, "re-weighted image scores (b = 9)", image, off["image"],
                    notes="coreset projection: ours Gaussian (knn.coreset_dim, seeded), anomalib's sparse random "
                          "projection (eps 0.9): picks agree given the same projection, differ otherwise"))
    return rows
