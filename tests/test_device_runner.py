"""benchmarks/run_device.py end to end on CPU with the demo's tiny models (the GPU machine is the only other place it
runs), then benchmarks/record.py on what it wrote: the runner's results are what the records are made of."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
import yaml
from project_copy import copy_sources, stage_env

pytestmark = pytest.mark.slow


Run = tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]


def run_device(base: Path) -> Run:
    """benchmarks/run_device.py in a copy of the working tree under `base`: the duel's stages (results in base/out),
    then --scoring with --profile-step (results in base/out-scoring); the copy and the two finished processes."""
    repo = copy_sources(base)
    args = ["llama", "--profile", "profiles/demo.yaml", "--baseline-last", "--budget-gib", "16", "--budget-steps", "4"]
    args += ["--test-size", "40"]
    # Scoring in batches of 4: 10 batches of the 40 reviews, so that the profile's window (batches 3-5) is reached.
    demo = yaml.safe_load((repo / "profiles" / "demo.yaml").read_text())
    demo["execution"]["eval_batch_size"] = 4
    (repo / "profiles" / "scoring.yaml").write_text(yaml.safe_dump(demo))
    scoring = ["llama", "--profile", "profiles/scoring.yaml", "--scoring", "40", "--profile-step"]
    runs = []
    for argv, out in (
        (args, "out"),
        (scoring, "out-scoring"),
    ):
        runs.append(
            subprocess.run(
                [sys.executable, "benchmarks/run_device.py", *argv],
                cwd=repo,
                env=stage_env({"OUT": str(base / out)}),
                capture_output=True,
                text=True,
            )
        )
    return repo, *runs


@pytest.fixture(scope="module")
def device_run(started_early: dict[str, Future]) -> Run:
    """run_device's copy and processes: processes only, started with the session (conftest.started_early)."""
    return started_early["device_run"].result()


def test_scoring_call_scores_each_layout_and_profiles_it(device_run: Run) -> None:
    """--scoring 40 --profile-step: the zero_shot stage once per layout of scoring's batches on the same 40 reviews,
    the same predictions from both, each layout profiled again apart."""
    repo, _, done = device_run
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = repo.parent / "out-scoring"
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["tag"]) for r in lines] == [("call", "argv"), ("scoring", "left"), ("scoring", "flattened")]
    left, flattened = lines[1]["data"], lines[2]["data"]
    assert (left["padding"], flattened["padding"], left["reviews"], flattened["reviews"]) == (
        "left",
        "flattened",
        40,
        40,
    )
    assert flattened["accuracy"] == left["accuracy"] and flattened["eval_startup_s"] > 0
    for layout in ("left", "flattened"):
        window = json.loads((out / f"profile-llama-scoring-{layout}" / "batches.json").read_text())
        assert window["first_batch"] == 3 and window["batches"] == 3


def test_device_runner_results_become_records(device_run: Run, tmp_path: Path) -> None:
    repo, done, _ = device_run
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = repo.parent / "out"
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["tag"]) for r in lines] == [
        ("call", "argv"),
        ("finetune", "default"),
        ("evaluate", "default"),
        ("timings", "duel"),
        ("finetune", "budget"),
    ]
    default, budget = lines[1]["data"], lines[4]["data"]
    assert default["steps"] == 20 and budget["steps"] == 4 and budget["memory_budget_gib"] == 16
    assert default["attention"] == "sdpa" and default["quantization"] == "nf4-dq"  # how it ran, beside the numbers
    assert set(lines[3]["data"]) == {"download", "base", "tokenize", "finetune", "evaluate", "duel_wall_s"}
    log = (out / "log.txt").read_text()
    assert "==== finetune_llama_default: exit 0" in log and "==== baseline_llama: exit" in log

    # The call folder as the device tool brings it back, with the files device.sh adds, then into records.
    call = tmp_path / "bench" / "raw" / "2026-12-03-cpu-call01"
    shutil.copytree(out, call)
    (call / "gpu.csv").write_text("name, driver_version, memory.total [MiB], power.limit [W]\ncpu, -, 0, 0\n")
    (call / "versions.json").write_text(json.dumps({"torch": "cpu"}))
    for name in ("record.py", "README.template.md"):
        shutil.copy(repo / "benchmarks" / name, tmp_path / "bench" / name)
    done = subprocess.run(
        [sys.executable, "record.py", str(call)], cwd=tmp_path / "bench", capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "bench" / "records.jsonl").read_text().splitlines()]
    by_recipe = {(r["stage"], r["recipe"]): r for r in records}
    assert by_recipe[("finetune", "default")]["reviews_per_s"] == default["reviews_per_s"]
    assert by_recipe[("finetune", "budget")]["memory_budget_gib"] == 16
    scored = by_recipe[("evaluate", "default")]
    assert scored["test_reviews"] == 40 and scored["reviews_per_s"] > 0
