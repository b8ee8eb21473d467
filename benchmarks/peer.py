"""The peer: Unsloth's QLoRA on the duel's own work, run by benchmarks/run_device.py --peer beside the project's
finetune stage and the plain baseline, in the same device call.

The same work as the project's finetune stage: the base model it trained (models/base/<key>/, the same random
weights), the same tokenized reviews in the same order (data/tokenized/<key>/, duel.training.training_order), the
same answer-only labels (-100 except the answer token; Unsloth computes its own cross-entropy over them, at every
position), the same LoRA targets, rank, alpha and dropout, 16 reviews per optimizer step, learning rate and fused
AdamW. Each review is a row of its own, right-padded to the longest of its micro-batch (Unsloth packs only through
TRL's SFTTrainer, which would tokenize the text again; it drops the attention mask when training, exact only for
right padding).

A budget caps torch's allocator as execution.memory_budget_gib does for the project (the budget less the memory
outside torch, duel.checkpointing.limit_gpu_memory); on an out-of-memory error the micro-batch halves (16, 8, ..., 1),
gradient accumulation making up the 16 reviews of a step. One JSON line per budget and checkpointing way, on stdout
or, with --results, appended to run_device.py's results.jsonl as it comes:

    python benchmarks/peer.py llama --budgets 8,12,16,24,0      (0: the whole GPU)

--plain runs the same loop on transformers + PEFT (the CPU test's path: Unsloth needs a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--plain" not in sys.argv:  # Unsloth patches transformers and PEFT only when imported before them
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from duel.checkpointing import limit_gpu_memory
from duel.hub import load_tokenizer
from duel.io import read_json
from duel.params import Params, load_params
from duel.telemetry import GpuSampler, allocator_summary
from duel.training import AnswerCollator, ReviewDataset, training_order

MICRO_BATCHES = (16, 8, 4, 2, 1)


@dataclass
class Work:
    """The finetune stage's reviews, in its order, and its learning recipe."""

    dataset: ReviewDataset
    order: np.ndarray
    collate: AnswerCollator
    params: Params


def load_work(key: str) -> Work:
    params = load_params()
    folder = Path("data/tokenized") / key
    frame = pd.read_parquet(folder / "train.parquet")
    answers = tuple(read_json(folder / "verbalizer.json")["token_ids"])
    lengths = frame["input_ids"].map(len).to_numpy()
    order = training_order(lengths, params.train.steps, params.train.batch_size, params.seeds.train)
    pad_id = load_tokenizer(Path("models/base") / key).pad_token_id
    collate = AnswerCollator(pad_id, "longest", params.data.max_length)
    return Work(ReviewDataset(frame, answers), order, collate, params)


def load_model(key: str, params: Params, impl: str, checkpointing: str) -> Any:
    """The base model in 4-bit with LoRA adapters, through Unsloth (or transformers + PEFT with --plain, quantized as
    the stage quantizes)."""
    lora, targets = params.lora, params.model(key).lora_targets
    base, dtype = str(Path("models/base") / key), getattr(torch, params.execution.compute_dtype)
    if impl == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            base, max_seq_length=params.data.max_length, dtype=dtype, load_in_4bit=params.quantization.enabled
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            use_gradient_checkpointing=checkpointing if checkpointing != "none" else False,
            random_state=params.seeds.train,
        )
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from duel.modeling import quantization_config

        quantized = quantization_config(params.quantization, params.execution.compute_dtype)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, quantization_config=quantized)
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
        model = get_peft_model(model, config)
    model.train()  # from_pretrained returns eval mode: dropout and checkpointing off
    return model


def right_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The collator's left-padded rows with their padding moved to the end. Unsloth drops the attention mask when it
    trains, which is exact only for right padding (its source says so): left pads would be attended to."""
    pads = (batch["attention_mask"] == 0).sum(dim=1).tolist()
    keys = ("input_ids", "attention_mask", "labels")
    return {k: torch.stack([row.roll(-n) for row, n in zip(batch[k], pads, strict=True)]) for k in keys}


def train(model: Any, work: Work, micro_batch: int, budget_gib: float | None = None) -> dict[str, Any]:
    """train.steps optimizer steps of train.batch_size reviews, micro_batch at a time; the time of each step. The
    budget's cap is set again after the first step, as the finetune stage does (BudgetKeeper)."""
    device = next(model.parameters()).device
    batch_size = work.params.train.batch_size
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(trainable, lr=work.params.train.learning_rate, fused=fused)
    accumulate = batch_size // micro_batch
    step_s, real, padded, losses = [], 0, 0, []
    sampler = GpuSampler().start()
    for step in range(work.params.train.steps):
        start = time.perf_counter()
        rows = work.order[step * batch_size : (step + 1) * batch_size]
        for m in range(accumulate):
            features = [work.dataset[int(i)] for i in rows[m * micro_batch : (m + 1) * micro_batch]]
            batch = right_padded(work.collate(features))
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            loss = model(**inputs).loss / accumulate
            loss.backward()
            losses.append(float(loss.detach()) * accumulate)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - start)
        if step == 0 and budget_gib:
            limit_gpu_memory(budget_gib)
    hardware = sampler.stop() | allocator_summary()
    del optimizer, trainable
    seconds = sum(step_s)
    steady = step_s[2:] or step_s
    return {
        "steps": len(step_s),
        "reviews_per_s": round(len(step_s) * batch_size / seconds, 3),
        "steady_reviews_per_s": round(len(steady) * batch_size / sum(steady), 3),
        "tokens_per_s": round(real / seconds, 1),
        "padded_tokens_per_s": round(padded / seconds, 1),
        "first_step_s": round(step_s[0], 2),
        "first_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
    } | hardware


def adapters(model: Any) -> dict[str, torch.Tensor]:
    """A copy of the trainable (LoRA) weights, to start every budget's run from the same adapters."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore(model: Any, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in saved:
                p.copy_(saved[name])


def at_budget(model: Any, work: Work, budget_gib: float, initial: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The largest micro-batch that trains within the budget, from the `initial` adapters and the training seed, and
    what it measured."""
    limit_gpu_memory(budget_gib or None)
    for retries, micro_batch in enumerate(MICRO_BATCHES):
        if work.params.train.batch_size % micro_batch:
            continue
        restore(model, initial)
        torch.manual_seed(work.params.seeds.train)  # and the same dropout masks
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            result = train(model, work, micro_batch, budget_gib or None)
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            continue
        memory = {}
        if torch.cuda.is_available():
            memory = {
                "peak_vram_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
                "peak_vram_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            }
        return {"micro_batch": micro_batch, "oom_retries": retries} | result | memory
    return {"error": f"out of memory at micro-batch 1 within {budget_gib} GiB"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("key")
    parser.add_argument("--budgets", default="8,12,16,24,0", help="GiB, comma-separated; 0 for the whole GPU")
    parser.add_argument("--results", type=Path, help="append each result to this results.jsonl")
    parser.add_argument("--plain", action="store_true", help="transformers + PEFT instead of Unsloth")
    parser.add_argument("--no-checkpointing", action="store_true", help="also the whole GPU without checkpointing")
    args = parser.parse_args()
    impl = "hf" if args.plain else "unsloth"
    work = load_work(args.key)
    ways = [("none" if args.plain else "unsloth", [float(b) for b in args.budgets.split(",")])]
    if args.no_checkpointing:
        ways.append(("none", [0.0]))
    for checkpointing, budgets in ways:
        start = time.perf_counter()
        model = load_model(args.key, work.params, impl, checkpointing)
        load_s = round(time.perf_counter() - start, 1)
        initial = adapters(model)
        for budget in budgets:
            result = at_budget(model, work, budget, initial)
            run = {"impl": impl, "checkpointing": checkpointing, "memory_budget_gib": budget or None}
            row = run | {"load_s": load_s} | result
            print(json.dumps(row), flush=True)
            if args.results:
                tag = f"budget-{budget or 'none'}-{checkpointing}"
                with args.results.open("a") as f:
                    f.write(json.dumps({"kind": "peer", "model": args.key, "tag": tag, "data": row}) + "\n")
        del model, initial
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
