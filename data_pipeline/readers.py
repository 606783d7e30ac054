"""Input discovery and whole-document readers.

Inputs are files, directories and globs, on the local disk or behind a pyarrow filesystem URI (s3://,
gs://, hdfs://, file://). Formats: ``.txt`` in the BERT format (one sentence or paragraph per line, a
blank line between documents), ``.jsonl`` (a text field), ``.parquet`` (a text column), and local
Hugging Face ``datasets`` directories (``save_to_disk``); ``.gz`` and ``.zst`` compression.

Readers stream: a file is never read into memory whole, a document is bounded by ``max_document_bytes``
and a ``.txt`` line by ``max_line_bytes``. Anything unreadable is yielded as a skipped document with its
reason, so it is counted rather than lost.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_BINARY_PROBE_BYTES = 8192
_READ_ERRORS = (OSError, pa.ArrowException, EOFError, ValueError)
"""What reading a corrupt, truncated or unreadable file raises."""


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is, how to read it, and its size (part of the dataset's fingerprint)."""

    uri: str
    format: str
    compression: str | None
    size: int


@dataclass(frozen=True)
class ReadLimits:
    text_field: str = "text"
    max_line_bytes: int = 1 << 20
    max_document_bytes: int = 32 << 20


def _split_uri(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
            raise ValueError(f"input {path!r}: {' '.join(str(err).split())}") from None
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _join_uri(original: str, fs_path: str) -> str:
    if "://" in original:
        scheme = original.split("://", 1)[0]
        return f"{scheme}://{fs_path.lstrip('/')}" if scheme != "file" else f"file://{fs_path}"
    return fs_path


def classify(path: str) -> tuple[str, str | None] | None:
    """(format, compression) from a file name, or None when the extension is not supported."""
    suffixes = PurePosixPath(path).suffixes
    compression = COMPRESSIONS.get(suffixes[-1].lower()) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1].lower()) if suffixes else None
    if fmt is None or (fmt in ("parquet", "arrow") and compression):
        return None
    return fmt, compression


def _hf_dataset_files(fs: pafs.FileSystem, root: str) -> list[str] | None:
    """The Arrow files of a ``save_to_disk`` directory (Dataset or DatasetDict), in their order."""

    def read_json(path: str) -> dict | None:
        try:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            return None

    state = read_json(f"{root}/state.json")
    if state is not None and "_data_files" in state:
        return [f"{root}/{entry['filename']}" for entry in state["_data_files"]]
    splits = read_json(f"{root}/dataset_dict.json")
    if splits is not None and "splits" in splits:
        files: list[str] = []
        for split in splits["splits"]:
            files += _hf_dataset_files(fs, f"{root}/{split}") or []
        return files
    return None


def discover(paths: Sequence[str]) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """Expands inputs into readable files, in a deterministic order.

    Returns the files and the (path, reason) of files passed over inside directories. A named input that
    does not exist or has an unsupported extension is an error naming it.
    """
    if not paths:
        raise ValueError("no --input given")
    files: list[InputFile] = []
    skipped: list[tuple[str, str]] = []
    for original in paths:
        fs, fs_path = _split_uri(original)
        if any(ch in fs_path for ch in "*?["):
            matches = _glob(fs, fs_path, original)
            if not matches:
                raise FileNotFoundError(f"input {original!r}: the pattern matches no file")
            for match in matches:
                _add_file(files, skipped, fs, match, original, explicit=False)
            continue
        info = fs.get_file_info(fs_path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input {original!r}: no such file or directory")
        if info.type == pafs.FileType.Directory:
            hf_files = _hf_dataset_files(fs, fs_path.rstrip("/"))
            if hf_files is not None:
                for member in hf_files:
                    size = fs.get_file_info(member).size or 0
                    files.append(InputFile(_join_uri(original, member), "arrow", None, size))
                continue
            selector = pafs.FileSelector(fs_path, recursive=True)
            entries = sorted(
                (e for e in fs.get_file_info(selector) if e.type == pafs.FileType.File), key=lambda e: e.path
            )
            if not entries:
                raise ValueError(f"input {original!r}: the directory holds no file")
            for entry in entries:
                _add_file(files, skipped, fs, entry.path, original, explicit=False)
        else:
            _add_file(files, skipped, fs, fs_path, original, explicit=True)
    if not files:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise ValueError(f"no readable input among {list(paths)} ({reasons})")
    return files, skipped


def _glob(fs: pafs.FileSystem, pattern: str, original: str) -> list[str]:
    if isinstance(fs, pafs.LocalFileSystem):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    static = pattern
    while any(ch in static for ch in "*?["):
        static = static.rsplit("/", 1)[0]
    entries = fs.get_file_info(pafs.FileSelector(static, recursive=True, allow_not_found=True))
    return sorted(
        e.path for e in entries if e.type == pafs.FileType.File and fnmatch.fnmatch(e.path, pattern)
    )


def _add_file(
    files: list[InputFile],
    skipped: list[tuple[str, str]],
    fs: pafs.FileSystem,
    fs_path: str,
    original: str,
    *,
    explicit: bool,
) -> None:
    uri = original if explicit else _join_uri(original, fs_path)
    kind = classify(fs_path)
    if kind is None:
        if explicit:
            supported = ", ".join([*FORMATS, "(optionally .gz or .zst)", "a datasets directory"])
            raise ValueError(f"input {original!r}: unsupported file type (supported: {supported})")
        skipped.append((uri, "unsupported file type"))
        return
    size = fs.get_file_info(fs_path).size or 0
    files.append(InputFile(uri, kind[0], kind[1], size))


def check_named_files(files: Sequence[InputFile], paths: Sequence[str]) -> None:
    """Fails, naming the file, when a file named as an input (not found in a directory or by a glob) holds
    no text at all: empty, binary, not UTF-8, or not readable through its compression. Inside a directory
    such files are skipped and counted instead. Reads at most the first ``_BINARY_PROBE_BYTES`` of each."""
    named = set(paths)
    for item in files:
        if item.uri in named:
            _check_named_file(item)


def _check_named_file(item: InputFile) -> None:
    where = f"input {item.uri!r}"
    if item.size == 0:
        raise ValueError(f"{where}: empty file")
    try:
        if item.format == "parquet":
            with _open(item) as raw:
                pq.ParquetFile(raw)  # reads the footer
            return
        if item.format not in ("txt", "jsonl"):
            return
        with _open(item) as raw:
            head = raw.read(_BINARY_PROBE_BYTES)
    except _READ_ERRORS as err:
        kind = f"{item.compression}-compressed {item.format}" if item.compression else item.format
        raise ValueError(f"{where}: unreadable as {kind} ({_reason(err)})") from None
    if not head:
        raise ValueError(f"{where}: empty file (after decompression)")
    if _looks_binary(head):
        raise ValueError(f"{where}: a binary file (NUL bytes in its first {len(head)} bytes), not text")
    lines = head.split(b"\n")
    whole = len(head) < _BINARY_PROBE_BYTES
    if not whole:
        lines = lines[:-1]  # may end inside a character
    lines = [line for line in lines if line.strip()]
    if whole and not lines:
        raise ValueError(f"{where}: holds only blank lines, no text")
    if lines and not any(_is_utf8(line) for line in lines):
        raise ValueError(f"{where}: not UTF-8 text (no line of its first {len(head)} bytes decodes as UTF-8)")


def _looks_binary(head: bytes) -> bool:
    """A file whose first bytes (at most ``_BINARY_PROBE_BYTES``) hold a NUL byte is binary, not text."""
    return b"\x00" in head


def _reason(err: BaseException) -> str:
    """An error's message on one line, at most 200 characters."""
    return " ".join(str(err).split())[:200]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _open(item: InputFile) -> pa.NativeFile:
    fs, fs_path = _split_uri(item.uri)
    if item.format == "parquet":
        return fs.open_input_file(fs_path)  # Parquet reads its footer first: it needs random access
    return fs.open_input_stream(fs_path, compression=item.compression)


def read_documents(item: InputFile, limits: ReadLimits) -> Iterator[tuple[str, str]]:
    """Yields (text, skip_reason) per document of one file; exactly one of the two is empty."""
    try:
        if item.format == "txt":
            yield from _read_txt(item, limits)
        elif item.format == "jsonl":
            yield from _read_jsonl(item, limits)
        else:
            yield from _read_columnar(item, limits)
    except _READ_ERRORS as err:
        # A corrupt archive or an unreadable file ends that file's documents, counted with the reason.
        yield "", f"unreadable file: {_reason(err)}"


def _lines(item: InputFile, limit: int) -> Iterator[bytes | None]:
    """Lines without their newline; None stands for a line longer than ``limit`` (consumed, not kept).
    Raises ValueError for a binary file and yields nothing for an empty one."""
    with _open(item) as raw:
        reader = io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[arg-type]
        head = reader.peek(_BINARY_PROBE_BYTES)[:_BINARY_PROBE_BYTES]
        if _looks_binary(head):
            raise ValueError("binary file (NUL bytes)")
        while True:
            line = reader.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # drain the rest of the long line
                    line = reader.readline(1 << 20)
                yield None
                continue
            yield line.rstrip(b"\r\n")


def _read_txt(item: InputFile, limits: ReadLimits) -> Iterator[tuple[str, str]]:
    lines: list[str] = []
    size = 0
    reason = ""
    seen_any = False
    for raw in _lines(item, limits.max_line_bytes):
        seen_any = True
        if raw is not None and not raw.strip():
            if lines or reason:
                yield ("", reason) if reason else ("\n".join(lines), "")
            lines, size, reason = [], 0, ""
            continue
        if reason:
            continue
        if raw is None:
            reason, lines = f"line longer than max_line_bytes={limits.max_line_bytes}", []
            continue
        size += len(raw)
        if size > limits.max_document_bytes:
            reason, lines = f"document larger than max_document_bytes={limits.max_document_bytes}", []
            continue
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            reason, lines = "invalid UTF-8", []
    if lines or reason:
        yield ("", reason) if reason else ("\n".join(lines), "")
    if not seen_any:
        yield "", "empty file"


def _read_jsonl(item: InputFile, limits: ReadLimits) -> Iterator[tuple[str, str]]:
    seen_any = False
    for number, raw in enumerate(_lines(item, limits.max_document_bytes), start=1):
        seen_any = True
        if raw is None:
            yield "", f"document larger than max_document_bytes={limits.max_document_bytes}"
            continue
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except UnicodeDecodeError:
            yield "", "invalid UTF-8"
            continue
        except json.JSONDecodeError:
            yield "", f"invalid JSON (line {number})"
            continue
        text = record.get(limits.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            yield "", f"no string field {limits.text_field!r}"
            continue
        yield text, ""
    if not seen_any:
        yield "", "empty file"


def _read_columnar(item: InputFile, limits: ReadLimits) -> Iterator[tuple[str, str]]:
    field = limits.text_field
    with _open(item) as raw:
        if item.format == "parquet":
            parquet = pq.ParquetFile(raw)
            if field not in parquet.schema_arrow.names:
                yield "", f"no column {field!r}"
                return
            batches: Iterator[pa.RecordBatch] = parquet.iter_batches(columns=[field], batch_size=1024)
        else:
            stream = pa.ipc.open_stream(raw)
            if field not in stream.schema.names:
                yield "", f"no column {field!r}"
                return
            batches = (batch.select([field]) for batch in stream)
        seen_any = False
        for batch in batches:
            for text in batch.column(0).to_pylist():
                seen_any = True
                if not isinstance(text, str):
                    yield "", f"no string in column {field!r}"
                elif len(text) > limits.max_document_bytes:
                    yield "", f"document larger than max_document_bytes={limits.max_document_bytes}"
                else:
                    yield text, ""
        if not seen_any:
            yield "", "empty file"


def fingerprint_inputs(files: Sequence[InputFile]) -> list[dict[str, object]]:
    """What identifies the inputs in a manifest: URI, format, compression and size."""
    return [{"uri": f.uri, "format": f.format, "compression": f.compression, "bytes": f.size} for f in files]
