"""Two runs of the same stages with the same params, in two copies of the project, write the same results: the
data subsets, the per-step losses, the fine-tune metrics (timing, throughput and memory aside), the adapter, the
evaluation's quality metrics and every prediction. The second run has a hub token in its environment, which must
change nothing."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from project_copy import StageRun, assert_same_adapter

pytestmark = pytest.mark.slow

# metrics/finetune_llama.json: what must repeat, and what measures this machine's speed at this moment.
FINETUNE_COMPARED = [
    "final_loss",
    "train_loss_mean",
    "steps",
    "resumed_from_step",
    "padding_share",
    "checkpointed_layers",
    "micro_batch",
    "grad_accum",
    "oom_retries",
    "trainable_parameters",
    "total_parameters",
]
FINETUNE_TIMING = [
    "train_time_s",
    "startup_s",
    "load_s",
    "reviews_per_s",
    "tokens_per_s",
    "padded_tokens_per_s",
    "model_tflops_per_s",
    "mfu",
    "nvml_peak_gib",
    "gpu_util_mean_pct",
    "energy_j",
    "peak_vram_allocated_gib",
    "peak_vram_reserved_gib",
    "peak_memory_gib",
    "energy_j_per_step",
    "outside_torch_gib",
    "alloc_retries",
]
# metrics/evaluate.json and metrics/zero_shot_llama.json.
EVALUATE_COMPARED = ["accuracy", "f1", "precision", "recall", "roc_auc", "predicted_positive_share", "reviews"]


# The small pipeline's first losses on CPU in fp32, pinned. Two runs agree bit for bit
# (test_data_losses_and_adapter_repeat), so anything that changes what is learned (the data drawn, their order, the
# prompt, the loss, the LoRA init, the optimizer) moves them, and so does the rows' layout (execution.padding: LoRA
# dropout draws its masks over the rows as laid out); the tolerance only allows for another CPU's rounding. Change
# them only with a change meant to alter the loss or the default layout (these are the flattened rows').
GOLDEN_LOSS = [10.511238098144531, 10.421394348144531, 10.126204490661621, 9.823358535766602]


def read_json(run: StageRun, name: str) -> dict:
    return json.loads((run.repo / name).read_text())


def test_finetune_metrics_repeat(reference_run: StageRun, token_run: StageRun) -> None:
    first, second = (read_json(run, "metrics/finetune_llama.json")["llama"] for run in (reference_run, token_run))
    unclassified = set(first) - set(FINETUNE_COMPARED) - set(FINETUNE_TIMING)
    assert not unclassified, f"new fields {unclassified}: add each to FINETUNE_COMPARED or FINETUNE_TIMING"
    assert {k: first[k] for k in FINETUNE_COMPARED} == {k: second[k] for k in FINETUNE_COMPARED}
    assert first["steps"] == 12 and first["resumed_from_step"] == 0
    # How each ran (attention, kernels, padding, device...), kept beside the adapter, is the same too.
    runs = [read_json(run, "models/adapters/llama/training.json")["run"] for run in (reference_run, token_run)]
    assert runs[0] == runs[1] and runs[0]["quantization"] == "nf4-dq"


def test_data_losses_and_adapter_repeat(reference_run: StageRun, token_run: StageRun) -> None:
    for name in ("data/train.parquet", "data/test.parquet", "data/tokenized/llama/train.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(reference_run.repo / name), pd.read_parquet(token_run.repo / name), obj=name
        )
    series = "plots/llama/plots/metrics/loss.tsv"
    first, second = (pd.read_csv(run.repo / series, sep="\t") for run in (reference_run, token_run))
    assert len(first) == 12
    pd.testing.assert_frame_equal(first[["step", "loss"]], second[["step", "loss"]])
    assert_same_adapter(token_run.repo, reference_run.repo)


def test_evaluation_repeats(reference_run: StageRun, token_run: StageRun) -> None:
    def scores(run: StageRun) -> dict[str, dict]:
        zero_shot = read_json(run, "metrics/zero_shot_llama.json")["llama"]["zero_shot"]
        return {"finetuned": read_json(run, "metrics/evaluate.json")["llama"], "zero_shot": zero_shot}

    first, second = scores(reference_run), scores(token_run)
    for variant in ("finetuned", "zero_shot"):
        quality = [{k: metrics[variant][k] for k in EVALUATE_COMPARED} for metrics in (first, second)]
        assert quality[0] == quality[1], variant
        assert quality[0]["reviews"] == 40
        # Every review's prediction, and its two logits to float rounding: one run of the whole suite saw the
        # fine-tuned logits of two runs differ in their last digits (the adapters were bit for bit the same).
        name = f"data/predictions/llama_{variant}/predictions.csv"
        frames = [pd.read_csv(run.repo / name) for run in (reference_run, token_run)]
        assert len(frames[0]) == 40 and frames[0]["predicted"].tolist() == frames[1]["predicted"].tolist(), name
        pd.testing.assert_frame_equal(frames[0], frames[1], check_exact=False, atol=1e-5, rtol=0, obj=name)


def test_compiled_layers_follow_the_eager_loss_curve(reference_run: StageRun, tmp_path) -> None:
    """execution.compile through the whole finetune stage (Trainer, LoRA on the CPU, checkpoints, adapter), on the
    4-bit base dequantized for training (execution.dequantize_base: how a large GPU trains by default): the per-step
    losses follow the eager 4-bit run's. Not bit for bit: the compiled code draws LoRA's dropout masks from another
    random generator and sums in another order, and bitsandbytes' CPU kernels round a little differently from a plain
    product (tests/test_gpu.py compares each of the two changes alone on CUDA)."""
    from project_copy import clone, run_stage, set_params

    repo = clone(reference_run.repo, tmp_path)
    set_params(repo, {"execution.compile": True, "execution.dequantize_base": True})
    log = run_stage(repo, "finetune", "llama")
    assert "compiled layers" in log and "base weights unquantized" in log
    metrics = read_json(StageRun(repo, log), "metrics/finetune_llama.json")["llama"]
    assert metrics["steps"] == 12
    run = read_json(StageRun(repo, log), "models/adapters/llama/training.json")["run"]
    assert run["compiled"] is True and run["base_weights"] == "unquantized"
    cache = run["compile_cache"]  # forward and backward graphs, compiled or from an earlier run's cache
    assert cache["graphs_compiled"] + cache["graphs_from_cache"] >= 2 and cache["seconds"] > 0, cache
    series = "plots/llama/plots/metrics/loss.tsv"
    eager, compiled = (pd.read_csv(run / series, sep="\t") for run in (reference_run.repo, repo))
    assert eager["step"].tolist() == compiled["step"].tolist() and len(eager) == 12
    difference = (compiled["loss"] - eager["loss"]).abs() / eager["loss"]
    print(f"largest relative loss difference, compiled against eager: {difference.max():.2e}")
    assert difference.max() < 1e-2


def test_golden_loss(reference_run: StageRun) -> None:
    losses = pd.read_csv(reference_run.repo / "plots/llama/plots/metrics/loss.tsv", sep="\t")["loss"]
    assert losses.tolist()[: len(GOLDEN_LOSS)] == pytest.approx(GOLDEN_LOSS, rel=1e-5)
