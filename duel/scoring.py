"""One scoring run: a base model (zero-shot) or a base model with its adapter (fine-tuned) on the tokenized test
reviews, its predictions written beside what it cost."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from duel.attention import FLEX
from duel.checkpointing import decoder_layers, limit_gpu_memory
from duel.evaluation import classification_metrics, confusion, predictions_frame, score
from duel.hub import load_tokenizer
from duel.io import atomic_dir, read_json, write_json
from duel.modeling import (
    attention_implementation,
    dequantized,
    kernels_implementation,
    load_adapter_for_inference,
    load_base_model,
    merge_wanted,
    merged_adapter,
    projection_weights,
)
from duel.params import ModelParams, Params
from duel.telemetry import device_name, model_utilization

PRECISIONS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # execution.compute_dtype -> PEAK_TFLOPS'


def score_model(
    model: ModelParams,
    params: Params,
    base: Path,
    tokens: Path,
    adapter: Path | None,
    out_dir: Path,
    desc: str,
    started: float,
) -> dict[str, Any]:
    """Score `base` (with `adapter` merged in or beside it, when given) on tokens/test.parquet. Writes out_dir/
    (predictions.csv, one row per review: review_id, label, prediction, score, logits; scoring.json, how it was
    scored and the confusion matrix) and returns the metrics: quality, then what scoring paid, its start-up counted
    from `started` (time.time()'s clock: the process's start, or the end of the model scored before)."""
    test = pd.read_parquet(tokens / "test.parquet")
    labels = test["label"].to_numpy()
    answer_ids = tuple(read_json(tokens / "verbalizer.json")["token_ids"])
    flattened = params.execution.eval_padding == "flattened"
    attention = attention_implementation(scoring_attention(params.execution.attention, flattened), packed=flattened)
    kernels = kernels_implementation(params.execution.kernels)
    merge = merge_wanted(params.execution)
    limit_gpu_memory(params.execution.memory_budget_gib)  # scoring too stays within the poor man's GPU

    loading = time.perf_counter()  # the model's build: load, quantize, dequantize, merge (eval_load_s)
    loaded = load_base_model(base, model, params, attention, kernels)
    if merge:  # the weights training saw, in compute_dtype, without per-batch dequantization
        loaded = dequantized(loaded, params.quantization.enabled)
    if adapter is not None:
        loaded = merged_adapter(loaded, adapter) if merge else load_adapter_for_inference(loaded, adapter)
    load_s = time.perf_counter() - loading
    pad_id, batch_size = load_tokenizer(base).pad_token_id, params.execution.eval_batch_size
    startup_s = time.time() - started
    budget = params.execution.memory_budget_gib
    logits, measured = score(loaded.eval(), test, answer_ids, pad_id, batch_size, desc, budget, flattened)
    measured |= scoring_speed(loaded, test, measured["eval_time_s"], params.execution.compute_dtype)
    measured |= {"eval_startup_s": round(startup_s, 2), "eval_load_s": round(load_s, 2)}
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    with atomic_dir(out_dir) as tmp:
        predictions_frame(test, logits).to_csv(tmp / "predictions.csv", index=False)
        write_json(
            tmp / "scoring.json",
            {
                "attention": attention,
                "padding": params.execution.eval_padding,
                "kernels": kernels,
                "dequantized_base": merge,
                "adapter": str(adapter) if adapter else None,
                "confusion_matrix": confusion(labels, logits),
                "device": device_name(),
            },
        )
    return classification_metrics(labels, logits) | measured


def scoring_speed(model: Any, test: pd.DataFrame, seconds: float, compute_dtype: str) -> dict[str, float | None]:
    """Scoring's real tokens per second, model TFLOP/s and MFU: 2N FLOPs per token, the forward pass only (N the
    decoder layers' projection weights, as a fine-tune's MFU counts them; duel/telemetry.py)."""
    tokens_per_s = float(test["input_ids"].map(len).sum()) / seconds
    flops = 2.0 * sum(projection_weights(layer) for layer in decoder_layers(model))
    speed = model_utilization(tokens_per_s, flops, PRECISIONS[compute_dtype])
    return {"eval_tokens_per_s": round(tokens_per_s, 1), **{f"eval_{k}": v for k, v in speed.items()}}


def scoring_attention(requested: str, flattened: bool) -> str:
    """execution.attention for scoring, before attention_implementation resolves it: flattened batches take auto in
    place of flex_attention, whose kernel would compile again for each new row length (a batch of reviews each)."""
    return "auto" if flattened and requested == FLEX else requested
