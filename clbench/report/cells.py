"""How one table cell reads: Markdown or LaTeX syntax, digits, and a unit chosen per column.

A cost column spans orders of magnitude between benchmarks (a few thousand trainable parameters
on ``digits``, tens of millions on a ViT-B), so a fixed unit prints ``0.000582``; the column's
unit is picked from its largest value instead and named in its header. Which cell is bold is
decided on the text shown, so two cells that read the same are a tie, never one bold and one not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

ACC_DIGITS = 2  # decimals of the accuracy-like metrics (percentages)
SIG_DIGITS = 3  # significant digits of a cost value in its column's unit

# (factor from the stored unit, text put into the header), smallest first.
PARAMS = ((1.0, ""), (1e3, " (K)"), (1e6, " (M)"), (1e9, " (B)"))  # stored: parameters
GFLOPS = ((1e-9, ""), (1e-6, "K"), (1e-3, "M"), (1.0, "G"), (1e3, "T"))  # stored: GFLOPs
SECONDS = ((1.0, " (s)"), (60.0, " (min)"), (3600.0, " (h)"))  # stored: seconds


@dataclass(frozen=True)
class Style:
    """The symbols of one output syntax, in cells and in footnotes."""

    pm: str
    bold: str  # format string with {}
    mark: str
    missing: str
    lt: str = "<"
    delta: str = "Δ"
    arrow: str = "→"
    minus: str = "−"


MD = Style(" ± ", "**{}**", "†", "–")
TEX = Style(r" $\pm$ ", r"\textbf{{{}}}", r"$^{\dagger}$", "--", "$<$", r"$\Delta$",
            r"$\rightarrow$", "$-$")


def num(x: float, digits: int = ACC_DIGITS) -> str:
    return f"{x:.{digits}f}"


def pick_unit(values: Sequence[float], scale: Sequence[tuple[float, str]]) -> tuple[float, str]:
    """The smallest unit of ``scale`` in which the column's largest value is below 1000, so
    every value shows its leading digits (the largest unit when none is)."""
    finite = [abs(v) for v in values if not math.isnan(v)]
    top = max(finite, default=0.0)
    return next((u for u in scale if top / u[0] < 1000), scale[-1])


def sig(x: float, digits: int = SIG_DIGITS, trim: bool = False) -> str:
    """``x`` with ``digits`` significant digits, never in exponent notation; whole numbers
    without decimals. ``trim``: drop trailing zeros (0.5, not 0.500) where a column's values
    need not line up."""
    if float(x).is_integer():
        return str(int(x))
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    text = f"{x:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if trim and "." in text else text


def count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}"
