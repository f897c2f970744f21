"""Summary statistics over seeds and Welch's two-sample t-test, in the standard library only.

For samples ``a`` (n_a values, mean m_a, sample variance v_a with n-1 in the denominator) and ``b``::

    gain = m_a - m_b,   se = sqrt(v_a/n_a + v_b/n_b)
    df   = se^4 / ((v_a/n_a)^2/(n_a-1) + (v_b/n_b)^2/(n_b-1))        (Welch-Satterthwaite)
    t    = gain / se,   p = 2 * (1 - F_df(|t|)),   CI = gain -+ F_df^{-1}(1 - alpha/2) * se

where ``F_df`` is Student's t CDF: ``1 - F_df(t) = I_{df/(df+t^2)}(df/2, 1/2) / 2`` for t >= 0, with
``I_x(a, b)`` the regularised incomplete beta function (evaluated by its continued fraction, modified
Lentz method, to ~1e-14 relative accuracy). The quantile inverts the CDF by bisection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["Summary", "WelchResult", "summarize", "welch", "t_cdf", "t_quantile", "betainc"]

_EPS = 1e-15
_TINY = 1e-300


@dataclass(frozen=True)
class Summary:
    """count, mean, sample standard deviation (None for one value), min and max."""

    count: int
    mean: float
    std: Optional[float]
    min: float
    max: float


def summarize(values: Sequence[float]) -> Optional[Summary]:
    """The :class:`Summary` of ``values`` (None when empty); ``std`` uses n-1 and needs two values."""
    values = [float(v) for v in values]
    if not values:
        return None
    count = len(values)
    mean = math.fsum(values) / count
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (count - 1)) if count > 1 else None
    return Summary(count, mean, std, min(values), max(values))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float, y: Optional[float] = None) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` for a, b > 0 and 0 <= x <= 1.

    ``y`` is ``1 - x`` when the caller knows it more precisely than the subtraction (x close to 1).
    """
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    y = 1.0 - x if y is None else y
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; else use the symmetry
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def _t_tail(t: float, df: float) -> float:
    """P(T > |t|) = I_{df/(df+t^2)}(df/2, 1/2) / 2."""
    return 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """Student's t cumulative distribution function with ``df`` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = _t_tail(t, df)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t (``t_cdf(t_quantile(p, df), df) == p``), 0 < p < 1."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class WelchResult:
    """``gain`` = mean(a) - mean(b) with its ``confidence`` interval [low, high], t, df and p-value."""

    gain: float
    low: float
    high: float
    t: float
    df: float
    p_value: float
    confidence: float


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Optional[WelchResult]:
    """Welch's t-test of mean(a) - mean(b) (module docstring); None unless both have two values or more.

    Two samples without any spread give a zero-width interval, p = 0 for a non-zero gain and p = 1 for none.
    """
    sa, sb = summarize(a), summarize(b)
    if sa is None or sb is None or sa.std is None or sb.std is None:
        return None
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    gain = sa.mean - sb.mean
    wa, wb = sa.std ** 2 / sa.count, sb.std ** 2 / sb.count
    se = math.sqrt(wa + wb)
    if se == 0.0:
        return WelchResult(gain, gain, gain, math.copysign(math.inf, gain) if gain else 0.0, math.inf,
                           0.0 if gain else 1.0, confidence)
    df = (wa + wb) ** 2 / (wa ** 2 / (sa.count - 1) + wb ** 2 / (sb.count - 1))
    t = gain / se
    p_value = min(1.0, 2.0 * _t_tail(t, df))
    half = t_quantile(0.5 + confidence / 2.0, df) * se
    return WelchResult(gain, gain - half, gain + half, t, df, p_value, confidence)
