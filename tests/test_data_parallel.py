"""Data parallelism on CPU (gloo over loopback): the finetune stage as two processes learns what one process learns
from the same data and seed, started by the stage itself (execution.data_parallel: 2) and as two nodes of one
process each through torchrun's c10d rendezvous on 127.0.0.1 (the multi-machine launch).

LoRA dropout is off: its masks are drawn per process, so they are the one randomness that depends on the split.
What remains is float rounding: in fp32, one process sums a step's two micro-batch gradients in one tensor, two
processes all-reduce them (the same two terms, another order of operations), about 1e-7 relative per step; AdamW
divides by the root of the second moment, so a rounding difference in a tiny gradient moves its update by more.
Hence the tolerances: per-step losses within 1e-5 relative (the label-word loss, logged to 4 decimals, within one
unit of the last), adapter weights within 2e-5 absolute, 1% of the largest
lora_B weight after 4 steps of lr 1e-3 (2.5e-3; lora_B starts at zero). Seen on a 2-core CPU: losses 1e-7 and
weights 3e-6 apart."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from project_copy import (
    ADAPTER,
    StageRun,
    clone,
    ready_to_finetune,
    run_stage,
    run_stage_in_process,
    set_params,
    stage_command,
    stage_env,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# 4 steps of 16 reviews, micro-batch 8: one process accumulates 2 passes per step, two processes 1 each; a
# checkpoint at step 2 (saved by rank 0). 4 steps: the loss falls, and a rounding difference has steps to grow.
RUN = {
    "train.steps": 4,
    "execution.save_steps": 2,
    "execution.micro_batch": 8,
    "execution.data_parallel": 1,
    "lora.dropout": 0.0,
}
SERIES = Path("plots/llama/plots/metrics")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, reference_run: StageRun) -> Path:
    """The reference run's copy up to its tokens (its data, base model and tokens), with RUN: ready to fine-tune."""
    return ready_to_finetune(reference_run.repo, tmp_path_factory.mktemp("prepared"), RUN)


@pytest.fixture(scope="module")
def one_process(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fine-tune as one process: its entry point called in the test process."""
    repo = clone(prepared, tmp_path_factory.mktemp("one"))
    run_stage_in_process(repo, "finetune", "llama")
    return repo


def assert_same_training(repo: Path, reference: Path) -> None:
    """The same per-step losses and label-word losses, the same adapter, within the module's tolerances."""
    for name in ("loss", "label_word_loss"):
        ours, theirs = (pd.read_csv(r / SERIES / f"{name}.tsv", sep="\t") for r in (repo, reference))
        assert ours["step"].tolist() == theirs["step"].tolist() == [1, 2, 3, 4]
        difference = (ours[name] - theirs[name]).abs().max()
        print(f"largest {name} difference, two processes against one: {difference:.1e}")
        assert difference <= (1e-5 * theirs[name].abs().max() if name == "loss" else 1.001e-4), name
    first = pd.read_csv(reference / SERIES / "loss.tsv", sep="\t")["loss"]
    assert first.iloc[0] - first.iloc[-1] > 0.1  # the loss moves, so equal curves mean something
    weights, expected = load_file(repo / ADAPTER), load_file(reference / ADAPTER)
    assert weights.keys() == expected.keys() and len(weights) > 0
    largest = max((weights[k] - expected[k]).abs().max().item() for k in expected)
    moved = max((expected[k]).abs().max().item() for k in expected if "lora_B" in k)  # lora_B starts at zero
    print(f"largest adapter difference, two processes against one: {largest:.2e} (largest lora_B weight {moved:.2e})")
    assert largest < 2e-5 and moved > 1e-3


def finetune_metrics(repo: Path) -> dict:
    return json.loads((repo / "metrics/finetune_llama.json").read_text())["llama"]


def test_two_processes_resume_after_a_kill(prepared: Path, one_process: Path, tmp_path: Path) -> None:
    """The stage started as two processes (execution.data_parallel: 2), every process killed (SIGKILL) after rank 0
    saved the step-2 checkpoint: the rerun resumes from it, on both ranks, and ends as one uninterrupted process does.
    (An uninterrupted two-process run is the two-node test's.)"""
    repo = clone(prepared, tmp_path)
    set_params(repo, {"execution.data_parallel": 2})
    state = repo / "checkpoints/llama/checkpoint-2/trainer_state.json"  # the Trainer writes it last
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    launcher = subprocess.Popen(stage_command("finetune", "llama"), cwd=repo, env=stage_env(), **quiet)
    deadline = time.monotonic() + 120
    while not state.is_file():
        assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint at step 2"
        time.sleep(0.02)
    family = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    for process in family:  # torchrun's ranks run in sessions of their own: kill each
        process.kill()
    psutil.wait_procs(family, timeout=30)
    assert not (repo / "metrics/finetune_llama.json").exists(), "finished before the kill; raise train.steps"
    log = run_stage(repo, "finetune", "llama")
    assert "finetune llama: 2 data-parallel processes under torchrun" in log
    assert log.count("resuming from checkpoints/llama/checkpoint-2 (step 2)") == 2  # each rank
    assert_same_training(repo, one_process)
    metrics, reference = finetune_metrics(repo), finetune_metrics(one_process)
    assert metrics["resumed_from_step"] == 2
    assert (metrics["steps"], metrics["micro_batch"], metrics["grad_accum"]) == (4, 8, 1)
    assert reference["grad_accum"] == 2
    run = json.loads((repo / "models/adapters/llama/training.json").read_text())["run"]
    assert run["processes"] == 2
    assert not (repo / "checkpoints/llama").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_loopback_learn_what_one_process_learns(
    prepared: Path, one_process: Path, tmp_path: Path
) -> None:
    """Two torchrun launches, as two machines would start them (one process each), meeting at a c10d rendezvous on
    127.0.0.1; they share the project folder here, as nodes share a file system for checkpoints."""
    repo = clone(prepared, tmp_path)
    endpoint = f"127.0.0.1:{free_port()}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=duel-test"]
    nodes = [
        subprocess.Popen(
            [*torchrun, f"--node-rank={node}", *rendezvous, "-m", "stages.finetune", "llama"],
            cwd=repo,
            env=stage_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        logs = [node.communicate(timeout=180)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.terminate()  # torchrun passes it on to its rank
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert_same_training(repo, one_process)
    assert json.loads((repo / "models/adapters/llama/training.json").read_text())["run"]["processes"] == 2
    assert finetune_metrics(repo)["grad_accum"] == 1
