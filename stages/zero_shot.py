"""Stage zero_shot_<key>: one base model without an adapter, scored on the test reviews by the logits of the two
label words at the answer position: the baseline each fine-tune is measured against. It runs once per base model
and test set; a LoRA or training change does not touch it.

    python -m stages.zero_shot llama     (run by `dvc repro` as zero_shot_llama; deepseek likewise)

Reads params: models.<key>.trust_remote_code, quantization, execution (scoring keys). Reads models/base/<key>/ and
data/tokenized/<key>/. Writes metrics/zero_shot_<key>.json and data/predictions/<key>_zero_shot/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from duel import cli, parallel
from duel.io import write_json
from duel.params import load_params
from duel.scoring import score_model
from duel.telemetry import process_started


def main() -> None:
    key = sys.argv[1]
    params = load_params()
    if parallel.claim_gpus(1, f"zero_shot {key}"):  # a free GPU of the host, unless CUDA_VISIBLE_DEVICES says which
        sys.exit(parallel.relaunch("stages.zero_shot", 1))  # in a child, where CUDA starts on it
    base, tokens = Path("models/base") / key, Path("data/tokenized") / key
    out = Path("data/predictions") / f"{key}_zero_shot"
    metrics = score_model(params.model(key), params, base, tokens, None, out, f"{key} zero-shot", process_started())
    write_json(f"metrics/zero_shot_{key}.json", {key: {"zero_shot": metrics}})
    speed = metrics["eval_reviews_per_s"]
    print(f"zero_shot {key}: accuracy {metrics['accuracy']}, F1 {metrics['f1']}, {speed} reviews/s")


if __name__ == "__main__":
    cli.run(main)
