"""A contributor's own text (modelcore/data/userdata.py): what a path may be, what is
skipped and counted, the errors, and the train / held-out split by content."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from modelcore.data.userdata import (
    DataError,
    Document,
    passages,
    read_documents,
    split_documents,
)


def _words(seed: int, n: int = 60) -> str:
    rng = random.Random(seed)
    vocab = ["river", "stone", "lamp", "orchard", "signal", "copper", "meadow", "thread"]
    return " ".join(rng.choice(vocab) for _ in range(n)) + f" ({seed})\n"


def test_a_folder_is_walked_recursively_with_gz_and_jsonl(tmp_path):
    root = tmp_path / "notes"
    (root / "a" / "b").mkdir(parents=True)
    (root / "one.txt").write_text("first note\n")
    (root / "a" / "two.md").write_text("second note\r\nwith a CRLF\r\n")
    with gzip.open(root / "a" / "b" / "three.txt.gz", "wt") as fh:
        fh.write("third note, compressed\n")
    lines = [{"body": "fourth", "id": 1}, {"body": "fifth", "id": 2}, {"id": 3}]
    (root / "a" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with gzip.open(root / "rows2.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"body": "sixth"}) + "\n")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("never read\n")

    docs, report = read_documents([root], text_field="body")

    texts = sorted(d.text for d in docs)
    assert texts == sorted([
        "first note\n", "second note\nwith a CRLF\n", "third note, compressed\n",
        "fourth", "fifth", "sixth",
    ])  # fmt: skip
    assert report.files == 5  # two JSON Lines files, three text files; .hidden skipped
    assert report.documents == 6
    assert report.bytes == sum(len(t.encode()) for t in texts)
    assert report.missing_field == 1  # {"id": 3}
    assert any(d.id.endswith("rows.jsonl:2") for d in docs)


def test_binary_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "text.txt").write_text("plain words\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    docs, report = read_documents([tmp_path])
    assert [d.text for d in docs] == ["plain words\n"]
    assert report.binary_files == 1
    assert report.binary_examples == [str(tmp_path / "image.png")]
    assert report.to_dict()["binary_files_skipped"] == 1


def test_invalid_utf8_is_replaced_and_counted_or_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 cr\u00e8me, na\u00efve\n".encode("latin-1"))
    (tmp_path / "fine.txt").write_text("caf\u00e9 \ufffd already there\n")
    docs, report = read_documents([tmp_path])
    by_name = {Path(d.id).name: d.text for d in docs}
    assert by_name["latin1.txt"] == "caf\ufffd cr\ufffdme, na\ufffdve\n"
    assert report.replaced == 3  # a U+FFFD the file already had is not counted
    assert report.replaced_files == 1
    with pytest.raises(
        DataError, match=r"latin1\.txt: not UTF-8 \(byte 3 is 0xe9\).*--strict-utf8"
    ):
        read_documents([tmp_path], strict_utf8=True)


def test_duplicates_and_empty_documents_are_dropped_and_counted(tmp_path):
    for name, text in (("a.txt", "same\n"), ("b.txt", "same\n"), ("c.txt", " \n\t\n"),
                       ("d.txt", ""), ("e.txt", "other\n")):  # fmt: skip
        (tmp_path / name).write_text(text)
    docs, report = read_documents([tmp_path, tmp_path / "e.txt"])  # e.txt twice
    assert sorted(d.text for d in docs) == ["other\n", "same\n"]
    assert report.duplicates == 2
    assert report.empty == 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.txt", r"missing\.txt: no such file or directory"),
        (
            lambda p: (p / "cut.gz").write_bytes(gzip.compress(b"x" * 5000)[:20]) and p / "cut.gz",
            r"cut\.gz: not a readable gzip file \(Compressed file ended",
        ),
        (
            lambda p: (p / "plain.gz").write_text("not compressed\n") and p / "plain.gz",
            r"plain\.gz: not a readable gzip file \(Not a gzipped file",
        ),
        (
            lambda p: (
                (p / "rows.jsonl").write_text('{"body": "x"}\n{"title": "y"}\n')
                and p / "rows.jsonl"
            ),
            r"rows\.jsonl: no line has a string field 'text' \(fields found: body, title\); "
            r"pass --text-field NAME",
        ),
        (
            lambda p: (
                (p / "bad.jsonl").write_text('{"text": "x"}\n{"text": \n') and p / "bad.jsonl"
            ),
            r"bad\.jsonl:2: not JSON",
        ),
        (
            lambda p: (p / "blob.bin").write_bytes(b"\0\1\2" * 10) and p / "blob.bin",
            r"blob\.bin: no readable text \(1 binary file\(s\) skipped\)",
        ),
        (
            lambda p: (p / "empty.txt").write_text("\n\n") and p,
            r"no readable text \(1 empty document\(s\)\)",
        ),
    ],
    ids=["missing", "cut-gz", "plain-gz", "jsonl-field", "jsonl-not-json", "binary-only", "empty"],
)
def test_unusable_input_is_one_line_naming_the_path(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as caught:
        read_documents([make(tmp_path)])
    assert "\n" not in str(caught.value)


def test_the_split_depends_on_each_text_alone(tmp_path):
    docs = [Document(f"d{i}", _words(i)) for i in range(200)]
    split = split_documents(docs, 0.2)
    held = {d.text for d in split.heldout}
    assert 20 <= len(held) <= 60  # about a fifth
    assert not held & {d.text for d in split.train}
    assert len(split.train) + len(split.heldout) == 200
    # Any order, any company: a document lands on the same side.
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert {d.text for d in split_documents(shuffled, 0.2).heldout} == held
    some = split_documents([*docs[:120], Document("new", _words(999))], 0.2)
    assert {d.text for d in some.heldout} - {_words(999)} == held & {d.text for d in docs[:120]}
    # Ids (paths) do not matter, only the text does.
    renamed = [Document(f"elsewhere/{i}", d.text) for i, d in enumerate(docs)]
    assert {d.text for d in split_documents(renamed, 0.2).heldout} == held
    # A larger share only adds documents to the held-out side.
    assert held < {d.text for d in split_documents(docs, 0.4).heldout}


def test_every_side_gets_a_document_and_the_share_is_checked():
    docs = [Document(f"d{i}", _words(i)) for i in range(3)]
    for share in (0.01, 0.99):
        split = split_documents(docs, share)
        assert split.train
        assert split.heldout
    for share in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(DataError, match="between 0 and 1"):
            split_documents(docs, share)


def test_a_single_document_is_split_by_passage():
    text = "".join(_words(i, 40) for i in range(200))  # ~60 KB, ~30 passages of 2 KiB
    split = split_documents([Document("book.txt", text)], 0.2)
    assert split.by_passage
    assert split.train
    assert split.heldout
    assert all(d.id.startswith("book.txt#") for d in split.train + split.heldout)
    pieces = passages([Document("book.txt", text)])
    assert sorted(d.text for d in split.train + split.heldout) == sorted(pieces)
    assert all(len(p.encode()) <= 2048 for p in pieces)
    with pytest.raises(DataError, match=r"short\.txt: too little text to hold any out \(6 bytes\)"):
        split_documents([Document("short.txt", "words\n")], 0.2)
