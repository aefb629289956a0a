"""kNN bundles as ONNX graphs (`anomaly-core export-onnx`) and their onnxruntime engine (`predict --engine onnx`).

One graph per category, `model_<category>.onnx`: input `images` float32 [B, S, S, 3] (RGB pixel values 0..255,
already resized to the backbone size by `features.load_resized`) -> `score` [B], `map` [B, size, size]. The
graph holds the normalisation, the backbone, the cast to the pipeline's feature dtype and back, the patch
descriptors, the memory bank (a constant), the exact nearest-neighbour distances, the upsampling, the Gaussian
smoothing and the image score: the same operations as the PyTorch engine, so both agree (tests: 1e-3).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from anomaly_core.deploy.bundle import read_card
from anomaly_core.deploy.predict import KnnPredictor
from anomaly_core.errors import DataError

__all__ = ["KnnGraph", "export_bundle", "OnnxPredictor", "onnx_path"]


def onnx_path(bundle: Path, category: str) -> Path:
    return Path(bundle) / f"model_{category}.onnx"


class KnnGraph(nn.Module):
    """The whole kNN scoring of one category as one traceable module (no Python loops over images or chunks)."""

    def __init__(self, predictor: KnnPredictor, category: str):
        super().__init__()
        bb = predictor.backbone
        self.backbone, self.branch, self.cfg = bb, predictor.branch, predictor.cfg
        self.size, self.dtype, self.grid_side = predictor.size, predictor.dtype, predictor.grid_side
        bank = predictor.bank(category).float()  # [M, D]
        self.register_buffer("bank", bank)
        self.register_buffer("bank_sq", (bank * bank).sum(1))  # [M]
        self.register_buffer("mean", torch.tensor(bb.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(bb.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images float [B, S, S, 3] in 0..255 -> (score [B], map [B, size, size])."""
        from anomaly_core.scoring.knn import clip_patches, cnn_patches
        from anomaly_core.scoring.maps import image_score_from_map, to_image_maps

        x = (images.permute(0, 3, 1, 2) / 255.0 - self.mean) / self.std  # [B, 3, S, S]
        levels = [lvl.to(self.dtype).float() for lvl in self.backbone(x)["levels"]]
        cfg = self.cfg
        grid = (clip_patches(levels, self.grid_side) if self.branch == "clip"
                else cnn_patches(levels, cfg.patch_aggregate, cfg.patch_pad))
        b, h, w, d = grid.shape
        q = grid.reshape(b * h * w, d)  # [Q, D]
        d2 = (q * q).sum(1, keepdim=True) + self.bank_sq[None] - 2.0 * q @ self.bank.T  # [Q, M]
        k = min(cfg.k, self.bank.shape[0])
        near, ids = d2.topk(k, dim=1, largest=False)  # [Q, k]
        dist = near.clamp_min(0).sqrt()  # [Q, k]
        maps = to_image_maps(dist.mean(1).reshape(b, h, w), self.size, cfg.sigma, cfg.upsample)
        if cfg.image_score != "reweight":
            return image_score_from_map(maps, cfg.image_score, cfg.top_percent), maps
        return self.reweight(dist[:, 0].reshape(b, h * w), ids[:, 0].reshape(b, h * w), q.reshape(b, h * w, d)), maps

    def reweight(self, patch_d: torch.Tensor, patch_nn: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """PatchCore's image score as `scoring.knn.reweight_scores`, in one traceable graph: [B, P] x 2, [B, P, D] -> [B]."""
        top = patch_d.argmax(1, keepdim=True)  # [B, 1]
        s_star = patch_d.gather(1, top)[:, 0]  # [B]
        n_b = min(self.cfg.reweight_neighbors, self.bank.shape[0])
        if n_b <= 1:
            return s_star
        m_star = self.bank[patch_nn.gather(1, top)[:, 0]]  # [B, D]
        d2 = (m_star * m_star).sum(1, keepdim=True) + self.bank_sq[None] - 2.0 * m_star @ self.bank.T  # [B, M]
        support = d2.topk(n_b, dim=1, largest=False).indices  # [B, n_b]
        q_star = queries.gather(1, top[:, :, None].expand(-1, 1, queries.shape[2]))[:, 0]  # [B, D]
        dist = torch.linalg.vector_norm(q_star[:, None] - self.bank[support], dim=-1)  # [B, n_b]
        return (1.0 - torch.softmax(dist, dim=1)[:, 0]) * s_star


def export_bundle(bundle: str | Path, check: bool = True) -> list[str]:
    """Write `model_<category>.onnx` for every category of a kNN bundle; with `check`, compare onnxruntime with the
    PyTorch engine on a random image. Returns one report line per category."""
    import onnx  # noqa: F401 - the exporter needs it; a clear ImportError otherwise

    bundle = Path(bundle)
    card = read_card(bundle)
    if card["kind"] != "knn":
        raise DataError(f"{bundle}: {card['method']} bundle (kind {card['kind']!r}); export-onnx handles kNN bundles "
                        "only (other methods and the fusion score with `predict --engine torch`)")
    predictor = KnnPredictor(bundle, card)
    lines = []
    for cat in card["categories"]:
        graph = KnnGraph(predictor, cat).eval()
        example = torch.rand(1, predictor.image_size, predictor.image_size, 3) * 255
        path = onnx_path(bundle, cat)
        with torch.no_grad():
            torch.onnx.export(graph, (example,), str(path), input_names=["images"], output_names=["score", "map"],
                              dynamic_axes={"images": {0: "batch"}, "score": {0: "batch"}, "map": {0: "batch"}},
                              opset_version=17, dynamo=False)
        line = f"{path} ({path.stat().st_size / 1e6:.1f} MB)"
        if check:
            ref = graph(example)[0].item()
            got = float(OnnxPredictor(bundle, card).session(cat).run(None, {"images": example.numpy()})[0][0])
            line += f"; onnxruntime vs PyTorch on a random image: |diff| = {abs(got - ref):.2e}"
        lines.append(line)
    return lines


class OnnxPredictor:
    """The onnxruntime engine: same call as `KnnPredictor` (uint8 [B, S, S, 3], category) -> (score [B], maps)."""

    def __init__(self, bundle: str | Path, card: dict | None = None):
        import onnxruntime  # noqa: F401

        self.bundle = Path(bundle)
        self.card = card or read_card(self.bundle)
        if self.card["kind"] != "knn":
            raise DataError(f"{self.bundle}: --engine onnx scores kNN bundles only ({self.card['method']} bundle, "
                            f"kind {self.card['kind']!r}): use --engine torch")
        entry = next(iter(self.card["backbone"].values()))
        self.image_size = int(entry["image_size"])
        self._sessions: dict = {}

    def session(self, category: str):
        import onnxruntime as ort

        if category not in self._sessions:
            path = onnx_path(self.bundle, category)
            if not path.is_file():
                raise DataError(f"{path}: missing; run `anomaly-core export-onnx {self.bundle}` first")
            self._sessions = {category: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])}
        return self._sessions[category]

    transductive = False

    def __call__(self, images: torch.Tensor, category: str, paths=None) -> tuple[torch.Tensor, torch.Tensor]:
        score, maps = self.session(category).run(None, {"images": images.numpy().astype(np.float32)})
        return torch.from_numpy(score), torch.from_numpy(maps)
