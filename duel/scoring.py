"""One scoring run: a base model (zero-shot) or a base model with its adapter (fine-tuned) on the tokenized test
reviews, its predictions written beside what it cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from duel.checkpointing import limit_gpu_memory
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
)
from duel.params import ModelParams, Params
from duel.telemetry import device_name


def score_model(
    model: ModelParams, params: Params, base: Path, tokens: Path, adapter: Path | None, out_dir: Path, desc: str
) -> dict[str, Any]:
    """Score `base` (with `adapter` merged in or beside it, when given) on tokens/test.parquet. Writes out_dir/
    (predictions.csv, one row per review: review_id, label, prediction, score, logits; scoring.json, how it was
    scored and the confusion matrix) and returns the metrics: quality, then what scoring paid."""
    test = pd.read_parquet(tokens / "test.parquet")
    labels = test["label"].to_numpy()
    answer_ids = tuple(read_json(tokens / "verbalizer.json")["token_ids"])
    attention = attention_implementation(params.execution.attention, packed=False)
    kernels = kernels_implementation(params.execution.kernels)
    merge = merge_wanted(params.execution)
    limit_gpu_memory(params.execution.memory_budget_gib)  # scoring too stays within the poor man's GPU

    loaded = load_base_model(base, model, params, attention, kernels)
    if merge:  # the weights training saw, in compute_dtype, without per-batch dequantization
        loaded = dequantized(loaded, params.quantization.enabled)
    if adapter is not None:
        loaded = merged_adapter(loaded, adapter) if merge else load_adapter_for_inference(loaded, adapter)
    pad_id, batch_size = load_tokenizer(base).pad_token_id, params.execution.eval_batch_size
    logits, measured = score(
        loaded.eval(), test, answer_ids, pad_id, batch_size, desc, params.execution.memory_budget_gib
    )
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    with atomic_dir(out_dir) as tmp:
        predictions_frame(test, logits).to_csv(tmp / "predictions.csv", index=False)
        write_json(
            tmp / "scoring.json",
            {
                "attention": attention,
                "kernels": kernels,
                "dequantized_base": merge,
                "adapter": str(adapter) if adapter else None,
                "confusion_matrix": confusion(labels, logits),
                "device": device_name(),
            },
        )
    return classification_metrics(labels, logits) | measured
