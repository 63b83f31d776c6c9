"""A contributor's own text: files, folders, ``.gz`` files and JSON Lines, read into
documents and split train / held-out by a hash of each document's content
(docs/data.md, "A contributor's own text"; the CLI's ``--data``).

What a PATH may be (``read_documents``):

- a text file: one document;
- a folder: walked recursively in sorted order, hidden files and folders (``.git``)
  skipped; every file in it is read as below;
- a ``.gz`` file: decompressed as it is read; ``x.jsonl.gz`` is JSON Lines, anything
  else ``.gz`` is text;
- a JSON Lines file (``.jsonl``, ``.ndjson``): one document per line, the string in
  ``text_field`` (default ``text``). A line that is not JSON is an error (the file is
  corrupt); a line without that field is skipped and counted; a file where no line has
  it is an error that lists the fields it does have.

A file with a NUL byte in its first 8 KiB is binary: skipped and counted, never an error
(a folder of notes may hold a PDF). Bytes that are not UTF-8 are replaced by U+FFFD and
counted, or refused with ``strict_utf8``. Newlines become ``\\n``. Empty documents and
exact duplicates (same text) are dropped and counted.

The split (``split_documents``): a document is held out iff
``sha256("heldout:" + text) < heldout_fraction * 2^256``. It depends on the text alone, so
a document lands on the same side whatever else is read with it, in any order, and two
copies of one text can never sit on both sides. When the hash puts every document on one
side, the one closest to the threshold crosses over; a single document is split by
passage instead, with the same rule.

Every problem is a ``DataError`` whose message is one line that names the path.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelcore.data.corpus import chunk_text

__all__ = [
    "DataError",
    "Document",
    "ReadReport",
    "Split",
    "passages",
    "read_documents",
    "split_documents",
]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# A NUL byte this early means a binary file (the heuristic of git and grep).
_SNIFF_BYTES = 8192
REPLACEMENT = "\ufffd"
# Passages a held-out document is cut into for evaluation and samples.
PASSAGE_BYTES = 2048


class DataError(ValueError):
    """Input text that cannot be used; the message is one line naming the path."""


@dataclass(frozen=True)
class Document:
    id: str  # the path as given (joined with the file's place in a folder), "FILE:LINE" in JSONL
    text: str


@dataclass
class ReadReport:
    """What reading the paths found, for the summary a contributor sees."""

    files: int = 0  # files read (binary ones not counted)
    documents: int = 0  # documents kept
    bytes: int = 0  # UTF-8 bytes of the documents kept
    binary_files: int = 0  # skipped: NUL bytes
    binary_examples: list[str] = field(default_factory=list)
    replaced: int = 0  # invalid UTF-8 sequences replaced by U+FFFD
    replaced_files: int = 0
    empty: int = 0  # empty or whitespace-only documents dropped
    duplicates: int = 0  # exact duplicate texts dropped
    missing_field: int = 0  # JSON Lines lines without the text field

    def to_dict(self) -> dict[str, object]:
        return {
            "files": self.files,
            "documents": self.documents,
            "bytes": self.bytes,
            "binary_files_skipped": self.binary_files,
            "invalid_utf8_replaced": self.replaced,
            "files_with_invalid_utf8": self.replaced_files,
            "empty_documents_skipped": self.empty,
            "duplicate_documents_skipped": self.duplicates,
            "jsonl_lines_without_field": self.missing_field,
        }


def _describe(path: Path) -> str:
    return os.fspath(path)


def _files_under(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(JSONL_SUFFIXES)


def _read_bytes(path: Path, max_file_bytes: int | None) -> bytes:
    """The file's bytes (decompressed for ``.gz``), at most ``max_file_bytes`` of them."""
    limit = -1 if max_file_bytes is None else max_file_bytes + 1
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read(limit)
        else:
            with open(path, "rb") as fh:
                raw = fh.read(limit)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{_describe(path)}: not a readable gzip file ({exc})") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{_describe(path)}: is a directory") from exc
    except PermissionError as exc:
        raise DataError(f"{_describe(path)}: permission denied") from exc
    except OSError as exc:
        raise DataError(f"{_describe(path)}: cannot read it ({exc.strerror or exc})") from exc
    if max_file_bytes is not None and len(raw) > max_file_bytes:
        raise DataError(
            f"{_describe(path)}: more than {max_file_bytes} bytes"
            f"{' once decompressed' if path.name.lower().endswith('.gz') else ''}; "
            "split it into smaller files"
        )
    return raw


def _decode(raw: bytes, where: str, strict: bool, report: ReadReport) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if strict:
            raise DataError(
                f"{where}: not UTF-8 (byte {exc.start} is 0x{raw[exc.start]:02x}); "
                "convert it, or drop --strict-utf8 to replace such bytes"
            ) from exc
        before = raw.count(REPLACEMENT.encode("utf-8"))
        text = raw.decode("utf-8", errors="replace")
        n = text.count(REPLACEMENT) - before
        report.replaced += n
        report.replaced_files += 1
    if text.startswith("\ufeff"):  # a byte-order mark is not text
        text = text[1:]
    return text.replace("\r\n", "\n")


def _jsonl_documents(
    raw: bytes, where: str, text_field: str, strict: bool, report: ReadReport
) -> list[Document]:
    text = _decode(raw, where, strict, report)
    docs: list[Document] = []
    seen_fields: set[str] = set()
    lines = 0
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        lines += 1
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise DataError(
                f"{where}:{n}: not JSON ({exc.__class__.__name__}); a JSON Lines file holds "
                "one JSON object per line"
            ) from exc
        value = obj.get(text_field) if isinstance(obj, dict) else None
        if isinstance(obj, dict):
            seen_fields.update(str(k) for k in obj)
        if not isinstance(value, str):
            report.missing_field += 1
            continue
        docs.append(Document(f"{where}:{n}", value.replace("\r\n", "\n")))
    if lines and not docs:
        shown = ", ".join(sorted(seen_fields)[:8]) or "none: the lines are not objects"
        raise DataError(
            f"{where}: no line has a string field {text_field!r} (fields found: {shown}); "
            "pass --text-field NAME"
        )
    return docs


def read_documents(
    paths: Sequence[str | os.PathLike[str]],
    *,
    text_field: str = "text",
    strict_utf8: bool = False,
    max_file_bytes: int | None = 256 * 1024 * 1024,
) -> tuple[list[Document], ReadReport]:
    """The documents of ``paths`` (see the module docstring) and what reading found.

    Raises ``DataError`` for a path that does not exist, an unreadable file, a corrupt
    ``.gz`` or JSON Lines file, non-UTF-8 bytes under ``strict_utf8``, and when no
    document with text is left at all."""
    if not paths:
        raise DataError("no data paths given")
    if not text_field:
        raise DataError("the JSON Lines text field name is empty")
    report = ReadReport()
    docs: list[Document] = []
    seen: set[str] = set()
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise DataError(f"{_describe(root)}: no such file or directory")
        files = list(_files_under(root)) if root.is_dir() else [root]
        for path in files:
            if not path.is_file():
                continue  # a socket, a FIFO, a dangling link
            raw = _read_bytes(path, max_file_bytes)
            if b"\0" in raw[:_SNIFF_BYTES]:
                report.binary_files += 1
                if len(report.binary_examples) < 3:
                    report.binary_examples.append(_describe(path))
                continue
            report.files += 1
            where = _describe(path)
            if _is_jsonl(path):
                found = _jsonl_documents(raw, where, text_field, strict_utf8, report)
            else:
                found = [Document(where, _decode(raw, where, strict_utf8, report))]
            for doc in found:
                if not doc.text.strip():
                    report.empty += 1
                elif doc.text in seen:
                    report.duplicates += 1
                else:
                    seen.add(doc.text)
                    docs.append(doc)
    if not docs:
        raise DataError(_nothing_readable(paths, report))
    report.documents = len(docs)
    report.bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    return docs, report


def _nothing_readable(paths: Sequence[str | os.PathLike[str]], report: ReadReport) -> str:
    named = ", ".join(os.fspath(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    why = []
    if report.binary_files:
        why.append(f"{report.binary_files} binary file(s) skipped")
    if report.empty:
        why.append(f"{report.empty} empty document(s)")
    if report.missing_field:
        why.append(f"{report.missing_field} JSON Lines line(s) without the text field")
    if not report.files and not report.binary_files:
        why.append("no files")
    return (
        f"{named}: no readable text ({'; '.join(why) or 'nothing found'}); give text files, "
        "folders of them, .gz text or JSON Lines"
    )


def _heldout_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(b"heldout:" + text.encode("utf-8")).digest(), "big")


@dataclass(frozen=True)
class Split:
    train: list[Document]
    heldout: list[Document]
    by_passage: bool  # a single document, split by passage

    def sizes(self) -> dict[str, int]:
        def nbytes(docs: list[Document]) -> int:
            return sum(len(d.text.encode("utf-8")) for d in docs)

        return {
            "train_documents": len(self.train),
            "heldout_documents": len(self.heldout),
            "train_bytes": nbytes(self.train),
            "heldout_bytes": nbytes(self.heldout),
        }


def split_documents(
    docs: Sequence[Document], heldout_fraction: float, *, passage_bytes: int = PASSAGE_BYTES
) -> Split:
    """Train / held-out by content hash (module docstring). ``heldout_fraction`` in (0, 1)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise DataError(f"the held-out share must be between 0 and 1, not {heldout_fraction}")
    docs = list(docs)
    if not docs:
        raise DataError("no documents to split")
    by_passage = len(docs) == 1
    if by_passage:
        (only,) = docs
        pieces = [p for p in chunk_text(only.text, passage_bytes) if p.strip()]
        docs = [Document(f"{only.id}#{i}", p) for i, p in enumerate(pieces)]
        if len(docs) < 2:
            raise DataError(
                f"{only.id}: too little text to hold any out "
                f"({len(only.text.encode('utf-8'))} bytes): the held-out split needs at least "
                f"two documents, or one longer than {passage_bytes} bytes"
            )
    threshold = int(heldout_fraction * (1 << 256))
    keyed = [(_heldout_key(d.text), d) for d in docs]
    heldout = [d for k, d in keyed if k < threshold]
    train = [d for k, d in keyed if k >= threshold]
    if not heldout or not train:
        # The document nearest the threshold crosses: the least arbitrary choice that
        # keeps the rule "held out by content", and it does not depend on file order.
        nearest = min(keyed, key=lambda kd: abs(kd[0] - threshold))[1]
        if not heldout:
            heldout = [nearest]
            train = [d for d in train if d is not nearest]
        else:
            train = [nearest]
            heldout = [d for d in heldout if d is not nearest]
    return Split(train, heldout, by_passage)


def passages(docs: Sequence[Document], passage_bytes: int = PASSAGE_BYTES) -> list[str]:
    """The documents cut into passages of at most ``passage_bytes`` (blank ones dropped)."""
    return [p for d in docs for p in chunk_text(d.text, passage_bytes) if p.strip()]
