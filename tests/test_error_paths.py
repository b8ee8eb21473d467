"""Every error the README's table "Errors you may see" lists, caused the way a user causes it (a params.yaml value, a
data source, a model folder, a hub that answers no) in a copy of the project, through the stage a user runs
(`python -m stages.<name>`). Each must exit 1 with one line on stderr that starts as the README says, and no
traceback. The README's messages are read from the README itself: `...` stands for any text, N and K for a number,
<time> for a time stamp; a row added to the table without a case here fails the test."""

from __future__ import annotations

import http.server
import importlib.util
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from project_copy import ROOT, clone, make_copy, run_in_process, run_stages_in_process, set_params

# Rows no CPU run can reach, and the tests that cover them.
ELSEWHERE = {
    "out of GPU memory at micro-batch 1": "tests/test_backoff.py::test_oom_at_micro_batch_one_says_what_to_change "
    "(a simulated CUDA OOM in a real Trainer)",
    "out of GPU memory while scoring at batch 1": "tests/test_evaluation.py::"
    "test_scoring_oom_at_batch_one_says_what_to_change (a simulated CUDA OOM)",
    "disk full during a save": "tests/test_bad_input.py::test_write_json_on_a_full_disk, "
    "test_write_parquet_on_a_full_disk, test_atomic_dir_full_disk_* (a full disk, simulated; no one-line message)",
    "NaN / infinite loss with `execution.precision: fp16`": "test_fp16_nan_loss_blames_fp16 below (the Trainer's "
    "fp16 needs CUDA)",
}
# Of two messages one row lists, the one the machine cannot give (covered elsewhere):
# - liger: with liger-kernel installed, "needs the liger-kernel ..." cannot happen; without it, "cannot be compiled"
#   cannot (the package check comes first); tests/test_modeling.py::test_kernels_auto_and_a_missing_liger has both.
# - a diverging run: the gradient norm turns NaN first (step 2 at a learning rate of 2e+5), so its NaN loss is
#   checked by test_fp16_nan_loss_blames_fp16 below; divergence seen only in the LoRA weights (K tensors hold NaN):
#   tests/test_training_unit.py::test_nonfinite_lora_weights_stop_before_saving.
LIGER_INSTALLED = importlib.util.find_spec("liger_kernel") is not None

# The pipeline the tokenize and fine-tune cases start from: download, base_llama and tokenize of a small demo.
PREPARED = {"train.steps": 4, "data.train_size": 64, "data.test_size": 40, "execution.save_steps": 0}
DIVERGED = "a diverging run (e.g. `train.learning_rate: 2.0e+5`)"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def readme_errors() -> dict[str, list[str]]:
    """The README's error table: each row's input (its first cell, as written) -> the messages of its second cell."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Errors you may see", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 2 and cells[0] not in ("input", "---"):
            rows[cells[0]] = re.findall(r"`([^`]+)`", cells[1])
    return rows


def message_pattern(message: str) -> str:
    """A README message as a regular expression for the stage's line after "error: "."""
    parts = re.split(r" ?\.\.\.", message.removeprefix("error: "))  # "16 ..." is "16" and more: "16; use a ..."
    pattern = ".*".join(re.escape(part) for part in parts)
    return re.sub(r"\b[NK]\b", r"\\d+", pattern.replace("<time>", r"[\d-]+"))


@dataclass(frozen=True)
class Case:
    row: str
    """The README row's input cell."""
    message: int
    """Which of the row's messages the stage must print."""
    stage: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    """params.yaml overrides (dotted keys) on the demo profile."""
    source: Callable[[Path, str], dict[str, Any]] | None = None
    """Makes what the case needs under a folder (a data source, a model folder); returns more overrides. Gets the
    local web server's address."""
    hub: bool = False
    """Run against the fake hub (online mode, an empty hub cache)."""
    prepared: bool = False
    """Start from a copy where download, base_llama and tokenize have run."""
    damaged: str | None = None
    """A file of that copy overwritten with junk before the stage runs."""


def parquet_source(train: pd.DataFrame, test: pd.DataFrame | None = None) -> Callable[[Path, str], dict[str, Any]]:
    def make(folder: Path, web: str) -> dict[str, Any]:
        folder.mkdir(parents=True)
        train.to_parquet(folder / "train.parquet", index=False)
        (train if test is None else test).to_parquet(folder / "test.parquet", index=False)
        return {"data.source": str(folder)}

    return make


def files_source(files: dict[str, str | bytes]) -> Callable[[Path, str], dict[str, Any]]:
    def make(folder: Path, web: str) -> dict[str, Any]:
        for name, content in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return {"data.source": str(folder)}

    return make


def url_source(path: str) -> Callable[[Path, str], dict[str, Any]]:
    return lambda folder, web: {"data.source": f"{web}{path}"}


def model_folder(files: dict[str, str]) -> Callable[[Path, str], dict[str, Any]]:
    def make(folder: Path, web: str) -> dict[str, Any]:
        folder.mkdir(parents=True)
        for name, content in files.items():
            (folder / name).write_text(content)
        return {"models.llama.checkpoint": str(folder)}

    return make


REVIEWS = pd.DataFrame({"text": ["Dull.", "Loved it.", "Awful.", "A classic."], "label": [0, 1, 0, 1]})
ACLIMDB = {"train/pos/0_9.txt": "Loved it.", "train/neg/0_2.txt": "Dull.", "test/pos/0_10.txt": "A classic."}

CASES = {
    "misspelled-key": Case("unknown / misspelled key", 0, ("download",), {"train.lerning_rate": 2e-5}),
    "wrong-type": Case("wrong type", 0, ("download",), {"train.steps": "ten"}),
    "lora-r": Case("out of range", 0, ("download",), {"lora.r": 0}),
    "learning-rate": Case("out of range", 1, ("download",), {"train.learning_rate": -2e-5}),
    "micro-batch": Case("out of range", 2, ("download",), {"execution.micro_batch": 3}),
    "data-parallel": Case(
        "a step that does not split over the processes", 0, ("download",), {"execution.data_parallel": 2}
    ),
    "seed": Case("seed out of range", 0, ("download",), {"seeds.data": -1}),
    "subset": Case("subset larger than the data", 0, ("download",), {"data.train_size": 30000}),
    "no-source": Case("data source missing / wrong", 0, ("download",), {"data.source": "/no/such/imdb"}),
    "corrupt-parquet": Case(
        "corrupt parquet, wrong schema, bad labels, empty reviews",
        0,
        ("download",),
        source=files_source({"train.parquet": b"PAR1 not parquet", "test.parquet": b"PAR1 not parquet"}),
    ),
    "no-label": Case(
        "corrupt parquet, wrong schema, bad labels, empty reviews",
        1,
        ("download",),
        source=parquet_source(REVIEWS[["text"]]),
    ),
    "bad-labels": Case(
        "corrupt parquet, wrong schema, bad labels, empty reviews",
        2,
        ("download",),
        source=parquet_source(REVIEWS.assign(label=[0, 1, 2, 1])),
    ),
    "empty-reviews": Case(
        "corrupt parquet, wrong schema, bad labels, empty reviews",
        3,
        ("download",),
        source=parquet_source(REVIEWS.assign(text=["", "  ", "Fine.", None])),
    ),
    "text-numbers": Case(
        "reviews that are not text, labels given as words",
        0,
        ("download",),
        source=parquet_source(REVIEWS.assign(text=[17, 4, 9, 1])),
    ),
    "label-words": Case(
        "reviews that are not text, labels given as words",
        1,
        ("download",),
        source=parquet_source(REVIEWS.assign(label=["neg", "pos", "neg", "pos"])),
    ),
    "one-class": Case(
        "a split of one class, or a subset too small for both",
        0,
        ("download",),
        source=parquet_source(REVIEWS, REVIEWS.assign(label=1)),
    ),
    "subset-one-class": Case(
        "a split of one class, or a subset too small for both", 1, ("download",), {"data.test_size": 1}
    ),
    "misnamed-file": Case(
        "an aclImdb folder with a misnamed or non-UTF-8 review file, or without a class folder",
        0,
        ("download",),
        source=files_source(ACLIMDB | {"test/neg/0_1.txt": "Awful.", "train/neg/notes.txt": "to do"}),
    ),
    "latin-1": Case(
        "an aclImdb folder with a misnamed or non-UTF-8 review file, or without a class folder",
        1,
        ("download",),
        source=files_source(ACLIMDB | {"test/neg/0_1.txt": "Awful.", "test/pos/7_8.txt": "Un café.".encode("cp1252")}),
    ),
    "no-class-folder": Case(
        "an aclImdb folder with a misnamed or non-UTF-8 review file, or without a class folder",
        2,
        ("download",),
        source=files_source(ACLIMDB),
    ),
    "url-html": Case(
        "a URL that does not serve the aclImdb tarball (an HTML page, a truncated download, another archive)",
        0,
        ("download",),
        source=url_source("/login/aclImdb_v1.tar.gz"),
    ),
    "url-missing": Case(
        "a URL that does not serve the aclImdb tarball (an HTML page, a truncated download, another archive)",
        1,
        ("download",),
        source=url_source("/missing/aclImdb_v1.tar.gz"),
    ),
    "hub-missing": Case(
        "model id that does not exist", 0, ("base", "llama"), {"models.llama.checkpoint": "org/name"}, hub=True
    ),
    "hub-gated": Case(
        "gated model without a token",
        0,
        ("base", "llama"),
        {"models.llama.checkpoint": "meta-llama/Llama-2-7b-hf"},
        hub=True,
    ),
    "hub-unreachable": Case(
        "hub unreachable, or offline without the model cached",
        0,
        ("base", "llama"),
        {"models.llama.checkpoint": "org/name"},
    ),
    "hub-revision": Case(
        "revision that does not exist",
        0,
        ("base", "llama"),
        {"models.llama.checkpoint": "meta-llama/Llama-2-7b-hf", "models.llama.revision": "v9"},
        hub=True,
    ),
    "folder-no-config": Case(
        "a local checkpoint folder that is not a causal language model",
        0,
        ("base", "llama"),
        source=model_folder({}),
    ),
    "folder-not-causal": Case(
        "a local checkpoint folder that is not a causal language model",
        1,
        ("base", "llama"),
        source=model_folder({"config.json": '{"model_type": "t5"}', "tokenizer.json": "{}"}),
    ),
    "folder-no-weights": Case(
        "a local checkpoint folder that is not a causal language model",
        2,
        ("base", "llama"),
        {"models.llama.init": "pretrained", "models.llama.overrides": {}},
        source=model_folder({"config.json": "{}", "tokenizer.json": "{}"}),
    ),
    "override-unknown": Case(
        "`overrides` that do not fit the architecture",
        0,
        ("base", "llama"),
        {"models.llama.overrides": {"hidn_size": 64}},
    ),
    "override-zero": Case(
        "`overrides` that do not fit the architecture",
        1,
        ("base", "llama"),
        {"models.llama.overrides.hidden_size": 0},
    ),
    "override-kv-heads": Case(
        "`overrides` that do not fit the architecture",
        2,
        ("base", "llama"),
        {"models.llama.overrides.num_key_value_heads": 3},
    ),
    "max-length": Case(
        "max_length beyond the model",
        0,
        ("tokenize",),
        {"data.max_length": 8192, "execution.pack_tokens": 8192},
        prepared=True,
    ),
    "lora-target": Case(
        "a LoRA target the model lacks (one misspelled of seven)",
        0,
        ("finetune", "llama"),
        {"models.llama.lora_targets": [*LORA_TARGETS[:-1], "dwn_proj"]},
        prepared=True,
    ),
    "varlen": Case(
        "`execution.attention: varlen` without an Ampere or newer CUDA GPU, or PyTorch 2.9",
        0,
        ("finetune", "llama"),
        {"execution.attention": "varlen"},
        prepared=True,
    ),
    "flex": Case(
        "`execution.attention: flex_attention` for training on a CPU",
        0,
        ("finetune", "llama"),
        {"execution.attention": "flex_attention"},
        prepared=True,
    ),
    "liger": Case(
        "`execution.kernels: liger` without the package, or with `execution.compile`",
        1 if LIGER_INSTALLED else 0,
        ("finetune", "llama"),
        {"execution.kernels": "liger", "execution.compile": LIGER_INSTALLED},
        prepared=True,
    ),
    # A learning rate of 2e+5: the update after step 1 makes step 2's gradients NaN (its loss is still finite).
    "diverged": Case(
        DIVERGED,
        0,
        ("finetune", "llama"),
        {"train.learning_rate": 2.0e5},
        prepared=True,
    ),
    "unforeseen": Case(
        "anything no check foresaw (a bug, a damaged file)",
        0,
        ("tokenize",),
        prepared=True,
        damaged="data/train.parquet",
    ),
}


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    """A local web server (127.0.0.1): /login/... is the HTML page a site serves in place of a file; the hub paths
    answer as the Hugging Face hub does for a repository that does not exist, a gated one and a missing revision."""
    answers = {
        "/login/aclImdb_v1.tar.gz": (200, {"Content-Type": "text/html"}),
        "/org/name/resolve/main/config.json": (404, {"X-Error-Code": "RepoNotFound"}),
        "/meta-llama/Llama-2-7b-hf/resolve/main/config.json": (403, {"X-Error-Code": "GatedRepo"}),
        "/meta-llama/Llama-2-7b-hf/resolve/v9/config.json": (404, {"X-Error-Code": "RevisionNotFound"}),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # the names http.server calls
            status, headers = answers.get(self.path, (404, {}))
            body = b"<!DOCTYPE html><html><body>Please sign in</body></html>"
            self.send_response(status)
            for name, value in (headers | {"Content-Length": str(len(body))}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        do_GET = do_HEAD

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hub_client_online(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path) -> None:
    """The hub client of this process online, at `endpoint`, with the empty cache `cache`: what HF_HUB_OFFLINE=0,
    HF_ENDPOINT and HF_HUB_CACHE give a new process (the client reads them once, when imported). Its waits between
    retries of a failed connection (1 + 2 + 4 + 8 + 8 s) are skipped; the retries themselves still run."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))  # the module's only use of time
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):  # as stage_env: no hub token
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_copy(tmp_path_factory.mktemp("prepared"), PREPARED)
    run_stages_in_process(repo, ("download",), ("base", "llama"), ("tokenize",))
    return repo


def test_every_readme_row_has_a_case() -> None:
    rows = readme_errors()
    covered = {case.row for case in CASES.values()} | set(ELSEWHERE)
    assert sorted(set(rows) - covered) == [], "README rows without a case here"
    assert sorted(covered - set(rows)) == [], "cases of rows the README does not have (reworded?)"
    for name, case in CASES.items():
        assert case.message < len(rows[case.row]), f"{name}: the row lists {len(rows[case.row])} messages"
    for row, where in ELSEWHERE.items():  # the tests named for the rows no CPU run reaches exist
        for path, test in re.findall(r"(tests/\w+\.py)::(\w+)", where):
            assert f"def {test}(" in (ROOT / path).read_text(), f"{row}: {path}::{test} is gone"


@pytest.mark.slow  # 35 stage runs, in the test process: 1 minute on 2 CPUs
@pytest.mark.parametrize("name", list(CASES))
def test_readme_error(
    name: str, tmp_path: Path, web: str, prepared: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]
    expected = readme_errors()[case.row][case.message]
    repo = clone(prepared, tmp_path) if case.prepared else make_copy(tmp_path, PREPARED)
    overrides = case.params | (case.source(tmp_path / "input", web) if case.source else {})
    set_params(repo, overrides)
    if case.damaged:
        (repo / case.damaged).write_bytes(b"not parquet")
    before = outputs(repo)

    if case.hub or name == "hub-unreachable":
        hub_client_online(monkeypatch, web if case.hub else f"http://127.0.0.1:{closed_port()}", tmp_path / "hub-cache")
    capfd.readouterr()
    code = run_in_process(repo, *case.stage)
    stderr = "".join(capfd.readouterr())

    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    message = errors[0].removeprefix("error: ")
    assert re.match(message_pattern(expected), message), f"README: {expected}\nstage:  {message}"
    if name == "hub-unreachable":  # a refused connection, not the offline mode the rest of the tests run in
        assert "(ConnectError)" in message, message
    # Nothing that looks finished: no data, model, adapter, metrics or report beside what the copy held.
    assert {path for path in outputs(repo) - before if not path.startswith(IN_PROGRESS)} == set()


# What a stage may leave when it stops: the trace of an unforeseen error, and what a fine-tune writes as it goes, as a
# crash leaves it, for a rerun to resume (its checkpoints, DVCLive's per-step series and DVCLive's own state); a
# rerun with other params removes the checkpoints and starts the series afresh.
IN_PROGRESS = (".cache/tracebacks/", "checkpoints/", "plots/", ".dvc/tmp/")


def outputs(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}


def test_message_pattern_reads_the_readme_placeholders() -> None:
    pattern = message_pattern("train: the gradient norm is nan at step N; lower ... (200000; the paper uses 2e-5)")
    assert re.match(pattern, "train: the gradient norm is nan at step 12; lower it (200000; the paper uses 2e-5)")
    assert not re.match(pattern, "train: the gradient norm is nan at step N; lower it (200000; the paper uses 2e-5)")
    trace = message_pattern("error: tokenize failed: ArrowInvalid: ...; the trace is in tokenize-<time>.txt")
    assert re.match(trace, "tokenize failed: ArrowInvalid: bad; the trace is in tokenize-20260101-120000.txt")


def test_fp16_nan_loss_blames_fp16() -> None:
    """Under fp16 a NaN loss is most likely an overflow of the half type; under bf16 or fp32 the run diverged."""
    from types import SimpleNamespace

    import numpy as np
    from transformers import TrainerControl, TrainerState

    from duel.errors import TrainingError
    from duel.training import StepTelemetry

    rows = readme_errors()
    for fp16, row, index in ((True, "NaN / infinite loss with `execution.precision: fp16`", 0), (False, DIVERGED, 1)):
        callback = StepTelemetry(np.array([100.0, 200.0]), np.array([128.0, 256.0]), batch_size=16)
        args = SimpleNamespace(fp16=fp16, learning_rate=2.0e5)  # what on_log reads of the TrainingArguments
        state = TrainerState(global_step=3)
        with pytest.raises(TrainingError) as caught:
            callback.on_log(args, state, TrainerControl(), logs={"loss": float("nan"), "grad_norm": 1.0})
        assert re.match(message_pattern(rows[row][index]), str(caught.value)), str(caught.value)
