"""The experiments side by side, in a table that fits a terminal: per experiment, the params that differ between
the experiments shown, and each model's headline figures (fine-tuned accuracy, F1, ROC-AUC; training reviews/s and
peak memory). Read from `dvc exp show --json`; arguments go to it (e.g. --rev, -n, -A).

    python -m duel.compare           (make compare)

`dvc exp show` lists every metric, param and dependency; this is the view for deciding between runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pandas as pd

HEADLINE = {
    "acc": ("evaluate.json", "accuracy"),
    "F1": ("evaluate.json", "f1"),
    "AUC": ("evaluate.json", "roc_auc"),
    "train rev/s": ("finetune_{key}.json", "reviews_per_s"),
    "peak GiB": ("finetune_{key}.json", "peak_memory_gib"),
}


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    return {
        name: value for key, sub in tree.items() for name, value in flat(sub, f"{prefix}.{key}".lstrip(".")).items()
    }


def experiments(shown: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, data) of every row of `dvc exp show --json` that has metrics: the workspace, commits, experiments."""
    rows = []
    for commit in shown:
        for rev in [commit, *(r for e in commit.get("experiments") or [] for r in e["revs"])]:
            data = rev.get("data") or {}
            if (data.get("metrics") or {}).get("metrics/evaluate.json", {}).get("data"):
                name = rev.get("name") or (rev["rev"] if rev["rev"] == "workspace" else rev["rev"][:7])
                rows.append((name, data))
    return rows


def table(shown: list[dict[str, Any]]) -> pd.DataFrame:
    rows = experiments(shown)
    params = [flat(data["params"]["params.yaml"]["data"]) for _, data in rows]
    changed = (
        sorted(name for name in set().union(*params) if len({json.dumps(p.get(name)) for p in params}) > 1)
        if params
        else []
    )
    records = []
    for (name, data), values in zip(rows, params, strict=True):
        metrics = {file.split("/")[-1]: m.get("data", {}) for file, m in data["metrics"].items()}
        record: dict[tuple[str, str], Any] = {("", "experiment"): name}
        settings = sorted((f"{p}={values.get(p)}" for p in changed), key=len)  # the short ones first, never cut
        record[("", "changed params")] = " ".join(settings) or "-"
        keys = list(metrics.get("evaluate.json", {}))
        for key in keys:
            for label, (file, metric) in HEADLINE.items():
                source = metrics.get(file.format(key=key), {})
                record[(key, label)] = (source.get(key) or {}).get(metric)
        records.append(record)
    frame = pd.DataFrame(records)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame


def main() -> None:
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        print(f"error: dvc exp show failed: {done.stderr.strip()}", file=sys.stderr)
        sys.exit(1)
    frame = table(json.loads(done.stdout))
    if frame.empty:
        print("no experiment with metrics yet: run make demo or dvc exp run")
        return
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-", max_colwidth=60))


if __name__ == "__main__":
    main()
