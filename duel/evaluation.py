"""Scoring by the verbalizer: compare the logits of the two label words at the answer position (no generation)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score
from tqdm.auto import tqdm


@torch.inference_mode()
def label_logits(
    model: Any, frame: pd.DataFrame, answer_ids: tuple[int, int], pad_id: int, batch_size: int, desc: str
) -> np.ndarray:
    """Logits of [negative, positive] at the last prompt position, one row per review, in frame order.

    Reviews are scored in length-sorted batches (little padding), left-padded so the answer position is the last
    one for every row, and only that position's logits are computed (logits_to_keep=1).
    """
    model.eval()
    device = next(model.parameters()).device
    ids = frame["input_ids"].tolist()
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out = np.zeros((len(ids), 2), dtype=np.float32)
    columns = torch.tensor(answer_ids, device=device)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        rows = order[start : start + batch_size]
        width = max(len(ids[r]) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(ids[r]) :] = torch.tensor(ids[r])
            mask[i, width - len(ids[r]) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=1,
        ).logits[:, -1, :]
        out[rows] = logits.index_select(1, columns).float().cpu().numpy()
    return out


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
    """Accuracy, F1, precision, recall (positive class = 1), ROC-AUC on the logit margin, confusion matrix."""
    predicted = (logits[:, 1] > logits[:, 0]).astype(int)
    margin = logits[:, 1] - logits[:, 0]
    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": round(float(accuracy_score(labels, predicted)), 4),
        "f1": round(float(f1_score(labels, predicted, zero_division=0)), 4),
        "precision": round(float(precision_score(labels, predicted, zero_division=0)), 4),
        "recall": round(float(recall_score(labels, predicted, zero_division=0)), 4),
        "roc_auc": round(float(roc_auc_score(labels, margin)), 4) if both_classes else None,
        "predicted_positive_share": round(float(predicted.mean()), 4),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=[0, 1]).tolist(),
        "reviews": len(labels),
    }


def predictions_frame(labels: np.ndarray, logits: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "actual": labels,
            "predicted": (logits[:, 1] > logits[:, 0]).astype(int),
            "logit_negative": logits[:, 0],
            "logit_positive": logits[:, 1],
        }
    )
