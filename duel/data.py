"""IMDB from a hub data set, the original tarball or a local mirror; stratified, seeded subsets."""

from __future__ import annotations

import hashlib
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from duel.errors import DataError
from duel.params import DataParams

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    test: pd.DataFrame
    source_kind: str
    source_sha256: str
    """SHA-256 over the source's files (parquet mirror, tarball) or the data set's fingerprint."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_frames(*frames: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def read_aclimdb(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The original layout: root/{train,test}/{pos,neg}/<id>_<rating>.txt, one review per file."""

    def split(name: str) -> pd.DataFrame:
        rows = []
        for label, folder in ((0, "neg"), (1, "pos")):
            files = sorted((root / name / folder).glob("*.txt"), key=lambda p: int(p.stem.split("_")[0]))
            rows += [(f.read_text(encoding="utf-8"), label) for f in files]
        return pd.DataFrame(rows, columns=["text", "label"])

    return split("train"), split("test")


def read_source(params: DataParams, cache_dir: Path) -> Splits:
    """Read the whole train and test splits from data.source, whatever its kind."""
    source = params.source
    path = Path(source)
    if source.startswith(("http://", "https://")):
        tarball = cache_dir / Path(source).name
        if not tarball.exists():
            try:
                with urllib.request.urlopen(source, timeout=60) as response, tarball.open("wb") as out:
                    out.write(response.read())
            except OSError as err:
                tarball.unlink(missing_ok=True)
                raise DataError(
                    f"data.source: cannot download {source} ({err}); use a local mirror, e.g. "
                    "data.source: ../shared/data/imdb"
                ) from None
        checksum = sha256_file(tarball)
        expected = params.source_sha256
        if expected and checksum != expected:
            tarball.unlink()
            raise DataError(f"data.source: {source} has SHA-256 {checksum}, expected {expected}; download again")
        with tarfile.open(tarball) as archive:
            archive.extractall(cache_dir, filter="data")
        train, test = read_aclimdb(cache_dir / "aclImdb")
        return Splits(train, test, "url", checksum)
    if path.is_dir() and (path / "train.parquet").exists():
        files = [path / "train.parquet", path / "test.parquet"]
        for file in files:
            if not file.exists():
                raise DataError(f"data.source: {file} is missing; the folder needs train.parquet and test.parquet")
        try:
            train, test = (pd.read_parquet(f) for f in files)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"data.source: cannot read {path} as parquet ({type(err).__name__}); re-copy it") from None
        digest = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()
        return Splits(train, test, "parquet", digest)
    if path.is_dir() and (path / "train" / "pos").is_dir():
        train, test = read_aclimdb(path)
        return Splits(train, test, "aclimdb", sha256_frames(train, test))
    if path.exists() or source.startswith((".", "/")):
        raise DataError(
            f"data.source: {source} is not a folder with train.parquet/test.parquet or an extracted aclImdb; "
            "point it at one (e.g. ../shared/data/imdb)"
        )
    return _read_hub(source)


def _read_hub(dataset_id: str) -> Splits:
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id)
    except Exception as err:  # network, missing data set and offline mode all surface differently
        raise DataError(
            f"data.source: cannot load hub data set {dataset_id!r} ({type(err).__name__}); check the id, or run "
            "offline with a local mirror: data.source: ../shared/data/imdb"
        ) from None
    train, test = (loaded[s].to_pandas()[["text", "label"]] for s in ("train", "test"))
    return Splits(train, test, "hub", sha256_frames(train, test))


def check_schema(frame: pd.DataFrame, split: str, source: str) -> pd.DataFrame:
    """Keep text and label; stop on anything that would silently corrupt training."""
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise DataError(f"data.source: {source} {split} split lacks column(s) {sorted(missing)}; need text and label")
    if frame.empty:
        raise DataError(f"data.source: {source} {split} split is empty; point data.source at the full IMDB")
    frame = frame[["text", "label"]]
    bad_labels = sorted(set(frame["label"].unique().tolist()) - {0, 1})
    if bad_labels:
        raise DataError(f"data.source: {source} {split} split has labels {bad_labels[:5]} outside {{0, 1}}")
    empty = int((frame["text"].fillna("").str.strip() == "").sum())
    if empty:
        raise DataError(f"data.source: {source} {split} split has {empty} empty review(s); remove them first")
    return frame.assign(label=frame["label"].astype("int64"))


def with_review_ids(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    """The split with a first column review_id = "<split>-<row>", row = the review's position in the whole split as
    read from data.source (test-0, test-1, ...).

    A position, not a hash of the text: IMDB repeats some reviews word for word (191 texts of its test split occur
    two to five times), and a text hash would give those reviews one id. The position is unique, survives
    re-sampling (a subset keeps its rows' ids, whatever the seed or size) and, with the source's SHA-256 in
    data/source.json, names the review in that source: the parquet mirror's row, or for aclImdb the n-th file of
    neg/ then pos/ in numeric file order.
    """
    return frame.assign(review_id=[f"{split}-{row}" for row in range(len(frame))])[["review_id", *frame.columns]]


def stratified_sample(frame: pd.DataFrame, size: int, seed: int, key: str) -> pd.DataFrame:
    """Draw `size` rows with the label shares of `frame` (half and half for IMDB), seeded; row order shuffled."""
    if size > len(frame):
        raise DataError(f"{key}: {size} is larger than the {len(frame)} reviews available; lower it")
    rng = np.random.default_rng(seed)
    shares = frame["label"].value_counts(normalize=True).sort_index()
    counts = np.floor(shares * size).astype(int)
    counts.iloc[: size - counts.sum()] += 1  # hand out the rounding remainder, lowest label first
    picked = [
        frame.index[frame["label"] == label][rng.permutation(int((frame["label"] == label).sum()))[:count]]
        for label, count in counts.items()
    ]
    index = np.concatenate(picked)
    return frame.loc[rng.permutation(index)].reset_index(drop=True)


def label_balance(frame: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
