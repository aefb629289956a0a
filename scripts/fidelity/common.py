"""Shared pieces of the fidelity harness: result rows, tensor comparison, running a peer in its own venv.

The peer side (official code) runs as a subprocess with the peer venv's python and the official checkout on its
sys.path; both sides exchange tensors through .pt files (inputs and seeded random weights written once here)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    method: str
    source: str            # official source + commit
    compared: str          # what was compared
    max_abs: float | None = None
    max_rel: float | None = None
    tol: float = 1e-4      # relative tolerance
    passed: bool | None = None   # None: not compared
    notes: str = ""


@dataclass
class Ctx:
    work: Path                      # scratch dir for exchanged files
    peer_python: str                # the peer venv's python
    repos: dict[str, Path] = field(default_factory=dict)   # name -> checkout (work tree)
    fixtures: Path | None = None    # if set: checks save the official outputs there (tests/fixtures/fidelity/)

    def save_fixture(self, name: str, data: dict, note: str) -> None:
        """Small official reference tensors for the regression tests (with a note of how they were made)."""
        if self.fixtures is None:
            return
        self.fixtures.mkdir(parents=True, exist_ok=True)
        tmp = self.fixtures / f"{name}.pt.tmp"
        torch.save({"note": note, **data}, tmp)
        tmp.replace(self.fixtures / f"{name}.pt")


def diff(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(max abs diff, max rel diff = max |a-b| / max(max |b|, 1e-12)) of two same-shape tensors."""
    a = torch.as_tensor(ours).double().flatten()
    b = torch.as_tensor(theirs).double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: ours {tuple(a.shape)} vs official {tuple(b.shape)}")
    d = (a - b).abs().max().item() if a.numel() else 0.0
    return d, d / max(b.abs().max().item(), 1e-12)


def row(method: str, source: str, compared: str, ours, theirs, tol: float = 1e-4, notes: str = "") -> Row:
    a, r = diff(ours, theirs)
    return Row(method, source, compared, a, r, tol, r <= tol, notes)


def git_commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def run_peer(ctx: Ctx, script: str, repo: Path | None, inp: Path, out: Path, timeout: int = 1800) -> dict:
    """Run scripts/fidelity/<script> in the peer venv (official checkout on PYTHONPATH): inp .pt -> out .pt."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if repo is not None:
        env["PYTHONPATH"] = str(repo)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [ctx.peer_python, str(HERE / script), str(inp), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"peer {script} failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-5:]}")
    return torch.load(out, weights_only=False)


def this_python() -> str:
    return sys.executable
