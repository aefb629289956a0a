"""scripts/device_check.sh in CPU mode: GPU-only checks are skipped with a reason, a failing check fails the run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.sh"


def _run(*checks: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_CHECK_TINY": ""}
    return subprocess.run(["bash", str(SCRIPT), *checks], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode only")
def test_cpu_mode_skips_gpu_only_checks_with_a_reason():
    r = _run("clip_features", "aaclip_stage2_amp", "ddp_nccl")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [l for l in r.stdout.splitlines() if l and not l.startswith("device_check:")]
    assert [l.split()[:2] for l in lines] == [[c, "skipped"] for c in ("clip_features", "aaclip_stage2_amp",
                                                                         "ddp_nccl")]
    assert all("no CUDA GPU" in l and " s " in l for l in lines)


def test_a_failing_check_exits_non_zero_and_says_which():
    r = _run("no_such_check")
    assert r.returncode == 1
    assert "no_such_check" in r.stdout and "failed" in r.stdout and "unknown check" in r.stdout
