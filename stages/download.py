"""Stage download: the IMDB subsets the duel trains and tests on, from data.source, so that no later stage touches
the network for data.

    python -m stages.download        (run by `dvc repro`)

Reads params: seeds.data, data.source, data.source_sha256, data.train_size, data.test_size. Reads data.source (a hub
data set, a URL, or a local folder). Writes data/train.parquet, data/test.parquet (review_id, text, label; review_id =
"<split>-<row in the source split>") and metrics/data.json.
"""

from __future__ import annotations

from pathlib import Path

from duel import cli
from duel.data import check_schema, label_balance, read_source, stratified_sample, with_review_ids
from duel.io import write_json, write_parquet
from duel.params import load_params


def main() -> None:
    params = load_params()
    cache = Path(".cache/download")  # a downloaded tarball, kept between runs
    cache.mkdir(parents=True, exist_ok=True)

    splits = read_source(params.data, cache)
    # Each review is named by its split and row before anything is dropped or drawn (duel.data.with_review_ids).
    train = with_review_ids(check_schema(splits.train, "train", params.data.source), "train")
    test = with_review_ids(check_schema(splits.test, "test", params.data.source), "test")

    # IMDB repeats some reviews across its splits; training on a test review would inflate accuracy.
    in_test = train["text"].isin(set(test["text"]))
    train = train[~in_test].drop_duplicates("text")
    train_subset = stratified_sample(train, params.data.train_size, params.seeds.data, "data.train_size")
    test_subset = stratified_sample(test, params.data.test_size, params.seeds.data, "data.test_size")

    write_parquet("data/train.parquet", train_subset)
    write_parquet("data/test.parquet", test_subset)
    write_json(
        "metrics/data.json",
        {
            "reviews": {
                "source": {"train": len(splits.train), "test": len(splits.test)},
                "train_also_in_test": int(in_test.sum()),
                "train": {"count": len(train_subset), "labels": label_balance(train_subset)},
                "test": {"count": len(test_subset), "labels": label_balance(test_subset)},
            }
        },
    )
    write_json(
        "data/source.json",
        {"source": params.data.source, "source_kind": splits.source_kind, "source_sha256": splits.source_sha256},
    )
    print(
        f"download: {len(train_subset)} train / {len(test_subset)} test reviews from {params.data.source}; "
        f"{int(in_test.sum())} train reviews also in test were left out"
    )


if __name__ == "__main__":
    cli.run(main)
