"""Read a Lightning ``CSVLogger`` ``metrics.csv`` strictly: every problem is one line naming the file.

Shared by ``lightning-bn plot`` (:mod:`lightning_bn.plot.run_logs`) and the reproduce run reader
(:mod:`lightning_bn.reproduce.history`); it needs neither matplotlib nor Lightning.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from lightning_bn._types import Series
from lightning_bn.errors import LogFormatError, TruncatedLogError

__all__ = ["LogFormatError", "TruncatedLogError", "read_csv_log"]


def read_csv_log(path: str | Path) -> dict[str, Series]:
    """Read a CSVLogger ``metrics.csv`` into ``key -> (steps, values)``, sorted by step.

    Lightning's CSVLogger writes a header row (the metric keys, ``step``, maybe ``epoch``) and
    one row per logging call, empty where the row lacks a key. A key logged twice at one step
    keeps the later value; ``nan`` and ``inf`` are kept as such.

    Args:
        path: the file.

    Returns:
        One ``(steps int64 array, values float64 array)`` pair per key (``step`` and
        ``epoch`` excluded).

    Raises:
        LogFormatError: the file cannot be read, is not UTF-8 text, has no ``step`` column,
            or a row has more or fewer fields than the header.
        TruncatedLogError: the last row is cut short (the file ends without its newline).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise LogFormatError(f"{path}: cannot be read ({err.strerror or err})") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LogFormatError(
            f"{path}: not a CSV text file (byte 0x{raw[err.start]:02x} at offset {err.start} "
            "is not UTF-8)"
        ) from None
    if "\x00" in text:
        raise LogFormatError(f"{path}: not a CSV text file (it holds NUL bytes)")
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise LogFormatError(f"{path}: not a valid CSV file ({err})") from None
    if not rows or not rows[0]:
        raise LogFormatError(f"{path}: empty file (no header row)")
    header = rows[0]
    if "step" not in header:
        raise LogFormatError(
            f"{path}: not a Lightning CSVLogger metrics file (no `step` column in the header)"
        )
    if len(rows) > 1 and not text.endswith(("\n", "\r")):
        # CSVLogger ends every row with a line break: a file without one was cut mid-row
        raise TruncatedLogError(
            f"{path}: truncated, its last row (row {len(rows)}) is cut short (no line break)"
        )
    step_col = header.index("step")
    points: dict[str, dict[int, float]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise LogFormatError(
                f"{path}: row {number} is malformed ({len(row)} fields, the header has "
                f"{len(header)})"
            )
        try:
            step = int(float(row[step_col]))
        except ValueError:
            continue  # a row without a step (an epoch-level row of another logger): skip it
        for key, cell in zip(header, row, strict=True):
            if key in ("step", "epoch") or cell == "":
                continue
            try:
                value = float(cell)
            except ValueError:
                continue  # a text value (a hyper-parameter logged as a metric): not plottable
            points.setdefault(key, {})[step] = value
    out: dict[str, Series] = {}
    for key, by_step in points.items():
        steps = sorted(by_step)
        out[key] = (
            np.asarray(steps, dtype=np.int64),
            np.asarray([by_step[s] for s in steps], dtype=np.float64),
        )
    return out
