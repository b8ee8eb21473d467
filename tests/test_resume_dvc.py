"""A crash under DVC, as a user meets it: `dvc repro` killed (SIGKILL) after a checkpoint, then `dvc repro` again.
The fine-tune resumes, and its per-step series holds every step exactly once, as an uninterrupted run's does. A
checkpoint left by a run with other params is never resumed into the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from project_copy import SMALL_RUN, StageRun, make_copy, run_stages_in_process, stage_env

pytestmark = pytest.mark.slow

CHECKPOINTS = Path("checkpoints/llama")
LOSS = Path("plots/llama/plots/metrics/loss.tsv")


def dvc(repo: Path, *args: str) -> str:
    done = subprocess.run(["dvc", *args], cwd=repo, env=stage_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def kill_after_checkpoint(repo: Path, *args: str) -> None:
    """`dvc repro finetune_llama` with `args`, killed with everything it started once a checkpoint is complete."""
    process = subprocess.Popen(
        ["dvc", "repro", *args, "finetune_llama"],
        cwd=repo,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    try:
        while not list((repo / CHECKPOINTS).glob("checkpoint-*/trainer_state.json")):
            assert process.poll() is None, "dvc repro ended before a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed copy (both models: tokenize reads both bases), its stages up to tokenize run (their entry points
    called in the test process) and recorded in dvc.lock by `dvc commit`, as `dvc repro tokenize` leaves it."""
    repo = make_copy(tmp_path_factory.mktemp("dvc-crash"), SMALL_RUN, models=("llama", "deepseek"))
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for command in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=repo, check=True)
    run_stages_in_process(repo, ("download",), ("base", "llama"), ("base", "deepseek"), ("tokenize",))
    dvc(repo, "commit", "--force", "--with-deps", "tokenize")
    return repo


def test_resumed_series_holds_every_step_once(repo: Path, reference_run: StageRun) -> None:
    kill_after_checkpoint(repo)
    log = dvc(repo, "repro", "finetune_llama")
    assert "resuming from checkpoints/llama/checkpoint-" in log
    series = pd.read_csv(repo / LOSS, sep="\t")
    assert series["step"].tolist() == list(range(1, SMALL_RUN["train.steps"] + 1))
    reference = pd.read_csv(reference_run.repo / LOSS, sep="\t")  # the same params, never interrupted
    pd.testing.assert_series_equal(series["loss"], reference["loss"])
    metrics = json.loads((repo / "metrics/finetune_llama.json").read_text())["llama"]
    assert metrics["resumed_from_step"] > 0 and metrics["steps"] == SMALL_RUN["train.steps"]


def test_checkpoint_of_other_params_is_not_resumed(repo: Path) -> None:
    kill_after_checkpoint(repo, "--force", "--single-item")  # a run with lora.r 16, killed after a checkpoint
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("  r: 16\n", "  r: 8\n"))
    log = dvc(repo, "repro", "finetune_llama")
    assert "held checkpoints of a run with other params or data; removed" in log and "resuming" not in log
    metrics = json.loads((repo / "metrics/finetune_llama.json").read_text())["llama"]
    assert metrics["resumed_from_step"] == 0 and metrics["trainable_parameters"] == 46080  # r=8 throughout
    assert pd.read_csv(repo / LOSS, sep="\t")["step"].tolist() == list(range(1, SMALL_RUN["train.steps"] + 1))
