"""Stage report: reports/report.md with PNG figures: loss curves of both models on one chart, memory over steps,
quality beside the zero-shot baselines and the paper's reported numbers, the hardware bill, the configuration.

    python -m stages.report          (run by `dvc repro`)

Reads metrics/*.json, plots/<key>/ (DVCLive series), models/base/<key>/model.json. Writes reports/.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from duel import cli
from duel.io import atomic_dir, read_json
from duel.params import as_dict, load_params
from duel.report import hardware_table, line_figure, quality_table, read_series


def main() -> None:
    params = load_params()
    keys = list(params.models)
    finetune = {key: read_json(f"metrics/finetune_{key}.json") for key in keys}
    evaluate = read_json("metrics/evaluate.json")
    data = read_json("metrics/data.json")
    tokenize = read_json("metrics/tokenize.json")
    bases = {key: read_json(Path("models/base") / key / "model.json") for key in keys}

    with atomic_dir("reports") as out:
        (out / "figures").mkdir()
        loss = {key: s for key in keys if (s := read_series(Path("plots") / key, "loss")) is not None}
        memory = {key: s for key in keys if (s := read_series(Path("plots") / key, "memory_gib")) is not None}
        line_figure(loss, "loss", "answer-token cross-entropy", "Training loss", out / "figures" / "loss.png")
        kind = "VRAM reserved by torch" if finetune[keys[0]]["memory_plot"] == "cuda_reserved" else "CPU peak RSS"
        line_figure(memory, "memory_gib", f"GiB ({kind})", "Memory during training", out / "figures" / "memory.png")

        lines = ["# Fine-tuning duel: report", ""]
        random = [key for key in keys if bases[key]["source"] == "random"]
        if random:
            shapes = ", ".join(
                f"{k}: {bases[k]['num_hidden_layers']} layers, hidden {bases[k]['hidden_size']}" for k in random
            )
            lines += [
                f"> **Warning: {', '.join(random)} had random weights** (`init: random`; {shapes}). "
                "Accuracy and F1 here say nothing about the real models; time and memory are those of this "
                "architecture on this machine.",
                "",
            ]
        lines += [
            "## Quality on the test reviews",
            "",
            f"{data['test']['reviews']} test reviews ({data['test']['labels']} per label), "
            f"{data['train']['reviews']} training reviews; scored by the logits of "
            f"{params.data.label_words} at the answer position. The paper's numbers are its claims, "
            "quoted for comparison, not reproduced by this run.",
            "",
        ]
        lines += [*quality_table(evaluate), ""]
        lines += ["## What the hardware paid (fine-tuning)", "", *hardware_table(finetune), ""]
        lines += ["Definitions: `duel/telemetry.py`. Tokens/s counts real tokens (padding excluded).", ""]
        lines += ["![training loss](figures/loss.png)", "", "![memory](figures/memory.png)", ""]
        lines += [
            "## Data",
            "",
            f"Source `{data['source']}` ({data['source_kind']}, SHA-256 "
            f"`{data['source_sha256'][:16]}…`); {data['train_reviews_also_in_test']} training reviews that "
            "also appear in the test split were kept out of training.",
            "",
        ]
        for key in keys:
            t = tokenize[key]["test"]
            lines.append(
                f"- {key}: test prompts {t['tokens_mean']} tokens on average (p95 {t['tokens_p95']}), "
                f"{t['truncated_share']:.1%} cut to {params.data.max_length} tokens; attention "
                f"{finetune[key]['attention']}, precision {finetune[key]['precision']}, quantization "
                f"{finetune[key]['quantization']}, micro-batch {finetune[key]['micro_batch']} x "
                f"{finetune[key]['grad_accum']}."
            )
        lines += [
            "",
            "## Resolved configuration",
            "",
            "```yaml",
            yaml.safe_dump(as_dict(params), sort_keys=False).strip(),
            "```",
            "",
        ]
        (out / "report.md").write_text("\n".join(lines))
    print(f"report: reports/report.md ({len(keys)} models)")


if __name__ == "__main__":
    cli.run(main)
