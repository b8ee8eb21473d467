"""Scoring by the verbalizer: compare the logits of the two label words at the answer position (no generation)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score
from tqdm.auto import tqdm

from duel import profiling
from duel.checkpointing import limit_gpu_memory
from duel.errors import EvaluationError
from duel.telemetry import GpuSampler, Stopwatch, peak_memory


@torch.inference_mode()
def label_logits(
    model: Any,
    frame: pd.DataFrame,
    answer_ids: tuple[int, int],
    pad_id: int,
    batch_size: int,
    desc: str,
    stats: dict[str, int] | None = None,
    budget_gib: float | None = None,
    flattened: bool = False,
) -> np.ndarray:
    """Logits of [negative, positive] at the last prompt position, one row per review, in frame order.

    Reviews are scored in length-sorted batches (little padding), left-padded so the answer position is the last
    one for every row, and only that position's logits are computed (logits_to_keep=1); `flattened`: a batch's
    reviews in one row without padding instead (flattened_logits). On a CUDA out-of-memory error the batch is halved
    and scoring goes on; `stats`, when given, gets the batch size it ended with and how many times it was halved.
    With execution.memory_budget_gib (`budget_gib`), the allocator's cap is set again after the first batch, whose
    kernels' memory counts against the budget (duel.checkpointing.limit_gpu_memory). DUEL_PROFILE profiles a few
    batches (duel/profiling.py).
    """
    model.eval()
    device = next(model.parameters()).device
    ids = frame["input_ids"].tolist()
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out = np.zeros((len(ids), 2), dtype=np.float32)
    columns = torch.tensor(answer_ids, device=device)
    start, retries, batches = 0, 0, 0
    answer_logits = flattened_logits if flattened else padded_logits
    profiler = profiling.from_environment("batch")  # DUEL_PROFILE: torch.profiler over a few of these batches
    with tqdm(total=len(order), desc=desc, unit="review") as bar:
        while start < len(order):
            rows = order[start : start + batch_size]
            if profiler is not None:
                profiler.begin(batches)
            try:
                logits = answer_logits(model, [ids[r] for r in rows], pad_id, device)
            except torch.OutOfMemoryError:
                logits = None  # handled below, once the traceback (and the activations it holds) is released
            if logits is None:
                if batch_size == 1:
                    raise EvaluationError(
                        "evaluate: out of GPU memory at batch size 1; set execution.merge_adapter: false (keeps "
                        "the base in 4 bits) or lower data.max_length"
                    )
                batch_size, retries = batch_size // 2, retries + 1
                print(f"evaluate: out of GPU memory; going on with eval batches of {batch_size}")
                torch.cuda.empty_cache()
                continue
            out[rows] = logits.index_select(1, columns).float().cpu().numpy()
            if start == 0 and budget_gib:
                limit_gpu_memory(budget_gib)
            start, batches = start + len(rows), batches + 1
            if profiler is not None:
                profiler.end(batches)
            bar.update(len(rows))
    if stats is not None:
        stats |= {"batch_size": batch_size, "oom_retries": retries}
    return out


def padded_logits(model: Any, prompts: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Each prompt's logits at its last position, (prompts, vocabulary): the prompts left-padded to the longest, one
    row each, under an attention mask."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=1,
        use_cache=False,
    ).logits[:, -1, :]


def flattened_logits(model: Any, prompts: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Each prompt's logits at its last position, (prompts, vocabulary): the prompts end to end in one row without
    padding or mask, as transformers' padding-free collator lays them out (DataCollatorWithFlattening): position ids
    restart at each prompt, which sdpa turns into a block mask, and the prompts' boundaries (cu_seq_lens, max_length)
    go to varlen and Flash Attention 2; the logits are computed at the prompts' last positions only. `pad_id` is
    unused (no padding): padded_logits' signature."""
    lengths = torch.tensor([len(p) for p in prompts])
    ends = lengths.cumsum(0)
    bounds = torch.cat([torch.zeros(1, dtype=ends.dtype), ends]).to(device=device, dtype=torch.int32)
    input_ids = torch.tensor([token for prompt in prompts for token in prompt]).unsqueeze(0)
    positions = torch.arange(int(ends[-1])) - torch.repeat_interleave(ends - lengths, lengths)
    longest = int(lengths.max())
    return model(
        input_ids=input_ids.to(device),
        position_ids=positions.unsqueeze(0).to(device),
        cu_seq_lens_q=bounds,
        cu_seq_lens_k=bounds,
        max_length_q=longest,
        max_length_k=longest,
        logits_to_keep=(ends - 1).to(device),
        use_cache=False,
    ).logits[0]


def predicted_labels(logits: np.ndarray) -> np.ndarray:
    """1 (positive) where the positive label word's logit is the larger, else 0."""
    return (logits[:, 1] > logits[:, 0]).astype(int)


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
    """Accuracy, F1, precision, recall (positive class = 1), ROC-AUC on the logit margin, confusion matrix."""
    predicted = predicted_labels(logits)
    margin = logits[:, 1] - logits[:, 0]
    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": round(float(accuracy_score(labels, predicted)), 4),
        "f1": round(float(f1_score(labels, predicted, zero_division=0)), 4),
        "precision": round(float(precision_score(labels, predicted, zero_division=0)), 4),
        "recall": round(float(recall_score(labels, predicted, zero_division=0)), 4),
        "roc_auc": round(float(roc_auc_score(labels, margin)), 4) if both_classes else None,
        "predicted_positive_share": round(float(predicted.mean()), 4),
        "reviews": len(labels),
    }


def confusion(labels: np.ndarray, logits: np.ndarray) -> list[list[int]]:
    """[[true negatives, false positives], [false negatives, true positives]]."""
    predicted = predicted_labels(logits)
    return confusion_matrix(labels, predicted, labels=[0, 1]).tolist()


def predictions_frame(reviews: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
    """One row per review of `reviews` (review_id, label), in its order: its id, the label, the prediction, the score
    (positive minus negative label-word logit; predicted positive when above 0, the ranking ROC-AUC is computed on)
    and the two logits. Other runs' predictions are paired with these by review_id, never by row."""
    return pd.DataFrame(
        {
            "review_id": reviews["review_id"].to_numpy(),
            "actual": reviews["label"].to_numpy(),
            "predicted": predicted_labels(logits),
            "score": logits[:, 1] - logits[:, 0],
            "logit_negative": logits[:, 0],
            "logit_positive": logits[:, 1],
        }
    )


def score(
    model: Any,
    test: pd.DataFrame,
    answer_ids: tuple[int, int],
    pad_id: int,
    batch_size: int,
    desc: str,
    budget_gib: float | None = None,
    flattened: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Label-word logits of every test review (label_logits, within `budget_gib`, `flattened` or left-padded), and
    what scoring paid: time, reviews/s, memory, GPU telemetry."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sampler, watch, stats = GpuSampler().start(), Stopwatch(), {}
    logits = label_logits(model, test, answer_ids, pad_id, batch_size, desc, stats, budget_gib, flattened)
    seconds = watch.elapsed_s()
    measured = {
        "time_s": round(seconds, 2),
        "reviews_per_s": round(len(test) / seconds, 2),
        "batch_size": stats["batch_size"],
        "oom_retries": stats["oom_retries"],
    }
    # Prefixed, so that no column of `dvc exp show` mixes scoring's cost with training's.
    return logits, {f"eval_{name}": value for name, value in (measured | sampler.stop() | peak_memory()).items()}
