"""Stage base_<key>: one base model, resolved so that no later stage touches the network: the hub checkpoint pinned
to a commit (its weights stay in the Hugging Face cache), or its architecture with seeded random weights.

    python -m stages.base llama          (run by `dvc repro` as base_llama; deepseek likewise)

Reads params: seeds.weights, models.<key> (checkpoint, revision, init, overrides, trust_remote_code). Writes
models/base/<key>/ (tokenizer, config, model.json with the resolved commit; the weights too when init is random).
"""

from __future__ import annotations

import sys
from pathlib import Path

from duel import cli
from duel.hub import resolve_model
from duel.params import load_params


def main() -> None:
    key = sys.argv[1]
    params = load_params()
    info = resolve_model(key, params.model(key), params.seeds.weights, Path("models/base") / key)
    size = f"{info['num_parameters']:,} parameters" if info["num_parameters"] else f"commit {info['revision']}"
    print(f"base {key}: {info['checkpoint']} ({info['source']}, {size}) in models/base/{key}")


if __name__ == "__main__":
    cli.run(main)
