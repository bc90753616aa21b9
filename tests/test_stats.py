"""spine_node.inference.stats against hand-computed and published values and independent implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spine_node.inference.stats import auc_ci, bootstrap, delong, roc_auc, wilson_ci

# Hanley & McNeil 1982 (Radiology 143:29), table 1: CT ratings 1 (definitely normal) ..
# 5 (definitely abnormal) of 58 normal and 51 abnormal patients. Published AUC 0.893,
# SE 0.032 by their exponential approximation.
HM_NORMAL = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
HM_ABNORMAL = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
HM_Y = np.r_[np.zeros(len(HM_NORMAL), int), np.ones(len(HM_ABNORMAL), int)]
HM_S = np.r_[HM_NORMAL, HM_ABNORMAL].astype(float)


def _delong_by_definition(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """DeLong 1988 written out over all pairs: psi(x, y) = 1, 1/2, 0."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(psi.mean()), float(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


def test_roc_auc_matches_definition() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert roc_auc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert roc_auc([1, 0], [0.1, 0.9]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))
    assert math.isnan(roc_auc([], []))


def test_roc_auc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="one length"):
        roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])


def test_hanley_mcneil_published_auc() -> None:
    assert roc_auc(HM_Y, HM_S) == pytest.approx(0.8932, abs=5e-5)
    result = auc_ci(HM_Y, HM_S)
    assert (result.positives, result.negatives) == (51, 58)
    # DeLong's SE is close to Hanley-McNeil's approximate 0.032 on their own data.
    assert result.se == pytest.approx(0.032, abs=0.002)
    assert result.low == pytest.approx(result.auc - 1.959964 * result.se, abs=1e-6)
    assert result.high == pytest.approx(result.auc + 1.959964 * result.se, abs=1e-6)


def test_delong_hand_computed() -> None:
    # Placement values: positives 0.5 and 1, negatives 1 and 0.5; each has sample
    # variance 0.125, so var = 0.125 / 2 + 0.125 / 2.
    assert delong([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == (0.75, 0.125)
    auc, variance = delong([0, 1, 1], [0.1, 0.2, 0.3])
    assert auc == 1.0 and math.isnan(variance)


@pytest.mark.parametrize("seed", range(5))
def test_delong_matches_pairwise_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=60)
    y[:2] = (0, 1)
    s = np.round(rng.normal(size=60) + y, 1)  # rounded: plenty of ties
    assert delong(y, s) == pytest.approx(_delong_by_definition(y, s), rel=1e-12, abs=1e-15)


def test_delong_interval_covers_at_the_nominal_rate() -> None:
    """Binormal scores (true AUC = Phi(1 / sqrt 2) = 0.760): the 95 % interval covers it
    in about 95 % of 400 simulated studies of 40 + 60 cases."""
    truth = 0.7602499389
    rng = np.random.default_rng(20_26)
    covered = 0
    for _ in range(400):
        y = np.r_[np.ones(40, int), np.zeros(60, int)]
        s = rng.normal(size=100) + y
        result = auc_ci(y, s)
        covered += result.low <= truth <= result.high
    assert 0.91 <= covered / 400 <= 0.98


def test_auc_ci_bootstrap_agrees_with_delong_and_handles_clusters() -> None:
    boot = auc_ci(HM_Y, HM_S, method="bootstrap", n_resamples=1000, seed=1)
    dl = auc_ci(HM_Y, HM_S)
    assert boot.auc == pytest.approx(dl.auc, abs=1e-12) and boot.method == "bootstrap"
    assert boot.low == pytest.approx(dl.low, abs=0.02) and boot.high == pytest.approx(dl.high, abs=0.02)
    # Duplicating every observation within its own cluster leaves the cluster bootstrap's
    # interval as wide as before; treating the copies as independent narrows it.
    y2, s2 = np.repeat(HM_Y, 2), np.repeat(HM_S, 2)
    groups = np.repeat(np.arange(len(HM_Y)), 2)
    clustered = auc_ci(y2, s2, method="bootstrap", groups=groups, n_resamples=1000, seed=1)
    naive = auc_ci(y2, s2, method="bootstrap", n_resamples=1000, seed=1)
    assert clustered.method == "cluster bootstrap"
    assert clustered.high - clustered.low > 1.25 * (naive.high - naive.low)
    with pytest.raises(ValueError, match="independent"):
        auc_ci(y2, s2, groups=groups)
    with pytest.raises(ValueError, match="method"):
        auc_ci(HM_Y, HM_S, method="exact")


def test_auc_ci_without_both_classes() -> None:
    result = auc_ci([1, 1, 1], [0.1, 0.2, 0.3])
    assert math.isnan(result.auc) and math.isnan(result.low) and result.positives == 3
    assert "n/a" in str(result)


def test_wilson_known_values() -> None:
    z2 = 1.959963985 ** 2
    assert wilson_ci(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))
    assert wilson_ci(10, 10) == (pytest.approx(10 / (10 + z2)), 1.0)
    low, high = wilson_ci(5, 10)
    assert (low, high) == (pytest.approx(0.236593, abs=1e-6), pytest.approx(0.763407, abs=1e-6))
    # Against scipy's implementation for an unbalanced count.
    from scipy.stats import binomtest

    expected = binomtest(81, 263).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_ci(81, 263) == (pytest.approx(expected.low, abs=1e-12), pytest.approx(expected.high, abs=1e-12))
    wide = wilson_ci(81, 263, level=0.99)
    assert wide[0] < expected.low and wide[1] > expected.high
    assert all(math.isnan(v) for v in wilson_ci(0, 0))
    with pytest.raises(ValueError, match="successes"):
        wilson_ci(11, 10)


def test_bootstrap_of_a_mean_matches_the_normal_interval() -> None:
    x = np.random.default_rng(3).normal(10.0, 2.0, size=400)
    low, high = bootstrap(np.mean, x, n_resamples=2000, seed=0)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert low == pytest.approx(x.mean() - half, abs=0.04)
    assert high == pytest.approx(x.mean() + half, abs=0.04)
    assert bootstrap(np.mean, x, n_resamples=200, seed=5) == bootstrap(np.mean, x, n_resamples=200, seed=5)


def test_bootstrap_strata_keep_their_counts_and_groups_stay_whole() -> None:
    y = np.r_[np.ones(3, int), np.zeros(17, int)]
    seen_positives: set[int] = set()

    def positives(labels: np.ndarray) -> float:
        seen_positives.add(int(labels.sum()))
        return float(labels.mean())

    bootstrap(positives, y, strata=y, n_resamples=200)
    assert seen_positives == {3}

    groups = np.repeat(np.arange(10), 3)
    members = np.arange(30)
    whole: list[bool] = []

    def check(ids: np.ndarray) -> float:
        counts = np.bincount(ids // 3, minlength=10)
        whole.append(bool(np.all(counts % 3 == 0)))
        return float(len(ids))

    bootstrap(check, members, groups=groups, n_resamples=100)
    assert all(whole) and len(whole) == 100
    one = bootstrap(check, members, groups=np.zeros(30, int), n_resamples=10)
    assert all(math.isnan(v) for v in one)
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap(np.mean, np.ones(3), np.ones(4))
