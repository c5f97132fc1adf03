"""Text where ``lightning-bn plot`` expects numbers: a ``metrics.csv`` whose diagnostic columns
hold words (a hand-edited file, a logger writing strings) is named, not read as "nothing logged".
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

__all__ = ["text_cells"]


def text_cells(path: Path, prefixes: tuple[str, ...]) -> dict[str, tuple[int, str, int]]:
    """The columns of ``path`` starting with one of ``prefixes`` that hold cells which are not
    numbers: column -> (first such row, its cell, how many such cells).

    ``path`` has been read by :func:`lightning_bn.logging.csv_log.read_csv_log` already (UTF-8,
    rows as long as the header), which skips such cells.
    """
    rows = csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
    header = next(rows, [])
    found: dict[str, tuple[int, str, int]] = {}
    for number, row in enumerate(rows, start=2):
        for key, cell in zip(header, row, strict=False):
            if cell == "" or not key.startswith(prefixes):
                continue
            try:
                float(cell)
            except ValueError:
                first, text, count = found.get(key, (number, cell, 0))
                found[key] = (first, text, count + 1)
    return found
