"""Temperature scaling (Guo et al., 2017): one scalar T per branch, fitted on the VALIDATION split.

``p = softmax(logits / T)``. T is fitted by minimising the mean negative log-likelihood over ``log T`` (so T
stays positive) with ``torch.optim.LBFGS``, then clamped to ``[T_MIN, T_MAX]``. Temperature scaling never
changes the argmax, so top-1 is unchanged; it changes how two branches weigh each other when their
probabilities are mixed.
"""
from __future__ import annotations

import numpy as np
import torch

from anomaly_core.errors import DataError

__all__ = ["T_MIN", "T_MAX", "fit_temperature", "softmax_t", "nll"]

T_MIN, T_MAX = 1e-2, 1e2


def _as_logits_labels(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits [N, C] and int64 labels [N], checked."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels).reshape(-1).astype(np.int64))
    if z.ndim != 2 or z.shape[0] != y.shape[0] or z.shape[0] == 0:
        raise DataError(f"temperature: logits {tuple(z.shape)} and labels {tuple(y.shape)} must be [N, C] and [N]")
    if int(y.min()) < 0 or int(y.max()) >= z.shape[1]:
        raise DataError(f"temperature: labels outside [0, {z.shape[1]})")
    if not torch.isfinite(z).all():
        raise DataError("temperature: logits contain NaN or inf")
    return z, y


def nll(logits, labels, T: float) -> float:
    """Mean negative log-likelihood of ``labels`` [N] under ``softmax(logits [N, C] / T)``."""
    z, y = _as_logits_labels(logits, labels)
    return float(torch.nn.functional.cross_entropy(z / T, y))


def fit_temperature(logits, labels, t_min: float = T_MIN, t_max: float = T_MAX, max_iter: int = 100) -> float:
    """Fit T on (logits [N, C], labels [N]) by LBFGS on the NLL in log-space; returns T clamped to [t_min, t_max]."""
    z, y = _as_logits_labels(logits, labels)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # clamp inside the objective too, so a flat NLL (e.g. all logits equal) cannot run off to inf
        loss = torch.nn.functional.cross_entropy(z / log_t.clamp(np.log(t_min), np.log(t_max)).exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return float(min(max(t, t_min), t_max)) if np.isfinite(t) else 1.0


def softmax_t(logits, T: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits [N, C] / T)`` as float64 numpy [N, C]."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    return torch.softmax(z / float(T), dim=-1).numpy()
