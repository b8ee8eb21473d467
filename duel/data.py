"""IMDB from a hub data set, the original tarball or a local mirror; stratified, seeded subsets."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import re
import shutil
import tarfile
import urllib.request
import zlib
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


REVIEW_FILE = re.compile(r"(\d+)_(\d+)\.txt")
"""An aclImdb review's file name: <id>_<rating>.txt."""


def read_aclimdb(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The original layout: root/{train,test}/{pos,neg}/<id>_<rating>.txt, one UTF-8 review per file (a byte-order
    mark is dropped), in numeric id order.

    What a copied folder carries besides the reviews is left alone: the tarball's other files (README, imdb.vocab,
    urls_*.txt, train/unsup/) and, in pos/ and neg/, files that are not .txt (.DS_Store, Thumbs.db) or hidden (macOS's
    ._<name> AppleDouble files). A .txt file there that is not named <id>_<rating>.txt, or is not UTF-8, stops the
    stage naming it: reading it would put a file that may be no review, or a review decoded by guess, into the data.
    """

    def split(name: str) -> pd.DataFrame:
        rows = []
        for label, folder in ((0, "neg"), (1, "pos")):
            where = root / name / folder
            if not where.is_dir():
                raise DataError(
                    f"data.source: {root} has no {name}/{folder}/ folder; an extracted aclImdb holds train/ and "
                    "test/, each with pos/ and neg/"
                )
            files = [f for f in where.glob("*.txt") if not f.name.startswith(".")]
            misnamed = [f for f in files if not REVIEW_FILE.fullmatch(f.name)]
            if misnamed:
                raise DataError(
                    f"data.source: {misnamed[0]} is not named <id>_<rating>.txt like a review ({len(misnamed)} such "
                    f"file(s) in {where}); move them out of the folder"
                )
            for file in sorted(files, key=lambda f: (int(f.name.split("_")[0]), f.name)):
                try:
                    rows.append((file.read_bytes().decode("utf-8-sig"), label))
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"data.source: {file} is not UTF-8 ({err.reason} at byte {err.start}); convert the folder's "
                        "files to UTF-8 (e.g. iconv -f cp1252 -t utf-8)"
                    ) from None
        return pd.DataFrame(rows, columns=["text", "label"])

    return split("train"), split("test")


def read_source(params: DataParams, cache_dir: Path) -> Splits:
    """Read the whole train and test splits from data.source, whatever its kind."""
    source = params.source
    path = Path(source)
    if source.startswith(("http://", "https://")):
        tarball = cache_dir / Path(source).name
        if not tarball.exists():
            _download(source, tarball)
        checksum = sha256_file(tarball)
        expected = params.source_sha256
        if expected and checksum != expected:
            tarball.unlink()
            raise DataError(f"data.source: {source} has SHA-256 {checksum}, expected {expected}; download again")
        train, test = read_aclimdb(_extract_aclimdb(source, tarball, cache_dir))
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
    if (path / "aclImdb" / "train").is_dir():  # the folder the tarball was extracted into
        path = path / "aclImdb"
    if (path / "train").is_dir():
        train, test = read_aclimdb(path)
        return Splits(train, test, "aclimdb", sha256_frames(train, test))
    if path.exists() or source.startswith((".", "/")):
        raise DataError(
            f"data.source: {source} is not a folder with train.parquet/test.parquet or an extracted aclImdb; "
            "point it at one (e.g. ../shared/data/imdb)"
        )
    return _read_hub(source)


def _download(url: str, tarball: Path) -> None:
    """The URL's content to `tarball`, through a temporary file: a transfer cut short leaves nothing behind."""
    partial = tarball.with_name(tarball.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            out.write(response.read())  # read whole: fewer bytes than announced raise IncompleteRead
    except (OSError, http.client.HTTPException) as err:  # IncompleteRead is an HTTPException
        partial.unlink(missing_ok=True)
        raise DataError(
            f"data.source: cannot download {url} ({err or type(err).__name__}); use a local mirror, e.g. "
            "data.source: ../shared/data/imdb"
        ) from None
    partial.replace(tarball)


def _extract_aclimdb(url: str, tarball: Path, cache_dir: Path) -> Path:
    """The tarball's aclImdb/ extracted into cache_dir. A download that is no tarball of aclImdb (an HTML page, a
    truncated or corrupt archive, another data set) is removed, so that the next run downloads again."""
    extracted = cache_dir / "aclImdb"
    shutil.rmtree(extracted, ignore_errors=True)  # never read what an earlier download left there
    try:
        with tarfile.open(tarball) as archive:
            names = archive.getnames()  # reads the archive to its end: a truncated one fails here
            if any(name.startswith("aclImdb/") for name in names):
                archive.extractall(cache_dir, filter="data")  # the data filter refuses links and paths outside
                return extracted
        problem = f"it holds no aclImdb/ folder; first entries: {', '.join(names[:3]) or 'none'}"
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        problem = f"not a readable tar archive: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    tarball.unlink()
    shutil.rmtree(extracted, ignore_errors=True)
    raise DataError(
        f"data.source: {url} did not serve the aclImdb tarball ({problem}); the download was removed; check the URL "
        f"(IMDB's is {IMDB_URL})"
    )


def _read_hub(dataset_id: str) -> Splits:
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id)
    except Exception as err:  # network, missing data set and offline mode all surface differently
        raise DataError(
            f"data.source: cannot load hub data set {dataset_id!r} ({type(err).__name__}); check the id, or run "
            "offline with a local mirror: data.source: ../shared/data/imdb"
        ) from None
    missing = [split for split in ("train", "test") if split not in loaded]
    if missing:
        raise DataError(
            f"data.source: hub data set {dataset_id!r} has no {' or '.join(missing)} split (it has "
            f"{', '.join(loaded)}); the duel needs IMDB's train and test splits"
        )
    # Only the columns the duel reads (check_schema says which are missing).
    train, test = (loaded[s].to_pandas().filter(["text", "label"]) for s in ("train", "test"))
    return Splits(train, test, "hub", sha256_frames(train, test))


def check_schema(frame: pd.DataFrame, split: str, source: str) -> pd.DataFrame:
    """Keep text and label; stop on anything that would silently corrupt training."""
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise DataError(f"data.source: {source} {split} split lacks column(s) {sorted(missing)}; need text and label")
    if frame.empty:
        raise DataError(f"data.source: {source} {split} split is empty; point data.source at the full IMDB")
    frame = frame[["text", "label"]]
    name = f"data.source: {source} {split} split"
    # Text that is text: numbers or bytes in the text column would be formatted into the prompt as their repr.
    texts = frame["text"].dropna()  # missing reviews are counted as empty below
    kind = pd.api.types.infer_dtype(texts)
    if not texts.empty and kind != "string":
        row = texts.map(lambda text: not isinstance(text, str)).idxmax()
        raise DataError(
            f"{name} has a text column of {kind} values, not text (row {row}: {texts[row]!s:.40}); store each "
            "review as a string"
        )
    # Labels 0 (negative) and 1 (positive): as numbers (0.0 and 1.0 are read as 0 and 1), not as words.
    if not pd.api.types.is_numeric_dtype(frame["label"]):
        words = sorted({str(label) for label in frame["label"].unique()})[:5]
        raise DataError(f"{name} has labels {words}, not numbers; give them as 0 (negative) and 1 (positive)")
    labels = set(frame["label"].unique().tolist())
    bad_labels = sorted(labels - {0, 1})
    if bad_labels:
        raise DataError(f"{name} has labels {bad_labels[:5]} outside {{0, 1}}")
    if len(labels) < 2:
        raise DataError(
            f"{name} holds only label {int(labels.pop())} reviews; the duel needs both classes, 0 (negative) and "
            "1 (positive)"
        )
    empty = int((frame["text"].fillna("").str.strip() == "").sum())
    if empty:
        raise DataError(f"{name} has {empty} empty review(s); remove them first")
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
    shares = frame["label"].value_counts(normalize=True).reindex([0, 1], fill_value=0.0)
    counts = np.floor(shares * size).astype(int)
    counts.iloc[: size - counts.sum()] += 1  # hand out the rounding remainder, lowest label first
    absent = [label for label, count in counts.items() if count == 0]
    if absent:  # accuracy, F1 and ROC-AUC need both classes; a subset of one class trains or tests nothing
        smallest = float(shares.min())
        fix = f"raise it to at least {math.ceil(1 / smallest)}" if smallest > 0 else "use a source with both classes"
        raise DataError(
            f"{key}: a subset of {size} holds no review of label {absent[0]} ({shares[absent[0]]:.1%} of the "
            f"{len(frame)} reviews available); {fix} so that both classes are in it"
        )
    picked = [
        frame.index[frame["label"] == label][rng.permutation(int((frame["label"] == label).sum()))[:count]]
        for label, count in counts.items()
    ]
    index = np.concatenate(picked)
    return frame.loc[rng.permutation(index)].reset_index(drop=True)


def label_balance(frame: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
