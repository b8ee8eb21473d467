"""The training data order, the collator and the answer-only loss, on a tiny random Llama."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from duel.training import (
    FP16_OVERFLOWS,
    IGNORE,
    AnswerCollator,
    BudgetKeeper,
    ReviewDataset,
    StepTelemetry,
    TrainingError,
    answer_loss,
    pack_rows,
    step_token_counts,
    training_order,
)

PAD = 0
LONGEST = AnswerCollator(pad_id=PAD, padding="longest", row_tokens=512)
ANSWERS = (7, 9)  # token ids of the negative and positive answer words in the tiny vocabulary


def random_lengths(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 500, size=n)


# --- training_order ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "steps", "batch"), [(100, 5, 16), (48, 3, 16), (30, 7, 8), (10, 4, 4)])
def test_order_shape_and_sorted_blocks(n, steps, batch):
    lengths = random_lengths(n, seed=1)
    order = training_order(lengths, steps, batch, seed=42)
    assert order.shape == (steps * batch,)
    assert order.min() >= 0 and order.max() < n
    blocks = lengths[order].reshape(steps, batch)
    assert (np.diff(blocks, axis=1) <= 0).all()  # longest first inside each optimizer step


def test_order_steps_hold_same_reviews_whatever_the_lengths():
    """Which reviews make up each optimizer step depends on the seed only (not on lengths, nor on the micro-batch,
    which the function never sees); lengths only reorder reviews inside a step."""
    n, steps, batch = 64, 6, 16

    def step_sets(lengths: np.ndarray, seed: int) -> list[set[int]]:
        order = training_order(lengths, steps, batch, seed)
        return [set(block) for block in order.reshape(steps, batch).tolist()]

    first = step_sets(random_lengths(n, seed=1), seed=42)
    assert step_sets(random_lengths(n, seed=1), seed=42) == first
    assert step_sets(random_lengths(n, seed=2), seed=42) == first
    assert step_sets(np.full(n, 100), seed=42) == first
    assert step_sets(random_lengths(n, seed=1), seed=43) != first


def test_order_is_deterministic():
    lengths = random_lengths(200, seed=3)
    np.testing.assert_array_equal(training_order(lengths, 10, 16, 42), training_order(lengths, 10, 16, 42))
    assert not np.array_equal(training_order(lengths, 10, 16, 42), training_order(lengths, 10, 16, 7))


@pytest.mark.parametrize(("n", "steps", "batch"), [(3200, 200, 16), (100, 6, 16), (64, 4, 16)])
def test_order_no_repeats_when_data_suffices(n, steps, batch):
    order = training_order(random_lengths(n, seed=4), steps, batch, seed=42)
    assert len(np.unique(order)) == steps * batch
    if steps * batch == n:
        assert sorted(order.tolist()) == list(range(n))


def test_order_covers_every_pass_when_data_is_short():
    n, steps, batch = 20, 5, 8  # 40 reviews needed: exactly two passes over 20
    order = training_order(random_lengths(n, seed=5), steps, batch, seed=42)
    assert np.bincount(order, minlength=n).tolist() == [2] * n


# --- AnswerCollator ------------------------------------------------------------------------------------------------


def features(*prompts: list[int], labels: tuple[int, ...] | None = None) -> list[dict]:
    frame = pd.DataFrame({"input_ids": list(prompts), "label": list(labels or [i % 2 for i in range(len(prompts))])})
    dataset = ReviewDataset(frame, ANSWERS)
    return [dataset[i] for i in range(len(dataset))]


def test_dataset_appends_nothing_and_maps_labels():
    items = features([1, 2, 3], [4, 5], labels=(1, 0))
    assert items == [{"input_ids": [1, 2, 3], "answer_id": 9}, {"input_ids": [4, 5], "answer_id": 7}]


def test_collator_left_pads_to_multiple_of_8():
    batch = LONGEST(features([11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [21, 22, 23]))
    assert batch["input_ids"].shape == (2, 16)  # longest is 10 + 1 answer = 11 tokens, padded to 16
    assert batch["input_ids"][0].tolist() == [PAD] * 5 + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, ANSWERS[0]]
    assert batch["input_ids"][1].tolist() == [PAD] * 12 + [21, 22, 23, ANSWERS[1]]
    assert batch["attention_mask"].tolist() == [[0] * 5 + [1] * 11, [0] * 12 + [1] * 4]
    assert batch["labels"][:, -1].tolist() == list(ANSWERS)
    assert (batch["labels"][:, :-1] == IGNORE).all()
    assert batch["position_ids"][0].tolist() == [0] * 5 + list(range(11))
    assert batch["position_ids"][1].tolist() == [0] * 12 + list(range(4))
    assert batch["logits_to_keep"].tolist() == [14]  # the answers sit in column 15, predicted from column 14


@pytest.mark.parametrize(("prompt_tokens", "width"), [(1, 8), (7, 8), (8, 16), (15, 16), (16, 24)])
def test_collator_width(prompt_tokens, width):
    # prompt + 1 answer token, rounded up to a multiple of 8
    batch = LONGEST(features(list(range(1, prompt_tokens + 1)), [1]))
    assert batch["input_ids"].shape[1] == width


def test_collator_pad_to_fixed_length():
    batch = AnswerCollator(pad_id=PAD, padding="max_length", row_tokens=32)(features([5, 6, 7], [8]))
    for key in ("input_ids", "attention_mask", "position_ids", "labels"):
        assert batch[key].shape == (2, 32)
    assert batch["attention_mask"].sum(dim=1).tolist() == [4, 2]
    assert batch["position_ids"][0, -4:].tolist() == [0, 1, 2, 3]
    assert batch["input_ids"][1, -2:].tolist() == [8, ANSWERS[1]]


def test_pack_rows_balances_rows():
    lengths = [300, 120, 500, 80, 200, 260, 40]  # 1,500 tokens -> 3 rows of 512
    rows = pack_rows(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    # Longest first, each into the row with the fewest tokens: 500 | 300 | 260, then 200 beside 260, 120 and 80
    # beside 300, 40 beside 460: three rows of 500 tokens, so padding to the longest row wastes nothing.
    assert rows == [[2], [0, 1, 3], [5, 4, 6]]
    assert [sum(lengths[i] for i in row) for row in rows] == [500, 500, 500]
    assert pack_rows([512, 512], 512) == [[0], [1]]
    assert pack_rows([5, 5, 5], 512) == [[0, 1, 2]]


def test_collator_packs_reviews_end_to_end():
    batch = AnswerCollator(pad_id=PAD, padding="packed", row_tokens=16)(
        features([11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23], [31, 32], labels=(0, 1, 1))
    )
    assert "attention_mask" not in batch  # the position ids tell transformers where each review starts
    assert batch["use_cache"] is False  # transformers looks for packed sequences only without a KV cache
    # 10 + 4 + 3 = 17 tokens -> 2 rows: the 10-token review alone, the 4- and 3-token ones together; rows are
    # padded to the longest, rounded up to a multiple of 8.
    assert batch["input_ids"].tolist() == [
        [11, 12, 13, 14, 15, 16, 17, 18, 19, ANSWERS[0], PAD, PAD, PAD, PAD, PAD, PAD],
        [21, 22, 23, ANSWERS[1], 31, 32, ANSWERS[1], PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
    ]
    assert batch["position_ids"].tolist() == [
        [*range(10), *range(6)],  # the padding counts as a sequence of its own
        [*range(4), *range(3), *range(9)],
    ]
    answers = (batch["labels"] != IGNORE).nonzero().tolist()
    assert answers == [[0, 9], [1, 3], [1, 6]]
    assert batch["logits_to_keep"].tolist() == [2, 5, 8]
    # The same boundaries for variable-length attention, over the two rows laid end to end (padding included).
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 10, 16, 20, 23, 32]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 10


def test_flattened_lays_every_review_in_one_row_through_transformers_collator():
    """padding "flattened": transformers' DataCollatorWithFlattening, one row and no padding at all, with the
    packed collator's answer labels, kept positions and variable-length attention keywords."""
    batch = AnswerCollator(pad_id=PAD, padding="flattened", row_tokens=16)(
        features([11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23], [31, 32], labels=(0, 1, 1))
    )
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["input_ids"].tolist() == [
        [11, 12, 13, 14, 15, 16, 17, 18, 19, ANSWERS[0], 21, 22, 23, ANSWERS[1], 31, 32, ANSWERS[1]]
    ]
    assert batch["position_ids"].tolist() == [[*range(10), *range(4), *range(3)]]
    assert (batch["labels"] != IGNORE).nonzero().tolist() == [[0, 9], [0, 13], [0, 16]]
    assert batch["logits_to_keep"].tolist() == [8, 12, 15]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 10, 14, 17]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == batch["max_length_k"] == 10


@pytest.mark.parametrize(("reviews", "width"), [((9, 3, 2), 24), ((9, 3, 1), 24), ((5, 2), 16)])
def test_flattened_rows_for_cuda_graphs_are_padded_to_few_lengths(reviews: tuple[int, ...], width: int):
    """With graph_tokens (execution.cuda_graphs) the flattened row is padded up to the next multiple of it by one
    padding sequence, never empty (16 tokens become 24, not 16: every batch has as many sequences), unlabelled, its
    positions from 0; the answers, their kept positions and the reviews' boundaries stay; the longest-sequence bound
    is the row_tokens given (data.max_length), the same in every batch."""
    prompts = [list(range(10 * i + 1, 10 * i + 1 + n)) for i, n in enumerate(reviews)]
    labels = tuple(i % 2 for i in range(len(reviews)))
    plain = AnswerCollator(pad_id=PAD, padding="flattened", row_tokens=32)(features(*prompts, labels=labels))
    batch = AnswerCollator(pad_id=PAD, padding="flattened", row_tokens=32, graph_tokens=8)(
        features(*prompts, labels=labels)
    )
    tokens = sum(reviews) + len(reviews)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, width)
    assert batch["input_ids"][0, :tokens].tolist() == plain["input_ids"][0].tolist()
    assert batch["input_ids"][0, tokens:].tolist() == [PAD] * (width - tokens)
    assert batch["position_ids"][0, tokens:].tolist() == list(range(width - tokens))
    assert (batch["labels"] != IGNORE).nonzero().tolist() == (plain["labels"] != IGNORE).nonzero().tolist()
    assert batch["logits_to_keep"].tolist() == plain["logits_to_keep"].tolist()
    ends = [*plain["cu_seq_lens_q"].tolist(), width]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == ends
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 32


@pytest.mark.parametrize("row", [16, 64, 512])
def test_packed_gives_the_padded_loss_and_gradients(tiny_model, row):
    """Packing changes how the work is laid out, not what is learned: the loss and every gradient equal those of
    one left-padded review per row (each packed review attends to itself only)."""
    lengths = (12, 5, 9, 3, 14, 2)
    results = []
    for padding in ("longest", "packed"):
        tiny_model.zero_grad(set_to_none=True)
        batch = tiny_batch(seed=2, lengths=lengths, padding=padding, row=row)
        loss = answer_loss(forward(tiny_model, batch, logits_to_keep=batch["logits_to_keep"]), batch["labels"])
        loss.backward()
        results.append((loss.item(), gradients(tiny_model), batch["input_ids"].shape))
    (padded_loss, padded_grads, padded_shape), (packed_loss, packed_grads, packed_shape) = results
    tiny_model.zero_grad(set_to_none=True)
    assert packed_shape[0] < padded_shape[0] or row == 16
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    for ref, got in zip(padded_grads, packed_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("graph_tokens", [0, 16])
def test_flattened_gives_the_padded_loss_and_gradients(tiny_model, graph_tokens: int):
    """transformers' padding-free collator (one row) learns what one left-padded review per row learns; so does that
    row padded for CUDA graphs (the padding a sequence of its own)."""
    lengths = (12, 5, 9, 3, 14, 2)
    results = []
    for padding in ("longest", "flattened"):
        tiny_model.zero_grad(set_to_none=True)
        batch = tiny_batch(seed=2, lengths=lengths, padding=padding, graph_tokens=graph_tokens)
        loss = answer_loss(forward(tiny_model, batch, logits_to_keep=batch["logits_to_keep"]), batch["labels"])
        loss.backward()
        results.append((loss.item(), gradients(tiny_model), batch["input_ids"].shape))
    (padded_loss, padded_grads, _), (flat_loss, flat_grads, flat_shape) = results
    tiny_model.zero_grad(set_to_none=True)
    tokens = sum(lengths) + len(lengths)  # each review and its answer
    assert flat_shape == (1, -(-(tokens + 1) // graph_tokens) * graph_tokens if graph_tokens else tokens)
    assert flat_loss == pytest.approx(padded_loss, abs=1e-5)
    for ref, got in zip(padded_grads, flat_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("padding", ["packed", "flattened"])
def test_flex_attention_gives_the_padded_loss(padding: str):
    """execution.attention flex_attention: transformers' FlexAttention on packed or flattened rows computes the loss of
    one left-padded review per row under SDPA (on the CPU, the forward pass only: FlexAttention has no backward pass
    there; the GPU test compares gradients)."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    lengths = (12, 5, 9, 3, 14, 2)
    losses = {}
    for attention, layout in (("sdpa", "longest"), ("flex_attention", padding)):
        torch.manual_seed(0)  # the same weights for both
        model = LlamaForCausalLM(tiny_llama_config(attn_implementation=attention, hidden_size=64)).eval()
        batch = tiny_batch(seed=2, lengths=lengths, padding=layout, row=32)
        with torch.no_grad():
            outputs = forward(model, batch, logits_to_keep=batch["logits_to_keep"])
            losses[attention] = answer_loss(outputs, batch["labels"]).item()
        assert model.config._attn_implementation == attention
    assert losses["flex_attention"] == pytest.approx(losses["sdpa"], abs=1e-5)


# --- answer_loss on a tiny random Llama ----------------------------------------------------------------------------


def tiny_batch(
    seed: int,
    lengths: tuple[int, ...] = (12, 5, 9, 3),
    padding: str = "longest",
    row: int = 512,
    graph_tokens: int = 0,
) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 300, size=n).tolist() for n in lengths]
    return AnswerCollator(pad_id=PAD, padding=padding, row_tokens=row, graph_tokens=graph_tokens)(features(*prompts))


def forward(model, batch: dict, **kwargs):
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "use_cache")}
    return model(**inputs, **kwargs)


@pytest.mark.parametrize("padding", ["longest", "packed"])
def test_answer_loss_equals_causal_lm_loss(tiny_model, padding: str):
    """Left-padded rows keep one position (every answer in the last column); packed rows keep every position that
    predicts some row's answer, each row's answers at its own columns."""
    batch = tiny_batch(seed=0, lengths=(12, 5, 9, 3, 7, 6), padding=padding, row=16)
    with torch.no_grad():
        reference = forward(tiny_model, batch, labels=batch["labels"]).loss
        kept = forward(tiny_model, batch, logits_to_keep=batch["logits_to_keep"])
    rows, kept_positions = (6, 1) if padding == "longest" else (3, 6)
    assert kept.logits.shape == (rows, kept_positions, 300)
    loss = answer_loss(kept, batch["labels"])
    assert torch.isfinite(loss) and loss.item() > 1.0  # random weights: about ln(300) = 5.7
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)


def test_answer_loss_by_hand():
    # The answer (last column) is predicted by the position before it, the only one whose logits are kept.
    logits = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 0.0, 3.0]]])
    labels = torch.tensor([[IGNORE, 0], [IGNORE, 1]])
    outputs = type("Outputs", (), {"logits": logits})()
    first = -math.log(math.exp(2) / (math.exp(2) + 2))  # answer 0, logit 2 against two zeros
    second = -math.log(1 / (2 + math.exp(3)))  # answer 1, logit 0 against 0 and 3
    assert answer_loss(outputs, labels).item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert answer_loss(outputs, labels, num_items_in_batch=8).item() == pytest.approx((first + second) / 8, rel=1e-6)


def gradients(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def test_micro_batches_give_the_same_gradient(tiny_model):
    """Micro-batch 1 x 4 accumulated with num_items_in_batch=4 equals one pass of 4: the paper's 1 x 16 and our
    16 x 1 learn the same thing."""
    lengths = (12, 5, 9, 3)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 300, size=n).tolist() for n in lengths]
    collate = AnswerCollator(pad_id=PAD, padding="longest", row_tokens=512)
    labels = (0, 1, 1, 0)

    tiny_model.zero_grad(set_to_none=True)
    whole = collate(features(*prompts, labels=labels))
    whole_loss = answer_loss(forward(tiny_model, whole, logits_to_keep=whole["logits_to_keep"]), whole["labels"])
    whole_loss.backward()
    reference = gradients(tiny_model)

    tiny_model.zero_grad(set_to_none=True)
    summed = 0.0
    for prompt, label in zip(prompts, labels, strict=True):
        micro = collate(features(prompt, labels=(label,)))
        kept = forward(tiny_model, micro, logits_to_keep=micro["logits_to_keep"])
        loss = answer_loss(kept, micro["labels"], num_items_in_batch=4)
        loss.backward()
        summed += loss.item()
    accumulated = gradients(tiny_model)
    tiny_model.zero_grad(set_to_none=True)

    assert summed == pytest.approx(whole_loss.item(), abs=1e-5)
    assert sum(g.abs().sum().item() for g in reference) > 0
    for ref, acc in zip(reference, accumulated, strict=True):
        torch.testing.assert_close(acc, ref, atol=1e-5, rtol=1e-4)


# --- per-step accounting and the telemetry callback ----------------------------------------------------------------


def test_step_token_counts(params):
    steps, batch, micro = 3, 4, 2
    train = dataclasses.replace(params.train, steps=steps, batch_size=batch)
    execution = dataclasses.replace(params.execution, micro_batch=micro, padding="longest")
    small = dataclasses.replace(params, train=train, execution=execution)
    lengths = np.array([10, 3, 7, 20, 15, 1, 8, 9, 30, 2, 4, 6])
    order = np.arange(12)
    real, padded = step_token_counts(lengths, order, small)
    assert real.tolist() == [(10 + 3 + 7 + 20) + 4, (15 + 1 + 8 + 9) + 4, (30 + 2 + 4 + 6) + 4]
    # Micro-batches of 2, each padded to its longest (+1 answer) rounded up to a multiple of 8.
    assert padded.tolist() == [2 * 16 + 2 * 24, 2 * 16 + 2 * 16, 2 * 32 + 2 * 8]
    fixed = dataclasses.replace(small, execution=dataclasses.replace(execution, padding="max_length"))
    assert step_token_counts(lengths, order, fixed)[1].tolist() == [4 * params.data.max_length] * 3
    packed = dataclasses.replace(
        small,
        data=dataclasses.replace(params.data, max_length=32),
        execution=dataclasses.replace(execution, padding="packed", pack_tokens=32),
    )
    # ceil(tokens / 32) rows, padded to the longest, rounded up to a multiple of 8 (the answer adds one token per
    # review). Step 1: [11, 4] -> one row of 15 -> 16; [8, 21] -> one row of 29 -> 32. Step 2: [16, 2] -> 24;
    # [9, 10] -> 24. Step 3: [31, 3] -> 34 tokens, two rows, the longest 31 -> 2 x 32; [5, 7] -> 16.
    assert step_token_counts(lengths, order, packed)[1].tolist() == [16 + 32, 24 + 24, 64 + 16]
    flattened = dataclasses.replace(small, execution=dataclasses.replace(execution, padding="flattened"))
    assert step_token_counts(lengths, order, flattened)[1].tolist() == real.tolist()  # no padding computed
    graphed = dataclasses.replace(
        small, execution=dataclasses.replace(execution, padding="flattened", cuda_graphs=True, graph_tokens=16)
    )
    # Micro-batches of 15, 29 | 18, 19 | 34, 12 tokens, each with at least one padding token up to a multiple of 16.
    assert step_token_counts(lengths, order, graphed)[1].tolist() == [16 + 32, 32 + 32, 48 + 16]


def test_telemetry_adds_throughput_and_stops_on_nan(tmp_path):
    from duel.telemetry import GpuSampler

    sampler = GpuSampler(util_samples=[50, 70])  # NVML's samples so far (a GPU run's background thread adds them)
    callback = StepTelemetry(np.array([100.0, 200.0]), np.array([128.0, 256.0]), batch_size=16, sampler=sampler)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    state.global_step = 2
    logs = {"loss": 0.7}
    callback.on_log(args, state, control, logs=logs)
    assert logs["tokens_per_s"] > 0 and logs["padded_tokens_per_s"] >= logs["tokens_per_s"]
    assert logs["reviews_per_s"] > 0 and logs["memory_gib"] > 0
    assert logs["gpu_util_pct"] == 60.0  # the mean of the samples taken during the line's steps
    sampler.util_samples.append(95)
    logs = {"loss": 0.7}
    callback.on_log(args, state, control, logs=logs)
    assert logs["gpu_util_pct"] == 95.0  # only the samples since the previous line
    logs = {"loss": 0.7}
    callback.on_log(args, state, control, logs=logs)
    assert "gpu_util_pct" not in logs  # no sample (a CPU run has none at all)
    # Not in fp16 (tests/test_error_paths.py checks the fp16 message): the run diverged.
    with pytest.raises(TrainingError, match=r"loss is nan at step 2; the training diverged: lower train\.learning_r"):
        callback.on_log(args, state, control, logs={"loss": float("nan")})
    with pytest.raises(TrainingError, match=r"gradient norm is inf at step 2; the training diverged"):
        callback.on_log(args, state, control, logs={"loss": 0.7, "grad_norm": float("inf")})


def test_fp16_overflow_skips_are_routine_until_they_persist(tmp_path):
    """In fp16 the loss scaler skips a step whose gradients overflow and halves its scale: a few non-finite gradient
    norms are routine (the paper's recipe logs them early on); FP16_OVERFLOWS logged in a row stop the run."""
    callback = StepTelemetry(np.full(20, 100.0), np.full(20, 128.0), batch_size=16)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    args.fp16 = True  # set after construction: the CPU would refuse fp16 in TrainingArguments' own checks
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step in range(1, FP16_OVERFLOWS):
        state.global_step = step
        callback.on_log(args, state, control, logs={"loss": 0.7, "grad_norm": float("nan")})
    state.global_step += 1
    callback.on_log(args, state, control, logs={"loss": 0.7, "grad_norm": 1.5})  # a finite one resets the count
    for _ in range(FP16_OVERFLOWS - 1):
        state.global_step += 1
        callback.on_log(args, state, control, logs={"loss": 0.7, "grad_norm": float("inf")})
    state.global_step += 1
    with pytest.raises(TrainingError, match=f"overflowed fp16 in {FP16_OVERFLOWS} logged steps in a row"):
        callback.on_log(args, state, control, logs={"loss": 0.7, "grad_norm": float("inf")})


# --- execution.compile ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # inductor compiles on the CPU: 8-10 s
def test_compiled_layers_give_the_same_loss_and_gradients():
    """execution.compile (regional torch.compile of each decoder layer, dynamic shapes) changes how the step runs, not
    what it computes: on a tiny LoRA model and packed batches of two widths, the loss and the LoRA gradients equal
    the eager ones, and a new row width does not compile again."""
    from conftest import tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import LlamaForCausalLM

    from duel.checkpointing import decoder_layers
    from duel.modeling import compile_layers

    torch._dynamo.reset()
    models = []
    for compiled in (False, True):
        torch.manual_seed(0)
        base = LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa", hidden_size=48, intermediate_size=96))
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
        model = get_peft_model(base, lora).train()
        compile_layers(model, compiled)
        models.append(model)
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(models[1]))
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(models[0]))

    counters.clear()
    for lengths in ((12, 5, 9, 3, 14, 2), (20, 7, 11)):
        batch = tiny_batch(seed=3, lengths=lengths, padding="packed", row=40)
        assert batch["input_ids"].shape[1] not in (48, 96)  # a width equal to a weight's size would be specialized
        results = []
        for model in models:
            model.zero_grad(set_to_none=True)
            loss = answer_loss(forward(model, batch, logits_to_keep=batch["logits_to_keep"]), batch["labels"])
            loss.backward()
            grads = [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]
            results.append((loss.item(), grads))
        (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
        assert compiled_loss == pytest.approx(eager_loss, abs=1e-5)
        assert sum(g.abs().sum().item() for g in eager_grads) > 0
        for ref, got in zip(eager_grads, compiled_grads, strict=True):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # One layer's code serves every layer and width: the first layer's input (from the frozen embeddings) is made to
    # require a gradient like every other layer's, so it needs no graph of its own.
    assert counters["stats"]["unique_graphs"] == 1


def test_quiet_live_skips_the_studio_payload_only(tmp_path, monkeypatch):
    """Without a Studio configured, QuietLive writes the same metric files as DVCLive's Live but never builds the
    per-step Studio payload (which re-reads every logged file); Live itself still builds it, so the private hook
    QuietLive overrides is the one DVCLive calls."""
    from dvclive import Live

    from duel.training import QuietLive

    monkeypatch.delenv("DVC_STUDIO_TOKEN", raising=False)
    built = []
    for cls in (Live, QuietLive):
        live = cls(str(tmp_path / cls.__name__), dvcyaml=False, save_dvc_exp=False, report=None)
        monkeypatch.setattr(live, "_get_live_data", lambda name=cls.__name__: built.append(name) or {})
        for step in range(3):
            live.log_metric("train/loss", 1.0 / (step + 1))
            live.next_step()
        rows = (tmp_path / cls.__name__ / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
        assert len(rows) == 4  # header + 3 steps
    assert built == ["Live"] * 3


def reference_varlen_kernel(query, key, value, cu_seq_lens, max_length, scale):
    """duel.attention.varlen_kernel's contract on the CPU: causal attention within each sequence, one at a time."""
    bounds = cu_seq_lens.tolist()
    assert max_length == max(b - a for a, b in itertools.pairwise(bounds))
    pieces = []
    for start, end in itertools.pairwise(bounds):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # (heads, tokens, head_dim)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces)


@pytest.mark.parametrize("row", [16, 64])
def test_varlen_attention_gives_the_masked_sdpa_loss_and_gradients(tiny_model, row, monkeypatch):
    """execution.attention varlen: the model reads the collator's cu_seq_lens instead of a block-diagonal mask; with the
    kernel's contract computed on the CPU (torch's varlen kernels are CUDA only; tests/test_gpu.py runs them), the
    loss and every gradient equal SDPA's (and eager's) on the packed-sequence mask."""
    from duel import attention

    monkeypatch.setattr(attention, "varlen_kernel", reference_varlen_kernel)
    attention.register()
    batch = tiny_batch(seed=4, lengths=(12, 5, 9, 3, 14, 2), padding="packed", row=row)
    original = tiny_model.config._attn_implementation  # sdpa or eager: both mask the packed sequences
    results = []
    for implementation in (original, attention.VARLEN):
        tiny_model.set_attn_implementation(implementation)
        tiny_model.zero_grad(set_to_none=True)
        extra = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
        loss = answer_loss(forward(tiny_model, batch, logits_to_keep=batch["logits_to_keep"], **extra), batch["labels"])
        loss.backward()
        results.append((loss.item(), gradients(tiny_model)))
    tiny_model.set_attn_implementation(original)
    tiny_model.zero_grad(set_to_none=True)
    (sdpa_loss, sdpa_grads), (varlen_loss, varlen_grads) = results
    assert varlen_loss == pytest.approx(sdpa_loss, abs=1e-5)
    for ref, got in zip(sdpa_grads, varlen_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_varlen_attention_refuses_padded_batches(tiny_model):
    from duel import attention

    attention.register()
    original = tiny_model.config._attn_implementation
    batch = tiny_batch(seed=4, padding="longest")
    tiny_model.set_attn_implementation(attention.VARLEN)
    try:
        with pytest.raises(ValueError, match=r"^execution\.attention: varlen needs packed rows"):
            forward(tiny_model, batch)
    finally:
        tiny_model.set_attn_implementation(original)


def test_telemetry_stops_on_a_diverged_gradient(tmp_path):
    """A run can log a finite loss while its gradients are NaN (a learning rate of 2e+5 for 2e-5): the gradient norm
    the Trainer logs stops it, with the learning rate named."""
    callback = StepTelemetry(np.array([100.0, 200.0]), np.array([128.0, 256.0]), batch_size=16)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=2e5)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    state.global_step = 1
    callback.on_log(args, state, control, logs={"loss": 0.7, "grad_norm": 3.0})  # finite: goes on
    with pytest.raises(TrainingError, match=r"gradient norm is nan at step 1.*train\.learning_rate \(200000"):
        callback.on_log(args, state, control, logs={"loss": 0.0, "grad_norm": float("nan")})


def test_nonfinite_lora_weights_stop_before_saving(tiny_model, params):
    from peft import LoraConfig, get_peft_model

    from duel.training import check_finite_weights

    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    check_finite_weights(model, params)  # a fresh adapter is finite
    lora = next(p for name, p in model.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        lora[0, 0] = float("inf")
    try:
        with pytest.raises(TrainingError, match=r"1 LoRA weight tensors hold NaN or infinite values"):
            check_finite_weights(model, params)
    finally:
        model.unload()  # the session's tiny model, as it was


def test_checkpoints_of_other_params_are_removed(tmp_path, params):
    import dataclasses

    from duel.training import resumable_checkpoint, training_fingerprint

    data = tmp_path / "train.parquet"
    data.write_bytes(b"tokens")
    folder = tmp_path / "checkpoints"
    first = training_fingerprint(params, "llama", [data])
    assert resumable_checkpoint(folder, first) == (None, 0)
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert resumable_checkpoint(folder, first) == (folder / "checkpoint-4", 4)  # same params: resumed

    other_lora = dataclasses.replace(params, lora=dataclasses.replace(params.lora, r=8))
    assert training_fingerprint(other_lora, "llama", [data]) != first  # other params
    data.write_bytes(b"other tokens")
    assert training_fingerprint(params, "llama", [data]) != first  # other data
    assert resumable_checkpoint(folder, training_fingerprint(other_lora, "llama", [data])) == (None, 0)
    assert not (folder / "checkpoint-4").exists()


def test_model_flops_count_the_projections_and_the_recomputed_layers(monkeypatch: pytest.MonkeyPatch):
    """MFU's numerator: per real token, 4N through a layer (forward, input gradients) and 6N through a checkpointed
    one, N its projections' in x out; LoRA's own small matrices are left out. Scoring's: 2N."""
    from conftest import tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from duel.checkpointing import set_checkpointed_layers
    from duel.scoring import scoring_speed
    from duel.telemetry import peak_tflops
    from duel.training import model_flops_per_token, utilization

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), LoraConfig(r=4, target_modules=targets))
    per_layer = 4 * 32 * 32 + 3 * 32 * 64  # attention's four 32 x 32 projections, the MLP's three 32 x 64
    assert model_flops_per_token(model) == 2 * 4 * per_layer
    set_checkpointed_layers(model, 1)
    assert model_flops_per_token(model) == 6 * per_layer + 4 * per_layer
    assert utilization(1000.0, model, "fp32") == {"model_tflops_per_s": 0.0, "mfu": None}  # no known peak here
    monkeypatch.setattr("duel.telemetry.device_name", lambda: "NVIDIA H200")
    tokens_per_s = 989e12 / 4 / model_flops_per_token(model)  # a quarter of the H200's peak
    assert utilization(tokens_per_s, model, "bf16") == {"model_tflops_per_s": 247.25, "mfu": 0.25}
    # Scoring: the forward pass only, 2N per real token of the reviews scored.
    test = pd.DataFrame({"input_ids": [[1] * 300, [1] * 100]})
    seconds = 400 * 2 * 2 * per_layer / (989e12 / 2)  # half the peak
    speed = scoring_speed(model, test, seconds, "bfloat16")
    assert speed == {"eval_tokens_per_s": round(400 / seconds, 1), "eval_model_tflops_per_s": 494.5, "eval_mfu": 0.5}
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0 and peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.0
    assert peak_tflops("NVIDIA L40S", "bf16") == 362.0 and peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert peak_tflops("NVIDIA H200", "fp32") is None and peak_tflops("cpu", "bf16") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_cuda_graphs_without_a_gpu_is_a_clear_error(tiny_model, tmp_path):
    from duel.graphs import GraphedTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TrainingError, match=r"execution\.cuda_graphs: needs a CUDA GPU; set it to false"):
        GraphedTrainer(model=tiny_model, args=args)


# --- execution.fuse_projections ------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_projections_give_the_same_loss_and_gradients(checkpointing: bool):
    """execution.fuse_projections computes q/k/v and gate/up of each layer together (duel/fused.py): on a tiny LoRA
    model over all seven projections, with and without checkpointing's recompute, the loss and every LoRA gradient
    equal PEFT's own, the base weights are views into one fused weight (no copy left behind), and the adapter's
    state dict keeps PEFT's names. With LoRA dropout too: on the CPU a group's one draw of its members' masks takes
    the generator's numbers in the order PEFT's three draws take them, so even the masks are PEFT's."""
    from conftest import tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from duel.fused import fuse_projections

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    batch = tiny_batch(seed=3, lengths=(12, 5, 9, 3, 14, 2), padding="packed", row=40)
    results, state_keys = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        base = LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa", hidden_size=48, intermediate_size=96))
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(base, lora).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        if fused:
            assert fuse_projections(model) == 2 * 2  # two groups in each of two layers
            attention = model.base_model.model.model.layers[0].self_attn
            weights = [attention.q_proj.base_layer.weight, attention.v_proj.base_layer.weight]
            assert weights[0].untyped_storage().data_ptr() == weights[1].untyped_storage().data_ptr()
        torch.manual_seed(1)  # the same dropout draws
        loss = answer_loss(forward(model, batch, logits_to_keep=batch["logits_to_keep"]), batch["labels"])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
        state_keys.append(sorted(model.state_dict()))
    (plain_loss, plain_grads), (fused_loss, fused_grads) = results
    assert state_keys[0] == state_keys[1]
    assert fused_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain_grads.keys() == fused_grads.keys() and len(plain_grads) == 2 * 7 * 2
    for name, ref in plain_grads.items():
        assert ref.abs().sum() > 0, name
        torch.testing.assert_close(fused_grads[name], ref, atol=1e-6, rtol=1e-5, msg=name)


def test_fused_projections_draw_a_dropout_mask_per_member():
    """With lora.dropout, each fused member's adapter sees its own mask over the shared input, at PEFT's rate: the
    three attention projections' inputs are dropped independently, not together."""
    from peft import LoraConfig, get_peft_model

    from duel.fused import FusedGroup

    torch.manual_seed(0)

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(64, 64, bias=False) for _ in range(3))

    lora = LoraConfig(r=64, lora_dropout=0.5, target_modules=["q_proj", "k_proj", "v_proj"])
    model = get_peft_model(Attention(), lora).train()
    inner = model.base_model.model
    group = FusedGroup([inner.q_proj, inner.k_proj, inner.v_proj])
    for member in group.members:  # each output is then the member's dropped input, scaled: 0 where it was dropped
        member.lora_A["default"].weight.data = torch.eye(64)
        member.lora_B["default"].weight.data = torch.eye(64)
        member.base_layer.weight.data.zero_()
    zero = [(out == 0).float() for out in group.outputs(torch.ones(4000, 64))]
    assert all(z.mean().item() == pytest.approx(0.5, abs=0.01) for z in zero)
    assert (zero[0] * zero[1]).mean().item() == pytest.approx(0.25, abs=0.01)  # independent masks


# --- execution.expandable_segments ---------------------------------------------------------------------------------


def test_expandable_segments_are_asked_for_unless_the_environment_has_its_own_allocator_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from duel.checkpointing import configure_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert configure_allocator(False) is None and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    assert configure_allocator(True) == "expandable_segments:True" == os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # the user's own
    assert configure_allocator(True) == "max_split_size_mb:512" == os.environ["PYTORCH_CUDA_ALLOC_CONF"]


def test_budget_keeper_caps_the_allocator_again_after_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first optimizer step loads kernels whose memory counts against execution.memory_budget_gib: the cap is
    set again once, after it; without a budget never."""
    import duel.training

    caps: list[float | None] = []
    monkeypatch.setattr(duel.training, "limit_gpu_memory", caps.append)
    args, state, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerState(), TrainerControl()
    for budget in (16.0, None):
        keeper = BudgetKeeper(budget)
        for _ in range(3):
            keeper.on_step_end(args, state, control)
    assert caps == [16.0]


@pytest.mark.parametrize("padding", ["flattened", "packed", "longest"])
def test_collator_looks_tokens_up_in_a_host_table(padding: str) -> None:
    """execution.offload_embeddings: with the table the collator hands the model each token's row of it in place of
    the token ids; the rest of the batch is the same."""
    table = torch.randn(300, 8)
    features = [{"input_ids": list(range(5 + i, 12 + 2 * i)), "answer_id": ANSWERS[i % 2]} for i in range(4)]
    plain = AnswerCollator(PAD, padding, 512)(features)
    hosted = AnswerCollator(PAD, padding, 512, embeddings=table)(features)
    assert "input_ids" not in hosted and hosted["inputs_embeds"].shape == (*plain["input_ids"].shape, 8)
    assert torch.equal(hosted["inputs_embeds"], table[plain["input_ids"]])
    assert hosted.keys() - {"inputs_embeds"} == plain.keys() - {"input_ids"}
    assert all(
        torch.equal(hosted[k], plain[k]) for k in plain if isinstance(plain[k], torch.Tensor) and k != "input_ids"
    )


def test_the_closing_line_says_whether_a_card_of_the_budget_held_the_run() -> None:
    from stages.finetune import on_the_card

    assert on_the_card({"nvml_peak_gib": None}, 8.0) == ""  # a CPU: no GPU memory to speak of
    assert on_the_card({"nvml_peak_gib": 8.57}, 8.0) == "; 8.57 GiB on the GPU at its peak, over the 8 GiB budget"
    assert on_the_card({"nvml_peak_gib": 7.5}, 8.0).endswith("within the 8 GiB budget")
    assert on_the_card({"nvml_peak_gib": 60.1}, None) == "; 60.10 GiB on the GPU at its peak"
