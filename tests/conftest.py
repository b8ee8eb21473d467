"""Shared fixtures: the real tokenizers of both models (offline, from ../shared/hf/hub) and the project's params."""

from __future__ import annotations

import os
import secrets
import shutil
import string
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the repo's sibling folder ../shared: hub cache and IMDB mirror
IMDB = SHARED / "data" / "imdb"

# Set before transformers is imported anywhere, so the hub client reads them: tokenizers come from the cache only.
os.environ["HF_HUB_CACHE"] = str(SHARED / "hf" / "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
# Idle OpenMP threads sleep instead of spinning, here and in every process the tests start (they inherit it; set before
# torch is imported): stage processes run beside each other and beside the tests on few cores, and a thread that spins
# at a barrier while its partner waits for a core burns the core the partner needs. Two 12-step fine-tunes at once
# on 2 cores: 45 s and 85 CPU-seconds spinning, 25 s and 45 passive; alone, the same 19 s. What each thread computes,
# and so every result, is the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from project_copy import StageRun, committed_params, run_pipeline, stage_env  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from duel.params import Params, parse_params  # noqa: E402

CHECKPOINTS = {"llama": "meta-llama/Llama-2-7b-hf", "deepseek": "deepseek-ai/deepseek-llm-7b-base"}


@pytest.fixture(scope="session")
def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    """Both real tokenizers, loaded the way duel.modeling loads them (tokenizer.json as it is)."""
    return {key: PreTrainedTokenizerFast.from_pretrained(checkpoint) for key, checkpoint in CHECKPOINTS.items()}


@pytest.fixture
def raw_params() -> dict[str, Any]:
    """The committed params.yaml as plain data, fresh per test so a test may change it."""
    return committed_params()


@pytest.fixture(scope="session")
def params() -> Params:
    """The committed params.yaml, loaded (an experiment may have changed the working copy)."""
    return parse_params(committed_params())


def tiny_llama_config(**fields: Any) -> Any:
    """A Llama config small enough for CPU: vocabulary 300, 2 layers of width 32, 4 heads; `fields` override."""
    from transformers import LlamaConfig

    tiny = {
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "pad_token_id": 0,
    }
    return LlamaConfig(**(tiny | fields))


@pytest.fixture(scope="session", params=["sdpa", "eager"])
def tiny_model(request):
    """A seeded random Llama small enough for CPU (vocabulary 300, 2 layers of width 32), in float32, eval mode;
    once per attention kernel, since padding is handled by each kernel's own masking."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(attn_implementation=request.param)).eval()


@pytest.fixture(scope="session")
def hub_token() -> str:
    """A fresh fake hub token, in the shape of a real one (hf_ + 34 letters)."""
    return "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(34))


@pytest.fixture(scope="session")
def small_runs(tmp_path_factory: pytest.TempPathFactory, hub_token: str) -> dict[str, StageRun]:
    """The small pipeline (project_copy.SMALL_RUN) run twice, uninterrupted, each in a copy of the project:
    "reference" by calling each stage's entry point in the test process, without a hub token; "token" with each
    stage a process of its own, HF_TOKEN set in its environment, under strace where it is installed (the files it
    opens are test_dag's). The token run's processes run on a thread meanwhile: a stage process spends most of its
    time importing, on one core, so the two runs share the machine's two."""
    base = tmp_path_factory.mktemp("with-token")
    traces = base / "traces" if shutil.which("strace") else None
    with ThreadPoolExecutor(1) as pool:
        token = pool.submit(run_pipeline, base, stage_env({"HF_TOKEN": hub_token}), traces)
        with pytest.MonkeyPatch.context() as patch:
            for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):  # as stage_env: no hub token
                patch.delenv(name, raising=False)
            reference = run_pipeline(tmp_path_factory.mktemp("reference"), in_process=True)
        return {"reference": reference, "token": token.result()}


@pytest.fixture(scope="session")
def reference_run(small_runs: dict[str, StageRun]) -> StageRun:
    return small_runs["reference"]


@pytest.fixture(scope="session")
def token_run(small_runs: dict[str, StageRun]) -> StageRun:
    return small_runs["token"]


@pytest.fixture(scope="session", autouse=True)
def started_early(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future]]:
    """Set-ups made of processes only, started on threads when the session's first test starts, where a selected test
    needs them; name -> its result to come. A stage process spends most of its time importing, on one core: these
    run on the core the tests leave idle, and are done by the time their tests come.
    test_pipeline.start_experiments: `make demo` and the experiments after it, each in a copy; device_run:
    test_device_runner.run_device."""
    needed = {name for item in request.session.items for name in item.fixturenames}
    with ThreadPoolExecutor(4) as pool:
        started = {}
        if needed & {"demo", "rerun", "seed_study"}:
            from test_pipeline import start_experiments

            started |= start_experiments(pool, tmp_path_factory, needed)
        if "device_run" in needed:
            from test_device_runner import run_device

            started["device_run"] = pool.submit(run_device, tmp_path_factory.mktemp("device"))
        yield started
