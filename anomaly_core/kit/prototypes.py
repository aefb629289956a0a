"""Class centroids of normalised embeddings and the cosine / temperature classifier over them: the image
prototypes of method `image_prototype` and the few-shot classification task's prototype branch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from anomaly_core.errors import DataError

__all__ = ["centroid", "class_centroids", "classify"]


def centroid(emb: torch.Tensor) -> torch.Tensor:
    """[N, E] -> unit [E]: the normalised mean of the normalised embeddings."""
    return F.normalize(F.normalize(emb.float(), dim=-1).mean(0), dim=-1)


def class_centroids(emb: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """emb [N, E], labels [N] in [0, C) -> unit centroids [C, E]; a class without samples raises DataError."""
    counts = torch.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        raise DataError(f"class_centroids: classes {torch.nonzero(counts == 0).flatten().tolist()} have no shots")
    sums = torch.zeros(n_classes, emb.shape[1]).index_add_(0, labels, F.normalize(emb.float(), dim=-1))
    return F.normalize(sums, dim=-1)


def classify(emb: torch.Tensor, centroids: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """emb [N, E], centroids [C, E] -> probabilities [N, C] = softmax(cos / temperature)."""
    sims = F.normalize(emb.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).T
    return (sims / temperature).softmax(-1)
