"""Device-ready checks: the real-size paths CPU tests cannot run (see scripts/device_check.sh).

    python scripts/device_check.py            # every check; one line each: passed / failed / skipped (reason)
    DEVICE_CHECK_TINY=1 python scripts/device_check.py   # tiny sizes (the repo's tiny CLIP, small banks): CI

Each check runs in its own process (a crash or OOM fails that check only); the line gives its seconds and peak
memory (CUDA max allocated on a GPU, else the child's peak resident set). Exit 1 if any check failed."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = os.environ.get("DEVICE_CHECK_TINY", "") not in ("", "0")
CHECKS = ["clip_features", "aaclip_stage2_amp", "ddp_nccl", "benchmark_knn"]


def _cuda() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _peak(torch) -> None:
    mb = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print(f"PEAK {mb:.0f}")


def _images(n: int, size: int):
    import numpy as np
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)


def check_clip_features(gpus: int) -> str | None:
    """ViT-L-14-336 (random weights) at 518 px through the features stage's encoder."""
    if not gpus and not TINY:
        return "skip: no CUDA GPU (ViT-L-14-336 at 518 px takes minutes per image batch on CPU)"
    import torch
    from anomaly_core.backbones import create_backbone
    from anomaly_core.features import encode_batch
    name, size, levels = ("anomaly-core-tiny-clip", 224, [1, 2, 3, 4]) if TINY else ("ViT-L-14-336", 518, [6, 12, 18, 24])
    dev = torch.device("cuda" if gpus else "cpu")
    bb = create_backbone(name, "random", levels, size).to(dev)
    out = encode_batch(bb, torch.from_numpy(_images(4, size)).to(dev), torch.float16)
    grid = size // bb.patch_size if hasattr(bb, "patch_size") else None
    assert len([k for k in out if k.startswith("level_")]) == len(levels), list(out)
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    _peak(torch)
    return None if grid is None else f"grid {grid}"


def check_aaclip_stage2_amp(gpus: int) -> str | None:
    """One AA-CLIP stage-2 epoch (autocast + GradScaler on CUDA) on synthetic defect images."""
    if not gpus and not TINY:
        return "skip: no CUDA GPU (AMP autocast runs on CUDA only; ViT-L-14-336 stage 2 is GPU-sized)"
    import numpy as np
    import torch
    from anomaly_core.backbones import create_backbone
    from anomaly_core.methods.aaclip import api as A
    name, size, levels = ("anomaly-core-tiny-clip", 224, [1, 2, 3, 4]) if TINY else ("ViT-L-14-336", 518, [6, 12, 18, 24])
    dev = torch.device("cuda" if gpus else "cpu")
    torch.manual_seed(0)
    bb = create_backbone(name, "random", levels, size).to(dev)
    imgs = _images(4, size)
    masks = np.zeros((4, size // 4, size // 4), np.float32)
    masks[:2, 10:20, 10:20] = 1
    imgs[:2, 40:80, 40:80] = 255
    train = (torch.from_numpy(imgs), torch.from_numpy(masks), torch.tensor([1, 1, 0, 0]), ["metal_nut"] * 4)
    with torch.no_grad():
        anchors = {"metal_nut": A.class_anchors(bb, None, ["metal_nut"])[0]}
    cfg = A.ImageAdapterConfig(epochs=1, batch_size=2, accum_steps=1, lr=1e-3, adapt_until=len(levels) // 2,
                               image_size=size)
    _, history = A.train_image_adapters(bb, anchors, train, None, cfg, progress=False)
    assert np.isfinite(history[-1]["loss"]), history[-1]
    _peak(torch)
    return f"loss {history[-1]['loss']:.4f}" + ("" if gpus else " (CPU: no autocast)")


DDP_STEP = """
import os, torch, torch.distributed as dist
dist.init_process_group("nccl")
r = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(r)
torch.manual_seed(0)
m = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 8).cuda(), device_ids=[r])
opt = torch.optim.SGD(m.parameters(), lr=0.1)
torch.manual_seed(1 + r)
m(torch.randn(16, 64, device="cuda")).square().mean().backward(); opt.step()
w = m.module.weight.detach().clone(); ws = [torch.empty_like(w) for _ in range(dist.get_world_size())]
dist.all_gather(ws, w); assert all(torch.equal(w, x) for x in ws), "replicas differ after one DDP step"
dist.destroy_process_group()
"""


def check_ddp_nccl(gpus: int) -> str | None:
    """One DDP step with NCCL over every GPU present (replicas equal after it)."""
    if not gpus:
        return "skip: no CUDA GPU (NCCL needs GPUs; the gloo CPU path is covered by tests/test_distributed.py)"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                    str(_write_tmp(DDP_STEP))], check=True)
    return f"{gpus} GPU(s)"


def _write_tmp(code: str) -> Path:
    import tempfile
    f = Path(tempfile.mkdtemp()) / "ddp_step.py"
    f.write_text(code)
    return f


def check_benchmark_knn(gpus: int) -> str | None:
    """scripts/benchmark.py --knn-only (tiny: one 2k bank, 1 query image, 2k-row coreset)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--knn-only"]
    if TINY:
        cmd += ["--banks", "2000", "--queries", "1", "--coreset-bank", "2000"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"PEAK {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f}")
    return None


def run_one(name: str) -> int:
    if f"check_{name}" not in globals():
        raise SystemExit(f"unknown check '{name}' (known: {', '.join(CHECKS)})")
    gpus = _cuda()
    note = globals()[f"check_{name}"](gpus)
    if note and note.startswith("skip:"):
        print(f"SKIP {note[5:].strip()}")
    elif note:
        print(f"NOTE {note}")
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        return run_one(sys.argv[2])
    only = sys.argv[1:] or CHECKS
    failed = 0
    print(f"device_check: {'tiny sizes (DEVICE_CHECK_TINY)' if TINY else 'real sizes'}", flush=True)
    for name in only:
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        sec = time.time() - t0
        lines = r.stdout.splitlines()
        peak = next((l.split()[1] + " MB" for l in lines if l.startswith("PEAK ")), "—")
        skip = next((l[5:] for l in lines if l.startswith("SKIP ")), None)
        note = next((l[5:] for l in lines if l.startswith("NOTE ")), "")
        if r.returncode != 0:
            failed += 1
            err = (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
            print(f"{name:20s} failed   {sec:7.1f} s  peak {peak:>9s}  {err}", flush=True)
        elif skip:
            print(f"{name:20s} skipped  {sec:7.1f} s  peak {'—':>9s}  {skip}", flush=True)
        else:
            print(f"{name:20s} passed   {sec:7.1f} s  peak {peak:>9s}  {note}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
