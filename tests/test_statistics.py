"""duel.statistics against numbers worked out by hand on small tables (the arithmetic is in the comments)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from duel.statistics import (
    accuracy_difference,
    accuracy_interval,
    discordant,
    f1_interval,
    f1_resampled,
    mcnemar_exact,
    roc_auc_interval,
    roc_auc_resampled,
    wilson_interval,
)

Z = 1.959963985  # Φ⁻¹(0.975)


def test_wilson_interval_8_of_10():
    # p = 0.8, n = 10, z² = 3.841459:
    # centre = (0.8 + 3.841459/20) / (1 + 3.841459/10) = 0.992073 / 1.384146 = 0.716739
    # half   = 1.959964 / 1.384146 · sqrt(0.8·0.2/10 + 3.841459/400) = 1.416010 · 0.160011 = 0.226577
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.716739 - 0.226577, abs=1e-5)  # 0.490162
    assert high == pytest.approx(0.716739 + 0.226577, abs=1e-5)  # 0.943316
    # Not the Wald interval 0.8 ± 1.96·sqrt(0.016) = (0.552, 1.048), which leaves [0, 1].
    assert high < 1.0 and abs(low - (0.8 - Z * np.sqrt(0.016))) > 0.05


def test_wilson_interval_0_of_10_stays_inside_0_1():
    # p = 0: centre = (3.841459/20) / 1.384146 = 0.138766; half = 1.416010 · sqrt(3.841459/400) = 0.138766.
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-9)
    assert high == pytest.approx(0.277533, abs=1e-5)


def test_accuracy_interval_counts_right_predictions():
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    predicted = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1])  # 8 of 10 right
    assert accuracy_interval(labels, predicted) == pytest.approx(wilson_interval(8, 10))


# Four reviews: 0 a true positive, 1 a false negative, 2 a false positive, 3 a true negative.
LABELS = np.array([1, 1, 0, 0])
PREDICTED = np.array([1, 0, 1, 0])


def test_f1_of_given_resamples():
    rows = np.array([[0, 1, 2, 3], [0, 0, 0, 3], [3, 3, 3, 3], [1, 2, 2, 3], [0, 1, 1, 2]])
    # [0,1,2,3]: TP 1, FP 1, FN 1 -> 2/(2+2) = 0.5      [0,0,0,3]: TP 3 -> 6/6 = 1
    # [3,3,3,3]: all TN -> 0/0, counted 0              [1,2,2,3]: TP 0, FN 1, FP 2 -> 0/3 = 0
    # [0,1,1,2]: TP 1, FN 2, FP 1 -> 2/(2+3) = 0.4
    np.testing.assert_allclose(f1_resampled(LABELS, PREDICTED, rows), [0.5, 1.0, 0.0, 0.0, 0.4])


def test_roc_auc_of_given_resamples():
    scores = np.array([0.9, 0.5, 0.5, 0.1])  # review 1 (positive) ties review 2 (negative)
    rows = np.array([[0, 1, 2, 3], [0, 0, 2, 3], [1, 1, 2, 2], [0, 1, 1, 1]])
    # [0,1,2,3]: pairs (0.9>0.5) 1, (0.9>0.1) 1, (0.5=0.5) 1/2, (0.5>0.1) 1 -> 3.5/4 = 0.875
    # [0,0,2,3]: positives 0.9, 0.9 above negatives 0.5, 0.1 -> 4/4 = 1
    # [1,1,2,2]: every pair a tie -> 0.5                [0,1,1,1]: positives only -> undefined
    np.testing.assert_allclose(roc_auc_resampled(LABELS, scores, rows), [0.875, 1.0, 0.5, np.nan])


def test_resampled_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 30), np.round(rng.normal(size=30), 1)  # rounded: ties happen
    predicted = (scores > 0).astype(int)
    rows = rng.integers(0, 30, size=(20, 30))
    f1 = [f1_score(labels[r], predicted[r], zero_division=0) for r in rows]
    auc = [roc_auc_score(labels[r], scores[r]) for r in rows]
    np.testing.assert_allclose(f1_resampled(labels, predicted, rows), f1)
    np.testing.assert_allclose(roc_auc_resampled(labels, scores, rows), auc)


def test_f1_interval_follows_the_binomial():
    # Ten positive reviews, five predicted positive: no FP, so F1 = 2k/(2k + 10 - k) = 2k/(10 + k) with k, the true
    # positives drawn, ~ Binomial(10, 1/2). P(k <= 1) = 11/1024 = 1.1% and P(k <= 2) = 56/1024 = 5.5%, so the 2.5th
    # percentile is k = 2: F1 = 4/12 = 0.3333; by symmetry the 97.5th is k = 8: F1 = 16/18 = 0.8889.
    labels, predicted = np.ones(10, dtype=int), np.array([1] * 5 + [0] * 5)
    low, high = f1_interval(labels, predicted, seed=42, resamples=1000)
    assert low == pytest.approx(4 / 12) and high == pytest.approx(16 / 18)


def test_bootstrap_intervals_are_seeded():
    rng = np.random.default_rng(1)
    labels, scores = rng.integers(0, 2, 200), rng.normal(size=200)
    predicted = (scores > 0).astype(int)
    assert f1_interval(labels, predicted, 42, 300) == f1_interval(labels, predicted, 42, 300)
    assert f1_interval(labels, predicted, 42, 300) != f1_interval(labels, predicted, 43, 300)
    assert roc_auc_interval(labels, scores, 42, 300) == roc_auc_interval(labels, scores, 42, 300)
    low, high = roc_auc_interval(labels, scores, 42, 300)
    assert low < roc_auc_score(labels, scores) < high  # around the full set's AUC (scores are noise: near 0.5)
    # A perfect ranking is 1 on every resample with both classes; with one class only, ROC-AUC is undefined.
    assert roc_auc_interval(labels, labels + 0.5, 42, 300) == (1.0, 1.0)
    assert np.isnan(roc_auc_interval(np.ones(5, dtype=int), np.arange(5.0), 42, 300)).all()


# Ten reviews, all positive: both right on 0-5, only A right on 6, only B right on 7-9.
PAIR_LABELS = np.ones(10, dtype=int)
A = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0])  # accuracy 0.7
B = np.array([1, 1, 1, 1, 1, 1, 0, 1, 1, 1])  # accuracy 0.9


def test_accuracy_difference_paired():
    assert discordant(PAIR_LABELS, A, B) == (1, 3)
    # d = (3 - 1)/10 = 0.2 (= 0.9 - 0.7); se = sqrt(1 + 3 - 2²/10)/10 = sqrt(3.6)/10 = 0.189737;
    # z·se = 1.959964 · 0.189737 = 0.371877 -> (-0.171877, 0.571877)
    difference, low, high = accuracy_difference(PAIR_LABELS, A, B)
    assert difference == pytest.approx(0.2)
    assert low == pytest.approx(-0.171877, abs=1e-5) and high == pytest.approx(0.571877, abs=1e-5)
    # Swapping the two flips the sign.
    assert accuracy_difference(PAIR_LABELS, B, A) == pytest.approx((-0.2, -0.571877, 0.171877), abs=1e-5)


def test_paired_interval_is_narrower_than_unpaired():
    # Both right on 380 of 400 reviews, only B right on 12, only A on 4: d = 8/400 = 0.02,
    # se = sqrt(16 - 64/400)/400 = sqrt(15.84)/400 = 0.00995 -> half-width 0.0195.
    # Unpaired: sqrt(0.96·0.04/400 + 0.98·0.02/400) = 0.01204 -> half-width 0.0236.
    labels = np.ones(400, dtype=int)
    a, b = np.ones(400, dtype=int), np.ones(400, dtype=int)
    a[380:392], b[392:396] = 0, 0  # A wrong on 12 that B gets right, B wrong on 4 that A gets right
    a[396:], b[396:] = 0, 0  # both wrong on 4
    difference, low, high = accuracy_difference(labels, a, b)
    assert difference == pytest.approx(0.02)
    assert (high - low) / 2 == pytest.approx(Z * np.sqrt(15.84) / 400, abs=1e-6)
    assert (high - low) / 2 < Z * np.sqrt(0.96 * 0.04 / 400 + 0.98 * 0.02 / 400)


def test_mcnemar_exact():
    # 1 review only A gets right, 3 only B: under H0 a ~ Bin(4, 1/2); P(a <= 1) = (1 + 4)/16, two-sided 10/16.
    assert mcnemar_exact(PAIR_LABELS, A, B) == pytest.approx(0.625)
    # 1 vs 6: P(a <= 1) = (1 + 7)/128 = 0.0625, two-sided 0.125.
    a = np.array([1] * 6 + [0] + [1])
    b = np.array([0] * 6 + [1] + [1])
    labels = np.ones(8, dtype=int)
    assert discordant(labels, a, b) == (6, 1)
    assert mcnemar_exact(labels, a, b) == pytest.approx(0.125)
    # 0 vs 7: 2 · (1/2)^7 = 0.015625.
    assert mcnemar_exact(np.ones(7, dtype=int), np.zeros(7, dtype=int), np.ones(7, dtype=int)) == pytest.approx(
        0.015625
    )


def test_identical_classifiers():
    assert accuracy_difference(PAIR_LABELS, A, A) == (0.0, 0.0, 0.0)
    assert mcnemar_exact(PAIR_LABELS, A, A) == 1.0
