"""Every width limit of the package, in one place: what a setting, a quantizer, the budget and the codec accept.

``n`` is the width of the main codes every value gets; ``m`` the extra precision of the important channels, so an
important value is coded at ``n + m`` bits. The settings accept ``n`` in ``[MIN_BITS, MAX_BITS]`` and
``n + m <= MAX_TOTAL_BITS``; the bit packer packs any width in ``[MIN_BITS, MAX_TOTAL_BITS]``; the budget
(``target_bits``) chooses ``n`` from :data:`WIDTHS`, ``m`` from :data:`EXTRA_BITS` and the important fraction
from :data:`RATIOS`, so a loaded checkpoint or artifact of an allocated layer may say ``bits`` in :data:`WIDTHS`
and ``extra_bits`` in ``[0, MAX_EXTRA_BITS]`` (0 when no channel is important).
"""

from __future__ import annotations

__all__ = ["EXTRA_BITS", "MAX_BITS", "MAX_EXTRA_BITS", "MAX_TOTAL_BITS", "MIN_BITS", "RATIOS", "WIDTHS"]

MIN_BITS = 2
MAX_BITS = 8
MAX_TOTAL_BITS = 16
WIDTHS: tuple[int, ...] = tuple(range(MIN_BITS, MAX_BITS + 1))
EXTRA_BITS: tuple[int, ...] = (1, 2, 3, 4)
MAX_EXTRA_BITS = max(EXTRA_BITS)
RATIOS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
