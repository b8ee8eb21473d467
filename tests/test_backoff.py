"""The out-of-memory back-off with a real Trainer on a tiny LoRA model (CPU): a simulated CUDA OOM halves the
micro-batch, the run goes on from the last completed step and ends where a run at the smaller micro-batch ends."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_llama_config
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, Trainer

from duel.checkpointing import switch_on_checkpointing
from duel.params import Params, ParamsError
from duel.profiling import ProfileSteps, from_environment, idle_summary
from duel.training import (
    AnswerCollator,
    ReviewDataset,
    TrainingError,
    answer_loss,
    train_with_backoff,
    training_arguments,
    with_micro_batch,
)

STEPS, BATCH = 4, 8


def tiny_lora() -> Any:
    torch.manual_seed(0)
    config = tiny_llama_config(use_cache=False)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def small_params(params: Params) -> Params:
    train = dataclasses.replace(
        params.train, steps=STEPS, batch_size=BATCH, learning_rate=1e-2, optimizer="adamw_torch"
    )
    execution = dataclasses.replace(
        params.execution, micro_batch=BATCH, precision="fp32", padding="longest", save_steps=0, logging_steps=1
    )
    return dataclasses.replace(params, train=train, execution=execution)


def dataset() -> ReviewDataset:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "input_ids": [rng.integers(1, 300, size=int(n)).tolist() for n in rng.integers(3, 20, STEPS * BATCH)],
            "label": rng.integers(0, 2, STEPS * BATCH),
        }
    )
    return ReviewDataset(frame, (7, 9))


class FakeOom:
    """Raises torch.OutOfMemoryError for forward passes of more than `fits` reviews from the `after`-th pass on."""

    def __init__(self, fits: int, after: int) -> None:
        self.fits, self.after, self.calls = fits, after, 0

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        if self.calls >= self.after and kwargs["input_ids"].shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def run(params: Params, out: Path, oom: FakeOom | None, checkpointing_switch: bool = False) -> tuple[Any, Any]:
    model = tiny_lora()
    if oom:
        model.base_model.model.register_forward_pre_hook(oom, with_kwargs=True)
    data = dataset()

    def build(micro_batch: int) -> Trainer:
        return Trainer(
            model=model,
            args=training_arguments(with_micro_batch(params, micro_batch), out),
            train_dataset=data,
            data_collator=AnswerCollator(pad_id=0, padding="longest", row_tokens=64),
            compute_loss_func=answer_loss,
        )

    switch = (lambda: switch_on_checkpointing(model)) if checkpointing_switch else (lambda: None)
    return model, train_with_backoff(build, params.train.batch_size, params.execution.micro_batch, None, switch)


def lora_weights(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_oom_halves_the_micro_batch_and_goes_on(params: Params, tmp_path: Path) -> None:
    small = small_params(params)
    # Steps 1 and 2 fit at micro-batch 8; from step 3 on only 2 reviews fit: 8 -> 4 -> 2, going on from step 2.
    model, result = run(small, tmp_path / "oom", FakeOom(fits=2, after=3))
    assert result.oom_retries == 2
    assert result.micro_batch == 2
    assert result.trainer.state.global_step == STEPS
    assert result.trainer.args.gradient_accumulation_steps == BATCH // 2  # the effective batch stayed 8
    assert (tmp_path / "oom" / "checkpoint-2").is_dir()  # the state of step 2, saved at the first OOM
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    assert len(losses) == STEPS

    # Same data, same steps, no OOM: micro-batch 8 for two steps then 2 learns what micro-batch 2 learns throughout.
    reference, _ = run(
        dataclasses.replace(small, execution=dataclasses.replace(small.execution, micro_batch=2)),
        tmp_path / "ref",
        None,
    )
    got, want = lora_weights(model), lora_weights(reference)
    assert any((w != 0).any() for w in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


def test_oom_at_micro_batch_one_says_what_to_change(params: Params, tmp_path: Path) -> None:
    small = small_params(params)
    with pytest.raises(TrainingError, match=r"micro-batch 1 \(step 1\).*data\.max_length.*memory_budget_gib"):
        run(small, tmp_path, FakeOom(fits=0, after=1))


def test_oom_switches_checkpointing_on_before_halving(params: Params, tmp_path: Path) -> None:
    small = small_params(params)
    model, result = run(small, tmp_path, FakeOom(fits=2, after=3), checkpointing_switch=True)
    assert model.is_gradient_checkpointing  # the first OOM turned it on ...
    assert result.oom_retries == 3  # ... and, the fake OOM ignoring it, 8 -> 4 -> 2 followed
    assert result.micro_batch == 2
    assert result.trainer.state.global_step == STEPS


def test_profiler_wraps_the_trainers_own_steps(params: Params, tmp_path: Path) -> None:
    """DUEL_PROFILE's callback profiles steps of the real Trainer run (no second training loop) and changes nothing
    that is learned: the losses equal an unprofiled run's."""
    small = small_params(params)
    losses = {}
    for profiled in (False, True):
        model, data = tiny_lora(), dataset()
        callbacks = [ProfileSteps(tmp_path / "profile", skip=1, count=2)] if profiled else []
        trainer = Trainer(
            model=model,
            args=training_arguments(small, tmp_path / f"run-{profiled}"),
            train_dataset=data,
            data_collator=AnswerCollator(pad_id=0, padding="longest", row_tokens=64),
            compute_loss_func=answer_loss,
            callbacks=callbacks,
        )
        trainer.train()
        losses[profiled] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[True] == losses[False] and len(losses[True]) == STEPS
    assert "aten::mm" in (tmp_path / "profile" / "kernels.txt").read_text()  # the LoRA and base matrix products
    steps = json.loads((tmp_path / "profile" / "steps.json").read_text())
    assert steps["first_step"] == 2 and steps["steps"] == 2 and steps["seconds_per_step"] > 0
    with gzip.open(tmp_path / "profile" / "trace.json.gz", "rt") as trace:
        assert json.load(trace)["traceEvents"]


def test_idle_summary_finds_the_gpus_gaps_and_what_the_host_did_in_them() -> None:
    """Two kernels overlap (one busy span), then a 50 us gap in which the host synchronised for 30 us inside an
    operator, a 5 us gap (too short to count), and a last kernel: busy 90 of 145 us."""
    events = [
        {"cat": "kernel", "name": "gemm", "ts": 0, "dur": 40},
        {"cat": "kernel", "name": "add", "ts": 20, "dur": 30},
        {"cat": "gpu_memcpy", "name": "copy", "ts": 100, "dur": 10},
        {"cat": "kernel", "name": "gemm", "ts": 115, "dur": 30},
        {"cat": "cpu_op", "name": "aten::item", "ts": 45, "dur": 60},
        {"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 60, "dur": 30},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 10},  # while the GPU ran: not counted
        {"cat": "python_function", "name": "step", "ts": 0, "dur": 145},  # not a host work category
    ]
    idle = idle_summary(events)
    assert idle["device_busy_share"] == round(90 / 145, 4) and idle["gaps"] == 1 and idle["idle_ms"] == 0.05
    assert idle["kernels"] == 3 and idle["kernel_us_median"] == 30
    assert idle["host_during_idle_ms"] == {
        "cpu_op": [["aten::item", 0.05]],
        "cuda_runtime": [["cudaStreamSynchronize", 0.03]],
    }


def test_profiler_is_asked_for_by_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DUEL_PROFILE", raising=False)
    assert from_environment() is None
    monkeypatch.setenv("DUEL_PROFILE", str(tmp_path))
    monkeypatch.setenv("DUEL_PROFILE_STEPS", "3:1")
    callback = from_environment()
    assert (callback.folder, callback.skip, callback.count) == (tmp_path, 3, 1)
    monkeypatch.setenv("DUEL_PROFILE_STEPS", "three")
    with pytest.raises(ParamsError, match=r"DUEL_PROFILE_STEPS: 'three' is not <skip>:<count>"):
        from_environment()
