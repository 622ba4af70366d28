"""AUC, EER and the seeded bootstrap on numbers whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap as scipy_bootstrap

from imagegen.eval.stats import bootstrap_ci, equal_error_rate, roc_auc


def test_auc_of_separable_reversed_and_tied_scores():
    labels = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    assert roc_auc(np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), labels) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), labels) == 0.0
    assert roc_auc(np.full(6, 0.5), labels) == 0.5
    # one same pair below one different pair: 8 of 9 orderings right
    assert roc_auc(np.array([0.9, 0.8, 0.25, 0.3, 0.2, 0.1]), labels) == pytest.approx(8 / 9)
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([True, True])))


def test_eer_of_separable_scores_is_zero_with_the_threshold_in_the_gap():
    rates = equal_error_rate(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, True, False, False]))
    assert rates.eer == 0.0
    assert rates.threshold == pytest.approx(0.55)


def test_eer_of_overlapping_scores():
    rng = np.random.default_rng(0)
    same, diff = rng.normal(1.0, 1.0, 4000), rng.normal(-1.0, 1.0, 4000)
    rates = equal_error_rate(np.concatenate([same, diff]), np.r_[np.ones(4000, bool), np.zeros(4000, bool)])
    # two unit normals 2 apart: EER = Phi(-1) = 0.159, at the midpoint 0
    assert rates.eer == pytest.approx(0.159, abs=0.02)
    assert rates.threshold == pytest.approx(0.0, abs=0.1)
    assert abs(rates.far - rates.frr) < 0.01


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = np.random.default_rng(1).normal(0.7, 0.1, 200)
    first = bootstrap_ci(len(x), lambda idx: x[idx].mean(axis=1), samples=500, seed=3)
    again = bootstrap_ci(len(x), lambda idx: x[idx].mean(axis=1), samples=500, seed=3)
    other = bootstrap_ci(len(x), lambda idx: x[idx].mean(axis=1), samples=500, seed=4)
    assert first == again
    assert first != other
    assert first[0] < x.mean() < first[1]
    # ~ mean +- 1.96 * sd / sqrt(n)
    assert first[1] - first[0] == pytest.approx(2 * 1.96 * x.std() / np.sqrt(len(x)), rel=0.2)
    assert bootstrap_ci(0, lambda idx: idx.mean(axis=1)) is None


def test_bootstrap_is_scipys_percentile_interval():
    x = np.random.default_rng(2).normal(0.0, 1.0, 40)
    ours = bootstrap_ci(len(x), lambda idx: x[idx].mean(axis=1), samples=400, seed=7)
    theirs = scipy_bootstrap((x,), np.mean, n_resamples=400, method="percentile", rng=np.random.default_rng(7))
    assert ours == pytest.approx(tuple(theirs.confidence_interval))


def test_bootstrap_drops_undefined_resamples():
    # a unit with NaN: resamples made only of it are undefined, the rest still give an interval
    x = np.array([np.nan, 1.0, 2.0])
    ci = bootstrap_ci(len(x), lambda idx: np.nanmean(x[idx], axis=1), samples=300, seed=0)
    assert ci is not None and 1.0 <= ci[0] <= ci[1] <= 2.0
    assert bootstrap_ci(1, lambda idx: x[idx].mean(axis=1)) is None
    assert bootstrap_ci(1, lambda idx: x[1:][idx].mean(axis=1)) == (1.0, 1.0)
