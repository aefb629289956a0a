"""anomalib 2.7.0 PatchCore driven on given feature maps (runs in the anomalib venv; shared by peer_knn.py and
scripts/bench_peer_patchcore.py). The backbone is never run (the feature maps are the input), so resnet18 without
weights is only there to build the module."""
import torch

from anomalib.models.components.sampling import KCenterGreedy
from anomalib.models.image.patchcore.torch_model import PatchcoreModel


def build() -> PatchcoreModel:
    return PatchcoreModel(layers=["layer1", "layer2"], backbone="resnet18", pre_trained=False, num_neighbors=9).eval()


def embed(model: PatchcoreModel, levels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two CNN levels (finest first) -> PatchCore's embedding grid [N, D, h, w] and its rows [N*h*w, D]."""
    feats = {name: model.feature_pooler(f) for name, f in zip(model.layers, levels)}
    e = model.generate_embedding(feats)
    return e, model.reshape_embedding(e)


def fit(model: PatchcoreModel, bank: torch.Tensor, ratio: float, seed: int) -> KCenterGreedy:
    """KCenterGreedy (torch seeded) picks the memory bank from the embedding rows; returns the sampler (its
    projection and coreset size) with the picks in `sampler.picks`."""
    torch.manual_seed(seed)
    sampler = KCenterGreedy(embedding=bank, sampling_ratio=ratio)
    sampler.picks = sampler.select_coreset_idxs()
    model.memory_bank = bank[sampler.picks]
    return sampler


def score(model: PatchcoreModel, grid: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour patch scores [N, h*w] and compute_anomaly_score's image scores [N] (num_neighbors 9)."""
    b = grid.shape[0]
    patch, loc = model.nearest_neighbors(embedding=queries, n_neighbors=1)
    patch, loc = patch.reshape(b, -1), loc.reshape(b, -1)
    return patch, model.compute_anomaly_score(patch, loc, queries)


def anomaly_map(model: PatchcoreModel, patch: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """PatchcoreModel.forward's map: patch scores [N, h*w] -> anomaly_map_generator (nearest upsampling to the
    input size, GaussianBlur2d sigma 4) -> [N, H, W]."""
    return model.anomaly_map_generator(patch.reshape(patch.shape[0], 1, *grid), size)[:, 0]
