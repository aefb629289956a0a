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


def fit_lean(model: PatchcoreModel, bank: torch.Tensor, ratio: float, seed: int) -> dict:
    """`fit` with KCenterGreedy's own projection (its SparseRandomProjection fitted and applied as
    select_coreset_idxs does) and its own first pick (the same torch-seeded draw after the fit), then its greedy rule
    (next pick = the row farthest from the picks so far) in a loop that updates one squared min-distance vector in
    place. The library's loop keeps memory per pick on this torch (RSS 11 GB after 650 of 2,047 picks of a
    20k-row bank), which these machines cannot hold; the picks are the library's up to distance ties (the argmax
    of a squared distance is the argmax of the distance; on a 3,000 x 160 bank at ratio 0.1 all 300 picks equal
    `fit`'s with numpy seeded alike). The projection draws from numpy's global generator (unseeded in anomalib:
    its picks vary run to run), seeded here with `seed` so a run repeats. Returns {picks, coreset_size}."""
    import numpy as np

    np.random.seed(seed)
    torch.manual_seed(seed)
    sampler = KCenterGreedy(embedding=bank, sampling_ratio=ratio)
    sampler.model.fit(bank)
    feats = sampler.model.transform(bank).float()
    idx = int(torch.randint(high=sampler.n_observations, size=(1,)).squeeze())
    sq = (feats * feats).sum(1)
    mind = (sq - 2.0 * (feats @ feats[idx]) + sq[idx]).clamp_min_(0)
    picks = [idx]
    step = torch.empty_like(mind)
    for _ in range(sampler.coreset_size - 1):
        idx = int(mind.argmax())
        picks.append(idx)
        torch.mv(feats, feats[idx], out=step)
        step.mul_(-2.0).add_(sq).add_(sq[idx])
        torch.minimum(mind, step, out=mind)
    model.memory_bank = bank[picks]
    return {"picks": picks, "coreset_size": sampler.coreset_size}


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
