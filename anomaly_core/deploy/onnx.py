"""ONNX graphs of a bundle (`anomaly-core export-onnx`) and their onnxruntime engine (`predict --engine onnx`).

One graph per category, `model_<category>.onnx`: input `images` float32 [B, S, S, 3] (RGB pixel values 0..255,
already resized to the backbone size by `features.load_resized`) -> `score` [B], `map` [B, size, size]. The graph
is the method's own (`onnx_graph(engine, category)` in its deploy module: the kNN's holds the normalisation, the
backbone, the cast to the feature dtype and back, the patch descriptors, the bank as a constant and the pipeline's
`kit.knn.score_patches`), so both engines agree (tests: 1e-3). A method without one is refused in one line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from anomaly_core.deploy.bundle import read_card
from anomaly_core.deploy.engines import deploy_module, load_predictor
from anomaly_core.errors import DataError
from anomaly_core.io import atomic_path

__all__ = ["export_bundle", "OnnxPredictor", "onnx_path"]


def onnx_path(bundle: Path, category: str) -> Path:
    return Path(bundle) / f"model_{category}.onnx"


def graph_factory(bundle: Path, card: dict, what: str):
    """The method's `onnx_graph`, or a DataError naming the bundle when its kind has none."""
    factory = None if card.get("kind") == "fusion" else getattr(deploy_module(card["method"]), "onnx_graph", None)
    if factory is None:
        raise DataError(f"{bundle}: {card['method']} bundle (kind {card['kind']!r}); {what} handles kNN bundles "
                        "only (other methods and the fusion score with `predict --engine torch`)")
    return factory


def export_bundle(bundle: str | Path, check: bool = True) -> list[str]:
    """Write `model_<category>.onnx` for every category of a bundle whose method has an ONNX graph; with `check`,
    compare onnxruntime with the PyTorch engine on a random image. Returns one report line per category."""
    import onnx  # the exporter needs it; a clear ImportError otherwise

    bundle = Path(bundle)
    card = read_card(bundle)
    factory = graph_factory(bundle, card, "export-onnx")
    engine = load_predictor(bundle, card)
    lines = []
    for cat in card["categories"]:
        graph = factory(engine, cat).eval()
        example = torch.rand(1, engine.image_size, engine.image_size, 3) * 255
        path = onnx_path(bundle, cat)
        with atomic_path(path, ".tmp") as tmp:  # a killed export leaves a hidden temporary, never a truncated graph
            with torch.no_grad():
                torch.onnx.export(graph, (example,), str(tmp), input_names=["images"], output_names=["score", "map"],
                                  dynamic_axes={"images": {0: "batch"}, "score": {0: "batch"}, "map": {0: "batch"}},
                                  opset_version=17, dynamo=False)
            onnx.checker.check_model(str(tmp))  # complete and well-formed before it takes the model's name
        line = f"{path} ({path.stat().st_size / 1e6:.1f} MB)"
        if check:
            with torch.no_grad():
                ref = graph(example)[0].item()
            got = float(OnnxPredictor(bundle, card).session(cat).run(None, {"images": example.numpy()})[0][0])
            line += f"; onnxruntime vs PyTorch on a random image: |diff| = {abs(got - ref):.2e}"
        lines.append(line)
    return lines


class OnnxPredictor:
    """The onnxruntime engine: same call as the PyTorch engine (uint8 [B, S, S, 3], category) -> (score [B], maps)."""

    transductive = False

    def __init__(self, bundle: str | Path, card: dict | None = None):
        import onnxruntime  # noqa: F401

        self.bundle = Path(bundle)
        self.card = card or read_card(self.bundle)
        graph_factory(self.bundle, self.card, "--engine onnx")
        entry = next(iter(self.card["backbone"].values()))
        self.image_size = int(entry["image_size"])
        self._sessions: dict = {}

    def session(self, category: str):
        import onnxruntime as ort

        if category not in self._sessions:
            path = onnx_path(self.bundle, category)
            if not path.is_file():
                raise DataError(f"{path}: missing; run `anomaly-core export-onnx {self.bundle}` first")
            try:
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a truncated graph
                raise DataError(f"{path}: not a loadable ONNX graph ({str(exc).splitlines()[0][:120]}); "
                                f"re-run `anomaly-core export-onnx {self.bundle}`") from exc
            self._sessions = {category: session}
        return self._sessions[category]

    def __call__(self, images: torch.Tensor, category: str, paths=None) -> tuple[torch.Tensor, torch.Tensor]:
        score, maps = self.session(category).run(None, {"images": images.numpy().astype(np.float32)})
        return torch.from_numpy(score), torch.from_numpy(maps)
