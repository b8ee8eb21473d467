"""Bad input the unit tests of params and data do not reach: a model id the hub does not have (offline, online,
unreachable), a disk that fills during a save, and what the CLI wrapper prints when a stage meets a user error.

tests/test_params.py and tests/test_data.py already check that parse_params / read_source / check_schema raise an
error naming the key for each bad value; here only the paths around them are tested."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from huggingface_hub import constants, file_download, hf_hub_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from project_copy import make_copy, run_stages_in_process, stage_command, stage_env

from duel import hub
from duel import io as duel_io
from duel.errors import ModelError
from duel.hub import resolve_model
from duel.io import atomic_dir, write_json, write_parquet

MISSING = "no-such-org/no-such-model-xyz"


# --- a model id that does not exist ----------------------------------------------------------------------------------


def hub_answers(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Online mode, with every metadata request to the hub failing as `error` (the call hf_hub_download makes first)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(file_download, "get_hf_file_metadata", fail)


def http_error(cls: type[Exception], status: int) -> Exception:
    url = f"https://huggingface.co/{MISSING}/resolve/main/tokenizer.json"
    return cls(f"{status} Client Error", response=httpx.Response(status, request=httpx.Request("HEAD", url)))


def resolve_missing(params, tmp_path: Path) -> ModelError:
    out_dir = tmp_path / "models" / "base" / "llama"
    with pytest.raises(ModelError) as caught:
        resolve_model("llama", dataclasses.replace(params.model("llama"), checkpoint=MISSING), 0, out_dir)
    assert not out_dir.exists()
    assert not (out_dir.parent.exists() and list(out_dir.parent.iterdir())), "a temporary folder was left behind"
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith("models.llama.checkpoint: ") and MISSING in message
    return caught.value


def test_missing_model_offline(params, tmp_path: Path) -> None:
    assert constants.HF_HUB_OFFLINE  # conftest's offline mode, as in `make demo`
    resolve_missing(params, tmp_path)


def test_hub_unreachable_says_how_to_run_offline(params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_answers(monkeypatch, httpx.ConnectError("[Errno 111] Connection refused"))
    assert "HF_HUB_OFFLINE=1" in str(resolve_missing(params, tmp_path))


def test_missing_model_online_says_it_does_not_exist(params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_answers(monkeypatch, http_error(RepositoryNotFoundError, 404))
    message = str(resolve_missing(params, tmp_path))
    assert "does not exist on the hub" in message and "HF_HUB_OFFLINE" not in message


def test_gated_model_says_to_accept_the_licence(params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_answers(monkeypatch, http_error(GatedRepoError, 403))
    message = str(resolve_missing(params, tmp_path))
    assert "gated" in message and "HF_TOKEN" in message


# --- a local folder that is not a model, overrides that make no sense -------------------------------------------------

# The tiny demo architecture (profiles/demo.yaml).
DEMO = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def llama_file(name: str) -> bytes:
    """One file of the real Llama-2-7B checkpoint, from the offline hub cache."""
    return Path(hf_hub_download("meta-llama/Llama-2-7b-hf", name)).read_bytes()


def model_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def resolve_refused(params, tmp_path: Path, **model: Any) -> str:
    """resolve_model's one-line ModelError for models.llama with `model`'s fields, and nothing written."""
    out_dir = tmp_path / "models" / "base" / "llama"
    with pytest.raises(ModelError) as caught:
        resolve_model("llama", dataclasses.replace(params.model("llama"), **model), 0, out_dir)
    assert not out_dir.parent.exists() or list(out_dir.parent.iterdir()) == []
    assert len(str(caught.value).splitlines()) == 1, str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize(
    ("files", "init", "message"),
    [
        ({}, "random", r"has no config\.json, so it is no Hugging Face model folder; point it at the folder"),
        ({"config.json": b"{}", "notes.md": b"# my run"}, "random", r"has no tokenizer\.json \(the fast tokenizer"),
        ({"config.json": b'{"hidden_size": 64,', "tokenizer.json": b"{}"}, "random", r"cannot load .* \(It looks"),
        ({"config.json": b'{"hidden_size": 64}', "tokenizer.json": b"{}"}, "random", r"cannot load .*Unrecognized"),
        (
            {"config.json": b'{"model_type": "t5"}', "tokenizer.json": b"{}"},
            "random",
            r"is a t5 model \(T5Config\), not a causal language model; the duel fine-tunes decoder-only models",
        ),
        ({"config.json": b"llama", "tokenizer.json": b"llama"}, "pretrained", r"holds no \*\.safetensors weights"),
        (
            {"config.json": b"llama", "tokenizer.json": b"llama", "pytorch_model.bin": b"pickle"},
            "pretrained",
            r"holds no \*\.safetensors weights \(pickled \.bin files are never loaded",
        ),
    ],
    ids=["empty", "no-tokenizer", "broken-json", "no-model-type", "not-causal", "no-weights", "only-bin"],
)
def test_local_folder_that_is_not_a_model(params, tmp_path: Path, files: dict[str, bytes], init: str, message: str):
    real = {"llama": {"config.json": llama_file("config.json"), "tokenizer.json": llama_file("tokenizer.json")}}
    files = {name: real["llama"][name] if content == b"llama" else content for name, content in files.items()}
    folder = model_folder(tmp_path / "my-model", files)
    refused = resolve_refused(params, tmp_path, checkpoint=str(folder), init=init, overrides={})
    assert refused.startswith(f"models.llama.checkpoint: {folder} ") or refused.startswith(
        f"models.llama.checkpoint: cannot load {folder} "
    ), refused
    assert re.search(message, refused), refused


def test_local_model_folder_with_random_init_is_used(params, tmp_path: Path):
    real = {"config.json": llama_file("config.json"), "tokenizer.json": llama_file("tokenizer.json")}
    folder = model_folder(tmp_path / "my-model", real)
    model = dataclasses.replace(params.model("llama"), checkpoint=str(folder), init="random", overrides=DEMO)
    info = resolve_model("llama", model, 0, tmp_path / "base")
    assert info["hidden_size"] == 64 and info["num_hidden_layers"] == 2 and info["source"] == "random"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidn_size": 64}, r"overrides\.hidn_size: not a field of LlamaConfig; check the spelling \(its sizes: voc"),
        ({"hidden_size": 0}, r"overrides\.hidden_size: 0 must be a whole number > 0"),
        ({"num_hidden_layers": -2}, r"overrides\.num_hidden_layers: -2 must be a whole number > 0"),
        ({"intermediate_size": 127.5}, r"overrides\.intermediate_size: 127\.5 must be a whole number > 0"),
        (
            DEMO | {"num_attention_heads": 3, "num_key_value_heads": 3},
            r"overrides\.num_attention_heads: num_attention_heads 3 does not divide hidden_size 64; pick sizes",
        ),
        ({"hidden_size": 100}, r"overrides\.hidden_size: num_attention_heads 32 does not divide hidden_size 100"),
        (
            DEMO | {"num_key_value_heads": 3},
            r"overrides\.num_key_value_heads: num_key_value_heads 3 does not divide num_attention_heads 4 \(each",
        ),
        ({"tie_word_embeddings": 2}, r"overrides\.tie_word_embeddings: TypeError: Field 'tie_word_embeddings' exp"),
    ],
    ids=["unknown-field", "zero", "negative", "fraction", "heads-width", "width-heads", "kv-heads", "wrong-type"],
)
def test_overrides_that_make_no_sense_are_refused_before_the_model_is_built(
    params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any], message: str
):
    built = []
    monkeypatch.setattr(hub, "_random_model", lambda config, seed: built.append(config))
    refused = resolve_refused(params, tmp_path, init="random", overrides=overrides)
    assert re.match(r"models\.llama\." + message, refused), refused
    assert built == []


# --- a disk that fills during a save ---------------------------------------------------------------------------------


def disk_full(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("previous", [{"accuracy": 0.9}, None], ids=["replaces", "creates"])
def test_write_json_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, previous: Any) -> None:
    target = tmp_path / "metrics.json"
    if previous is not None:
        write_json(target, previous)

    def write_half(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        with open(self, "w") as handle:
            handle.write(data[: len(data) // 2])
        raise disk_full(self)

    monkeypatch.setattr(Path, "write_text", write_half)
    with pytest.raises(OSError) as caught:
        write_json(target, {"accuracy": 0.5, "f1": 0.4})
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == (["metrics.json"] if previous else [])
    if previous is not None:
        assert json.loads(target.read_text()) == previous


@pytest.mark.parametrize("previous", [True, False], ids=["replaces", "creates"])
def test_write_parquet_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, previous: bool) -> None:
    target = tmp_path / "train.parquet"
    old = pd.DataFrame({"text": ["good", "bad"], "label": [1, 0]})
    if previous:
        write_parquet(target, old)
    real_to_parquet = pd.DataFrame.to_parquet

    def write_half(self: pd.DataFrame, path: Path, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_to_parquet(self, buffer, **kwargs)
        Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise disk_full(path)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", write_half)
    with pytest.raises(OSError) as caught:
        write_parquet(target, pd.DataFrame({"text": ["new"] * 100, "label": [1] * 100}))
    assert caught.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == (["train.parquet"] if previous else [])
    if previous:
        pd.testing.assert_frame_equal(pd.read_parquet(target), old)


def old_adapter(tmp_path: Path) -> Path:
    target = tmp_path / "models" / "adapters" / "llama"
    target.mkdir(parents=True)
    (target / "adapter_model.safetensors").write_bytes(b"old weights")
    (target / "training.json").write_text('{"steps": 20}')
    return target


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_dir_full_disk_inside_the_block(tmp_path: Path) -> None:
    target = old_adapter(tmp_path)
    before = files_under(target)
    with pytest.raises(OSError) as caught, atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"half of the new weig")
        raise disk_full(tmp / "adapter_model.safetensors")  # as save_pretrained would, midway
    assert caught.value.errno == errno.ENOSPC
    assert files_under(target) == before
    assert [p.name for p in target.parent.iterdir()] == ["llama"], "a temporary folder was left behind"


def test_atomic_dir_full_disk_at_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rename(2) may fail with ENOSPC too (the parent folder needs a new entry): the previous folder stays whole."""
    target = old_adapter(tmp_path)
    before = files_under(target)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(src).name.endswith(".tmp"):  # the new folder moving into place
            raise disk_full(Path(dst))
        real_replace(src, dst)

    monkeypatch.setattr(duel_io.os, "replace", replace)
    with pytest.raises(OSError) as caught, atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"new weights")
    assert caught.value.errno == errno.ENOSPC
    assert files_under(target) == before
    assert [p.name for p in target.parent.iterdir()] == ["llama"], "a temporary folder was left behind"


# --- the CLI wrapper: one line on stderr, exit code 1, nothing written -----------------------------------------------


def outputs(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("stage", "override", "expected"),
    [
        (("finetune", "llama"), {"lora.r": 0}, "error: lora.r: 0 must be > 0"),
        (("tokenize",), {"train.lerning_rate": 2e-5}, "error: train.lerning_rate: unknown key"),
        (("download",), {"data.source": "../shared/data/no-such-folder"}, "error: data.source: "),
        (("base", "llama"), {"models.llama.checkpoint": MISSING}, "error: models.llama.checkpoint: "),
    ],
    ids=["ParamsError-range", "ParamsError-misspelled", "DataError", "ModelError"],
)
def test_stage_user_error_is_one_line(
    tmp_path: Path, stage: tuple[str, ...], override: dict[str, Any], expected: str
) -> None:
    repo = make_copy(tmp_path, override)
    before = outputs(repo)
    done = subprocess.run(stage_command(*stage), cwd=repo, env=stage_env(), capture_output=True, text=True)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # Libraries may print notices on import (bitsandbytes on CPU); the stage itself prints exactly one line.
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), done.stderr[-3000:]
    assert outputs(repo) == before


def test_unexpected_error_is_one_line_with_the_trace_in_a_file(tmp_path: Path) -> None:
    """A failure no check foresaw (here a data file damaged after download) prints no traceback: one line naming the
    stage, the error and the file that holds the full trace."""
    repo = make_copy(tmp_path, {})
    run_stages_in_process(repo, ("download",), ("base", "llama"))
    (repo / "data" / "train.parquet").write_bytes(b"not parquet")
    done = subprocess.run(stage_command("tokenize"), cwd=repo, env=stage_env(), capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: tokenize failed: ") and "the full trace is in .cache/tracebacks/tokenize-" in line
    (trace,) = (repo / ".cache" / "tracebacks").glob("tokenize-*.txt")
    assert "Traceback" in trace.read_text() and "read_parquet" in trace.read_text()
    assert not (repo / "data" / "tokenized").exists()  # nothing that looks finished
