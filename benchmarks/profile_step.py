"""Where does a training step's time go? torch.profiler over a few optimizer steps of the finetune stage's own setup
(model, LoRA, collator, loss), on the first steps' reviews of data/tokenized/<key>/ (run download and tokenize
first, e.g. through benchmarks/run_device.py). Prints the kernels that took most device time and the share of time
per phase (forward, backward, optimizer), and writes the same to $OUT/profile_<key>.txt.

    python3 benchmarks/profile_step.py llama [--steps 3] [--warmup 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from duel.io import read_json
from duel.modeling import add_lora, attention_implementation, load_base_model, load_tokenizer
from duel.params import load_params
from duel.training import AnswerCollator, ReviewDataset, answer_loss, training_order

OUT = Path(os.environ.get("OUT", "out"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("key")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    params = load_params()
    train = params.train
    base, tokens = Path("models/base") / args.key, Path("data/tokenized") / args.key
    frame = pd.read_parquet(tokens / "train.parquet")
    order = training_order(frame["n_tokens"].to_numpy(), train.steps, train.batch_size, params.seed)
    dataset = ReviewDataset(frame.iloc[order], tuple(read_json(tokens / "verbalizer.json")["token_ids"]))
    collate = AnswerCollator.from_params(load_tokenizer(base).pad_token_id, params)

    attention = attention_implementation(train.attention)
    model = add_lora(load_base_model(base, params.model(args.key), params, attention), params.model(args.key), params)
    model.train()
    device = next(p for p in model.parameters() if p.requires_grad).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.learning_rate)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)
    cuda = device.type == "cuda"

    def step(index: int) -> None:
        features = [dataset[i] for i in range(index * train.batch_size, (index + 1) * train.batch_size)]
        for start in range(0, train.batch_size, train.micro_batch):
            batch = collate(features[start : start + train.micro_batch])
            labels = batch.pop("labels").to(device)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with record_function("forward"), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = answer_loss(model(**inputs), labels, train.batch_size)
            with record_function("backward"):
                loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

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
        f"profiler overhead included), micro-batch {train.micro_batch}, padding {train.padding}, "
        f"checkpointing {model.is_gradient_checkpointing}, attention {attention}\n"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"profile_{args.key}.txt").write_text(summary + table)
    print(summary + table)


if __name__ == "__main__":
    main()
