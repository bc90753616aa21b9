"""Statistics for model evaluation: ROC AUC with DeLong or bootstrap CIs, Wilson intervals.

NumPy only (no torch, no scikit-learn), so the training recipes, the evaluation harness and
the tests can use it anywhere. Every interval is two-sided at ``level`` (default 95 %).

* :func:`roc_auc` - Mann-Whitney AUC, ties counted one half.
* :func:`delong` / :func:`auc_ci` - AUC with DeLong's variance (DeLong, DeLong and
  Clarke-Pearson 1988, computed with the midrank method of Sun and Xu 2014) or with a
  stratified (optionally cluster) bootstrap.
* :func:`wilson_ci` - Wilson score interval for a proportion.
* :func:`bootstrap` - percentile bootstrap of any statistic, with strata (resample
  positives and negatives separately, keeping their counts) and groups (resample whole
  clusters, e.g. the seven vertebrae of one patient, which are not independent).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def _binary(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and scores must be 1-D of one length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1, True, False)).all():
        raise ValueError(f"y_true must hold 0/1 only, got values {np.unique(y)[:5].tolist()}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y.astype(bool), s


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # Boundaries of runs of equal values; a run [i, j) gets the rank (i + 1 + j) / 2.
    edges = np.flatnonzero(np.diff(ordered)) + 1
    starts = np.concatenate(([0], edges))
    stops = np.concatenate((edges, [len(values)]))
    for start, stop in zip(starts, stops, strict=True):
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0
    return ranks


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2.

    NaN when there is no positive or no negative.
    """
    y, s = _binary(y_true, scores)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return float("nan")
    ranks = _midranks(s)
    return float((ranks[y].sum() - m * (m + 1) / 2.0) / (m * n))


@dataclass(frozen=True)
class AucResult:
    """An AUC with its interval and the counts it rests on."""

    auc: float
    low: float
    high: float
    positives: int
    negatives: int
    method: str
    se: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        if math.isnan(self.auc):
            return f"n/a ({self.positives}+/{self.negatives}-)"
        return f"{self.auc:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.positives}+/{self.negatives}-)"


def delong(y_true: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """AUC and DeLong's estimate of its variance.

    The variance is ``S10 / m + S01 / n`` where ``S10`` and ``S01`` are the sample
    variances of the placement values of the ``m`` positives and ``n`` negatives.
    NaN variance with fewer than two positives or two negatives.
    """
    y, s = _binary(y_true, scores)
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return float("nan"), float("nan")
    rank_all = _midranks(np.concatenate((pos, neg)))
    rank_pos, rank_neg = _midranks(pos), _midranks(neg)
    # V10[i]: share of negatives below positive i (ties 1/2); V01[j]: share of positives above negative j.
    v10 = (rank_all[:m] - rank_pos) / n
    v01 = 1.0 - (rank_all[m:] - rank_neg) / m
    auc = float(v10.mean())
    if m < 2 or n < 2:
        return auc, float("nan")
    variance = float(v10.var(ddof=1) / m + v01.var(ddof=1) / n)
    return auc, variance


def auc_ci(
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    level: float = 0.95,
    method: str = "delong",
    groups: ArrayLike | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> AucResult:
    """AUC with a two-sided confidence interval.

    Parameters
    ----------
    method
        ``"delong"``: AUC +- z * DeLong SE, clipped to [0, 1] (independent cases only).
        ``"bootstrap"``: percentile interval of ``n_resamples`` stratified resamples
        (positives and negatives resampled separately), by cluster when ``groups`` is given.
    groups
        Cluster id per observation (bootstrap only): observations of one cluster are
        resampled together, as the vertebrae of one patient must be.
    """
    y, s = _binary(y_true, scores)
    m, n = int(y.sum()), int((~y).sum())
    if method == "delong":
        if groups is not None:
            raise ValueError("DeLong assumes independent observations; use method='bootstrap' with groups")
        auc, variance = delong(y, s)
        if math.isnan(variance):
            return AucResult(auc, float("nan"), float("nan"), m, n, method)
        se = math.sqrt(variance)
        z = _z(level)
        return AucResult(auc, max(0.0, auc - z * se), min(1.0, auc + z * se), m, n, method, se)
    if method == "bootstrap":
        auc = roc_auc(y, s)
        if m == 0 or n == 0:
            return AucResult(auc, float("nan"), float("nan"), m, n, method)
        low, high = bootstrap(roc_auc, y, s, level=level, n_resamples=n_resamples,
                              strata=None if groups is not None else y, groups=groups, seed=seed)
        return AucResult(auc, low, high, m, n, "cluster bootstrap" if groups is not None else method)
    raise ValueError(f"unknown AUC interval method {method!r}; expected 'delong' or 'bootstrap'")


def wilson_ci(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``successes`` out of ``trials`` (NaN, NaN when trials is 0)."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return float("nan"), float("nan")
    z = _z(level)
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # Exact at the ends (rounding would otherwise leave 1e-17 below 0 or above 1).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def bootstrap(
    statistic: Callable[..., float],
    *arrays: ArrayLike,
    level: float = 0.95,
    n_resamples: int = 2000,
    strata: ArrayLike | None = None,
    groups: ArrayLike | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)``.

    Rows of all ``arrays`` are resampled together. With ``strata`` each stratum is
    resampled within itself (its size kept); with ``groups`` whole groups are resampled
    (cluster bootstrap; strata are then ignored because a cluster may span strata; NaN,
    NaN with a single group). Resamples where the statistic is NaN (e.g. an AUC without a positive) are dropped;
    NaN, NaN when more than half of them are.
    """
    columns = [np.asarray(a) for a in arrays]
    if not columns:
        raise ValueError("bootstrap needs at least one array")
    size = len(columns[0])
    if any(len(c) != size for c in columns):
        raise ValueError(f"arrays differ in length: {[len(c) for c in columns]}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    if groups is not None:
        group_ids = np.asarray(groups)
        if len(group_ids) != size:
            raise ValueError(f"groups has {len(group_ids)} entries for {size} rows")
        _, codes = np.unique(group_ids, return_inverse=True)
        if size == 0 or codes.max() < 1:
            return float("nan"), float("nan")  # one cluster: nothing to resample
        members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)] if size else []

        def draw() -> np.ndarray:
            picked = rng.integers(0, len(members), size=len(members))
            return np.concatenate([members[g] for g in picked])
    elif strata is not None:
        labels = np.asarray(strata)
        if len(labels) != size:
            raise ValueError(f"strata has {len(labels)} entries for {size} rows")
        pools = [np.flatnonzero(labels == value) for value in np.unique(labels)]

        def draw() -> np.ndarray:
            return np.concatenate([rng.choice(pool, size=len(pool), replace=True) for pool in pools])
    else:

        def draw() -> np.ndarray:
            return rng.integers(0, size, size=size)

    values = np.empty(n_resamples, dtype=np.float64)
    for k in range(n_resamples):
        index = draw()
        values[k] = statistic(*(c[index] for c in columns))
    values = values[~np.isnan(values)]
    if len(values) * 2 < n_resamples:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)
