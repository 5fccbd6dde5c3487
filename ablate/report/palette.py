"""How the report shows the block designs: the paper's names, the paper's order and one
colour per block, the same in every figure, table and sentence of every report.

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
# The paper's Figure 5 / Table 4 ordering of the conditioning blocks by FID, best first:
# legends and tables list the paper's blocks so, and the summary checks it.
PAPER_FID_ORDER = ("adaln-zero", "cross-attn", "adaln", "in-context")
PAPER_NAMES = {"adaln-zero": "adaLN-Zero", "cross-attn": "cross-attention", "adaln": "adaLN",
               "in-context": "in-context"}


def paper_ordering() -> str:
    """The paper's ordering in words: "adaLN-Zero has the best FID, then ..., and X the worst"."""
    names = [PAPER_NAMES[b] for b in PAPER_FID_ORDER]
    return f"{names[0]} has the best FID, then {', '.join(names[1:-1])}, and {names[-1]} the worst"


def block_order(blocks: Iterable[str]) -> list[str]:
    """The distinct blocks, the paper's in its order, then any others by name."""
    present = list(dict.fromkeys(blocks))
    return [b for b in PAPER_FID_ORDER if b in present] + sorted(b for b in present if b not in PAPER_FID_ORDER)


def block_colors(blocks: Iterable[str]) -> dict[str, str]:
    """Colour of each block: the fixed palette, then the fallback colours for user blocks."""
    colors, spare = {}, iter(FALLBACK)
    for b in block_order(blocks):
        colors[b] = PALETTE.get(b) or next(spare, "#000000")
    return colors
