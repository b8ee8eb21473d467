"""Fine-tuning with the Hugging Face Trainer: the loss is on the answer token only, computed from the last
positions' logits (a 102,400-word vocabulary times 512 positions would otherwise cost 200 MB per review in fp32).
Each log line also carries the loss over the two label words only, which the two vocabularies' sizes do not move."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from dvclive import Live
from transformers import (
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.integrations import DVCLiveCallback
from transformers.trainer_utils import TrainOutput

from duel import profiling
from duel.checkpointing import (
    ALLOCATOR_ENV,
    checkpointed_layers,
    decoder_layers,
    limit_gpu_memory,
    offloaded_layers,
    switch_on_checkpointing,
)
from duel.embeddings import HostEmbedding, look_up
from duel.errors import TrainingError
from duel.fused import fused_groups
from duel.graphs import GraphedTrainer
from duel.modeling import base_weights, compile_summary, dequantized_layers, projection_weights, quantization_name
from duel.parallel import barrier, world_size
from duel.params import Params
from duel.telemetry import (
    GpuSampler,
    Stopwatch,
    allocator_summary,
    device_name,
    memory_kind,
    memory_now_gib,
    model_utilization,
    peak_memory,
    process_started,
)

IGNORE = -100


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


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Indices of `lengths` in ceil(total / row_tokens) rows of about equal length: longest first, each into the
    row holding the fewest tokens so far. Every row is padded to the longest, so balanced rows waste least; a row may
    pass row_tokens by less than one sequence."""
    count = min(len(lengths), max(1, -(-sum(lengths) // row_tokens)))
    rows: list[list[int]] = [[] for _ in range(count)]
    totals = [0] * count
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = totals.index(min(totals))
        rows[row].append(i)
        totals[row] += lengths[i]
    return rows


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sorted positions whose logits predict an answer token (the one before each label); the model computes logits
    only there (`logits_to_keep`), and answer_loss finds them again from the labels."""
    return torch.unique((labels != IGNORE).nonzero(as_tuple=True)[1] - 1)


@dataclass(frozen=True)
class AnswerCollator:
    """Batches of prompt + answer with labels -100 except at the answer token (the causal-LM convention).

    padding "packed": the reviews are laid end to end in ceil(tokens / `row_tokens`) rows of about equal length
    (pack_rows); position ids restart at 0 for each, and without an attention mask transformers lets each attend to
    itself only (its packed-sequence masks for SDPA and eager; for Flash Attention 2 and varlen, the sequences'
    boundaries cu_seq_lens_q/k and longest length max_length_q/k, transformers' keywords), so no padding is
    computed. "longest" and "max_length" left-pad one review per row to the longest in the batch or to `row_tokens`.
    "flattened" puts all reviews in one row; with `graph_tokens` (execution.cuda_graphs) that row is padded up to the
    next multiple of it, and the longest-sequence bound is `row_tokens` (data.max_length) in every batch.
    With `embeddings` (the input embedding table in host memory, execution.offload_embeddings) the batch holds the
    tokens' rows of it as inputs_embeds instead of input_ids.
    """

    pad_id: int
    padding: str
    row_tokens: int
    graph_tokens: int = 0
    embeddings: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_params(cls, pad_id: int, params: Params, embeddings: torch.Tensor | None = None) -> AnswerCollator:
        """execution.padding with its row length: pack_tokens when packed, else data.max_length; `embeddings`: the
        host-memory table, when offloaded (duel.modeling.host_embeddings)."""
        execution = params.execution
        packed = execution.padding == "packed"
        graph_tokens = execution.graph_tokens if execution.cuda_graphs else 0
        row_tokens = execution.pack_tokens if packed else params.data.max_length
        return cls(pad_id, execution.padding, row_tokens, graph_tokens, embeddings)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(features)
        if self.embeddings is not None:
            batch["inputs_embeds"] = look_up(self.embeddings, batch.pop("input_ids"))
        return batch

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch with token ids (input_ids)."""
        sequences = [f["input_ids"] + [f["answer_id"]] for f in features]
        if self.padding == "flattened":
            return self.flattened(sequences)
        if self.padding == "packed":
            rows = [[sequences[i] for i in row] for row in pack_rows([len(s) for s in sequences], self.row_tokens)]
        else:
            rows = [[s] for s in sequences]
        longest = max(sum(len(s) for s in row) for row in rows)
        width = self.row_tokens if self.padding == "max_length" else -(-longest // 8) * 8  # multiples of 8
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        boundaries = [0]  # where each sequence starts in the rows laid end to end, and where the last one ends
        for r, row in enumerate(rows):
            start = 0 if self.padding == "packed" else width - len(row[0])
            for seq in row:
                end = start + len(seq)
                input_ids[r, start:end] = torch.tensor(seq)
                position_ids[r, start:end] = torch.arange(len(seq))
                labels[r, end - 1] = seq[-1]
                attention_mask[r, start:end] = 1
                start = end
                boundaries.append(r * width + end)
            if self.padding == "packed" and start < width:
                position_ids[r, start:] = torch.arange(width - start)  # the padding is a sequence of its own
                boundaries.append((r + 1) * width)
        batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
        if self.padding == "packed":  # for variable-length attention, in transformers' Flash Attention keywords
            cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32)
            longest_sequence = int(cu_seq_lens.diff().max())
            batch |= {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens}
            batch |= {"max_length_q": longest_sequence, "max_length_k": longest_sequence}
        else:
            batch["attention_mask"] = attention_mask
        batch["logits_to_keep"] = answer_positions(labels)
        batch["use_cache"] = False  # with a KV cache, transformers would not look for packed sequences
        return batch

    def flattened(self, sequences: list[list[int]]) -> dict[str, Any]:
        """padding "flattened": transformers' padding-free collator lays the reviews end to end in one row, position
        ids restarting at 0 and the Flash Attention keywords (cu_seq_lens, max_length) for each; the labels keep the
        answer token only."""
        labeled = [{"input_ids": s, "labels": [IGNORE] * (len(s) - 1) + [s[-1]]} for s in sequences]
        batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(labeled)
        if self.graph_tokens:
            batch = self.fixed_shape(batch)
        batch["logits_to_keep"] = answer_positions(batch["labels"])
        batch["use_cache"] = False
        return batch

    def fixed_shape(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A flattened row padded up to the next multiple of graph_tokens by one padding sequence (never empty, so
        every batch has as many sequences; unlabelled, attending to itself only), and the longest-sequence bound fixed
        at row_tokens: a CUDA graph replays fixed shapes and the host numbers it was captured with."""
        tokens = batch["input_ids"].shape[1]
        width = -(-(tokens + 1) // self.graph_tokens) * self.graph_tokens
        pad = width - tokens
        batch["input_ids"] = F.pad(batch["input_ids"], (0, pad), value=self.pad_id)
        batch["labels"] = F.pad(batch["labels"], (0, pad), value=IGNORE)
        batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(pad).unsqueeze(0)], dim=1)
        for side in ("q", "k"):
            ends = batch[f"cu_seq_lens_{side}"]
            batch[f"cu_seq_lens_{side}"] = torch.cat([ends, ends.new_tensor([width])])
            batch[f"max_length_{side}"] = self.row_tokens
        return batch


def answer_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> Any:
    """Cross-entropy of each answer token, predicted at the position before it (the collator's `logits_to_keep`).

    Summed and divided by the reviews in the whole accumulated step, so micro-batch 1 x 16 and 16 x 1 give the
    same gradient.
    """
    return answer_cross_entropy(*answer_logits(outputs, labels), num_items_in_batch)


def answer_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor:
    """answer_loss on answer_logits' output: the summed cross-entropy of the answers over the step's reviews (this
    micro-batch's when num_items_in_batch is None)."""
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum())


def answer_logits(outputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 logits over the vocabulary at every kept position of every row (rows x kept positions, vocabulary),
    and the token each predicts: the row's answer there, IGNORE where the row has none (a position kept for another
    row's answer). Each answer's slot among the kept positions (answer_positions, sorted) is counted on the device
    from which columns hold an answer, so the step waits on no host synchronisation (finding the answers with
    nonzero or unique would: their output sizes live on the host)."""
    logits = outputs.logits
    rows, kept = logits.shape[:2]
    labels = labels.to(logits.device)
    answered = (labels != IGNORE).any(dim=0)  # columns holding some row's answer, one kept position each
    slot = torch.where(answered, answered.cumsum(0) - 1, kept)  # the others into a spare slot, dropped after
    targets = torch.full((rows, kept + 1), IGNORE, dtype=labels.dtype, device=labels.device)
    targets.scatter_(1, slot.expand(rows, -1), labels)
    return logits.float().reshape(rows * kept, -1), targets[:, :kept].reshape(-1)


def label_word_loss(logits: torch.Tensor, answers: torch.Tensor, label_ids: tuple[int, int]) -> torch.Tensor:
    """Per review, the cross-entropy of the two-way softmax over the logits of the two label words (negative,
    positive): the loss of the classifier the model is scored as. It does not depend on the vocabulary's size, so
    it compares Llama-2 (32,000 words) with DeepSeek (102,400): ln 2 = 0.693 at chance for both, where the
    answer-token cross-entropy starts near ln 32,000 = 10.4 and ln 102,400 = 11.5."""
    negative, positive = label_ids
    pair = torch.stack([logits[:, negative], logits[:, positive]], dim=1)
    return F.cross_entropy(pair, (answers == positive).long(), reduction="none")


class AnswerLoss(TrainerCallback):
    """The training loss (answer_loss) that also adds the label-word loss to each log line, as `label_word_loss`
    (DVCLive then writes it beside `loss`). Like the Trainer's logged loss, it is the mean over the reviews of the
    steps since the previous log line.

    The label-word loss is computed from the logits the training loss already gathered (reviews x 2 of them), with
    no gradient: what is learned does not change. Its sum stays on the device until a log line reads it, so it adds
    no synchronisation to a step; a few element-wise kernels on 2 numbers per kept position, against the thousands
    of a 7B model's forward and backward.
    """

    def __init__(self, label_ids: tuple[int, int]) -> None:
        self.label_ids = label_ids
        self.label_word_sum: torch.Tensor | float = 0.0
        self.reviews: torch.Tensor | int = 0

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        loss, label_word_sum, reviews = self.terms(outputs, labels, num_items_in_batch)
        self.add(label_word_sum, reviews)
        return loss

    def terms(
        self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training loss, and this micro-batch's summed label-word loss and reviews (no gradient), without adding
        them up: a CUDA graph (duel/graphs.py) computes these and the caller adds them after each replay."""
        logits, targets = answer_logits(outputs, labels)
        answered = targets != IGNORE
        with torch.no_grad():
            per_review = label_word_loss(logits, targets, self.label_ids)
            label_word_sum, reviews = torch.where(answered, per_review, 0.0).sum(), answered.sum()
        return answer_cross_entropy(logits, targets, num_items_in_batch), label_word_sum, reviews

    def add(self, label_word_sum: torch.Tensor, reviews: torch.Tensor) -> None:
        self.label_word_sum = self.label_word_sum + label_word_sum
        self.reviews = self.reviews + reviews

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if logs is None or "loss" not in logs or not int(self.reviews):
            return
        summed = torch.tensor([float(self.label_word_sum), int(self.reviews)], dtype=torch.float64, device=args.device)
        if torch.distributed.is_initialized():  # every rank logs the same steps: the mean over all ranks' reviews
            torch.distributed.all_reduce(summed)
        logs["label_word_loss"] = round(float(summed[0] / summed[1]), 4)
        self.label_word_sum, self.reviews = 0.0, 0


# In fp16 the loss scaler starts high and halves its scale on each step whose gradients overflow, skipping that step:
# a non-finite gradient norm is then routine early on. This many logged in a row (the scale halved as often) is not.
FP16_OVERFLOWS = 8


class StepTelemetry(TrainerCallback):
    """Adds memory and throughput to each log line (which DVCLive then writes) and stops on a NaN loss or a diverged
    gradient."""

    def __init__(
        self,
        tokens_per_step: np.ndarray,
        padded_per_step: np.ndarray,
        batch_size: int,
        sampler: GpuSampler | None = None,
    ) -> None:
        self.sampler = sampler or GpuSampler()  # the run's NVML samples: each log line gets its steps' utilization
        self.overflows = 0
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
            cause = (
                "the likely cause is fp16 overflow: set execution.precision: bf16 (or lower train.learning_rate)"
                if args.fp16
                else f"the training diverged: lower train.learning_rate ({args.learning_rate:g}; the paper uses 2e-5)"
            )
            raise TrainingError(f"train: loss is {logs['loss']} at step {state.global_step}; {cause}")
        self.check_gradient(args, state, logs.get("grad_norm", 0.0))
        now = time.perf_counter()
        steps = slice(self.last_step, state.global_step)
        elapsed = max(now - self.last_time, 1e-9)
        logs["memory_gib"] = round(memory_now_gib(), 4)
        logs["reviews_per_s"] = round((state.global_step - self.last_step) * self.batch_size / elapsed, 3)
        logs["tokens_per_s"] = round(float(self.tokens_per_step[steps].sum()) / elapsed, 1)
        logs["padded_tokens_per_s"] = round(float(self.padded_per_step[steps].sum()) / elapsed, 1)
        if (util := self.sampler.take_util_mean()) is not None:
            logs["gpu_util_pct"] = util
        if torch.cuda.is_available():
            logs["vram_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 4)
            logs["vram_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 4)
        self.last_step, self.last_time = state.global_step, now

    def check_gradient(self, args: TrainingArguments, state: TrainerState, grad_norm: float) -> None:
        """A non-finite gradient norm: in fp16 a step the loss scaler skipped (routine, up to FP16_OVERFLOWS logged in
        a row); otherwise the run diverged."""
        if math.isfinite(grad_norm):
            self.overflows = 0
            return
        self.overflows += 1
        if args.fp16 and self.overflows < FP16_OVERFLOWS:
            return
        cause = (
            f"it overflowed fp16 in {self.overflows} logged steps in a row: set execution.precision: bf16"
            if args.fp16
            else f"the training diverged: lower train.learning_rate ({args.learning_rate:g}; the paper uses 2e-5)"
        )
        raise TrainingError(f"train: the gradient norm is {grad_norm} at step {state.global_step}; {cause}")


class BudgetKeeper(TrainerCallback):
    """execution.memory_budget_gib counts the memory outside torch (limit_gpu_memory), and the kernels the first
    optimizer step loads add to it: the allocator's cap is set again after that step."""

    def __init__(self, budget_gib: float | None) -> None:
        self.budget_gib, self.capped = budget_gib, False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.budget_gib and not self.capped:
            limit_gpu_memory(self.budget_gib)
            self.capped = True


class LiveStep(TrainerCallback):
    """Puts DVCLive's step on the optimizer step (its own counter counts log calls), so the curves of runs that log
    every step and every 10 steps share one x axis. Must come before DVCLive's callback."""

    def __init__(self, live: Any) -> None:
        self.live = live

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.live.step = state.global_step


class QuietLive(Live):
    """DVCLive's Live, minus the per-step payload for DVC Studio when no Studio is configured: next_step would re-read
    the params it logged (the ~150 TrainingArguments) and every metric file to build a payload it then drops (27 ms a
    step on a 2-core CPU; an H200 step takes 0.3-0.5 s)."""

    def post_data_to_studio(self) -> None:
        if "data" not in self._studio_events_to_skip:
            super().post_data_to_studio()


def micro_batch_tokens(lengths: np.ndarray, order: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """Real tokens (prompt + answer) and tokens computed, padding included, per micro-batch, in training order."""
    execution = params.execution
    seq = (lengths[order] + 1).reshape(-1, execution.micro_batch)
    if execution.padding == "max_length":
        computed = np.full(len(seq), params.data.max_length * execution.micro_batch)
    elif execution.padding == "flattened" and execution.cuda_graphs:  # one row, up to a multiple of graph_tokens
        computed = -(-(seq.sum(axis=1) + 1) // execution.graph_tokens) * execution.graph_tokens
    elif execution.padding == "flattened":  # one row, no padding
        computed = seq.sum(axis=1)
    elif execution.padding == "longest":
        computed = -(-seq.max(axis=1) // 8) * 8 * execution.micro_batch
    else:
        computed = np.array([_packed_size(micro.tolist(), execution.pack_tokens) for micro in seq])
    return seq.sum(axis=1), computed


def step_token_counts(lengths: np.ndarray, order: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """Real tokens (prompt + answer) and tokens computed, padding included, per optimizer step."""
    real, computed = micro_batch_tokens(lengths, order, params)
    return real.reshape(params.train.steps, -1).sum(axis=1), computed.reshape(params.train.steps, -1).sum(axis=1)


def _packed_size(lengths: list[int], row_tokens: int) -> int:
    rows = pack_rows(lengths, row_tokens)
    return len(rows) * -(-max(sum(lengths[i] for i in row) for row in rows) // 8) * 8


def training_arguments(params: Params, output_dir: Path) -> TrainingArguments:
    train, execution = params.train, params.execution
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=train.steps,
        per_device_train_batch_size=execution.micro_batch,
        gradient_accumulation_steps=params.grad_accum // world_size(),  # the step's reviews split over the ranks
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps,
        optim=train.optimizer,
        bf16=execution.precision == "bf16",
        fp16=execution.precision == "fp16",
        gradient_checkpointing=False,  # switched on by the model setup, with use_reentrant=False
        logging_steps=execution.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # else a NaN loss is logged as the window's mean, and StepTelemetry never sees it
        save_strategy="steps" if execution.save_steps else "no",
        save_steps=execution.save_steps or 500,
        save_total_limit=1,
        seed=params.seeds.train,
        data_seed=params.seeds.train,
        train_sampling_strategy="sequential",  # training_order() already shuffled, seeded
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Under data parallelism, accelerate deals the sequential micro-batches out to the ranks in turn (rank r gets
        # micro-batches r, r + ranks, ...), so a step's ranks x grad_accum micro-batches are the step's reviews of
        # training_order(). Every LoRA weight gets a gradient in every pass: DDP need not search for unused ones.
        ddp_find_unused_parameters=False,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )


def with_micro_batch(params: Params, micro_batch: int) -> Params:
    return dataclasses.replace(params, execution=dataclasses.replace(params.execution, micro_batch=micro_batch))


@dataclass
class BackoffResult:
    trainer: Trainer
    output: TrainOutput
    micro_batch: int
    oom_retries: int


def train_with_backoff(
    build: Callable[[int], Trainer],
    batch_size: int,
    micro_batch: int,
    resume: str | None,
    switch_on_checkpointing: Callable[[], str | None] = lambda: None,
) -> BackoffResult:
    """Train, and on a CUDA out-of-memory error save memory and go on from the last completed step: first by keeping
    fewer activations (`switch_on_checkpointing()`: checkpointing on in every layer, then offloaded; it says what it
    did, None when nothing was left), then by halving the micro-batch (more accumulation passes keep the effective
    batch the same). The last completed step's state (adapter, optimizer, scheduler, RNG, data position) is saved as
    a checkpoint, in the Trainer's own format, and a new Trainer resumes from it.

    `build(micro_batch)` makes a Trainer; `resume` is a checkpoint to start from (or None).
    """
    retries = 0
    while True:
        trainer = build(micro_batch)
        start = int(Path(resume).name.split("-")[1]) if resume else 0
        try:
            return BackoffResult(trainer, trainer.train(resume_from_checkpoint=resume), micro_batch, retries)
        except torch.OutOfMemoryError:
            if world_size() > 1:  # the other ranks wait in a collective; torchrun stops them when this one exits
                raise TrainingError(
                    f"train: out of GPU memory under data parallelism ({world_size()} processes), where the back-off "
                    "does not run; lower execution.micro_batch or set execution.gradient_checkpointing: true"
                ) from None
            pass  # handled below, once the traceback (and the activations its frames hold) is released
        step = trainer.state.global_step
        switched = switch_on_checkpointing()
        checkpointing_was_off = switched is not None
        if micro_batch == 1 and not checkpointing_was_off:
            raise TrainingError(
                f"train: out of GPU memory at micro-batch 1 (step {step + 1}); lower data.max_length, set "
                "execution.gradient_checkpointing: true and quantization.enabled: true, or raise "
                "execution.memory_budget_gib"
            )
        trainer.model.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if step > start:
            trainer._save_checkpoint(trainer.model, trial=None)
            resume = str(Path(trainer.args.output_dir) / f"checkpoint-{step}")
        if not checkpointing_was_off:
            micro_batch = max(d for d in range(1, micro_batch // 2 + 1) if batch_size % d == 0)
        retries += 1
        change = switched if checkpointing_was_off else f"micro-batch {micro_batch}"
        print(f"train: out of GPU memory at step {step + 1}; going on from step {step} with {change}")


def last_checkpoint(folder: Path) -> tuple[Path | None, int]:
    """The newest complete Trainer checkpoint in `folder` and its step, or (None, 0). trainer_state.json is the last
    file the Trainer writes: a folder without it is a save cut short by a crash."""
    complete = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    last = max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)
    return last, int(last.name.split("-")[1]) if last else 0


def loss_summary(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Last logged loss and the mean over all steps. Each logged loss is the mean over the steps since the previous
    log; the log history survives a resume (the Trainer's own training_loss covers only the steps this process ran)."""
    logged = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    losses = [loss for _, loss in logged]
    windows = np.diff([0] + [step for step, _ in logged])
    return {
        "final_loss": round(losses[-1], 4),
        "train_loss_mean": round(float(np.dot(windows, losses) / windows.sum()), 4),
    }


def throughput(
    params: Params, start_step: int, seconds: float, real_tokens: np.ndarray, padded_tokens: np.ndarray
) -> dict[str, float]:
    """Reviews and tokens per second over the steps this process ran (after a resume, only those were timed)."""
    timed = slice(start_step, None)
    return {
        "train_time_s": round(seconds, 2),
        "reviews_per_s": round((params.train.steps - start_step) * params.train.batch_size / seconds, 3),
        "tokens_per_s": round(float(real_tokens[timed].sum()) / seconds, 1),
        "padded_tokens_per_s": round(float(padded_tokens[timed].sum()) / seconds, 1),
        "padding_share": round(1 - float(real_tokens.sum()) / float(padded_tokens.sum()), 4),
    }


@dataclass
class FineTune:
    """A finished fine-tune: the Trainer's run (after any out-of-memory back-off) and what it cost."""

    run: BackoffResult
    seconds: float
    startup_s: float
    """From the process's start to the first step (duel.telemetry, startup_s)."""
    hardware: dict[str, float | None]
    real_tokens: np.ndarray
    """Real tokens per optimizer step, at the micro-batch the run finished with."""
    padded_tokens: np.ndarray


def fine_tune(
    model: Any,
    dataset: ReviewDataset,
    lengths: np.ndarray,
    order: np.ndarray,
    params: Params,
    collator: AnswerCollator,
    live: Live | None,
    checkpoints: Path,
    resume: Path | None,
) -> FineTune:
    """Train `model` with the Hugging Face Trainer on `dataset` (rows in training order), logging every step to
    `live` (DVCLive) and saving checkpoints to `checkpoints`; resume from `resume` when given. On a CUDA out-of-memory
    error the run goes on with less memory (train_with_backoff)."""
    token_counts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    profiler = profiling.from_environment()  # DUEL_PROFILE: torch.profiler over a few of these very steps
    sampler = GpuSampler()

    def build(micro_batch: int) -> Trainer:
        run_params = with_micro_batch(params, micro_batch)
        token_counts[micro_batch] = step_token_counts(lengths, order, run_params)
        loss = AnswerLoss(dataset.answer_ids)  # a callback too: adds the label-word loss to the log line
        callbacks = [StepTelemetry(*token_counts[micro_batch], params.train.batch_size, sampler), loss]
        callbacks.append(BudgetKeeper(params.execution.memory_budget_gib))
        if live is not None:  # None on ranks other than 0: one process writes the series
            callbacks += [LiveStep(live), DVCLiveCallback(live=live)]
        trainer = GraphedTrainer if params.execution.cuda_graphs else Trainer
        return trainer(
            model=model,
            args=training_arguments(run_params, checkpoints),
            train_dataset=dataset,
            data_collator=collator,
            compute_loss_func=loss,
            callbacks=[*callbacks, *([profiler] if profiler else [])],
        )

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sampler.start()
    watch = Stopwatch()
    startup_s = time.time() - process_started()
    run = train_with_backoff(
        build,
        params.train.batch_size,
        params.execution.micro_batch,
        str(resume) if resume else None,
        lambda: switch_on_checkpointing(model, offload=params.execution.offload_checkpoints is not False),
    )
    seconds = watch.elapsed_s()
    check_finite_weights(model, params)
    hardware = sampler.stop() | peak_memory() | allocator_summary()
    return FineTune(run, seconds, startup_s, hardware, *token_counts[run.micro_batch])


def check_finite_weights(model: Any, params: Params) -> None:
    """Stop before anything is saved when a trained weight is NaN or infinite (a diverged run can log a finite loss)."""
    broken = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if broken:
        raise TrainingError(
            f"train: {len(broken)} LoRA weight tensors hold NaN or infinite values after training (first: "
            f"{broken[0]}); the training diverged: lower train.learning_rate ({params.train.learning_rate:g}; the "
            "paper uses 2e-5)"
        )


def training_fingerprint(params: Params, key: str, files: list[Path]) -> str:
    """What a checkpoint was trained with: every param the fine-tune reads, and the files it trains from."""
    digest = hashlib.sha256()
    read = {
        "seed": params.seeds.train,
        "max_length": params.data.max_length,
        "model": dataclasses.asdict(params.model(key)),
        **{part: dataclasses.asdict(getattr(params, part)) for part in ("quantization", "lora", "train", "execution")},
    }
    digest.update(json.dumps(read, sort_keys=True).encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def resume_point(folder: Path, fingerprint: str, main_process: bool) -> tuple[Path | None, int]:
    """Where this run starts: rank 0 (or the only process) keeps a resumable checkpoint of these params
    (resumable_checkpoint); the other ranks, once it has decided, take the checkpoint it kept (the Trainer saves
    each rank's RNG state in it)."""
    last, step = resumable_checkpoint(folder, fingerprint) if main_process else (None, 0)
    barrier()
    return (last, step) if main_process else last_checkpoint(folder)


def resumable_checkpoint(folder: Path, fingerprint: str) -> tuple[Path | None, int]:
    """The newest complete checkpoint in `folder` if it was trained with `fingerprint`, else (None, 0): checkpoints
    of a run with other params or data are removed, never resumed into this one."""
    recorded = folder / "fingerprint.json"
    if folder.exists() and not (recorded.is_file() and json.loads(recorded.read_text()) == fingerprint):
        shutil.rmtree(folder)
        print(f"finetune: {folder} held checkpoints of a run with other params or data; removed, starting afresh")
    folder.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(fingerprint))
    return last_checkpoint(folder)


def finetune_metrics(done: FineTune, model: Any, params: Params, start_step: int, load_s: float) -> dict[str, Any]:
    """The numbers of a fine-tune: loss, speed over the steps this process ran, what starting up took (load_s: the
    model's build, part of startup_s), memory, energy, and what the back-off left it with."""
    steps_timed = params.train.steps - start_step
    trainable, total = model.get_nb_trainable_parameters()
    energy = done.hardware["energy_j"]
    return {
        **loss_summary(done.run.trainer.state.log_history),
        "steps": done.run.trainer.state.global_step,
        "resumed_from_step": start_step,
        "startup_s": round(done.startup_s, 2),
        "load_s": round(load_s, 2),
        **(speed := throughput(params, start_step, done.seconds, done.real_tokens, done.padded_tokens)),
        **utilization(speed["tokens_per_s"], model, params.execution.precision),
        **done.hardware,
        "energy_j_per_step": round(energy / steps_timed, 2) if energy else None,
        "checkpointed_layers": checkpointed_layers(model),
        "micro_batch": done.run.micro_batch,
        "grad_accum": params.train.batch_size // (done.run.micro_batch * world_size()),
        "oom_retries": done.run.oom_retries,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


def model_flops_per_token(model: Any) -> float:
    """Training FLOPs per real token (see duel/telemetry.py, mfu): 2N forward, 2N backward and 2N recomputed in each
    checkpointed layer, N the decoder layers' projection weights (their in x out, whether held in 4 bits or not)."""
    return float(
        sum((6 if layer.gradient_checkpointing else 4) * projection_weights(layer) for layer in decoder_layers(model))
    )


def utilization(tokens_per_s: float, model: Any, precision: str) -> dict[str, float | None]:
    """The training's model TFLOP/s and its MFU against the GPU's peak (None where the peak is unknown)."""
    return model_utilization(tokens_per_s, model_flops_per_token(model), precision)


def run_description(key: str, model: Any, params: Params, attention: str, kernels: str) -> dict[str, Any]:
    """How a fine-tune was executed, in words (kept beside its adapter, not among its metrics)."""
    return {
        "model": key,
        "device": device_name(),
        "attention": attention,
        "kernels": kernels,
        "compiled": params.execution.compile,
        "compile_cache": compile_summary() if params.execution.compile else None,
        "precision": params.execution.precision,
        "quantization": quantization_name(params.quantization),
        "base_weights": base_weights(model),
        "dequantized_layers": dequantized_layers(model, params.quantization.enabled),
        "padding": params.execution.padding,
        "fused_projections": fused_groups(model),
        "cuda_graphs": params.execution.cuda_graphs,
        "gradient_checkpointing": f"{checkpointed_layers(model)} of {len(decoder_layers(model))} layers",
        "offloaded_checkpoints": offloaded_layers(model),
        "offloaded_embeddings": isinstance(model.get_input_embeddings(), HostEmbedding),
        "memory": memory_kind(),
        "processes": world_size(),
        "allocator": os.environ.get(ALLOCATOR_ENV) or "default",  # execution.expandable_segments, or the user's own
    }
