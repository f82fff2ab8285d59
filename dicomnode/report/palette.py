"""One colour per lesion, the same in the SEG, the SR's viewer rendering, the key images and the
PDF (PURE).

Colours are chosen for contrast against grey CT and between neighbours (lesion 1 and 2 are
never alike); past the list they repeat, and the lesion's number tells lesions apart.
"""

from __future__ import annotations

import highdicom as hd

#: sRGB, 8 bits per channel: saturated hues that stand out from CT greys.
LESION_RGB: tuple[tuple[int, int, int], ...] = (
    (255, 64, 64),    # red
    (64, 160, 255),   # blue
    (255, 200, 0),    # yellow
    (0, 200, 120),    # green
    (200, 90, 255),   # violet
    (255, 130, 0),    # orange
    (0, 220, 220),    # cyan
    (255, 100, 190),  # pink
)


def lesion_rgb(label: int) -> tuple[int, int, int]:
    """The display colour of lesion ``label`` (1-based) as sRGB."""
    if label < 1:
        raise ValueError(f"lesion labels start at 1, got {label}")
    return LESION_RGB[(label - 1) % len(LESION_RGB)]


def lesion_cielab(label: int) -> hd.color.CIELabColor:
    """The same colour as a Recommended Display CIELab Value (PS3.3 C.10.7.1.1)."""
    return hd.color.CIELabColor.from_rgb(*lesion_rgb(label))
