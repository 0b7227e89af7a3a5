"""Reading and writing files the way every stage needs: whole or not at all, with errors that name the file.

- ``atomic_write`` / ``atomic_write_text``: write to a temporary name beside the target, then rename, so a
  kill mid-write leaves the previous version intact, never a half-written file.
- ``read_text`` / ``text_files``: UTF-8 input with errors that name the file and byte offset.
- ``read_text_chunks``: the same, streamed a block at a time, so a corpus larger than memory can be read.
- ``read_json_records``: the records of a JSON list or JSONL file, each with its line, checked.
- ``check_output_file``: an output path checked before the work that fills it (writable, not a folder,
  not one of the inputs), so a long job never ends on an unwritable path.
- ``fingerprint``: size and SHA-256 of a file or folder, so a resumed run can tell its data was changed.
- ``remove_stale_temps``: temporary files that a killed writer left behind.
"""
from __future__ import annotations

import codecs
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
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
    A write that fails for want of space or permission is a ``GptlabError`` naming ``path`` (never the
    hidden temporary name), and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise GptlabError(f"{path}: cannot write it ({e.strerror or e})") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        reason = write_failure(e, path.parent)  # asked before the partial file frees its space
        Path(tmp).unlink(missing_ok=True)
        if reason is not None:
            raise GptlabError(f"{path}: cannot write it ({reason})") from None
        raise


DISK_FULL = "no space left on device"


def write_failure(error: BaseException, directory: str | Path) -> str | None:
    """Why writing into ``directory`` failed, when ``error`` is a failed write rather than a bug; else None.

    An ``OSError`` says so itself. Libraries that write files in native code raise their own types with
    other words (safetensors: "I/O error: No space left on device"; torch.save: "unexpected pos 576 vs
    534"), so a disk left with (almost) no free space is taken as the cause too.
    """
    if isinstance(error, GptlabError):
        return None
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return DISK_FULL
        return error.strerror or str(error)
    if not isinstance(error, Exception):
        return None  # KeyboardInterrupt, SystemExit: not a write failure
    if "No space left" in str(error) or "os error 28" in str(error):
        return DISK_FULL
    try:
        if shutil.disk_usage(directory).free < (1 << 20):
            return DISK_FULL
    except OSError:
        pass
    return None


def check_output_file(path: str | Path, inputs: Iterable[str | Path] = (), option: str = "--output") -> Path:
    """Refuse an output path before any work is done: a folder, one of ``inputs``, or a place that cannot be
    written (a file where a folder must be, no permission, a read-only or virtual file system).

    Writability is tried, not guessed from permission bits (which say yes to root, even under /proc): a
    temporary file is created in the nearest existing folder and removed at once.
    """
    path = Path(path)
    if path.is_dir():
        raise GptlabError(f"{option} {path} is a folder; give a file name, e.g. {path / 'out.json'}")
    for source in inputs:
        if source is not None and same_path(path, source):
            raise GptlabError(f"{option} {path} is also the input; write the output to another file")
    check_writable_dir(path.parent, option, path)
    return path


def check_writable_dir(directory: str | Path, option: str, target: str | Path | None = None) -> None:
    """Raise unless files can be created in ``directory`` (or, if it does not exist yet, in its nearest existing
    ancestor, where the missing folders would be made)."""
    directory = Path(directory)
    target = Path(target) if target is not None else directory
    existing = next(p for p in (directory, *directory.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise GptlabError(f"{option} {target}: {existing}: a file stands where a directory has to be created; "
                          "choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".gptlab-write-test.", suffix=".tmp", dir=existing)
    except OSError as e:
        raise GptlabError(f"{option} {target}: cannot create files in {existing} ({e.strerror or e}); "
                          "choose another output path") from None
    os.close(fd)
    os.unlink(probe)


def same_path(a: str | Path, b: str | Path) -> bool:
    """Do ``a`` and ``b`` name one file (or folder)? Also through links, and for paths that do not exist yet."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


# Temporary names: atomic_write's ``.NAME.XXXXXXXX.tmp`` (mkstemp's 8 random characters) and the
# ``.tmpXXXXXX`` that safetensors' native writer creates beside its target.
_STALE_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|^\.tmp[A-Za-z0-9]{6}$")


def remove_stale_temps(directory: str | Path) -> tuple[int, int]:
    """Delete the temporary files that writers killed mid-write left in ``directory`` (not below it);
    returns ``(files, bytes)`` removed. Call it only where no other writer is at work."""
    directory = Path(directory)
    count = size = 0
    if not directory.is_dir():
        return 0, 0
    for p in directory.iterdir():
        if _STALE_TEMP.match(p.name) and p.is_file() and not p.is_symlink():
            try:
                n = p.stat().st_size
                p.unlink()
            except OSError:
                continue
            count, size = count + 1, size + n
    return count, size


# ---- fingerprints --------------------------------------------------------------------------------

FULL_HASH_BYTES = 256 << 20  # larger files are hashed by their size and their first and last ENDS_BYTES
ENDS_BYTES = 16 << 20


def fingerprint(path: str | Path) -> dict:
    """Size and SHA-256 of a file, or of every file below a folder (names included), to recognise data again.

    A file over 256 MiB is hashed by its size and its first and last 16 MiB, so that a multi-gigabyte token
    file is recognised in a moment (its header, in the first 4 KiB, holds its token count and tokenizer).
    """
    path = Path(path)
    files = text_files(path)
    digest, total = hashlib.sha256(), 0
    for f in files:
        size = f.stat().st_size
        total += size
        if path.is_dir():
            digest.update(f"{f.relative_to(path).as_posix()}\0{size}\0".encode())
        _hash_file(digest, f, size)
    return {"bytes": total, "files": len(files), "sha256": digest.hexdigest()}


def _hash_file(digest, path: Path, size: int) -> None:
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            return
        digest.update(f.read(ENDS_BYTES))
        f.seek(size - ENDS_BYTES)
        digest.update(f.read(ENDS_BYTES))


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


READ_CHUNK_BYTES = 1 << 20


def read_text_chunks(path: str | Path, chunk_bytes: int = READ_CHUNK_BYTES,
                     on_read: Callable[[int], None] | None = None) -> Iterator[str]:
    """Stream a UTF-8 file as text, ``chunk_bytes`` at a time; together the chunks are the whole text.

    A character split between two reads is completed by the next one. Invalid UTF-8 is the same error as
    ``read_text``'s, naming the file and the byte offset. ``on_read(n)`` is told each ``n`` bytes read
    (for a progress bar). The chunks are cut anywhere: ``gptlab.bpe.text_blocks`` re-cuts them where
    tokenization allows.
    """
    path = Path(path)
    if path.is_dir():
        raise GptlabError(f"{path} is a folder; give a file")
    if not path.is_file():
        raise GptlabError(f"{path}: no such file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes read before this chunk
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a character split by the previous read
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                # e.object is the pending bytes + this chunk; decoding it up to the bad byte raises read_text's message
                decode_utf8(e.object[: e.end], path, offset - pending)
                raise
            offset += len(data)
            if on_read is not None and data:
                on_read(len(data))
            if text:
                yield text
            if not data:
                return


# ---- JSON records ------------------------------------------------------------------------------

def read_json_records(path: str | Path, what: str = "a JSON object") -> list[tuple[int, dict]]:
    """The records of a JSON list (``[{...}, ...]``) or a JSONL file (one object per line), each with the
    line it starts on, for messages.

    Every error names the file and the line: text that is not JSON, a record that is not an object
    (``what`` says what one should be), one object where a list of records was meant, no records at all.
    """
    path = Path(path)
    text = read_text(path).removeprefix("\ufeff")  # a byte-order mark some editors write
    records = _json_list(text, path) if text.lstrip().startswith("[") else _json_lines(text, path)
    if len(records) == 1:
        _refuse_wrapped_list(records[0][1], path)
    if not records:
        raise GptlabError(f"{path}: no records; expected a JSON list of records or one record per line, "
                          f"each {what}")
    for i, (line, record) in enumerate(records):
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise GptlabError(f"{path} line {line}: record {i} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, "
                              f"not {what}")
    return records


def _json_list(text: str, path: Path) -> list[tuple[int, object]]:
    """A JSON array read one element at a time, so that each record knows the line it starts on."""
    decoder, blank = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    records, line, counted = [], 1, 0
    try:
        pos = blank.match(text, text.index("[") + 1).end()
        empty = text.startswith("]", pos)
        while not empty:
            line += text.count("\n", counted, pos)  # counted incrementally: linear in the file's size
            counted = pos
            record, end = decoder.raw_decode(text, pos)
            records.append((line, record))
            pos = blank.match(text, end).end()
            if text.startswith("]", pos):
                break
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            pos = blank.match(text, pos + 1).end()
        rest = blank.match(text, pos + 1).end()
        if rest != len(text):
            raise json.JSONDecodeError("Extra data", text, rest)
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return records


def _json_lines(text: str, path: Path) -> list[tuple[int, object]]:
    # split on "\n" only: str.splitlines also cuts at U+2028, which JSON allows unescaped inside a string
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            _refuse_one_object(text, path)
            raise GptlabError(f"{path}: line {n} is not valid JSON ({e.msg}, column {e.colno}); "
                              "expected a JSON list of records or one JSON object per line") from None
    return records


def _refuse_wrapped_list(record: object, path: Path) -> None:
    """One object on one line that holds the records in a list (``{"data": [{...}, ...]}``): name the key."""
    if not isinstance(record, dict):
        return
    lists = [k for k, v in record.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if lists:
        raise GptlabError(f"{path}: one JSON object holding the records under {lists[0]!r}, not a list of records; "
                          f"give the list itself ([{{...}}, {{...}}]), e.g. `jq '.{lists[0]}' {path.name} > records.json`")
    if len(record) > 1 and all(isinstance(v, dict) for v in record.values()):
        raise GptlabError(f"{path}: one JSON object of records keyed by name, not a list of records; give a list "
                          f"([{{...}}, {{...}}]), e.g. `jq '[.[]]' {path.name} > records.json`")


def _refuse_one_object(text: str, path: Path) -> None:
    """A pretty-printed object spanning lines is neither a list nor JSONL: say so, not 'line 1 is not JSON'."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(whole, dict):
        raise GptlabError(f"{path}: one JSON object, not a list of records; put the records in a list "
                          "[{...}, {...}] or write one object per line (JSONL)")
