"""How sure the duel's numbers are: 95% intervals for accuracy, F1 and ROC-AUC on the test reviews, and the paired
comparison of two classifiers scored on the same reviews. Plain functions over per-review arrays (labels and
predictions 0/1, scores = positive minus negative label-word logit); scipy does the distributions and the ranks."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest, norm, rankdata, t

CONFIDENCE = 0.95


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """The Wilson score interval of a proportion p = successes / trials (here: accuracy = correct / reviews).

        z = Φ⁻¹(0.975) ≈ 1.96,  centre = (p + z²/2n) / (1 + z²/n),
        half-width = z / (1 + z²/n) · sqrt(p(1 - p)/n + z²/4n²)

    Unlike p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and keeps its coverage near 0 and 1.
    """
    interval = binomtest(successes, trials).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


def accuracy_interval(labels: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Wilson interval of the share of reviews predicted right."""
    return wilson_interval(int((labels == predicted).sum()), len(labels))


def bootstrap_rows(reviews: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, reviews) row indices drawn with replacement: each row is one bootstrap test set of the same size.
    A review's label, prediction and score travel together (paired resampling); the same seed and size draw the
    same test sets, so every model and metric is resampled on the same reviews."""
    return np.random.default_rng(seed).integers(0, reviews, size=(resamples, reviews))


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of a metric over the bootstrap test sets (the percentile interval);
    test sets where the metric is undefined (NaN) are left out; NaN when it is undefined on all."""
    if np.isnan(values).all():
        return float("nan"), float("nan")
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def f1_resampled(labels: np.ndarray, predicted: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """F1 of the positive class on each bootstrap test set: 2·TP / (2·TP + FP + FN), 0 when that is 0/0 (as
    scikit-learn's f1_score with zero_division=0)."""
    actual, guess = labels[rows].astype(bool), predicted[rows].astype(bool)
    true_pos = (actual & guess).sum(axis=1)
    wrong = (actual != guess).sum(axis=1)  # FP + FN
    denominator = 2 * true_pos + wrong
    return np.divide(2 * true_pos, denominator, out=np.zeros(len(rows)), where=denominator > 0)


def roc_auc_resampled(labels: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """ROC-AUC on each bootstrap test set by the Mann-Whitney statistic: with r the ranks of all scores (ties get
    their average rank), P positives and N negatives, AUC = (Σ r over positives - P(P+1)/2) / (P·N), the share of
    (positive, negative) pairs ranked right, a tie counting half (as scikit-learn's roc_auc_score). NaN for a test
    set drawn with one class only."""
    actual = labels[rows].astype(bool)
    ranks = rankdata(scores[rows], axis=1)
    positives = actual.sum(axis=1)
    pairs = positives * (rows.shape[1] - positives)
    u = (ranks * actual).sum(axis=1) - positives * (positives + 1) / 2
    return np.divide(u, pairs, out=np.full(len(rows), np.nan), where=pairs > 0)


def f1_interval(labels: np.ndarray, predicted: np.ndarray, seed: int, resamples: int) -> tuple[float, float]:
    """Seeded bootstrap percentile interval of F1 (reviews resampled with replacement, `resamples` times)."""
    return percentile_interval(f1_resampled(labels, predicted, bootstrap_rows(len(labels), resamples, seed)))


def roc_auc_interval(labels: np.ndarray, scores: np.ndarray, seed: int, resamples: int) -> tuple[float, float]:
    """Seeded bootstrap percentile interval of ROC-AUC (the same test sets as f1_interval for the same seed)."""
    return percentile_interval(roc_auc_resampled(labels, scores, bootstrap_rows(len(labels), resamples, seed)))


def discordant(labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray) -> tuple[int, int]:
    """(reviews only A gets right, reviews only B gets right): the two off-diagonal cells of the paired table.
    Reviews both get right or both get wrong say nothing about which classifier is better."""
    right_a, right_b = predicted_a == labels, predicted_b == labels
    return int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())


def accuracy_difference(
    labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray
) -> tuple[float, float, float]:
    """Accuracy of B minus accuracy of A on the same n reviews, with its 95% (Wald) interval for paired proportions:
    with a = reviews only A gets right and b = reviews only B gets right,

        d = (b - a) / n,   se = sqrt(a + b - (b - a)²/n) / n,   interval d ± z·se,  z = Φ⁻¹(0.975)

    (Agresti, Categorical Data Analysis, 10.1). Pairing removes the variance of the reviews both get right or
    wrong, so the interval is narrower than two separate accuracy intervals would suggest.
    """
    only_a, only_b = discordant(labels, predicted_a, predicted_b)
    n = len(labels)
    difference = (only_b - only_a) / n
    se = np.sqrt(only_a + only_b - (only_b - only_a) ** 2 / n) / n
    z = norm.ppf(0.5 + CONFIDENCE / 2)
    return float(difference), float(difference - z * se), float(difference + z * se)


def mcnemar_exact(labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray) -> float:
    """Exact McNemar p-value: if A and B were equally accurate, each review only one of them gets right would be
    A's with probability 1/2, so a ~ Binomial(a + b, 1/2); the p-value is the two-sided binomial test of a
    (scipy's binomtest). 1.0 when no review separates them."""
    only_a, only_b = discordant(labels, predicted_a, predicted_b)
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean of a few runs' results (one per seed) with its 95% Student-t interval: mean ± t(n-1) · sd / sqrt(n),
    sd with n - 1 degrees of freedom. NaN bounds for fewer than two runs (no spread to estimate)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half
