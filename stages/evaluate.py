"""Stage evaluate: each fine-tuned model, and each base model zero-shot, on the same test reviews, by the logits of
the two label words at the answer position (no generation).

    python -m stages.evaluate        (run by `dvc repro`)

Reads params: models, quantization, eval, train.attention, train.kernels. Reads models/base/<key>/,
models/adapters/<key>/ and data/tokenized/<key>/test.parquet. Writes metrics/evaluate.json (accuracy, F1,
precision, recall, ROC-AUC, confusion matrix, reviews/s for every model and variant) and
data/predictions/<key>_<variant>.csv (one row per review).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from duel import cli
from duel.evaluation import classification_metrics, label_logits, predictions_frame
from duel.io import atomic_dir, read_json, write_json
from duel.modeling import (
    attention_implementation,
    dequantized,
    kernels_implementation,
    load_adapter_for_inference,
    load_base_model,
    load_tokenizer,
    merge_wanted,
    merged_adapter,
)
from duel.params import load_params
from duel.telemetry import GpuSampler, Stopwatch, torch_memory


def score(model: Any, test: pd.DataFrame, answer_ids: tuple[int, int], pad_id: int, batch: int, desc: str) -> tuple:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sampler, watch, stats = GpuSampler().start(), Stopwatch(), {}
    logits = label_logits(model, test, answer_ids, pad_id, batch, desc, stats)
    seconds = watch.elapsed_s()
    timing = {
        "eval_time_s": round(seconds, 2),
        "reviews_per_s": round(len(test) / seconds, 2),
        "eval_batch_size": stats["batch_size"],
        "eval_oom_retries": stats["oom_retries"],
    }
    return logits, timing | sampler.stop() | torch_memory()


def main() -> None:
    params = load_params()
    attention = attention_implementation(params.train.attention, packed=False)
    kernels = kernels_implementation(params.train.kernels)
    results: dict[str, dict] = {}
    with atomic_dir("data/predictions") as predictions:
        for key, model_params in params.models.items():
            base, tokens = Path("models/base") / key, Path("data/tokenized") / key
            adapter = Path("models/adapters") / key
            test = pd.read_parquet(tokens / "test.parquet")
            labels = test["label"].to_numpy()
            answer_ids = tuple(read_json(tokens / "verbalizer.json")["token_ids"])
            pad_id = load_tokenizer(base).pad_token_id
            model = load_base_model(base, model_params, params, attention, kernels)
            merge = merge_wanted(params)
            if merge:
                model = dequantized(model, params.quantization.enabled)
            scored = {}
            if params.eval.zero_shot:  # the base model alone, before the adapter joins it
                scored["zero_shot"] = score(model, test, answer_ids, pad_id, params.eval.batch_size, f"{key} zero-shot")
            model = merged_adapter(model, adapter) if merge else load_adapter_for_inference(model, adapter)
            scored["finetuned"] = score(model, test, answer_ids, pad_id, params.eval.batch_size, f"{key} finetuned")
            results[key] = {}
            for variant in ("finetuned", "zero_shot"):
                if variant not in scored:
                    continue
                logits, measured = scored[variant]
                results[key][variant] = (
                    classification_metrics(labels, logits) | measured | {"merged_adapter": merge, "kernels": kernels}
                )
                predictions_frame(labels, logits).to_csv(predictions / f"{key}_{variant}.csv", index=False)
                print(
                    f"evaluate {key} {variant}: accuracy {results[key][variant]['accuracy']}, "
                    f"F1 {results[key][variant]['f1']}, {results[key][variant]['reviews_per_s']} reviews/s"
                )
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        write_json("metrics/evaluate.json", results)


if __name__ == "__main__":
    cli.run(main)
