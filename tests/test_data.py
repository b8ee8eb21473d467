"""IMDB readers and the stratified, seeded subsets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
from conftest import IMDB

from duel.data import DataError, check_schema, read_source, stratified_sample, with_review_ids


def reviews(n_neg: int, n_pos: int) -> pd.DataFrame:
    """n_neg negative and n_pos positive reviews with distinct texts, labels interleaved."""
    rows = [(f"negative review number {i}", 0) for i in range(n_neg)] + [
        (f"positive review number {i}", 1) for i in range(n_pos)
    ]
    return pd.DataFrame(rows, columns=["text", "label"]).sample(frac=1.0, random_state=0).reset_index(drop=True)


# --- stratified_sample ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 7, 50, 51, 100])
def test_sample_size_and_balance(size):
    frame = reviews(60, 60)
    sample = stratified_sample(frame, size, seed=42, key="data.train_size")
    assert len(sample) == size
    counts = sample["label"].value_counts()
    assert abs(counts.get(0, 0) - counts.get(1, 0)) <= 1
    assert not sample["text"].duplicated().any()  # drawn without replacement
    assert set(sample["text"]) <= set(frame["text"])
    assert list(sample.index) == list(range(size))


def test_sample_keeps_label_shares_of_unbalanced_frame():
    sample = stratified_sample(reviews(75, 25), 40, seed=1, key="data.test_size")
    assert sample["label"].value_counts().to_dict() == {0: 30, 1: 10}


def test_sample_rows_match_their_labels():
    sample = stratified_sample(reviews(30, 30), 20, seed=3, key="data.train_size")
    expected = sample["text"].str.startswith("positive").astype(int)
    assert (sample["label"] == expected).all()


def test_sample_is_deterministic_per_seed():
    frame = reviews(100, 100)
    first = stratified_sample(frame, 40, seed=42, key="data.train_size")
    again = stratified_sample(frame, 40, seed=42, key="data.train_size")
    other = stratified_sample(frame, 40, seed=43, key="data.train_size")
    pd.testing.assert_frame_equal(first, again)
    assert first["text"].tolist() != other["text"].tolist()
    assert set(first["text"]) != set(other["text"])


def test_sample_whole_frame_is_a_shuffle():
    frame = reviews(10, 10)
    sample = stratified_sample(frame, 20, seed=0, key="data.test_size")
    assert sorted(sample["text"]) == sorted(frame["text"])


def test_sample_too_large_names_key():
    with pytest.raises(DataError, match=r"data\.test_size") as err:
        stratified_sample(reviews(5, 5), 11, seed=0, key="data.test_size")
    assert "11" in str(err.value) and "10" in str(err.value)


# --- with_review_ids -----------------------------------------------------------------------------------------------


def test_review_ids_are_rows_of_the_source_split_and_survive_sampling():
    frame = with_review_ids(reviews(30, 30), "test")
    assert list(frame.columns) == ["review_id", "text", "label"]
    assert frame["review_id"].tolist()[:3] == ["test-0", "test-1", "test-2"] and frame["review_id"].is_unique
    by_id = dict(zip(frame["review_id"], frame["text"], strict=True))
    drawn = []
    for seed, size in ((42, 20), (7, 20), (42, 11)):
        sample = stratified_sample(frame, size, seed=seed, key="data.test_size")
        # A drawn review keeps the id of its row in the whole split, whichever seed and size drew it.
        assert [by_id[i] for i in sample["review_id"]] == sample["text"].tolist()
        drawn.append(set(sample["review_id"]))
    assert drawn[0] != drawn[1]  # the seeds draw different reviews


def test_review_ids_tell_repeated_texts_apart():
    frame = with_review_ids(pd.DataFrame({"text": ["Great.", "Dull.", "Great."], "label": [1, 0, 1]}), "train")
    assert frame["review_id"].tolist() == ["train-0", "train-1", "train-2"]


# --- check_schema --------------------------------------------------------------------------------------------------


def test_schema_keeps_text_and_label_as_int64():
    frame = reviews(2, 2).assign(extra=1.0, label=lambda f: f["label"].astype("int32"))
    out = check_schema(frame, "train", "src")
    assert list(out.columns) == ["text", "label"]
    assert out["label"].dtype == "int64"
    assert out["label"].tolist() == frame["label"].tolist()


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"text": ["good film"]}), "label"),
        (pd.DataFrame({"review": ["good film"], "label": [1]}), "text"),
        (pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=int)}), "empty"),
        (pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]}), "outside {0, 1}"),
        (pd.DataFrame({"text": ["a", "b"], "label": [0, -1]}), "outside {0, 1}"),
        (pd.DataFrame({"text": ["fine", "   "], "label": [0, 1]}), "1 empty"),
        (pd.DataFrame({"text": ["fine", None], "label": [0, 1]}), "1 empty"),
    ],
)
def test_schema_rejects(frame, message):
    with pytest.raises(DataError) as err:
        check_schema(frame, "test", "my/source")
    assert message in str(err.value)
    assert "my/source test" in str(err.value)


def test_schema_bad_label_message_is_plain():
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]})
    with pytest.raises(DataError, match=r"labels \[2\] outside"):
        check_schema(frame, "train", "src")


# --- read_source ---------------------------------------------------------------------------------------------------


def source_params(params, source: Path):
    return dataclasses.replace(params.data, source=str(source))


def test_read_parquet_folder(tmp_path: Path, params):
    train, test = reviews(3, 2), reviews(1, 4)
    train.to_parquet(tmp_path / "train.parquet", index=False)
    test.to_parquet(tmp_path / "test.parquet", index=False)
    splits = read_source(source_params(params, tmp_path), tmp_path / "cache")
    assert splits.source_kind == "parquet"
    pd.testing.assert_frame_equal(splits.train, train)
    pd.testing.assert_frame_equal(splits.test, test)
    assert len(splits.source_sha256) == 64 and int(splits.source_sha256, 16) >= 0
    # The checksum follows the files' content.
    reviews(3, 3).to_parquet(tmp_path / "test.parquet", index=False)
    assert read_source(source_params(params, tmp_path), tmp_path / "cache").source_sha256 != splits.source_sha256


def test_read_parquet_folder_without_test(tmp_path: Path, params):
    reviews(2, 2).to_parquet(tmp_path / "train.parquet", index=False)
    with pytest.raises(DataError, match=r"test\.parquet"):
        read_source(source_params(params, tmp_path), tmp_path / "cache")


def test_read_corrupt_parquet(tmp_path: Path, params):
    (tmp_path / "train.parquet").write_bytes(b"PAR1 this is not a parquet file")
    reviews(2, 2).to_parquet(tmp_path / "test.parquet", index=False)
    with pytest.raises(DataError, match="parquet"):
        read_source(source_params(params, tmp_path), tmp_path / "cache")


def test_read_aclimdb_layout(tmp_path: Path, params):
    root = tmp_path / "aclImdb"
    files = {
        "train/pos/0_9.txt": "Loved it.",
        "train/pos/10_8.txt": "Great cast.",
        "train/pos/2_7.txt": "Quite good.",
        "train/neg/1_2.txt": "Dull.",
        "test/pos/0_10.txt": "A classic.",
        "test/neg/0_1.txt": "Awful.",
        "test/neg/3_4.txt": "Too long.",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    splits = read_source(source_params(params, root), tmp_path / "cache")
    assert splits.source_kind == "aclimdb"
    # Negatives first, then positives, each in numeric id order (2 before 10).
    assert splits.train.values.tolist() == [["Dull.", 0], ["Loved it.", 1], ["Quite good.", 1], ["Great cast.", 1]]
    assert splits.test.values.tolist() == [["Awful.", 0], ["Too long.", 0], ["A classic.", 1]]
    assert len(splits.source_sha256) == 64


@pytest.mark.parametrize("name", ["does-not-exist", "empty-folder"])
def test_read_missing_or_unknown_folder(tmp_path: Path, params, name):
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(DataError, match=name):
        read_source(source_params(params, tmp_path / name), tmp_path / "cache")


@pytest.mark.skipif(not (IMDB / "train.parquet").exists(), reason="needs the IMDB mirror in ../shared/data/imdb")
def test_shared_imdb_mirror_schema_and_sample(params):
    splits = read_source(source_params(params, IMDB), IMDB)
    assert splits.source_kind == "parquet"
    train = check_schema(splits.train, "train", str(IMDB))
    assert len(train) == 25_000
    sample = stratified_sample(train, 320, seed=42, key="data.train_size")
    assert sample["label"].value_counts().to_dict() == {0: 160, 1: 160}
