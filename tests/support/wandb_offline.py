"""Read an offline W&B run back from its ``run-<id>.wandb`` transaction log.

Written from scratch for tests, so that they can check what reached a W&B run without an
account, a network or any private reader inside ``wandb``.

File format (as written by ``wandb-core``, ``core/pkg/leveldb`` and
``core/internal/transactionlog`` in the wandb repository):

* A 7-byte file header: ident ``b":W&B"``, magic ``0xBEE1`` (uint16, little-endian) and
  version ``0`` (uint8). The header sits at the start of the first 32 KiB block and counts
  toward that block's size.
* Then the LevelDB log format: the file is cut into 32 KiB blocks; each block holds chunks
  with a 7-byte header ``checksum: uint32 LE``, ``length: uint16 LE``, ``type: uint8``
  (FULL=1, FIRST=2, MIDDLE=3, LAST=4) followed by ``length`` payload bytes. A chunk never
  crosses a block boundary; when fewer than 7 bytes are left in a block they are zero
  padding. A record is one FULL chunk or FIRST, MIDDLE*, LAST.
* The checksum differs from upstream LevelDB (masked CRC-32C): wandb writes the plain
  CRC-32 (IEEE, ``zlib.crc32``) of the type byte followed by the payload, unmasked
  (``leveldb.CRCAlgoIEEE``).
* Each record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

# The protobuf module re-exports a generated module picked by protobuf version, which mypy
# cannot see into: treat its messages as Any.
pb: Any = wandb_internal_pb2

HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
HEADER_VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024

FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The ``.wandb`` file is not in the expected format (bad header, checksum, chunk order)."""


def chunk_checksum(chunk_type: int, payload: bytes) -> int:
    """Checksum wandb stores in a chunk header: CRC-32 (IEEE) of ``type byte + payload``.

    Args:
        chunk_type: 1 (full), 2 (first), 3 (middle) or 4 (last).
        payload: The chunk's payload bytes.

    Returns:
        The unsigned 32-bit checksum.
    """
    return zlib.crc32(payload, zlib.crc32(bytes([chunk_type]))) & 0xFFFFFFFF


@dataclass(frozen=True)
class Chunk:
    """One physical chunk of the log.

    Attributes:
        offset: Byte offset of the chunk header in the file.
        type: 1 (full), 2 (first), 3 (middle) or 4 (last).
        payload: The chunk's payload.
    """

    offset: int
    type: int
    payload: bytes


def iter_chunks(path: str | Path) -> Iterator[Chunk]:
    """Yield every chunk of a ``.wandb`` file after checking the file header and checksums.

    A chunk cut off at the end of the file (a run still being written) ends the iteration
    silently.

    Args:
        path: The ``run-<id>.wandb`` file.

    Yields:
        The chunks in file order.

    Raises:
        WandbFileError: On a bad file header, a non-zero block trailer, a chunk that overflows
            its block or a checksum mismatch.
    """
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: {len(data)} bytes, shorter than the 7-byte header")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (HEADER_IDENT, HEADER_MAGIC, HEADER_VERSION):
        raise WandbFileError(
            f"{path}: expected header {(HEADER_IDENT, hex(HEADER_MAGIC), HEADER_VERSION)},"
            f" got {(ident, hex(magic), version)}"
        )

    pos = FILE_HEADER.size  # the header is part of the first block
    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            # Trailer: too small for a chunk header, the writer zero-fills it.
            if any(data[pos : pos + left_in_block]):
                raise WandbFileError(f"{path}: non-zero block trailer at offset {pos}")
            pos += left_in_block
            continue
        if pos + CHUNK_HEADER.size > len(data):
            return  # truncated chunk header at the end of a file still being written
        checksum, length, chunk_type = CHUNK_HEADER.unpack_from(data, pos)
        if checksum == 0 and length == 0 and chunk_type == 0:
            # Zero-filled rest of a block (preallocated file): skip to the next block.
            pos += left_in_block
            continue
        if length > left_in_block - CHUNK_HEADER.size:
            raise WandbFileError(f"{path}: chunk at offset {pos} overflows its block")
        start = pos + CHUNK_HEADER.size
        end = start + length
        if end > len(data):
            return  # truncated payload at the end of a file still being written
        payload = data[start:end]
        if chunk_checksum(chunk_type, payload) != checksum:
            raise WandbFileError(f"{path}: checksum mismatch in chunk at offset {pos}")
        yield Chunk(pos, chunk_type, payload)
        pos = end


def iter_raw_records(path: str | Path) -> Iterator[bytes]:
    """Yield the payload of every complete record in a ``.wandb`` file, in file order.

    Args:
        path: The ``run-<id>.wandb`` file.

    Yields:
        The bytes of each record (a serialized ``Record`` message): one FULL chunk, or the
        concatenated FIRST, MIDDLE... and LAST chunks.

    Raises:
        WandbFileError: On any error of :func:`iter_chunks`, an unknown chunk type or chunks
            out of order.
    """
    pending: bytearray | None = None  # payload of a record begun by a FIRST chunk
    for chunk in iter_chunks(path):
        if chunk.type == FULL:
            if pending is not None:
                raise WandbFileError(f"{path}: FULL chunk at {chunk.offset} inside a record")
            yield chunk.payload
        elif chunk.type == FIRST:
            if pending is not None:
                raise WandbFileError(f"{path}: FIRST chunk at {chunk.offset} inside a record")
            pending = bytearray(chunk.payload)
        elif chunk.type in (MIDDLE, LAST):
            if pending is None:
                raise WandbFileError(
                    f"{path}: chunk type {chunk.type} at {chunk.offset} without a FIRST chunk"
                )
            pending += chunk.payload
            if chunk.type == LAST:
                yield bytes(pending)
                pending = None
        else:
            raise WandbFileError(f"{path}: unknown chunk type {chunk.type} at {chunk.offset}")


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield every record of a ``.wandb`` file decoded as ``wandb_internal_pb2.Record``.

    Args:
        path: The ``run-<id>.wandb`` file.

    Yields:
        The decoded records, in file order.
    """
    for raw in iter_raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        yield record


def _item_path(item: Any) -> list[str]:
    """Path of a history/summary/config item: ``[key]`` or its ``nested_key`` labels."""
    return [item.key] if item.key else list(item.nested_key)


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, creating (or replacing) inner dicts."""
    for label in path[:-1]:
        inner = tree.get(label)
        if not isinstance(inner, dict):
            inner = tree[label] = {}
        tree = inner
    tree[path[-1]] = value


def _remove_path(tree: dict[str, Any], path: list[str]) -> None:
    for label in path[:-1]:
        inner = tree.get(label)
        if not isinstance(inner, dict):
            return
        tree = inner
    tree.pop(path[-1], None)


def _history_value(item: Any) -> Any:
    """Value of a history item, in the JSON form or the typed form (``x_history_value_encoding``)."""
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


@dataclass
class MetricDefinition:
    """One ``define_metric`` record (explicit, or expanded by wandb from a glob).

    Attributes:
        name: The metric's name (empty for a glob definition).
        glob_name: The glob (empty for an explicit one).
        step_metric: The metric used as this one's x axis.
        summary: The summary operations set, e.g. ``{"max"}``.
        step_sync: Whether wandb fills in the step metric when it is missing.
        expanded_from_glob: True for a definition wandb made from a glob (wandb 0.31 sends
            these to the server only; they do not appear in the file).
    """

    name: str
    glob_name: str
    step_metric: str
    summary: set[str]
    step_sync: bool
    expanded_from_glob: bool


@dataclass
class OfflineRun:
    """What a ``.wandb`` file says about its run.

    Attributes:
        path: The file read.
        run_id: The run's id (from the run record).
        history: One dict per history record (one ``run.log`` commit): key -> value, with
            the ``_step``, ``_runtime`` and ``_timestamp`` keys wandb adds. A key is kept
            whole (``"ics/model.0/l2"``); an item wandb stores under a nested key (a logged
            table's ``{"_type": ..., "path": ...}``) becomes a nested dict.
        summary: The summary after applying every summary update and removal in order
            (nested keys as nested dicts).
        config: The run config after every update and removal in order, starting with the
            run record's (wandb's own ``_wandb`` entry included).
        metrics: Every define_metric record, in order.
        record_types: How many records of each type the file holds.
    """

    path: Path
    run_id: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[MetricDefinition] = field(default_factory=list)
    record_types: dict[str, int] = field(default_factory=dict)

    def values(self, key: str, step_key: str = "trainer/global_step") -> list[tuple[Any, Any]]:
        """``(step, value)`` for every history row holding ``key``.

        Args:
            key: The logged key.
            step_key: The key to read the step from (``None`` where a row lacks it).

        Returns:
            The pairs in logging order.
        """
        return [(row.get(step_key), row[key]) for row in self.history if key in row]

    def metric(self, name: str) -> MetricDefinition | None:
        """The last explicit (non-glob) definition of ``name``, if any."""
        found = [m for m in self.metrics if m.name == name]
        return found[-1] if found else None

    def glob_metric(self, glob_name: str) -> MetricDefinition | None:
        """The last glob definition ``glob_name`` (e.g. ``"ics/*"``), if any."""
        found = [m for m in self.metrics if m.glob_name == glob_name]
        return found[-1] if found else None


_SUMMARY_OPS = ("min", "max", "mean", "best", "last", "none", "copy", "first")


def _apply(tree: dict[str, Any], record: Any) -> None:
    """Apply a config or summary record's updates, then its removals, to ``tree``."""
    for item in record.update:
        _set_path(tree, _item_path(item), json.loads(item.value_json))
    for item in record.remove:
        _remove_path(tree, _item_path(item))


def read_run(path: str | Path) -> OfflineRun:
    """Decode a ``.wandb`` file into history rows, summary, config and metric definitions.

    Args:
        path: The ``run-<id>.wandb`` file (see :func:`find_run_file`).

    Returns:
        The decoded run.
    """
    run = OfflineRun(path=Path(path))
    for record in iter_records(path):
        kind = record.WhichOneof("record_type") or "<none>"
        run.record_types[kind] = run.record_types.get(kind, 0) + 1
        if kind == "run":
            run.run_id = record.run.run_id
            _apply(run.config, record.run.config)
            _apply(run.summary, record.run.summary)
        elif kind == "history":
            row: dict[str, Any] = {}
            for h_item in record.history.item:
                _set_path(row, _item_path(h_item), _history_value(h_item))
            run.history.append(row)
        elif kind == "summary":
            _apply(run.summary, record.summary)
        elif kind == "config":
            _apply(run.config, record.config)
        elif kind == "metric":
            m = record.metric
            run.metrics.append(
                MetricDefinition(
                    name=m.name,
                    glob_name=m.glob_name,
                    step_metric=m.step_metric,
                    summary={op for op in _SUMMARY_OPS if getattr(m.summary, op)},
                    step_sync=m.options.step_sync,
                    expanded_from_glob=m.expanded_from_glob,
                )
            )
    return run


def find_run_file(save_dir: str | Path) -> Path:
    """Locate the single offline run's ``.wandb`` file under ``save_dir``.

    Looks for ``wandb/offline-run-*/run-*.wandb`` below ``save_dir`` (the layout
    ``WandbLogger(save_dir=..., offline=True)`` produces) and, failing that, directly for
    ``offline-run-*/run-*.wandb`` (``save_dir`` being the ``wandb`` folder itself).

    Args:
        save_dir: The logger's save_dir (or ``wandb.init(dir=...)``).

    Returns:
        The path of the file.

    Raises:
        FileNotFoundError: If there is no such file, or more than one (ambiguous).
    """
    root = Path(save_dir)
    found = sorted(root.glob("wandb/offline-run-*/run-*.wandb")) or sorted(
        root.glob("offline-run-*/run-*.wandb")
    )
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected exactly one wandb/offline-run-*/run-*.wandb under {root}, found {found}"
        )
    return found[0]


def wait_for_finished_run(save_dir: str | Path, timeout: float = 60.0) -> OfflineRun:
    """Wait until the offline run under ``save_dir`` is completely on disk, then read it.

    ``wandb.finish()`` returns before ``wandb-core`` has necessarily written the whole
    ``.wandb`` file: the service closes the run's stream after the call. The ``exit``
    record is the last record of a finished run, so this polls until it can be read.

    Args:
        save_dir: As for :func:`find_run_file`.
        timeout: Seconds to wait.

    Returns:
        The decoded run.

    Raises:
        TimeoutError: If no complete file appears within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            run = read_run(find_run_file(save_dir))
        except (FileNotFoundError, WandbFileError):
            run = None
        if run is not None and run.record_types.get("exit"):
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"no finished wandb run under {save_dir} after {timeout} s")
        time.sleep(0.05)
