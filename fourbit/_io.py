"""File helpers shared by every part of fourbit: atomic files and folders, output checks, safe readers.

Every file fourbit writes goes to a temporary name in the same folder and is renamed into place, and every
finished folder (a quantized model, a checkpoint, a merged model, an index build) is written into a temporary
folder beside its destination and swapped in whole, so an interrupted run never leaves a half-written
checkpoint, adapter, config, cache or index that looks complete. Temporary names start with
:data:`TEMP_PREFIX` and carry the writer's process id: the next writer into the same folder removes those whose
process is gone (a run killed with SIGKILL cleans nothing up itself).

Files and folders are created with the modes the user's umask allows (0644/0755 under the usual 022), never
0600/0700, so a colleague or a service account can read a shared adapter or checkpoint.

Readers wrap the errors of their formats (safetensors, JSON, JSONL, text encodings) into
:class:`fourbit._errors.InputFileError`, which names the file and, where there is one, the line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError, InputFileError

__all__ = [
    "SafetensorsStreamWriter",
    "tensor_nbytes",
    "TEMP_PREFIX",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "load_safetensors",
    "read_json",
    "read_jsonl",
    "read_jsonl_lines",
    "remove_stale_temps",
    "replace_dir",
    "save_safetensors",
]

TEMP_PREFIX = ".fourbit-tmp-"


def _temp_name(final_name: str) -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{final_name}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders of fourbit writers in ``folder`` whose process is gone.

    Only names of fourbit's own making (:data:`TEMP_PREFIX` followed by a process id) are touched.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        pid_text = entry.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue  # not ours, or its writer is still running
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _with_path(err: OSError, path: Path) -> OSError:
    """The same OSError, naming ``path`` when it named no file (a failed write names none)."""
    if err.filename is None and err.errno is not None:
        return type(err)(err.errno, err.strerror or os.strerror(err.errno), str(path))
    return err


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    The file gets the mode the umask allows (``0o666 & ~umask``); a failed write (disk full, read-only
    folder) raises an ``OSError`` that names ``path`` and leaves no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / _temp_name(path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _with_path(err, path) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to a safetensors file atomically, one tensor at a time.

    ``safetensors.torch.save`` builds the whole file in memory first: for a 4-bit 8B model that is a second
    copy of 5.6 GB. Streaming through :class:`SafetensorsStreamWriter` keeps one tensor's bytes in flight;
    the tensors go in safetensors' own order (larger element size first, then by name), so the file reads the
    same everywhere. A failed write raises an ``OSError`` naming ``path`` and leaves no temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    writer = SafetensorsStreamWriter(path, [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in order],
                                     {"format": "pt", **(metadata or {})})
    try:
        for k in order:
            writer.write(k, tensors[k])
        return writer.close()
    except OSError as err:
        writer.abort()
        raise _with_path(err, path) from err
    except BaseException:
        writer.abort()
        raise


def load_safetensors(path: str | os.PathLike) -> dict:
    """Every tensor of a safetensors file, on the CPU.

    Raises:
        InputFileError: the file is missing, truncated, damaged or not safetensors (it names the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InputFileError(path, f"not a readable safetensors file ({err}); it may be truncated or "
                                   "damaged: write it again") from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in ``path``.

    Raises:
        InputFileError: missing, not UTF-8, or not JSON (it names the file and line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(path, "no such file") from None
    except UnicodeDecodeError as err:
        raise InputFileError(path, f"not UTF-8 text (byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputFileError(path, f"not valid JSON ({err.msg}, column {err.colno}); it may be truncated",
                             line=err.lineno) from None


def read_jsonl(path: str | os.PathLike, *, skip_torn_last_line: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-blank line (:func:`read_jsonl_lines` without the line
    numbers)."""
    return [row for _, row in read_jsonl_lines(path, skip_torn_last_line=skip_torn_last_line)]


def read_jsonl_lines(path: str | os.PathLike, *, skip_torn_last_line: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file (1-based line numbers).

    Args:
        path: the file.
        skip_torn_last_line: for logs appended to line by line (``metrics.jsonl``): a last line that is not
            valid JSON (the writer was killed mid-line) is dropped instead of raising.

    Raises:
        InputFileError: naming the file and line of a line that is not a JSON object or not UTF-8.
    """
    path = Path(path)
    rows = []
    try:
        raw_lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        raise InputFileError(path, "no such file") from None
    last = max((i for i, line in enumerate(raw_lines) if line.strip()), default=-1)
    for index, raw in enumerate(raw_lines):
        lineno = index + 1
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputFileError(path, f"not UTF-8 text (byte {err.start} of the line); save the file as "
                                       "UTF-8", line=lineno) from None
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if skip_torn_last_line and index == last:
                break
            raise InputFileError(path, f"malformed JSON line ({err.msg})", line=lineno) from None
        if not isinstance(row, dict):
            raise InputFileError(path, f"expected a JSON object, got {type(row).__name__}", line=lineno)
        rows.append((lineno, row))
    return rows


def _first_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    field: str = "out_dir",
    inputs: Sequence[str | os.PathLike] = (),
) -> Path:
    """Refuse an output folder that cannot or must not be written, before any work starts.

    Args:
        out: the output folder.
        overwrite: whether an existing, non-empty ``out`` may be replaced (only once the new one is complete).
        field: the caller's name of the argument, for the error.
        inputs: paths the job reads: ``out`` may be none of them, nor hold one, nor lie inside one.

    Raises:
        FieldError: ``out`` is a file, holds files and ``overwrite`` is false, is or holds an input, or lies
            where nothing can be written.
    """
    out = Path(out)
    resolved = out.resolve()
    if out.exists() and not out.is_dir():
        raise FieldError(field, f"{out} is a file, not a folder; choose a folder for `{field}`")
    for source in inputs:
        src = Path(source).resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise FieldError(field, f"{out} is, holds or lies inside the input {source}; writing there would "
                                    "replace what is being read: choose another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FieldError(field, f"{out} already holds files; choose another `{field}` or pass `overwrite` to "
                                "replace it")
    existing = _first_existing(out.parent if not out.exists() else out)
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(existing) else "permission denied"
        raise FieldError(field, f"cannot write into {existing} ({reason}); choose another folder")
    return out


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` is set aside first and deleted only
    once the new folder is in place, so there is never a moment without a complete ``out``."""
    tmp, out = Path(tmp), Path(out)
    backup = None
    if out.exists():
        backup = out.parent / _temp_name(out.name + ".old")
        os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        if backup is not None:
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Write a folder atomically: yield a fresh temporary folder beside ``out``; when the block ends without
    an exception it replaces ``out`` whole (:func:`replace_dir`), otherwise it is removed.

    Stale temporaries of killed fourbit runs in the same parent folder are removed first. Check the
    destination with :func:`check_output_dir` before the work starts; this only writes.

    Example::

        with atomic_dir(out) as tmp:
            save_safetensors(tensors, tmp / "model.safetensors")
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)
    tmp = out.parent / _temp_name(out.name)
    tmp.mkdir()  # mode 0o777 & ~umask
    try:
        yield tmp
        replace_dir(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT) and err.filename is None:
            raise _with_path(err, out) from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time, so that no more than one tensor is in memory.

    The format (a little-endian u64 header size, a JSON header giving each tensor's dtype, shape and byte range,
    then the bytes) needs every tensor's dtype and shape before the first byte: they are given up front, the
    header is written, and each tensor's bytes follow in that order as :meth:`write` receives them. The file is
    written under a temporary name and renamed by :meth:`close` only when every tensor was written.

    Args:
        path: the final file.
        entries: ``(name, torch dtype, shape)`` in the order the tensors will be written.
        metadata: string metadata for the header (transformers reads ``{"format": "pt"}``).

    Raises:
        ValueError: (``write``) a tensor out of order or of another dtype or shape than announced.
    """

    def __init__(self, path: str | os.PathLike, entries: list, metadata: dict[str, str] | None = None) -> None:
        import json

        self.path = Path(path)
        self.entries = list(entries)
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in self.entries:
            size = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": _SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")],
                            "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        self._tmp = self.path.with_name(_temp_name(self.path.name))
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by close() or abort()
        self._file.write(len(blob).to_bytes(8, "little") + blob)
        self._next = 0

    def write(self, name: str, tensor) -> None:
        """Append the next tensor's bytes (contiguous, on the CPU)."""
        want_name, dtype, shape = self.entries[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path.name}: expected {want_name} {dtype} {tuple(shape)}, got {name} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        import torch

        data = tensor.detach().to("cpu").contiguous()
        self._file.write(memoryview(data.view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> Path:
        """Finish: every announced tensor must have been written; the file is synced and renamed into place."""
        if self._next != len(self.entries):
            self.abort()
            raise ValueError(f"{self.path.name}: {len(self.entries) - self._next} announced tensors were not written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def tensor_nbytes(dtype, shape) -> int:
    """Bytes of a tensor of ``dtype`` and ``shape``, without making it."""
    import torch

    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= int(d)
    return n
