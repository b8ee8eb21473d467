"""Where does a training step's time go? torch.profiler over a few optimizer steps of the finetune stage's own setup
(model, LoRA, collator, loss), on the first steps' reviews of data/tokenized/<key>/ (run download and tokenize
first, e.g. through benchmarks/run_device.py). Prints the kernels that took most device time and the share of time
per phase (forward, backward, optimizer) to stdout (benchmarks/run_device.py keeps it in $OUT/log.txt).

Then a sweep of how the same steps are executed (what is learned does not change): row length of the packing,
micro-batch split, gradient checkpointing on all, half or none of the layers, the layers compiled (execution.compile, on
CUDA; its one-off compile time recorded), Liger's kernels (where installed). For each: seconds per step, reviews/s,
real tokens/s and peak torch memory, appended to $OUT/results.jsonl as kind "sweep" (one line per variant).

    python3 benchmarks/profile_step.py llama [--steps 3] [--warmup 2] [--sweep-steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from duel.checkpointing import decoder_layers, set_checkpointed_layers
from duel.hub import load_tokenizer
from duel.io import read_json
from duel.modeling import (
    add_lora,
    apply_kernels,
    attention_implementation,
    compile_layers,
    kernels_implementation,
    load_base_model,
)
from duel.params import load_params
from duel.training import AnswerCollator, ReviewDataset, answer_loss, training_order

OUT = Path(os.environ.get("OUT", "out"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("key")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sweep-steps", type=int, default=4, help="0 skips the sweep")
    parser.add_argument("--compile", action="store_true", help="also the layers compiled (CUDA; minutes)")
    parser.add_argument("--kernels", default="none,liger", help="the sweep's kernel sets, of none and liger")
    args = parser.parse_args()
    params = load_params()
    train, execution = params.train, params.execution
    base, tokens = Path("models/base") / args.key, Path("data/tokenized") / args.key
    frame = pd.read_parquet(tokens / "train.parquet")
    order = training_order(frame["n_tokens"].to_numpy(), train.steps, train.batch_size, params.seeds.train)
    dataset = ReviewDataset(frame.iloc[order], tuple(read_json(tokens / "verbalizer.json")["token_ids"]))
    collate = AnswerCollator.from_params(load_tokenizer(base).pad_token_id, params)

    # The profile and the first half of the sweep with the plain kernels; Liger joins for the second half.
    attention, kernels = attention_implementation(execution.attention, execution.padding == "packed"), "none"
    model = add_lora(
        load_base_model(base, params.model(args.key), params, attention, kernels), params.model(args.key), params
    )
    model.train()
    device = next(p for p in model.parameters() if p.requires_grad).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.learning_rate)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(execution.precision)
    cuda = device.type == "cuda"

    def step(index: int, micro_batch: int = execution.micro_batch, collate: AnswerCollator = collate) -> int:
        """One optimizer step on the index-th batch (from the start again after the last); returns its real tokens."""
        index %= len(dataset) // train.batch_size
        features = [dataset[i] for i in range(index * train.batch_size, (index + 1) * train.batch_size)]
        for start in range(0, train.batch_size, micro_batch):
            batch = collate(features[start : start + micro_batch])
            labels = batch.pop("labels").to(device)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with record_function("forward"), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = answer_loss(model(**inputs), labels, train.batch_size)
            with record_function("backward"):
                loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return sum(len(f["input_ids"]) + 1 for f in features)

    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(args.warmup, args.warmup + args.steps):
            step(i)
        if cuda:
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    summary = (
        f"profile {args.key}: {seconds:.3f} s per optimizer step ({train.batch_size / seconds:.2f} reviews/s, "
        f"profiler overhead included), micro-batch {execution.micro_batch}, padding {execution.padding}, "
        f"checkpointing {model.is_gradient_checkpointing}, attention {attention}, kernels {kernels}\n"
    )
    print(summary + table)
    if not args.sweep_steps:
        return
    first = args.warmup + args.steps
    layers = len(decoder_layers(model))
    batch = train.batch_size
    kernel_sets = args.kernels.split(",")
    if "none" in kernel_sets:
        sweep(args.key, model, step, collate, first, args.sweep_steps, batch, "none", variants(collate, batch, layers))
    if cuda and args.compile:  # execution.compile: its one-off cost, then the same batches compiled
        compile_layers(model, True)
        start = time.perf_counter()
        for _ in range(2):  # the first layer (its input needs no gradient) and the others compile separately
            step(first)
        torch.cuda.synchronize()
        compile_s = round(time.perf_counter() - start, 1)
        print(f"sweep {args.key}: compiling the layers took {compile_s} s (2 steps included)", flush=True)
        compiled = [
            Variant("compiled", collate.row_tokens, batch, 0),
            Variant("compiled-ckpt-all", collate.row_tokens, batch, layers),
        ]
        sweep(
            args.key, model, step, collate, first, args.sweep_steps, batch, "none", compiled, {"compile_s": compile_s}
        )
        for layer in decoder_layers(model):
            layer._compiled_call_impl = None  # back to eager for the Liger half
    if kernels_implementation(execution.kernels) == "liger" and "liger" in kernel_sets:
        apply_kernels(model, "liger")
        sweep(args.key, model, step, collate, first, args.sweep_steps, batch, "liger", variants(collate, batch, layers))


@dataclass(frozen=True)
class Variant:
    name: str
    row_tokens: int
    micro_batch: int
    checkpointed: int
    attention: str | None = None  # None: the one the model was loaded with


def variants(collate: AnswerCollator, batch: int, layers: int) -> list[Variant]:
    """The eager variants: row length, micro-batch, checkpointed layers, and SDPA's masked attention where the
    model's own is another (varlen)."""
    rows = collate.row_tokens
    return [
        Variant("default", rows, batch, 0),
        Variant("rows-1024", 1024, batch, 0),
        Variant("rows-4096", 4096, batch, 0),
        Variant("mb8", rows, batch // 2, 0),
        Variant("ckpt-all", rows, batch, layers),
        Variant("ckpt-all-but-4", rows, batch, max(layers - 4, 0)),
        Variant("ckpt-half", rows, batch, layers // 2),
        Variant("ckpt-all-rows-1024", 1024, batch, layers),
        Variant("sdpa", rows, batch, 0, "sdpa"),
        Variant("sdpa-ckpt-all", rows, batch, layers, "sdpa"),
    ]


def sweep(
    key: str,
    model: torch.nn.Module,
    step: Callable[..., int],
    collate: AnswerCollator,
    first: int,
    steps: int,
    batch: int,
    kernels: str,
    variants: list[Variant],
    extra: dict[str, float] | None = None,
) -> None:
    """Seconds per step and peak memory (on CUDA) for execution variants: each a warm-up step on batch `first`,
    then `steps` timed steps on the batches after it (the same batches for every variant). `extra` goes into each
    variant's row."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    layers = len(decoder_layers(model))
    for _ in range(2):  # untimed: in every H200 sweep the first variant after the profiler ran slow
        step(first)
    loaded = model.config._attn_implementation
    for variant in variants:
        set_checkpointed_layers(model, variant.checkpointed)
        model.set_attn_implementation(variant.attention or loaded)
        rows = AnswerCollator(collate.pad_id, collate.padding, variant.row_tokens)
        try:
            step(first, variant.micro_batch, rows)  # warm-up: allocator and kernel choice for the new shapes
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            tokens = sum(step(first + 1 + i, variant.micro_batch, rows) for i in range(steps))
            sync()
            seconds = (time.perf_counter() - start) / steps
            row = {
                "variant": variant.name,
                "kernels": kernels,
                "attention": variant.attention or loaded,
                "row_tokens": variant.row_tokens,
                "micro_batch": variant.micro_batch,
                "checkpointed_layers": variant.checkpointed,
                "layers": layers,
                "s_per_step": round(seconds, 4),
                "reviews_per_s": round(batch / seconds, 2),
                "tokens_per_s": round(tokens / steps / seconds, 1),
            } | (extra or {})
            if cuda:
                row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        except torch.OutOfMemoryError as error:
            row = {"variant": variant.name, "kernels": kernels, "error": str(error).splitlines()[0][:200]}
        if cuda:
            torch.cuda.empty_cache()
        print(f"sweep {key}: {row}", flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        with (OUT / "results.jsonl").open("a") as f:
            f.write(json.dumps({"kind": "sweep", "model": key, "tag": f"{kernels}/{variant.name}", "data": row}) + "\n")
    model.set_attn_implementation(loaded)


if __name__ == "__main__":
    main()
