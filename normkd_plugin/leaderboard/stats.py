"""Difference of two methods' accuracies with a 95 % interval: paired t over shared seeds, else Welch.

Student's t quantile is computed here (incomplete beta function and bisection), without scipy, so that
the command line starts fast.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

__all__ = ["Diff", "betainc", "t975", "paired_diff", "welch_diff", "compare"]

Sample = Tuple[Optional[int], float]  # (seed or None, accuracy) of one run


@dataclass(frozen=True)
class Diff:
    """method − baseline: the mean difference, its 95 % interval (low, high) and how both were computed.

    ``kind`` is "paired" (Student's t over per-seed differences, n pairs) or "welch" (difference of
    means, Welch–Satterthwaite dof, n and n_baseline runs), or "" when nothing could be compared.
    ``note`` says why the interval or the difference is absent, or why paired runs were not paired.
    """

    kind: str
    n: int
    n_baseline: int
    mean: float | None
    low: float | None
    high: float | None
    dof: float | None
    note: str = ""
    baseline: str = ""

    @property
    def sample(self) -> str:
        """How many runs entered: "paired n=3" or "welch n=3/2" (method/baseline)."""
        return f"paired n={self.n}" if self.kind == "paired" else f"{self.kind} n={self.n}/{self.n_baseline}"

    @property
    def above_zero(self) -> bool:
        """True when the 95 % interval exists and lies entirely above 0."""
        return self.low is not None and self.low > 0

    def text(self) -> str:
        """One table cell: "+1.25 [+0.10, +2.40] paired n=3", "+0.50 paired n=1, no CI" or "– (reason)"."""
        if self.mean is None:
            return f"– ({self.note})" if self.note else "–"
        if self.low is None:
            return f"{self.mean:+.2f} {self.sample}, no CI"
        out = f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}] {self.sample}"
        return f"{out} ({self.note})" if self.note else out


def betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function for a, b > 0 and 0 ≤ x ≤ 1 (continued fraction)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0  # modified Lentz evaluation of the fraction
    for i in range(1000):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            return front * (f - 1.0)
    raise ArithmeticError(f"incomplete beta I_{x}({a}, {b}) did not converge")


def t975(dof: float) -> float:
    """t_{0.975, dof} (dof > 0, finite): the quantile of Student's t for a two-sided 95 % interval.

    P(|T| > t) = I_x(dof/2, 1/2) with x = dof / (dof + t²); x is found by bisection to the last bit."""
    if not (0 < dof < math.inf):
        raise ValueError(f"degrees of freedom must be positive and finite, not {dof}")
    lo, hi = 0.0, 1.0  # I_x rises with x: below the root lo, above it hi
    while lo < (mid := (lo + hi) / 2) < hi:
        lo, hi = (mid, hi) if betainc(dof / 2, 0.5, mid) < 0.05 else (lo, mid)
    x = (lo + hi) / 2
    return math.sqrt(dof * (1.0 - x) / x)


def paired_diff(diffs: Sequence[float]) -> Diff:
    """d̄ ± t_{0.975,n−1}·s_d/√n over the per-seed differences d (s_d their sample std); no interval for n < 2."""
    n = len(diffs)
    if n == 0:
        return Diff("paired", 0, 0, None, None, None, None, "no pairs")
    mean = statistics.fmean(diffs)
    if n < 2:
        return Diff("paired", n, n, mean, None, None, None, f"n={n}: fewer than 2 pairs")
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return Diff("paired", n, n, mean, mean - half, mean + half, float(n - 1))


def welch_diff(a: Sequence[float], b: Sequence[float]) -> Diff:
    """ā − b̄ ± t_{0.975,ν}·√(v_a + v_b), v_i = s_i²/n_i, ν = (v_a + v_b)² / (v_a²/(n_a−1) + v_b²/(n_b−1));
    no interval when either side has fewer than 2 runs; a zero-width interval when both variances are 0."""
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        return Diff("welch", na, nb, None, None, None, None, "no runs on one side")
    mean = statistics.fmean(a) - statistics.fmean(b)
    if na < 2 or nb < 2:
        return Diff("welch", na, nb, mean, None, None, None, f"n={na}/{nb}: fewer than 2 runs on a side")
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    if va + vb == 0:
        return Diff("welch", na, nb, mean, mean, mean, None)
    dof = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = t975(dof) * math.sqrt(va + vb)
    return Diff("welch", na, nb, mean, mean - half, mean + half, dof)


def compare(ours: Sequence[Sample], base: Sequence[Sample], pairable: bool = True) -> Diff:
    """ours − base: paired over the seeds both sides have when ``pairable`` (same trainer) and some seed is
    shared, each shared seed appearing once per side; otherwise Welch over all runs, with the reason noted."""
    shared = {s for s, _ in ours if s is not None} & {s for s, _ in base if s is not None}
    if pairable and shared:
        counts = Counter(s for s, _ in ours if s in shared) + Counter(s for s, _ in base if s in shared)
        repeated = sorted(s for s, c in counts.items() if c > 2)
        if not repeated:
            a, b = dict(ours), dict(base)
            return paired_diff([a[s] - b[s] for s in sorted(shared)])
        diff = welch_diff([v for _, v in ours], [v for _, v in base])
        note = f"seed {', '.join(map(str, repeated))} repeated, not paired"
        return replace(diff, note=f"{note}; {diff.note}" if diff.note else note)
    return welch_diff([v for _, v in ours], [v for _, v in base])
