"""The one rule for every file lightning-bn writes (run folders, figures, ``summary.md``,
``findings.json``, ``index.md``).

lightning-bn writes only into a folder it created, an empty one, or one holding its own record
of what it wrote (:data:`RECORD`, or a reproduce run's ``run.json``). It overwrites only files
that record lists with the content it wrote (a SHA-256 of the bytes): a file the user added or
edited by hand is first renamed to ``<name>.kept<suffix>`` (``.kept-2`` … when taken), never
lost, and the rename is reported in one line. Files are replaced in one step (a temporary file
renamed over the old one), so a full disk or a kill leaves the old file whole.

Text is written as UTF-8; characters a path cannot spell in UTF-8 (a non-UTF-8 folder name,
decoded by Python with surrogate escapes) are written as ``\\udcXX`` escapes, which JSON reads
back as the same string.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RECORD",
    "FigureBatch",
    "OutputFolder",
    "folder_state",
    "foreign_files",
    "pending_figures",
]

#: The record of the files lightning-bn wrote in a folder: ``{"files": {relative path: sha256}}``.
RECORD = ".lightning-bn-files.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str | None:
    try:
        return _sha256(path.read_bytes())
    except OSError:
        return None


def folder_state(path: Path, markers: tuple[str, ...] = ()) -> str:
    """``"new"`` (absent), ``"empty"``, ``"ours"`` (holds :data:`RECORD` or one of
    ``markers``), ``"foreign"`` (holds other files) or ``"file"`` (not a folder)."""
    if not path.exists():
        return "new"
    if not path.is_dir():
        return "file"
    if any((path / name).is_file() for name in (RECORD, *markers)):
        return "ours"
    return "foreign" if any(path.iterdir()) else "empty"


def foreign_files(path: Path, limit: int = 3) -> str:
    """Up to ``limit`` names in ``path``, for a message (``a, b, c, …``)."""
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:limit]) + (", …" if len(names) > limit else "")


def _kept_name(path: Path) -> Path:
    n, candidate = 1, path.with_name(f"{path.stem}.kept{path.suffix}")
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.kept-{n}{path.suffix}")
    return candidate


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it; an ``OSError`` names
    ``path`` (a full disk: ``[Errno 28] No space left on device: 'path'``)."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        code = err.errno if err.errno is not None else errno.EIO
        raise OSError(code, err.strerror or str(err), str(path)) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@dataclass
class OutputFolder:
    """A folder lightning-bn may write into, with the record of what it wrote there.

    Attributes:
        root: the folder.
        notes: one line per file of the user's kept under a new name.
        written: files written through this object (relative to ``root``).
    """

    root: Path
    notes: list[str] = field(default_factory=list)
    written: set[str] = field(default_factory=set)
    _files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path) -> OutputFolder:
        """The folder ``root`` (created if absent) with its record (empty when it has none)."""
        root.mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {}
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            loaded = json.loads((root / RECORD).read_text())["files"]
            files = {str(k): str(v) for k, v in loaded.items()}
        return cls(root, _files=files)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is a file this folder's record lists with its current content."""
        recorded = self._files.get(self._rel(path))
        return recorded is not None and recorded == _file_sha256(path)

    def write_bytes(self, path: Path, data: bytes) -> Path:
        """Write ``data`` to ``path`` (inside :attr:`root`), keeping a file that is not ours.

        Raises:
            OSError: the file cannot be written (its ``filename`` is ``path``).
        """
        rel = self._rel(path)
        if path.exists() and not self.owns(path):
            if path.is_file() and _file_sha256(path) == _sha256(data):
                pass  # the same bytes: nothing to keep
            else:
                kept = _kept_name(path)
                os.replace(path, kept)
                self.notes.append(
                    f"{rel} was not written by lightning-bn as it is now: kept as "
                    f"{kept.relative_to(self.root).as_posix()}"
                )
        _replace_atomically(path, data)
        self._files[rel] = _sha256(data)
        self.written.add(rel)
        self._save_record()
        return path

    def write_text(self, path: Path, text: str) -> Path:
        """:meth:`write_bytes` of ``text`` as UTF-8 (unencodable characters as ``\\uXXXX``)."""
        return self.write_bytes(path, text.encode("utf-8", "backslashreplace"))

    def remove_stale(self, under: str = "", keep: Iterable[Path] = ()) -> list[str]:
        """Delete the files under ``under`` that the record lists, that were not written through
        this object, and that are unchanged (a figure not drawn this time); returns them.

        ``keep``: files to leave even so (a figure drawn this time but not written, a full disk:
        the older one stays).
        """
        removed = []
        prefix = f"{under.rstrip('/')}/" if under else ""
        kept = {self._rel(p) for p in keep}
        for rel in sorted(self._files):
            if rel in self.written or rel in kept or not rel.startswith(prefix):
                continue
            path = self.root / rel
            if self.owns(path):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(rel)
            if not path.exists():
                del self._files[rel]
        if removed:
            self._save_record()
        return removed

    def _save_record(self) -> None:
        data = {"format": 1, "files": dict(sorted(self._files.items()))}
        _replace_atomically(self.root / RECORD, (json.dumps(data, indent=1) + "\n").encode())


@dataclass
class FigureBatch:
    """Figures rendered to PNG bytes, to be written later (results first, figures last).

    Attributes:
        rendered: PNG bytes by path, in drawing order.
        failed: one line per figure that could not be rendered.
    """

    rendered: dict[Path, bytes] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def write(self, folder: OutputFolder) -> tuple[list[Path], list[str]]:
        """Write every rendered figure; a failure costs that figure only (one line each).

        Returns:
            The paths written and the lines of the failures.
        """
        written: list[Path] = []
        lines: list[str] = []
        for path, data in self.rendered.items():
            try:
                written.append(folder.write_bytes(path, data))
            except OSError as err:
                lines.append(f"figure not written: {err.filename}: {err.strerror or err}")
        return written, lines


_BATCH: contextvars.ContextVar[FigureBatch | None] = contextvars.ContextVar(
    "lightning_bn_figure_batch", default=None
)


def current_batch() -> FigureBatch | None:
    """The batch figures are rendered into, or ``None`` (write them at once)."""
    return _BATCH.get()


@contextlib.contextmanager
def pending_figures() -> Iterator[FigureBatch]:
    """Within the block, figures are rendered into the batch yielded instead of written."""
    batch = FigureBatch()
    token = _BATCH.set(batch)
    try:
        yield batch
    finally:
        _BATCH.reset(token)
