"""Stage report: reports/report.md with PNG figures: loss curves of both models on one chart, memory over steps,
quality with 95% intervals beside the zero-shot baselines and the paper's reported numbers, the paired comparisons
(accuracy difference, McNemar), the hardware bill, the configuration.

    python -m stages.report          (run by `dvc repro`)

Reads all params (the report prints the resolved configuration; seeds.data seeds the bootstrap), metrics/*.json,
data/source.json, data/predictions/<key>_{finetuned,zero_shot}/predictions.csv (one row per review), plots/<key>/
(DVCLive series) and models/adapters/<key>/training.json (how each fine-tune ran, on which base model). Writes reports/.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from duel import cli
from duel.io import atomic_dir, read_json
from duel.params import load_params
from duel.report import line_figure, read_series, report_markdown


def main() -> None:
    params = load_params()
    keys = list(params.models)
    # How each fine-tune ran (device, attention, padding...) and on which base is kept beside its adapter; its
    # numbers are metrics.
    training = {key: read_json(Path("models/adapters") / key / "training.json") for key in keys}
    finetune = {key: read_json(f"metrics/finetune_{key}.json")[key] | training[key]["run"] for key in keys}
    finetuned = read_json("metrics/evaluate.json")
    zero_shot = {key: read_json(f"metrics/zero_shot_{key}.json")[key]["zero_shot"] for key in keys}
    evaluate = {key: {"finetuned": finetuned[key], "zero_shot": zero_shot[key]} for key in keys}
    reviews, source = read_json("metrics/data.json")["reviews"], read_json("data/source.json")
    tokenize = read_json("metrics/tokenize.json")
    bases = {key: training[key]["base"] for key in keys}
    predictions = {
        key: {v: pd.read_csv(Path("data/predictions") / f"{key}_{v}" / "predictions.csv") for v in evaluate[key]}
        for key in keys
    }

    with atomic_dir("reports") as out:
        (out / "figures").mkdir()
        loss = {key: s for key in keys if (s := read_series(Path("plots") / key, "loss")) is not None}
        memory = {key: s for key in keys if (s := read_series(Path("plots") / key, "memory_gib")) is not None}
        line_figure(loss, "loss", "answer-token cross-entropy", "Training loss", out / "figures" / "loss.png")
        kind = "VRAM reserved by torch" if finetune[keys[0]]["memory"] == "cuda_reserved" else "CPU peak RSS"
        line_figure(
            memory, "memory_gib", f"GiB ({kind})", "Memory during training", out / "figures" / "memory.png", True
        )

        text = report_markdown(params, bases, reviews, source, tokenize, finetune, evaluate, predictions)
        (out / "report.md").write_text(text)
    print(f"report: reports/report.md ({len(keys)} models)")


if __name__ == "__main__":
    cli.run(main)
