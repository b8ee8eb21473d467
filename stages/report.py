"""Stage report: reports/report.md and its figures in plots/report/ (duel/figures.py: loss, memory, throughput,
accuracy with its interval, confusion matrices, cost): quality with 95% intervals beside the zero-shot baselines and
the paper's reported numbers, the paired comparisons (accuracy difference, McNemar), the hardware bill, the
configuration.

    python -m stages.report          (run by `dvc repro`)

Reads all params (the report prints the resolved configuration; seeds.data seeds the bootstrap), metrics/*.json,
data/source.json, data/predictions/<key>_{finetuned,zero_shot}/predictions.csv (one row per review), plots/<key>/
(DVCLive series) and models/adapters/<key>/training.json (how each fine-tune ran, on which base model). Writes reports/
and plots/report/.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from duel import cli
from duel.claims import newest_ablation, peer_rows, read_records
from duel.figures import FOLDER, ModelRun, read_series, write_figures
from duel.io import atomic_dir, read_json
from duel.params import load_params
from duel.report import PAPER_REPORTED, report_markdown


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

    runs = [
        ModelRun(
            key,
            bases[key]["vocab_size"],
            bases[key]["source"] == "random",
            read_series(Path("plots") / key),
            finetune[key],
            evaluate[key],
            predictions[key],
            PAPER_REPORTED.get(key, {}).get("accuracy"),
        )
        for key in keys
    ]
    with atomic_dir(FOLDER) as out:
        write_figures(out, runs, params.data.label_words)
    with atomic_dir("reports") as out:
        losses = {run.key: run.series["loss"]["loss"] for run in runs if "loss" in run.series}
        records = read_records()  # benchmarks/records.jsonl: the GPU measurements the report quotes
        ablation, peers = newest_ablation(records), peer_rows(records)
        text = report_markdown(
            params, bases, reviews, source, tokenize, finetune, evaluate, predictions, losses, ablation, peers
        )
        (out / "report.md").write_text(text)
    print(f"report: reports/report.md ({len(keys)} models), figures in {FOLDER}/")


if __name__ == "__main__":
    cli.run(main)
