"""One colour per block design, the same in every figure of every report.

The four blocks of the paper have fixed colours (seaborn's colour-blind palette); a block
registered by a user gets the next free colour in the order of its name, so within a
report it is fixed too.
"""
from __future__ import annotations

from typing import Iterable

PALETTE = {
    "adaln-zero": "#0173b2",  # blue
    "cross-attn": "#de8f05",  # orange
    "adaln": "#029e73",  # green
    "in-context": "#d55e00",  # vermillion
}
FALLBACK = ("#cc78bc", "#ca9161", "#949494", "#56b4e9", "#ece133", "#fbafe4", "#000000")
# Legends and tables list the paper's blocks in the paper's FID order, best first.
ORDER = ("adaln-zero", "cross-attn", "adaln", "in-context")


def block_order(blocks: Iterable[str]) -> list[str]:
    """The distinct blocks, the paper's in its order, then any others by name."""
    present = list(dict.fromkeys(blocks))
    return [b for b in ORDER if b in present] + sorted(b for b in present if b not in ORDER)


def block_colors(blocks: Iterable[str]) -> dict[str, str]:
    """Colour of each block: the fixed palette, then the fallback colours for user blocks."""
    colors, spare = {}, iter(FALLBACK)
    for b in block_order(blocks):
        colors[b] = PALETTE.get(b) or next(spare, "#000000")
    return colors
