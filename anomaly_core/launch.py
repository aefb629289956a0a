"""Launch a stage script with one or several processes: the DVC `cmd` of a data-parallel stage.

    PYTHONPATH=. python -m anomaly_core.launch --nproc ${dist.nproc} stages/train_image_adapter.py --out ...

With --nproc 1 it execs plain `python script args` (today's path, no process group); with N > 1 it execs
`torchrun --standalone --nproc-per-node N script args` (one machine, N processes: one per GPU on CUDA machines,
N CPU processes with gloo otherwise). The script calls anomaly_core.distributed.init().
"""
from __future__ import annotations

import os
import sys

__all__ = ["command", "main"]


def command(nproc: int, script: str, args: list[str], python: str = sys.executable) -> list[str]:
    """The argv that runs `script args` with `nproc` processes (ValueError when nproc < 1)."""
    if nproc < 1:
        raise ValueError(f"dist.nproc={nproc}: must be >= 1")
    if nproc == 1:
        return [python, script, *args]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *args]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m anomaly_core.launch --nproc N script.py [args...]"
    if len(argv) < 3 or argv[0] != "--nproc":
        print(usage, file=sys.stderr)
        raise SystemExit(2)
    try:
        cmd = command(int(argv[1]), argv[2], argv[3:])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
