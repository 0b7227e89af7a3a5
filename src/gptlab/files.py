"""Reading and writing files the way every stage needs: whole or not at all, with errors that name the file.

- ``atomic_write`` / ``atomic_write_text``: write to a temporary name beside the target, then rename, so a
  kill mid-write leaves the previous version intact, never a half-written file.
- ``read_text`` / ``text_files``: UTF-8 input with errors that name the file and byte offset.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from gptlab.errors import GptlabError


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename the result onto ``path`` (atomic on POSIX and Windows).

    The file gets the permissions an ordinary ``open()`` would give it (0666 less the umask), not
    ``mkstemp``'s private 0600, so a run directory is as readable as any other file the user writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def decode_utf8(block: bytes, path: str | Path, offset: int = 0) -> str:
    """``block`` as text; invalid UTF-8 is an error naming the file, the byte and its offset."""
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(
            f"{path}: not UTF-8 text (invalid byte 0x{block[e.start]:02x} at byte offset {offset + e.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file; a missing, empty or non-UTF-8 file is a clear error."""
    path = Path(path)
    if path.is_dir():
        raise GptlabError(f"{path} is a folder; give a file")
    if not path.is_file():
        raise GptlabError(f"{path}: no such file")
    text = decode_utf8(path.read_bytes(), path)
    if not text.strip():
        raise GptlabError(f"{path}: file is empty")
    return text


def text_files(path: str | Path) -> list[Path]:
    """The file itself, or every regular non-hidden file below a folder, in sorted order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise GptlabError(f"{path}: folder has no files to read")
        return files
    raise GptlabError(f"{path}: no such file or folder")
