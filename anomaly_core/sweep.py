"""Spread a shots x seeds sweep over machines sharing one Git remote and one DVC remote (`anomaly-core sweep`):
each machine queues and runs its slice (`dvc exp run --queue` + `--run-all`), pushes the experiments and the
run-cache; `sweep pull` fetches every machine's experiments for `anomaly-core collect`.

    anomaly-core sweep run --machine 0 --machines 2 --shots 1,2,5 --seeds 0,1,2 --git-remote origin
    anomaly-core sweep pull --git-remote origin
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Sequence

from anomaly_core.experiments import dvc_command

__all__ = ["csv_list", "sweep_grid", "machine_slice", "exp_name", "sweep_run_commands", "sweep_pull_commands",
           "run_commands"]


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def sweep_grid(shots: Sequence[str], seeds: Sequence[str], sets: Sequence[str] = ()) -> list[dict[str, str]]:
    """The shots x seeds grid (shots outer, seeds inner, as given) as `-S` overrides {key: value}; `sets`
    ("key=value") are added to every point. ValueError on an empty axis or a malformed set."""
    if not shots or not seeds:
        raise ValueError("the grid needs at least one shots value and one seed")
    extra = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        extra[key] = value
    return [{"shots": str(k), "seed": str(s), **extra} for k in shots for s in seeds]


def machine_slice(grid: Sequence[dict], machine: int, machines: int) -> list[dict]:
    """Points machine `machine` (0-based) of `machines` runs: every machines-th point, so the slices are
    disjoint and cover the grid."""
    if machines < 1 or not 0 <= machine < machines:
        raise ValueError(f"--machine {machine} --machines {machines}: need 0 <= machine < machines")
    return list(grid[machine::machines])


def exp_name(point: dict[str, str], prefix: str = "") -> str:
    """Experiment name of a grid point, e.g. `s5-seed1` (a valid Git ref name, unique within the grid)."""
    return f"{prefix}s{point['shots']}-seed{point['seed']}"


def sweep_run_commands(points: Sequence[dict], git_remote: str | None, jobs: int = 1, prefix: str = "",
                       dvc_remote: str | None = None) -> list[list[str]]:
    """DVC commands that queue `points`, run the queue (waits), and when `git_remote` is given push the
    experiments (Git refs + their DVC cache + run-cache) and the run-cache of the workspace to the remotes."""
    dvc = dvc_command()
    cmds = []
    for p in points:
        cmds.append(dvc + ["exp", "run", "--queue", "-n", exp_name(p, prefix)]
                    + [a for k, v in p.items() for a in ("-S", f"{k}={v}")])
    cmds.append(dvc + ["exp", "run", "--run-all", "--jobs", str(jobs)])
    if git_remote:
        remote = ["-r", dvc_remote] if dvc_remote else []
        cmds.append(dvc + ["exp", "push", "--run-cache", *remote, git_remote] + [exp_name(p, prefix) for p in points])
        cmds.append(dvc + ["push", "--run-cache", *remote])
    return cmds


def sweep_pull_commands(git_remote: str, with_data: bool = False, dvc_remote: str | None = None) -> list[list[str]]:
    """DVC commands that fetch every experiment of the current commit from `git_remote` (their metrics live in
    the experiment commits, enough for `collect`), and with `with_data` the cached outputs + run-cache too."""
    dvc = dvc_command()
    remote = ["-r", dvc_remote] if dvc_remote else []
    cmds = [dvc + ["exp", "pull", "--no-cache", git_remote]] if not with_data else [
        dvc + ["exp", "pull", "--run-cache", *remote, git_remote], dvc + ["pull", "--run-cache", *remote]]
    return cmds


def run_commands(cmds: list[list[str]], cwd: Path, dry_run: bool, echo: Callable[[str], None] = print) -> None:
    """Run `cmds` in `cwd` one after the other (each echoed as `$ dvc ...`); the first failure raises RuntimeError
    naming the command and its exit code (with `dry_run`, only echo)."""
    for cmd in cmds:
        shown = " ".join(["dvc"] + cmd[len(dvc_command()):])
        echo(f"$ {shown}")
        if dry_run:
            continue
        proc = subprocess.run(cmd, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"`{shown}` failed (exit {proc.returncode})")
