"""Fine-tuning with the Hugging Face Trainer: the loss is on the answer token only, computed from the last
positions' logits (a 102,400-word vocabulary times 512 positions would otherwise cost 200 MB per review in fp32)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from duel.params import Params
from duel.telemetry import memory_now_gib

IGNORE = -100


class TrainingError(RuntimeError):
    """Training cannot go on; the message says what happened and what to change."""


def training_order(lengths: np.ndarray, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Row indices for `steps` optimizer steps of `batch_size` reviews each.

    Reviews are drawn in a seeded random order (a fresh permutation per pass over the data); inside each optimizer
    step they are sorted longest first, so micro-batches hold reviews of similar length (less padding) and the
    largest one comes first (an OOM shows at once). The reviews of each optimizer step do not depend on the
    micro-batch size, so micro-batch 1 x 16 and 16 x 1 learn from the same data in the same steps.
    """
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    passes = math.ceil(needed / len(lengths))
    order = np.concatenate([rng.permutation(len(lengths)) for _ in range(passes)])[:needed]
    blocks = order.reshape(steps, batch_size)
    ranks = np.argsort(-lengths[blocks], axis=1, kind="stable")
    return np.take_along_axis(blocks, ranks, axis=1).reshape(-1)


class ReviewDataset(torch.utils.data.Dataset):
    def __init__(self, frame: pd.DataFrame, answer_ids: tuple[int, int]) -> None:
        self.input_ids = frame["input_ids"].tolist()
        self.labels = frame["label"].to_numpy()
        self.answer_ids = answer_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": list(self.input_ids[i]), "answer_id": self.answer_ids[int(self.labels[i])]}


@dataclass(frozen=True)
class AnswerCollator:
    """Left-pads prompt + answer; labels are -100 except the answer token (the usual causal-LM convention)."""

    pad_id: int
    pad_to: int | None
    """Pad every batch to this length (the paper's fixed 512), or None for the longest in the batch."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [f["input_ids"] + [f["answer_id"]] for f in features]
        width = self.pad_to or -(-max(len(s) for s in sequences) // 8) * 8  # multiples of 8 suit tensor cores
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, width - len(seq) :] = torch.tensor(seq)
            attention_mask[row, width - len(seq) :] = 1
            labels[row, -1] = seq[-1]
        # Positions count real tokens only, so a left-padded review sees the positions it would see alone.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": labels,
            "logits_to_keep": 2,
        }


def answer_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> Any:
    """Cross-entropy of the answer token, predicted at the position before it (logits_to_keep=2 keeps both).

    Summed and divided by the reviews in the whole accumulated step, so micro-batch 1 x 16 and 16 x 1 give the
    same gradient.
    """
    logits = outputs.logits[:, -2, :].float()
    target = labels[:, -1].to(logits.device)
    loss = F.cross_entropy(logits, target, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else len(target))


class StepTelemetry(TrainerCallback):
    """Adds memory and throughput to each log line (which DVCLive then writes) and stops on a NaN loss."""

    def __init__(self, tokens_per_step: np.ndarray, padded_per_step: np.ndarray, batch_size: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.padded_per_step = padded_per_step
        self.batch_size = batch_size
        self.last_step = 0
        self.last_time = time.perf_counter()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.last_step, self.last_time = state.global_step, time.perf_counter()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if logs is None or "loss" not in logs:
            return
        if not math.isfinite(logs["loss"]):
            raise TrainingError(
                f"train: loss is {logs['loss']} at step {state.global_step}; the likely cause is fp16 overflow: "
                "set train.precision: bf16 (or lower train.learning_rate)"
            )
        now = time.perf_counter()
        steps = slice(self.last_step, state.global_step)
        elapsed = max(now - self.last_time, 1e-9)
        logs["memory_gib"] = round(memory_now_gib(), 4)
        logs["reviews_per_s"] = round((state.global_step - self.last_step) * self.batch_size / elapsed, 3)
        logs["tokens_per_s"] = round(float(self.tokens_per_step[steps].sum()) / elapsed, 1)
        logs["padded_tokens_per_s"] = round(float(self.padded_per_step[steps].sum()) / elapsed, 1)
        if torch.cuda.is_available():
            logs["vram_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 4)
            logs["vram_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 4)
        self.last_step, self.last_time = state.global_step, now


class LiveStep(TrainerCallback):
    """Puts DVCLive's step on the optimizer step (its own counter counts log calls), so the curves of runs that log
    every step and every 10 steps share one x axis. Must come before DVCLive's callback."""

    def __init__(self, live: Any) -> None:
        self.live = live

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.live.step = state.global_step


def step_token_counts(lengths: np.ndarray, order: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """Real tokens (prompt + answer) and padded tokens computed, per optimizer step."""
    seq = lengths[order] + 1
    micro = seq.reshape(-1, params.train.micro_batch)
    if params.train.padding == "max_length":
        width = np.full(len(micro), params.data.max_length)
    else:
        width = -(-micro.max(axis=1) // 8) * 8
    padded = (width * params.train.micro_batch).reshape(params.train.steps, -1).sum(axis=1)
    return seq.reshape(params.train.steps, -1).sum(axis=1), padded


def training_arguments(params: Params, output_dir: Path) -> TrainingArguments:
    train = params.train
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=train.steps,
        per_device_train_batch_size=train.micro_batch,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps,
        optim=train.optimizer,
        bf16=train.precision == "bf16",
        fp16=train.precision == "fp16",
        gradient_checkpointing=False,  # switched on by the model setup, with use_reentrant=False
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=1,
        seed=params.seed,
        data_seed=params.seed,
        train_sampling_strategy="sequential",  # training_order() already shuffled, seeded
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
