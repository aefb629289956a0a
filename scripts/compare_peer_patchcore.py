"""Peer side of scripts/compare_peer_knn.py: anomalib 2.7.0 PatchCore on given feature maps, with its own maps
(runs in the anomalib venv: /tmp/fidelity/anomalib/bin/python scripts/compare_peer_patchcore.py in.pt out.pt).

in.pt: {train: [f1, f2], test: [f1, f2]} (two CNN levels of our backbone, finest first, float32 [N, C, h, w]),
ratio (coreset sampling ratio), seed, library_coreset_loop (default False: patchcore_driver.fit_lean, KCenterGreedy's
projection and first pick with a lean greedy loop; True: the library's loop, which holds ~20 MB per pick here), size (the input side the maps are upsampled to, as PatchcoreModel.forward
does with its input's size); optionally check_images (float [n, 3, H, W] in [0, 1]) to run through anomalib's own
`Patchcore.configure_pre_processor()` (Resize 256, antialias) and with `center_crop_size=(224, 224)`, so the caller
can check its replica of the peer's input. Driven by scripts/fidelity/patchcore_driver.py (shared with peer_knn.py
and bench_peer_patchcore.py). out.pt: image scores [N], maps [N, size, size], coreset and bank sizes, and the
pre-processed check images."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fidelity"))
from patchcore_driver import anomaly_map, build, embed, fit, fit_lean, score  # noqa: E402

inp = torch.load(sys.argv[1])
out: dict = {}
model = build()
with torch.no_grad():
    _, bank = embed(model, inp["train"])
    if inp.get("library_coreset_loop"):
        picks = fit(model, bank, inp["ratio"], inp["seed"]).picks
    else:
        picks = fit_lean(model, bank, inp["ratio"], inp["seed"])["picks"]
    grid_test, queries = embed(model, inp["test"])
    patch, image = score(model, grid_test, queries)
    out.update(image=image, maps=anomaly_map(model, patch, tuple(grid_test.shape[-2:]), (inp["size"], inp["size"])),
               bank=bank.shape[0], coreset=len(picks))
if "check_images" in inp:
    from anomalib.models import Patchcore

    x = inp["check_images"]
    out["pre_default"] = Patchcore.configure_pre_processor().transform(x)
    out["pre_crop"] = Patchcore.configure_pre_processor(center_crop_size=(224, 224)).transform(x)
torch.save(out, sys.argv[2])
