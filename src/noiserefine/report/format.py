"""How the report writes numbers: adherence with its standard error, differences with theirs."""

from __future__ import annotations

import math
from typing import Any, Mapping


def pm(value: float, err: float, digits: int = 3) -> str:
    """`0.884 ± 0.010`."""
    return f"{value:.{digits}f} ± {err:.{digits}f}"


def adherence(rec: Mapping[str, Any], judge: str = "primary") -> str:
    """A record's adherence under `judge` ("primary" or "heldout") with its standard error."""
    key = "adherence" if judge == "primary" else "heldout_adherence"
    return pm(rec[key], rec[f"{key}_se"])


def diff(d: float, err: float) -> str:
    """A signed difference with its standard error: `+0.124 ± 0.012`."""
    return f"{d:+.3f} ± {err:.3f}" if math.isfinite(err) else f"{d:+.3f}"


def fd(rec: Mapping[str, Any]) -> str:
    """FD under both judges: `30.9 / 20.4`."""
    return f"{rec['fd']:.1f} / {rec['heldout_fd']:.1f}"
