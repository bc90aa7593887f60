"""Mean +- spread over training seeds, and the rule for calling a difference real.

Every small-scale comparison in docs/results trains each row with several training seeds. A row's metric is the
mean over its seeds with the sample standard deviation as its spread; two rows differ only where the gap between
their means exceeds the sum of their sds (a deliberately strict rule: with 3 seeds an sd is itself noisy).
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

# metric -> True when higher is better
HIGHER_IS_BETTER = {"fd_cls": False, "nll": False, "density_nll": False, "precision": True, "recall": True,
                    "class_accuracy": True, "is_cls": True, "diversity": True}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample sd) of ``values``; the sd of a single value is 0."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: Sequence[float], digits: int = 3) -> str:
    """``"mean +- sd"`` with ``digits`` decimals."""
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} +- {sd:.{digits}f}"


def verdict(metric: str, a: str, values_a: Sequence[float], b: str, values_b: Sequence[float]) -> str:
    """One line: which of rows ``a`` / ``b`` is ahead on ``metric`` and whether the gap exceeds the sum of the sds."""
    (ma, sa), (mb, sb) = mean_sd(values_a), mean_sd(values_b)
    a_ahead = ma > mb if HIGHER_IS_BETTER[metric] else ma < mb
    lead, other = (a, b) if a_ahead else (b, a)
    real = abs(ma - mb) > sa + sb
    return (f"{metric}: {lead} ahead of {other} by {abs(ma - mb):.3f} (sds {sa:.3f}, {sb:.3f}): "
            + ("exceeds the spread" if real else "within the spread, no difference shown"))


def beyond_spread(values_a: Sequence[float], values_b: Sequence[float]) -> bool:
    """True where the two means differ by more than the sum of the two sds."""
    (ma, sa), (mb, sb) = mean_sd(values_a), mean_sd(values_b)
    return abs(ma - mb) > sa + sb
