"""IMDB readers and the stratified, seeded subsets."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import re
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.mark.parametrize("size", [2, 7, 50, 51, 100])
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


@pytest.mark.parametrize(
    ("frame", "size", "message"),
    [
        (reviews(60, 60), 1, r"data\.train_size: a subset of 1 holds no review of label 1 \(50\.0% .*at least 2 "),
        (reviews(99, 1), 50, r"data\.train_size: a subset of 50 holds no review of label 1 .*at least 100 "),
        (reviews(0, 30), 10, r"data\.train_size: .* no review of label 0 .*use a source with both classes"),
    ],
    ids=["too-small", "too-rare", "one-class-left"],
)
def test_sample_without_both_classes_is_refused(frame, size, message):
    """Both classes in every subset: a subset of one class makes accuracy, F1 and ROC-AUC meaningless."""
    with pytest.raises(DataError, match=message):
        stratified_sample(frame, size, seed=0, key="data.train_size")
    assert set(stratified_sample(reviews(99, 1), 100, seed=0, key="data.train_size")["label"]) == {0, 1}


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ([17, 4], r"text column of integer values, not text \(row 0: 17\)"),
        ([b"good film", b"dull"], r"text column of bytes values, not text \(row 0: b'good film'\)"),
        (["good film", 3.5], r"text column of mixed values, not text \(row 1: 3\.5\)"),
        ([float("nan"), float("nan")], r"has 2 empty review\(s\)"),
        (["good film", float("nan")], r"has 1 empty review\(s\)"),
    ],
    ids=["numbers", "bytes", "mixed", "all-nan", "one-nan"],
)
def test_schema_refuses_text_that_is_not_text(text, message):
    frame = pd.DataFrame({"text": text, "label": [0, 1]})
    with pytest.raises(DataError, match=r"^data\.source: my/source train split (has a )?" + message) as err:
        check_schema(frame, "train", "my/source")
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    "labels",
    [["neg", "pos"], ["0", "1"], pd.Categorical(["neg", "pos"])],
    ids=["words", "digit-strings", "categorical"],
)
def test_schema_refuses_labels_given_as_words(labels):
    frame = pd.DataFrame({"text": ["dull", "great"], "label": labels})
    with pytest.raises(DataError, match=r"has labels \[.*\], not numbers; give them as 0 \(negative\) and 1 \(pos"):
        check_schema(frame, "test", "src")


@pytest.mark.parametrize("labels", [[0.0, 1.0], [False, True], pd.array([0, 1], dtype="Int8")])
def test_schema_reads_integral_float_and_bool_labels_as_ints(labels):
    out = check_schema(pd.DataFrame({"text": ["dull", "great"], "label": labels}), "train", "src")
    assert out["label"].dtype == "int64" and out["label"].tolist() == [0, 1]


@pytest.mark.parametrize("labels", [[0.5, 1.0], [0.0, float("nan")]], ids=["fraction", "nan"])
def test_schema_refuses_float_labels_that_are_not_0_or_1(labels):
    with pytest.raises(DataError, match=r"outside \{0, 1\}"):
        check_schema(pd.DataFrame({"text": ["dull", "great"], "label": labels}), "train", "src")


def test_schema_refuses_a_split_of_one_class():
    frame = pd.DataFrame({"text": ["great", "fine", "superb"], "label": [1, 1, 1]})
    with pytest.raises(DataError, match=r"^data\.source: src test split holds only label 1 reviews; .*both classes"):
        check_schema(frame, "test", "src")


# --- read_source ---------------------------------------------------------------------------------------------------


def source_params(params, source: Path | str):
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


def write_files(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            (root / name).write_text(content, encoding="utf-8")
        else:
            (root / name).write_bytes(content)
    return root


# One review per class and split: the smallest aclImdb the duel can use.
ACLIMDB = {
    "train/pos/0_9.txt": "Loved it.",
    "train/neg/0_2.txt": "Dull.",
    "test/pos/0_10.txt": "A classic.",
    "test/neg/0_1.txt": "Awful.",
}
# What copies of the tarball's folder carry besides the reviews (macOS, Windows, the tarball itself).
STRAY_FILES = {
    "README": "Large Movie Review Dataset v1.0",
    "imdb.vocab": "the\nand\n",
    "train/urls_pos.txt": "http://www.imdb.com/title/tt0453418/usercomments\n",
    "train/labeledBow.feat": "9 0:9 1:1\n",
    "train/unsup/0_0.txt": "An unlabelled review.",
    "train/pos/.DS_Store": b"\x00\x00\x00\x01Bud1\x00\x00",
    "train/pos/._0_9.txt": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \xff\xfe",
    "train/neg/Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
    "test/neg/desktop.ini": "[.ShellClassInfo]\r\n",
}


def test_read_aclimdb_leaves_stray_files_alone(tmp_path: Path, params):
    root = write_files(tmp_path / "aclImdb", ACLIMDB | STRAY_FILES)
    splits = read_source(source_params(params, root), tmp_path / "cache")
    assert splits.train.values.tolist() == [["Dull.", 0], ["Loved it.", 1]]
    assert splits.test.values.tolist() == [["Awful.", 0], ["A classic.", 1]]
    # The folder the tarball was extracted into works as well as aclImdb/ itself.
    parent = read_source(source_params(params, tmp_path), tmp_path / "cache")
    pd.testing.assert_frame_equal(parent.train, splits.train)


def test_read_aclimdb_drops_a_byte_order_mark(tmp_path: Path, params):
    root = write_files(tmp_path / "aclImdb", ACLIMDB | {"train/pos/0_9.txt": "\ufeffLoved it, café and all.".encode()})
    splits = read_source(source_params(params, root), tmp_path / "cache")
    assert splits.train["text"].tolist() == ["Dull.", "Loved it, café and all."]


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252", "utf-16"])
def test_read_aclimdb_refuses_a_file_that_is_not_utf8_naming_it(tmp_path: Path, params, encoding):
    text = "Un café superbe." if encoding == "latin-1" else "Un café “superbe”."  # latin-1 has no curly quotes
    root = write_files(tmp_path / "aclImdb", ACLIMDB | {"test/pos/7_8.txt": text.encode(encoding)})
    with pytest.raises(DataError, match=r"^data\.source: .*test/pos/7_8\.txt is not UTF-8 \(.* at byte \d+\); ") as err:
        read_source(source_params(params, root), tmp_path / "cache")
    assert "iconv" in str(err.value) and len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("name", ["notes.txt", "12_8 (copy).txt", "12.txt", "12_8.txt.txt"])
def test_read_aclimdb_refuses_a_text_file_not_named_like_a_review(tmp_path: Path, params, name):
    root = write_files(tmp_path / "aclImdb", ACLIMDB | {f"train/neg/{name}": "Maybe a review, maybe not."})
    with pytest.raises(DataError, match=r"is not named <id>_<rating>\.txt like a review \(1 such file\(s\) in ") as err:
        read_source(source_params(params, root), tmp_path / "cache")
    assert str(err.value).startswith(f"data.source: {root / 'train' / 'neg' / name} ")


def test_read_aclimdb_names_a_missing_class_folder(tmp_path: Path, params):
    root = write_files(tmp_path / "aclImdb", {k: v for k, v in ACLIMDB.items() if not k.startswith("test/neg/")})
    with pytest.raises(DataError, match=r"^data\.source: .*aclImdb has no test/neg/ folder; an extracted aclImdb"):
        read_source(source_params(params, root), tmp_path / "cache")


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


# --- a URL source -------------------------------------------------------------------------------------------------


def tarball(files: dict[str, str | bytes]) -> bytes:
    """A gzipped tar of `files` (path inside the archive -> content), as aclImdb_v1.tar.gz is built."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            archive.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


GOOD_TARBALL = tarball({f"aclImdb/{name}": text for name, text in (ACLIMDB | STRAY_FILES).items()})


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    """A local web server (127.0.0.1) serving SERVED[path]; /cut-short.tar.gz announces more bytes than it sends."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            body, kind = SERVED.get(self.path, (b"<html>Not found</html>", "text/html"))
            self.send_response(200 if self.path in SERVED else 404)
            self.send_header("Content-Type", kind)
            announced = len(body) * 2 if self.path == "/cut-short.tar.gz" else len(body)
            self.send_header("Content-Length", str(announced))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


SERVED = {
    "/aclImdb_v1.tar.gz": (GOOD_TARBALL, "application/x-gzip"),
    "/login.tar.gz": (b"<!DOCTYPE html><html><body>Please log in</body></html>", "text/html"),
    "/plain.tar.gz": (b"aclImdb/train/pos/0_9.txt Loved it.\n" * 20, "application/octet-stream"),
    "/truncated.tar.gz": (GOOD_TARBALL[: len(GOOD_TARBALL) // 2], "application/x-gzip"),
    "/other.tar.gz": (tarball({"sst2/train.tsv": "sentence\tlabel\n"}), "application/x-gzip"),
    "/cut-short.tar.gz": (GOOD_TARBALL, "application/x-gzip"),
}


def test_read_url_tarball(tmp_path: Path, params, web: str):
    cache = tmp_path / "cache"
    cache.mkdir()
    splits = read_source(source_params(params, f"{web}/aclImdb_v1.tar.gz"), cache)
    assert splits.source_kind == "url"
    assert splits.train.values.tolist() == [["Dull.", 0], ["Loved it.", 1]]
    assert splits.source_sha256 == hashlib.sha256(GOOD_TARBALL).hexdigest()
    assert sorted(p.name for p in cache.iterdir()) == ["aclImdb", "aclImdb_v1.tar.gz"]


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/login.tar.gz", r"not a readable tar archive: ReadError"),
        ("/plain.tar.gz", r"not a readable tar archive: ReadError"),
        ("/truncated.tar.gz", r"not a readable tar archive: (EOFError|ReadError)"),
        ("/other.tar.gz", r"it holds no aclImdb/ folder; first entries: sst2/train\.tsv"),
    ],
    ids=["html-page", "not-gzip", "truncated", "no-aclImdb"],
)
def test_url_that_serves_no_aclimdb_tarball_is_refused_and_removed(tmp_path: Path, params, web: str, path, problem):
    cache = tmp_path / "cache"
    write_files(cache / "aclImdb", ACLIMDB)  # an earlier download's folder: never read in place of this one
    url = f"{web}{path}"
    with pytest.raises(DataError) as err:
        read_source(source_params(params, url), cache)
    message = str(err.value)
    assert re.match(rf"data\.source: {re.escape(url)} did not serve the aclImdb tarball \({problem}", message), message
    assert "the download was removed" in message and len(message.splitlines()) == 1
    assert list(cache.iterdir()) == [], "the bad download (or an old extraction) was left behind"


def test_url_transfer_cut_short_leaves_nothing(tmp_path: Path, params, web: str):
    cache = tmp_path / "cache"
    cache.mkdir()
    url = f"{web}/cut-short.tar.gz"
    with pytest.raises(DataError, match=rf"^data\.source: cannot download {re.escape(url)} \(.+\); use a local"):
        read_source(source_params(params, url), cache)
    assert list(cache.iterdir()) == []


def test_url_that_does_not_exist(tmp_path: Path, params, web: str):
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(DataError, match=r"^data\.source: cannot download .*/missing\.tar\.gz \(HTTP Error 404"):
        read_source(source_params(params, f"{web}/missing.tar.gz"), cache)
    assert list(cache.iterdir()) == []


# --- a hub data set -----------------------------------------------------------------------------------------------


def test_hub_data_set_without_a_test_split(tmp_path: Path, params, monkeypatch: pytest.MonkeyPatch):
    import datasets

    loaded = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(reviews(2, 2))})
    monkeypatch.setattr(datasets, "load_dataset", lambda dataset_id: loaded)
    with pytest.raises(DataError, match=r"^data\.source: hub data set 'org/sst' has no test split \(it has train\)"):
        read_source(source_params(params, "org/sst"), tmp_path / "cache")


def test_hub_data_set_with_other_columns_names_them(tmp_path: Path, params, monkeypatch: pytest.MonkeyPatch):
    import datasets

    other = datasets.Dataset.from_pandas(reviews(2, 2).rename(columns={"text": "sentence"}))
    monkeypatch.setattr(datasets, "load_dataset", lambda dataset_id: datasets.DatasetDict(train=other, test=other))
    splits = read_source(source_params(params, "org/sst"), tmp_path / "cache")
    with pytest.raises(DataError, match=r"train split lacks column\(s\) \['text'\]"):
        check_schema(splits.train, "train", "org/sst")
