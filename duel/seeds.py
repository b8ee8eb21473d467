"""Seed studies: how much of the duel's result is chance. `queue` runs the current params N times as DVC
experiments that differ in one seed only; `report` sets the gap between the models against the seed-to-seed spread.

    python -m duel.seeds queue 5 --vary train --jobs 2   # seeds.train = 1..5 of the current params, 2 at a time
    python -m duel.seeds report --vary train              # studies/seeds-train/: report.md, runs.csv, accuracy.png

`make seeds N=5 VARY=train JOBS=2` does both. --vary names the seed (params.yaml, section seeds): data (which reviews
are drawn), train (LoRA init, order, dropout) or weights (random base weights). Without --jobs the experiments stay
queued for `dvc queue start -j K`. Further `-S key=value` arguments go to every queued `dvc exp run`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from duel.compare import experiments, flat
from duel.errors import DuelError
from duel.statistics import mean_interval, wilson_interval

SEEDS = ("data", "train", "weights")
METRICS = ("accuracy", "f1", "roc_auc")


def experiment_name(vary: str, value: int) -> str:
    return f"seed-{vary}{value}"


def dvc(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if done.returncode:
        raise DuelError(f"dvc {' '.join(args)} failed: {(done.stderr.strip().splitlines() or [''])[-1]}")
    return done.stdout


def queue(count: int, vary: str, jobs: int | None, extra: list[str]) -> None:
    """Queue seeds.<vary> = 1..count of the workspace's params (an earlier study's runs of those names replaced)."""
    names = [experiment_name(vary, value) for value in range(1, count + 1)]
    subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", "-q", *names], capture_output=True)
    for value, name in zip(range(1, count + 1), names, strict=True):
        dvc(["exp", "run", "--queue", "-n", name, "-S", f"seeds.{vary}={value}", *extra])
        print(f"seeds: queued {name} (seeds.{vary}={value})")
    if jobs:
        run_queue(names, jobs)


def run_queue(names: list[str], jobs: int) -> None:
    """`dvc queue start -j jobs`, then wait for the experiments. Its workers are daemons that inherit its stdout and
    stderr: a pipe to them would stay open until the last worker ends (DVC's first worker may stay up after the
    queue is done: its monitor logs "shutting down due to empty queue" and it goes on polling), so they go to a
    file. The workers' OpenMP threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE, unless set): spinning, they
    take the cores the other jobs' threads need (2 jobs of the demo's study on 2 cores: 2:46-2:54 spinning, 1:43
    passive)."""
    env = {"OMP_WAIT_POLICY": "PASSIVE"} | dict(os.environ)
    with tempfile.TemporaryFile() as errors:
        command = [sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)]
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=errors, env=env)
        if done.returncode:
            errors.seek(0)
            raise DuelError(f"dvc queue start failed: {(errors.read().decode().strip().splitlines() or [''])[-1]}")
    wait(names)


def wait(names: list[str]) -> None:
    """Until no experiment is queued or running; then name the ones that failed."""
    while True:
        status = dvc(["queue", "status"])
        rows = [line.split() for line in status.splitlines()]
        states = {row[1]: row[-1] for row in rows if len(row) > 2 and row[1] in names}
        busy = sum(state in ("Queued", "Running") for state in states.values())
        if not busy:
            break
        print(f"seeds: {len(names) - busy} of {len(names)} done", flush=True)
        time.sleep(10)
    failed = [name for name, state in states.items() if state == "Failed"]
    if failed:
        raise DuelError(f"seeds: {', '.join(failed)} failed; see dvc queue logs {failed[0]}")


def study(shown: list[dict[str, Any]], vary: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per finished experiment of the study (seed, model, accuracy, f1, roc_auc, test reviews), and the
    params they share. Runs whose params differ in anything but seeds.<vary> are refused: they are not one study."""
    pattern = re.compile(rf"seed-{vary}\d+")
    runs = [(name, data) for name, data in experiments(shown) if pattern.fullmatch(name)]
    if not runs:
        raise DuelError(f"seeds: no finished experiment named seed-{vary}<n>; run python -m duel.seeds queue first")
    params = {name: flat(data["params"]["params.yaml"]["data"]) for name, data in runs}
    first = next(iter(params.values()))
    for name, values in params.items():
        differ = sorted(k for k in set(first) | set(values) if k != f"seeds.{vary}" and first.get(k) != values.get(k))
        if differ:
            raise DuelError(
                f"seeds: {name} differs from the study's other runs in {', '.join(differ[:3])}; remove it "
                f"(dvc exp remove {name}) or queue the study again"
            )
    rows = []
    for name, data in runs:
        metrics = data["metrics"]["metrics/evaluate.json"]["data"]
        test = data["metrics"]["metrics/data.json"]["data"]["reviews"]["test"]["count"]
        for key, values in metrics.items():
            seed = params[name][f"seeds.{vary}"]
            rows.append({"seed": seed, "model": key, **{m: values.get(m) for m in METRICS}, "test_reviews": test})
    frame = pd.DataFrame(rows).sort_values("seed", kind="stable").reset_index(drop=True)  # models in params order
    return frame, first


def pp(share: float) -> str:
    return f"{100 * share:+.1f}" if np.isfinite(share) else "-"


def study_markdown(frame: pd.DataFrame, shared: dict[str, Any], vary: str) -> str:
    keys = list(dict.fromkeys(frame["model"]))
    wide = frame.pivot(index="seed", columns="model", values=list(METRICS))
    seeds = wide.index.tolist()
    lines = [f"# Seed study: seeds.{vary}", ""]
    random = [k for k in keys if shared.get(f"models.{k}.init") == "random"]
    if random:
        lines += [
            f"> **Warning: {', '.join(random)} had random weights** (`init: random`): the spread below is that of "
            "this setup, not of the real models.",
            "",
        ]
    tests = int(frame["test_reviews"].iloc[0])
    lines += [
        f"{len(seeds)} runs of the same params that differ in `seeds.{vary}` only ({', '.join(map(str, seeds))}), "
        f"each scored on {tests} test reviews. Intervals are 95%: Student's t over the seeds for a mean.",
        "",
        "| seed | " + " | ".join(f"{k} accuracy | {k} F1" for k in keys) + " |",
        "| --- | " + " | ".join("---: | ---:" for _ in keys) + " |",
    ]
    for seed in seeds:
        cells = [f"{wide.loc[seed, ('accuracy', k)]:.3f} | {wide.loc[seed, ('f1', k)]:.3f}" for k in keys]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", "| model | accuracy: mean [95% interval] | sd over seeds | min-max | F1: mean | sd |"]
    lines.append("| --- | --- | ---: | --- | ---: | ---: |")
    for k in keys:
        acc, f1 = wide[("accuracy", k)].to_numpy(float), wide[("f1", k)].to_numpy(float)
        mean, low, high = mean_interval(acc)
        lines.append(
            f"| {k} | {mean:.3f} [{low:.3f}, {high:.3f}] | {sd(acc):.3f} | {acc.min():.3f}-{acc.max():.3f} | "
            f"{f1.mean():.3f} | {sd(f1):.3f} |"
        )
    if len(keys) == 2:
        lines += ["", *gap_lines(wide, keys, tests, vary)]
    return "\n".join(lines) + "\n"


def sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def gap_lines(wide: pd.DataFrame, keys: list[str], tests: int, vary: str) -> list[str]:
    """The between-model gap, seed by seed (the same seed for both: paired), against the seed-to-seed spread."""
    first, second = keys
    gap = (wide[("accuracy", second)] - wide[("accuracy", first)]).to_numpy(float)
    mean, low, high = mean_interval(gap)
    typical = float(wide["accuracy"].stack().mean())
    wilson = wilson_interval(round(typical * tests), tests)
    within = (wilson[1] - wilson[0]) / 2
    spread = np.nanmean([sd(wide[("accuracy", k)].to_numpy(float)) for k in keys])
    lines = [
        f"Gap ({second} minus {first}, accuracy): {pp(mean)} points on average over {len(gap)} seeds; per seed "
        f"{', '.join(pp(g) for g in gap)}.",
        f"Seed-to-seed spread of one model's accuracy: {pp(spread)} points (sd, mean over the models); the test "
        f"sample alone moves one run's accuracy by about ±{100 * within:.1f} points (half a 95% Wilson interval at "
        f"{tests} reviews).",
    ]
    if not np.isfinite(low):
        return [*lines, "One seed: the spread cannot be estimated; queue at least two (three or more to conclude)."]
    verdict = (
        f"excludes zero: over these seeds {second if mean > 0 else first} is ahead by more than seeds.{vary} moves it"
        if low > 0 or high < 0
        else "includes zero: these seeds cannot tell the two models apart"
    )
    return [*lines, f"The 95% interval of the mean gap is [{pp(low)}, {pp(high)}] points, which {verdict}."]


def study_figure(frame: pd.DataFrame, vary: str, path: Path) -> None:
    """Accuracy per seed (dots) and its mean (bar) per model, on a 0-1 axis."""
    keys = list(dict.fromkeys(frame["model"]))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, key in enumerate(keys):
        acc = frame.loc[frame["model"] == key, "accuracy"].to_numpy(float)
        ax.bar(i, acc.mean(), width=0.5, color=f"C{i}", alpha=0.35)
        ax.scatter(np.full(len(acc), i) + np.linspace(-0.12, 0.12, len(acc)), acc, color=f"C{i}", zorder=3)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
    ax.set(xticks=range(len(keys)), xticklabels=keys, ylim=(0, 1), ylabel="test accuracy")
    ax.set_title(f"Accuracy over {frame['seed'].nunique()} values of seeds.{vary} (dots: runs, bars: mean)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(vary: str, out: Path) -> None:
    shown = json.loads(dvc(["exp", "show", "--json"]))
    frame, shared = study(shown, vary)
    text = study_markdown(frame, shared, vary)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "runs.csv", index=False)
    study_figure(frame, vary, out / "accuracy.png")
    (out / "report.md").write_text(text)
    print(text + f"\nseeds: {out}/report.md, runs.csv, accuracy.png")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m duel.seeds", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    queued = sub.add_parser("queue", help="queue N runs of the current params that differ in one seed")
    queued.add_argument("count", type=int, help="how many seeds: values 1..N")
    queued.add_argument("--jobs", type=int, default=None, help="start the queue with K workers and wait for it")
    reported = sub.add_parser("report", help="aggregate a study into studies/seeds-<vary>/")
    for command in (queued, reported):
        command.add_argument("--vary", choices=SEEDS, default="train", help="which seed the runs differ in")
    args, extra = parser.parse_known_args(argv)
    if args.command == "queue":
        if args.count < 1 or (args.jobs is not None and args.jobs < 1):
            parser.error("count and --jobs must be at least 1")
        queue(args.count, args.vary, args.jobs, extra)
    else:
        report(args.vary, Path("studies") / f"seeds-{args.vary}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DuelError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
