"""The report's statistics: predictions paired by review id, the comparisons' sentences, and the paper's numbers
never beside a random-weights run without the warning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from duel.errors import DataError
from duel.report import compare, comparisons, conclusion, hardware_table, quality_intervals, quality_table


def predictions(ids: list[str], labels: list[int], predicted: list[int]) -> pd.DataFrame:
    score = np.where(np.array(predicted) == 1, 1.0, -1.0)
    return pd.DataFrame({"review_id": ids, "actual": labels, "predicted": predicted, "score": score})


IDS = [f"test-{i}" for i in range(10)]
LABELS = [1] * 10
# Both right on 0-5, only A right on 6, only B right on 7-9 (tests/test_statistics.py works the numbers out).
A = predictions(IDS, LABELS, [1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
B = predictions(IDS, LABELS, [1, 1, 1, 1, 1, 1, 0, 1, 1, 1])


def test_comparison_pairs_by_review_id_not_row():
    shuffled = B.sample(frac=1.0, random_state=0).reset_index(drop=True)
    assert shuffled["review_id"].tolist() != IDS  # the rows are in another order ...
    c = compare("a", "b", {"a": A, "b": shuffled}, random_weights=False)
    # ... and the comparison is the one of the aligned rows: d = (3 - 1)/10, p = 10/16.
    assert (c.reviews, c.only_baseline_right, c.only_challenger_right) == (10, 1, 3)
    assert c.difference == pytest.approx(0.2) and c.p_value == pytest.approx(0.625)
    assert c.low == pytest.approx(-0.171877, abs=1e-5) and c.high == pytest.approx(0.571877, abs=1e-5)


def test_comparison_of_different_reviews_is_refused():
    other = B.assign(review_id=[f"test-{i}" for i in range(1, 11)])
    with pytest.raises(DataError, match="scored different reviews"):
        compare("a", "b", {"a": A, "b": other}, random_weights=False)
    relabelled = B.assign(actual=[0, *LABELS[1:]])
    with pytest.raises(DataError, match="different labels"):
        compare("a", "b", {"a": A, "b": relabelled}, random_weights=False)


def test_comparisons_that_decide_the_duel():
    frames = {name: A for name in ("llama fine-tuned", "llama zero-shot", "deepseek fine-tuned", "deepseek zero-shot")}
    names = [(c.challenger, c.baseline) for c in comparisons(["llama", "deepseek"], frames, {"deepseek"})]
    assert names == [
        ("deepseek fine-tuned", "llama fine-tuned"),
        ("llama fine-tuned", "llama zero-shot"),
        ("deepseek fine-tuned", "deepseek zero-shot"),
    ]
    flagged = [c.random_weights for c in comparisons(["llama", "deepseek"], frames, {"deepseek"})]
    assert flagged == [True, False, True]


def test_conclusions_say_what_this_test_size_can_tell():
    within = compare("a", "b", {"a": A, "b": B}, random_weights=False)
    assert "within what chance gives on 10 reviews" in conclusion(within)
    assert "cannot tell them apart" in conclusion(within) and "p = 0.625" in conclusion(within)
    # 40 reviews, only B right on 10, only A on none: p = 2 · (1/2)^10 = 0.002; d = 0.25,
    # se = sqrt(10 - 100/40)/40 = 0.068465 -> 25.0 ± 13.4 points.
    ids, labels = [f"test-{i}" for i in range(40)], [1] * 40
    clear_a, clear_b = predictions(ids, labels, [0] * 10 + [1] * 30), predictions(ids, labels, [1] * 40)
    clear = compare("a", "b", {"a": clear_a, "b": clear_b}, random_weights=True)
    sentence = conclusion(clear)
    assert clear.p_value == pytest.approx(2 / 1024)
    assert "b is more accurate than a" in sentence and "p = 0.002" in sentence
    assert "by +11.6 to +38.4 points" in sentence
    # The same pair the other way round: the baseline is the better one, its gain the mirrored interval.
    mirrored = conclusion(compare("b", "a", {"a": clear_a, "b": clear_b}, random_weights=False))
    assert "b is more accurate than a" in mirrored and "by +11.6 to +38.4 points" in mirrored
    assert "Random weights" in sentence and "Random weights" not in conclusion(within)
    same = compare("a", "b", {"a": A, "b": A}, random_weights=False)
    assert "same answer on all 10 reviews" in conclusion(same)


def quality(random_weights: set[str]) -> str:
    metrics = {"accuracy": 0.7, "f1": 0.8235, "precision": 1.0, "recall": 0.7, "roc_auc": None}
    evaluate = {key: {"finetuned": metrics | {"eval_reviews_per_s": 10.0}} for key in ("llama", "deepseek")}
    intervals = {key: {"finetuned": quality_intervals(A, seed=42)} for key in evaluate}
    return "\n".join(quality_table(evaluate, intervals, random_weights))


def test_quality_table_intervals_and_paper_numbers():
    table = quality(set())
    # 7 of 10 right: Wilson (0.397, 0.892).
    assert "| llama | finetuned | 0.700 (0.397–0.892) |" in table
    assert "| 1.000 | 0.700 | n/a | 10.0 |" in table  # all reviews positive: no ROC-AUC, no interval
    assert "| 0.840 | 0.850 |" in table and "| 0.910 | 0.924 |" in table  # the paper's claims, as they are


def test_paper_numbers_beside_random_weights_carry_the_warning():
    table = quality({"deepseek"})
    (llama,) = [row for row in table.splitlines() if row.startswith("| llama |")]
    (deepseek,) = [row for row in table.splitlines() if row.startswith("| deepseek |")]
    assert "random weights" not in llama
    assert "0.910 (not comparable: random weights) | 0.924 (not comparable: random weights) |" in deepseek


def test_hardware_table_says_how_the_base_was_held():
    """A dequantized base explains a fine-tune's larger peak memory: the table says so, and only for that run."""
    run = dict(device="NVIDIA H100", steps=200, micro_batch=16, grad_accum=1, padding="packed", train_time_s=80.0)
    run |= dict(gradient_checkpointing="0 of 32 layers", reviews_per_s=40.0, tokens_per_s=12000, padding_share=0.03)
    run |= dict(peak_vram_allocated_gib=50.0, peak_vram_reserved_gib=60.0, nvml_peak_gib=62.0, gpu_util_mean_pct=70)
    run |= dict(energy_j=9000, quantization="nf4-dq")
    rows = hardware_table({"llama": run | {"base_weights": "unquantized"}, "deepseek": run | {"base_weights": "4-bit"}})
    assert "4-bit base dequantized for training" in rows[2] and "dequantized" not in rows[3]
    unquantized = hardware_table({"llama": run | {"base_weights": "unquantized", "quantization": "none"}})
    assert "dequantized" not in unquantized[2]  # never quantized: nothing was dequantized
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    cells = [cell.strip() for cell in hardware_table({"llama": run | {"mfu": 0.3214}})[2].strip("|").split("|")]
    assert cells[header.index("MFU")] == "0.321"
    cells = [cell.strip() for cell in rows[2].strip("|").split("|")]
    assert cells[header.index("MFU")] == "n/a"  # a run without one (a CPU, an unknown GPU)
    assert cells[header.index("start-up s")] == "n/a"  # a run recorded before the stage timed its start-up
    cells = [cell.strip() for cell in hardware_table({"llama": run | {"startup_s": 31.26}})[2].strip("|").split("|")]
    assert cells[header.index("start-up s")] == "31.3"
