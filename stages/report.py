"""Stage report: reports/report.md with PNG figures: loss curves of both models on one chart, memory over steps,
quality beside the zero-shot baselines and the paper's reported numbers, the hardware bill, the configuration.

    python -m stages.report          (run by `dvc repro`)

Reads all params (the report prints the resolved configuration), metrics/*.json, data/source.json, plots/<key>/
(DVCLive series) and models/adapters/<key>/training.json (how each fine-tune ran, on which base model). Writes reports/.
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
    # How each fine-tune ran (device, attention, padding...) is kept beside its adapter; its numbers are metrics.
    finetune = {
        key: read_json(f"metrics/finetune_{key}.json")[key]
        | read_json(Path("models/adapters") / key / "training.json")["run"]
        for key in keys
    }
    finetuned = read_json("metrics/evaluate.json")
    zero_shot = {key: read_json(f"metrics/zero_shot_{key}.json")[key]["zero_shot"] for key in keys}
    evaluate = {key: {"finetuned": finetuned[key], "zero_shot": zero_shot[key]} for key in keys}
    reviews, source = read_json("metrics/data.json")["reviews"], read_json("data/source.json")
    tokenize = read_json("metrics/tokenize.json")
    bases = {key: read_json(Path("models/adapters") / key / "training.json")["base"] for key in keys}

    with atomic_dir("reports") as out:
        (out / "figures").mkdir()
        loss = {key: s for key in keys if (s := read_series(Path("plots") / key, "loss")) is not None}
        memory = {key: s for key in keys if (s := read_series(Path("plots") / key, "memory_gib")) is not None}
        line_figure(loss, "loss", "answer-token cross-entropy", "Training loss", out / "figures" / "loss.png")
        kind = "VRAM reserved by torch" if finetune[keys[0]]["memory"] == "cuda_reserved" else "CPU peak RSS"
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
            f"{reviews['test']['count']} test reviews ({reviews['test']['labels']} per label), "
            f"{reviews['train']['count']} training reviews; scored by the logits of "
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
            f"Source `{source['source']}` ({source['source_kind']}, SHA-256 "
            f"`{source['source_sha256'][:16]}…`); {reviews['train_also_in_test']} training reviews that "
            "also appear in the test split were kept out of training.",
            "",
        ]
        for key in keys:
            t = tokenize[key]["prompt_tokens"]["test"]
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
