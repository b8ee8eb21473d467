"""Stage tokenize: prompt + review token ids for each model (the tokenizers differ), truncated to data.max_length
with the review's start kept and room left for the one-token answer.

    python -m stages.tokenize        (run by `dvc repro`)

Reads params: data.max_length, data.prompt, data.label_words. Reads data/*.parquet and models/base/<key>/.
Writes data/tokenized/<key>/ ({train,test}.parquet, verbalizer.json) and metrics/tokenize.json (share of truncated
reviews, length distribution, verbalizer token ids).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from duel import cli
from duel.hub import load_tokenizer, model_info
from duel.io import atomic_dir, write_json
from duel.params import ParamsError, load_params
from duel.prompts import tokenize_split, verbalizer


def main() -> None:
    params = load_params()
    splits = {name: pd.read_parquet(f"data/{name}.parquet") for name in ("train", "test")}

    report = {}
    for key in params.models:
        base = Path("models/base") / key
        tokenizer = load_tokenizer(base)
        positions = model_info(base)["max_position_embeddings"]
        if params.data.max_length > positions:
            raise ParamsError(f"data.max_length: {params.data.max_length} exceeds models.{key}'s {positions} positions")
        answer = verbalizer(tokenizer, params.data, key)
        report[key] = {}
        with atomic_dir(Path("data/tokenized") / key) as tmp:
            write_json(
                tmp / "verbalizer.json", {"label_words": params.data.label_words, "token_ids": list(answer.token_ids)}
            )
            for name, frame in splits.items():
                tokens, stats = tokenize_split(frame, tokenizer, params.data)
                tokens.to_parquet(tmp / f"{name}.parquet", index=False)
                report[key].setdefault("prompt_tokens", {})[name] = stats
        counts = report[key]["prompt_tokens"]
        print(f"tokenize {key}: train {counts['train']}; test {counts['test']}")
    write_json("metrics/tokenize.json", report)


if __name__ == "__main__":
    cli.run(main)
