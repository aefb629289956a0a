"""Run one DVC stage command and append its wall seconds and peak RSS to $BENCH_METER_LOG (one JSON line).

    PYTHONPATH=. python scripts/stage_meter.py stages/score.py --method knn --config ...   # = python stages/...

Used by scripts/bench_scale.py in its temporary copy of the project (its dvc.yaml commands are prefixed with this
script; the project's own dvc.yaml never is). Standard library only, so it adds no import time to the stage. The
peak RSS is the kernel's ru_maxrss of the stage process from wait4 (the largest of it and its waited-for children,
e.g. the torchrun workers of a data-parallel stage). The label is the stage's name as DVC spells it: the script
name, with `@<method>` for the per-method stages (fit@knn, score@knn)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def label(argv: list[str]) -> str:
    script = next((a for a in argv if a.endswith(".py")), argv[0])
    name = os.path.splitext(os.path.basename(script))[0]
    if "--method" in argv:
        name += "@" + argv[argv.index("--method") + 1]
    return name


def main() -> int:
    argv = sys.argv[1:]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv])
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    log = os.environ.get("BENCH_METER_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"stage": label(argv), "seconds": round(seconds, 3),
                                 "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "exit": code}) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
