"""Verbalizer scoring: metrics from hand-made logits, and label_logits on a tiny random Llama."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from duel.evaluation import classification_metrics, confusion, label_logits, predictions_frame

PAD = 0
ANSWERS = (7, 9)


def test_metrics_on_hand_made_logits():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    # margin = positive - negative:  2    1   -1   -2   0.5  -3    3   -0.5
    logits = np.array(
        [[0, 2], [0, 1], [1, 0], [2, 0], [0, 0.5], [3, 0], [0, 3], [0.5, 0]],
        dtype=np.float32,
    )
    metrics = classification_metrics(labels, logits)
    # predicted: 1 1 0 0 1 0 1 0 -> TP 3, FN 1, FP 1, TN 3
    assert confusion(labels, logits) == [[3, 1], [1, 3]]
    assert metrics["accuracy"] == 0.75
    assert metrics["precision"] == 0.75
    assert metrics["recall"] == 0.75
    assert metrics["f1"] == 0.75
    assert metrics["predicted_positive_share"] == 0.5
    assert metrics["reviews"] == 8
    # Positives' margins {3, 2, 1, -1} vs negatives' {0.5, -0.5, -2, -3}: 14 of 16 pairs ranked right.
    assert metrics["roc_auc"] == 0.875


def test_metrics_unbalanced_predictions():
    labels = np.array([1, 1, 0, 0, 0])
    logits = np.array([[0, 1], [0, 1], [0, 1], [0, 1], [1, 0]], dtype=np.float32)
    metrics = classification_metrics(labels, logits)
    assert confusion(labels, logits) == [[1, 2], [0, 2]]
    assert metrics["precision"] == 0.5  # 2 of the 4 predicted positive are positive
    assert metrics["recall"] == 1.0
    assert metrics["f1"] == 0.6667
    assert metrics["accuracy"] == 0.6


def test_metrics_single_class_has_no_auc():
    labels, logits = np.array([1, 1]), np.array([[0, 1], [1, 0]], dtype=np.float32)
    metrics = classification_metrics(labels, logits)
    assert metrics["roc_auc"] is None
    assert metrics["accuracy"] == 0.5
    assert confusion(labels, logits) == [[0, 0], [1, 1]]


def test_predictions_frame():
    reviews = pd.DataFrame({"review_id": ["test-9", "test-2", "test-4"], "label": [0, 1, 1], "input_ids": [[1]] * 3})
    logits = np.array([[2.0, 1.0], [0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    frame = predictions_frame(reviews, logits)
    assert list(frame.columns) == ["review_id", "actual", "predicted", "score", "logit_negative", "logit_positive"]
    assert frame["review_id"].tolist() == ["test-9", "test-2", "test-4"]
    assert frame["actual"].tolist() == [0, 1, 1]
    assert frame["predicted"].tolist() == [0, 1, 0]
    assert frame["score"].tolist() == [-1.0, 0.5, -0.75]  # positive minus negative logit
    assert frame["logit_positive"].tolist() == [1.0, 0.5, 0.25]


def review_frame(seed: int, lengths: tuple[int, ...]) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"input_ids": [rng.integers(1, 300, size=n).tolist() for n in lengths], "label": [0] * len(lengths)}
    )


@torch.no_grad()
def alone(model, ids: list[int]) -> np.ndarray:
    """[negative, positive] logits of one review, run unpadded on its own."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return logits[list(ANSWERS)].numpy()


def test_label_logits_independent_of_batching(tiny_model):
    frame = review_frame(seed=0, lengths=(4, 17, 9, 1, 12, 17, 6))  # ties, a one-token review, odd last batch
    single = label_logits(tiny_model, frame, ANSWERS, PAD, batch_size=1, desc="test")
    batched = label_logits(tiny_model, frame, ANSWERS, PAD, batch_size=3, desc="test")
    whole = label_logits(tiny_model, frame, ANSWERS, PAD, batch_size=64, desc="test")
    assert single.shape == (7, 2) and single.dtype == np.float32
    np.testing.assert_allclose(batched, single, atol=1e-4)
    np.testing.assert_allclose(whole, single, atol=1e-4)
    # Rows come back in frame order, each equal to that review scored alone, without any padding.
    expected = np.stack([alone(tiny_model, ids) for ids in frame["input_ids"]])
    np.testing.assert_allclose(batched, expected, atol=1e-4)
    assert np.abs(expected[:, None] - expected[None]).max() > 1e-3  # reviews differ, so an order mix-up shows


def test_label_logits_padding_is_masked(tiny_model):
    """Controls for the equality above. Padding that is attended to changes a review's logits, so that test would
    see a broken mask. Positions counted from the padding (3..14 instead of 0..2) do not: RoPE scores depend only on
    the distance between tokens, so a constant shift is harmless for Llama, and the mask is what must be right."""
    frame = review_frame(seed=1, lengths=(3, 15))
    short = frame["input_ids"][0]
    ids = torch.tensor([[PAD] * 12 + short])
    with torch.no_grad():
        unmasked = tiny_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1, list(ANSWERS)]
        shifted = tiny_model(
            input_ids=ids, attention_mask=torch.tensor([[0] * 12 + [1] * 3]), position_ids=torch.arange(15)[None]
        ).logits[0, -1, list(ANSWERS)]
    scored = label_logits(tiny_model, frame, ANSWERS, PAD, batch_size=2, desc="test")
    np.testing.assert_allclose(scored[0], alone(tiny_model, short), atol=1e-4)
    assert np.abs(unmasked.numpy() - scored[0]).max() > 1e-3
    np.testing.assert_allclose(shifted.numpy(), scored[0], atol=1e-4)


def test_flattened_scoring_gives_each_review_its_own_logits(tiny_model):
    """execution.eval_padding flattened: a batch's reviews in one row without padding, position ids restarting per
    review, give each review the logits it has scored alone, in frame order, whatever the batch size."""
    frame = review_frame(seed=0, lengths=(4, 17, 9, 1, 12, 17, 6))
    expected = np.stack([alone(tiny_model, ids) for ids in frame["input_ids"]])
    for batch_size in (1, 3, 64):
        flattened = label_logits(tiny_model, frame, ANSWERS, PAD, batch_size, desc="test", flattened=True)
        assert flattened.shape == (7, 2) and flattened.dtype == np.float32
        np.testing.assert_allclose(flattened, expected, atol=1e-4)
    # The control: without positions restarting, the row's later reviews attend to those before them.
    first, second = (frame["input_ids"][i] for i in (0, 1))
    with torch.no_grad():
        one_sequence = tiny_model(input_ids=torch.tensor([first + second])).logits[0, -1, list(ANSWERS)].numpy()
    assert np.abs(one_sequence - expected[1]).max() > 1e-3


def test_scoring_profiles_the_batches_asked_for(tiny_model, tmp_path, monkeypatch: pytest.MonkeyPatch):
    """DUEL_PROFILE over scoring: batches 2 and 3 of the real scoring loop profiled, the logits unchanged."""
    frame = review_frame(seed=0, lengths=(4, 17, 9, 1, 12, 17, 6))
    plain = label_logits(tiny_model, frame, ANSWERS, PAD, batch_size=2, desc="test")
    monkeypatch.setenv("DUEL_PROFILE", str(tmp_path / "profile"))
    monkeypatch.setenv("DUEL_PROFILE_STEPS", "1:2")
    profiled = label_logits(tiny_model, frame, ANSWERS, PAD, batch_size=2, desc="test")
    np.testing.assert_array_equal(profiled, plain)
    window = json.loads((tmp_path / "profile" / "batches.json").read_text())
    assert window["first_batch"] == 2 and window["batches"] == 2 and window["seconds_per_batch"] > 0
    assert "aten::" in (tmp_path / "profile" / "kernels.txt").read_text()


def test_merged_adapter_scores_like_the_adapter_beside_the_base(params, tmp_path):
    """execution.merge_adapter: the dequantized base with the adapter merged in scores like the dequantized base with
    the adapter on the side (merging changes nothing), and both like the 4-bit base with the adapter (dequantizing
    keeps the weights; bitsandbytes' CPU kernels round a little differently from a plain fp32 product)."""
    import dataclasses

    from conftest import tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from duel.io import write_json
    from duel.modeling import dequantized, load_adapter_for_inference, load_base_model, merged_adapter

    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=64, intermediate_size=128)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    write_json(base_dir / "model.json", {"path": str(base_dir)})
    quantization = dataclasses.replace(params.quantization, enabled=True)
    execution = dataclasses.replace(params.execution, compute_dtype="float32")
    small = dataclasses.replace(params, quantization=quantization, execution=execution)

    def base_4bit():
        return load_base_model(base_dir, small.model("llama"), small, "sdpa")

    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base_4bit(), lora).save_pretrained(adapter_dir)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"input_ids": [rng.integers(10, 300, size=n).tolist() for n in (9, 4, 13, 6)], "label": 0})

    def scores(model) -> np.ndarray:
        return label_logits(model, frame, ANSWERS, PAD, batch_size=2, desc="test")

    plain = dequantized(base_4bit(), quantized=True)
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # no 4-bit layer left
    zero_shot = scores(plain)
    merged = scores(merged_adapter(plain, adapter_dir))
    beside = scores(load_adapter_for_inference(dequantized(base_4bit(), quantized=True), adapter_dir))
    beside_4bit = scores(load_adapter_for_inference(base_4bit(), adapter_dir))
    effect = np.abs(beside - zero_shot).max()
    assert effect > 0.1  # the adapter matters ...
    np.testing.assert_allclose(merged, beside, atol=1e-5)  # ... merging it changes nothing ...
    assert np.abs(beside - beside_4bit).max() < 0.05 * effect  # ... nor does dequantizing, beyond kernel rounding
    # Flattened batches through PEFT's model (the position ids and logits_to_keep reach the base): the same logits.
    adapted = load_adapter_for_inference(base_4bit(), adapter_dir)
    flattened = label_logits(adapted, frame, ANSWERS, PAD, batch_size=2, desc="test", flattened=True)
    np.testing.assert_allclose(flattened, beside_4bit, atol=1e-4)


class OomAbove:
    """A forward pre-hook raising torch.OutOfMemoryError for batches of more than `fits` reviews."""

    def __init__(self, fits: int) -> None:
        self.fits, self.calls = fits, 0

    def __call__(self, module, args, kwargs) -> None:
        self.calls += 1
        if kwargs["input_ids"].shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def test_scoring_halves_the_batch_on_oom(tiny_model):
    frame = pd.DataFrame({"input_ids": [[5 + i] * (3 + i) for i in range(10)], "label": 0})
    reference = label_logits(tiny_model, frame, ANSWERS, PAD, batch_size=8, desc="test")
    hook = tiny_model.register_forward_pre_hook(OomAbove(fits=2), with_kwargs=True)
    try:
        stats: dict[str, int] = {}
        logits = label_logits(tiny_model, frame, ANSWERS, PAD, batch_size=8, desc="test", stats=stats)
    finally:
        hook.remove()
    assert stats == {"batch_size": 2, "oom_retries": 2}  # 8 -> 4 -> 2
    np.testing.assert_allclose(logits, reference, atol=1e-5)


def test_scoring_oom_at_batch_one_says_what_to_change(tiny_model):
    from duel.evaluation import EvaluationError

    frame = pd.DataFrame({"input_ids": [[5, 6, 7]], "label": 0})
    hook = tiny_model.register_forward_pre_hook(OomAbove(fits=0), with_kwargs=True)
    try:
        with pytest.raises(EvaluationError, match=r"batch size 1; set execution\.merge_adapter: false"):
            label_logits(tiny_model, frame, ANSWERS, PAD, batch_size=4, desc="test")
    finally:
        hook.remove()


def test_scoring_stays_within_the_memory_budget(tiny_model, monkeypatch: pytest.MonkeyPatch, params) -> None:
    """execution.memory_budget_gib holds for scoring too: the allocator is capped again after the first batch (its
    kernels' memory counts), and on an 80 GiB GPU a 16 GiB budget keeps the base in 4 bits (no merge)."""
    import dataclasses

    import duel.evaluation
    from duel import modeling

    caps: list[float | None] = []
    monkeypatch.setattr(duel.evaluation, "limit_gpu_memory", caps.append)
    frame = pd.DataFrame({"input_ids": [[5 + i] * (3 + i) for i in range(10)], "label": 0})
    label_logits(tiny_model, frame, ANSWERS, PAD, batch_size=4, desc="test", budget_gib=16.0)
    label_logits(tiny_model, frame, ANSWERS, PAD, batch_size=4, desc="test")
    assert caps == [16.0]  # once, after the first of three batches; never without a budget

    monkeypatch.setattr(modeling, "gpu_memory_gib", lambda: 80.0)
    budgets = {b: dataclasses.replace(params.execution, memory_budget_gib=b) for b in (None, 16.0, 48.0)}
    assert {b: modeling.merge_wanted(e) for b, e in budgets.items()} == {None: True, 16.0: False, 48.0: True}
