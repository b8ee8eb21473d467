"""A fine-tune killed by SIGKILL after a checkpoint resumes from it and ends with exactly the loss and adapter of
a run that was never interrupted (CPU, same seed); the kill leaves nothing that looks finished."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from project_copy import (
    SMALL_RUN,
    StageRun,
    assert_same_adapter,
    clone,
    ready_to_finetune,
    run_stage_in_process,
    stage_command,
    stage_env,
)

pytestmark = pytest.mark.slow

CHECKPOINTS = Path("checkpoints/llama")


def last_complete_checkpoint(checkpoints: Path) -> int | None:
    """Step of the newest checkpoint whose trainer_state.json (the Trainer writes it last) is whole, or None."""
    steps = []
    for folder in checkpoints.glob("checkpoint-*"):
        try:
            state = json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):  # not written yet, or half written
            continue
        steps.append(state["global_step"])
    return max(steps, default=None)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory, reference_run: StageRun) -> tuple[Path, int]:
    """The reference run's copy up to its tokens, its fine-tune killed (SIGKILL) right after its first checkpoint;
    returns it and the step of its newest complete checkpoint."""
    repo = ready_to_finetune(reference_run.repo, tmp_path_factory.mktemp("crashed"))
    log = repo.parent / "killed.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            stage_command("finetune", "llama"), cwd=repo, env=stage_env(), stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 180
        try:
            while last_complete_checkpoint(repo / CHECKPOINTS) is None:
                assert process.poll() is None, f"finetune ended before a checkpoint:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no checkpoint within 180 s"
                time.sleep(0.02)
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
        returncode = process.wait(timeout=60)
    assert returncode == -signal.SIGKILL, f"finetune was not killed mid-run (exit {returncode}); raise train.steps"
    step = last_complete_checkpoint(repo / CHECKPOINTS)
    assert step is not None and 0 < step < SMALL_RUN["train.steps"]
    return repo, step


def test_kill_leaves_checkpoints_and_nothing_finished(crashed: tuple[Path, int]) -> None:
    repo, step = crashed
    assert (repo / CHECKPOINTS / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    assert not (repo / "models/adapters/llama").exists()
    assert not (repo / "metrics/finetune_llama.json").exists()
    assert not list((repo / "models/adapters").glob(".*")), "a temporary adapter folder was left behind"


@pytest.fixture(scope="module")
def resumed(crashed: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> StageRun:
    """A clone of the crashed copy, its fine-tune rerun (its entry point called in the test process)."""
    repo = clone(crashed[0], tmp_path_factory.mktemp("resumed"))
    return StageRun(repo, run_stage_in_process(repo, "finetune", "llama"))


def test_resume_matches_uninterrupted_run(
    crashed: tuple[Path, int], resumed: StageRun, reference_run: StageRun
) -> None:
    step, repo = crashed[1], resumed.repo
    assert f"resuming from {CHECKPOINTS}/checkpoint-{step} (step {step})" in resumed.log
    metrics = json.loads((repo / "metrics/finetune_llama.json").read_text())["llama"]
    reference = json.loads((reference_run.repo / "metrics/finetune_llama.json").read_text())["llama"]
    assert metrics["resumed_from_step"] == step > 0
    assert reference["resumed_from_step"] == 0
    assert (metrics["steps"], metrics["final_loss"]) == (reference["steps"], reference["final_loss"])
    assert_same_adapter(repo, reference_run.repo)
    assert not (repo / CHECKPOINTS).exists(), "checkpoints of a finished run must be removed"

    # DVCLive's series go on from the checkpoint: steps 1..N once each, with the losses of the uninterrupted run.
    series = Path("plots/llama/plots/metrics/loss.tsv")
    loss, expected = (pd.read_csv(r / series, sep="\t") for r in (repo, reference_run.repo))
    assert loss["step"].tolist() == list(range(1, SMALL_RUN["train.steps"] + 1))
    assert loss["loss"].tolist() == expected["loss"].tolist()


def test_resume_keeps_the_mean_loss(resumed: StageRun, reference_run: StageRun) -> None:
    metrics, reference = (
        json.loads((run.repo / "metrics/finetune_llama.json").read_text())["llama"] for run in (resumed, reference_run)
    )
    assert metrics["train_loss_mean"] == reference["train_loss_mean"]


def test_resume_skips_a_checkpoint_killed_mid_save(
    crashed: tuple[Path, int], reference_run: StageRun, tmp_path: Path
) -> None:
    """A kill during a save leaves a newer checkpoint folder without trainer_state.json (the Trainer writes it last);
    the rerun must resume from the last complete one, not crash on the partial one."""
    repo, step = crashed
    repo = clone(repo, tmp_path)
    partial = repo / CHECKPOINTS / f"checkpoint-{step + SMALL_RUN['execution.save_steps']}"
    shutil.copytree(repo / CHECKPOINTS / f"checkpoint-{step}", partial)
    (partial / "trainer_state.json").unlink()

    log = run_stage_in_process(repo, "finetune", "llama")
    assert f"resuming from {CHECKPOINTS}/checkpoint-{step} (step {step})" in log
    assert_same_adapter(repo, reference_run.repo)
