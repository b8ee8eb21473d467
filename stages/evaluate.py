"""Stage evaluate: each fine-tuned model (its base with its LoRA adapter) on the test reviews, by the logits of the
two label words at the answer position (no generation). The zero-shot baselines are the zero_shot_<key> stages.

    python -m stages.evaluate        (run by `dvc repro`)

Reads params: models.<key>.trust_remote_code, quantization, execution (scoring keys). Reads models/base/<key>/,
models/adapters/<key>/ and data/tokenized/<key>/. Writes metrics/evaluate.json (accuracy, F1, precision, recall,
ROC-AUC, reviews/s, memory for every model) and data/predictions/<key>_finetuned/ (one row per review).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from duel import cli, parallel
from duel.io import write_json
from duel.params import load_params
from duel.scoring import score_model
from duel.telemetry import process_started


def main() -> None:
    params = load_params()
    if parallel.claim_gpus(1, "evaluate"):  # a free GPU of the host, unless CUDA_VISIBLE_DEVICES says which
        sys.exit(parallel.relaunch("stages.evaluate", 1))  # in a child, where CUDA starts on it
    results, started = {}, process_started()  # each model's start-up: from the process's start, then the previous end
    for key, model in params.models.items():
        base, tokens, adapter = Path("models/base") / key, Path("data/tokenized") / key, Path("models/adapters") / key
        out = Path("data/predictions") / f"{key}_finetuned"
        results[key] = score_model(model, params, base, tokens, adapter, out, f"{key} fine-tuned", started)
        started = time.time()
        print(
            f"evaluate {key}: accuracy {results[key]['accuracy']}, F1 {results[key]['f1']}, "
            f"{results[key]['eval_reviews_per_s']} reviews/s"
        )
    write_json("metrics/evaluate.json", results)


if __name__ == "__main__":
    cli.run(main)
