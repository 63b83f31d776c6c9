"""``agora data discover``: the domains of a contributor's own corpus, found by clustering
its documents (c-BTM), written as one folder per cluster that ``agora expert train --data
DIR/cluster-K`` reads back exactly.

What DIR holds, the order of the clusters, the file names and the hierarchy's parents:
docs/data.md, "Discover domains in your own corpus". The clustering itself is
modelcore/data/discovery.py (TF-IDF, truncated SVD, balanced k-means or a Ward tree).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agora.common import LOCAL_PANEL, echo_err, require_extra
from agora.modeling import Seed, StrictUtf8, TextField

if TYPE_CHECKING:
    from modelcore.data.discovery import DomainDiscovery
    from modelcore.data.userdata import Document, ReadReport

FORMAT = "agora.clusters/1"
CLUSTERS_FILE = "clusters.json"
DISCOVERY_FILE = "discovery.safetensors"
CLUSTER_PREFIX = "cluster-"
PARENT_PREFIX = "parent-"
TOP_TERMS = 8
TOP_TERMS_BY = (
    "mean TF-IDF weight over its documents minus the mean over all other documents, highest first"
)
# Ward keeps n^2/2 pairwise distances: 10,000 documents took 14 s and 0.9 GB of memory
# here, and both grow as n^2, so 20,000 need about four times that (docs/data.md,
# "Discover domains in your own corpus").
HIERARCHY_MAX_DOCUMENTS = 20_000
MAX_NAME_CHARS = 100
# A code point the reader cannot give back as written: NUL (a NUL in a file's first 8 KiB
# makes it binary) and lone surrogates (not encodable as UTF-8).
_UNWRITABLE = re.compile("[\x00\ud800-\udfff]")

PathsArgument = Annotated[
    list[Path],
    typer.Argument(
        metavar="PATH",
        help="Your text: files, folders (recursive), .gz, or .jsonl (one document a line).",
    ),
]


@dataclass(frozen=True)
class _Group:
    """A cluster or a parent: its folder and the indices of its documents."""

    folder: str
    members: list[int]


def _fail(message: str) -> typer.Exit:
    echo_err(f"error: {message}")
    return typer.Exit(2)


# -- checks before any work ------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a directory", param_hint="--out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise typer.BadParameter(
            f"{out} is not empty (pass --overwrite to replace an earlier discovery there)",
            param_hint="--out",
        )
    try:
        earlier = json.loads((out / CLUSTERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("format") != FORMAT:
        # --overwrite removes folders: only ones this command wrote.
        raise typer.BadParameter(
            f"{out} is not empty and holds no {CLUSTERS_FILE} of `agora data discover`, "
            "so --overwrite leaves it alone; choose a new or empty directory",
            param_hint="--out",
        )


def _check_apart(paths: Sequence[Path], out: Path) -> None:
    """--out must not lie inside an input (a second run would read the first's output) nor
    hold one (--overwrite would delete the input)."""
    target = out.resolve()
    for path in paths:
        source = path.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise typer.BadParameter(
                f"{out} overlaps the input {path}; write the clusters somewhere else",
                param_hint="--out",
            )


def _parent_level(k: int, hierarchy: bool, parents: int | None) -> int | None:
    if not hierarchy:
        if parents is not None:
            raise typer.BadParameter("needs --hierarchy", param_hint="--parents")
        return None
    level = max(1, k // 2) if parents is None else parents
    if not 1 <= level < k:
        raise typer.BadParameter(
            f"must be at least 1 and below --k ({k}): parents are a coarser cut of the same tree",
            param_hint="--parents",
        )
    return level


# -- documents ------------------------------------------------------------------------------


def _read(
    paths: Sequence[Path], text_field: str, strict_utf8: bool
) -> tuple[list[Document], ReadReport]:
    from modelcore.data.userdata import DataError, read_documents

    started = time.perf_counter()
    try:
        docs, report = read_documents(paths, text_field=text_field, strict_utf8=strict_utf8)
    except DataError as exc:
        raise _fail(str(exc)) from exc
    found = f"{report.documents} documents, {report.bytes:,} bytes from {report.files} file(s)"
    if report.binary_files:
        found += f"; {report.binary_files} binary file(s) skipped"
    if report.replaced:
        found += f"; {report.replaced} invalid UTF-8 sequence(s) replaced"
    echo_err(f"read: {found} ({time.perf_counter() - started:.1f}s)")
    return docs, report


def _writable(docs: Sequence[Document], split_bytes: int | None) -> list[Document]:
    """The documents as they will be written and read back: cut into passages when asked,
    NUL and lone surrogates replaced by U+FFFD, a leading byte-order mark dropped (the
    reader drops it), and repeats of a text dropped (the reader drops those too)."""
    from modelcore.data.corpus import chunk_text
    from modelcore.data.userdata import Document

    units: list[Document] = []
    for doc in docs:
        pieces = [doc.text]
        if split_bytes is not None:
            pieces = [p for p in chunk_text(doc.text, split_bytes) if p.strip()]
        if len(pieces) == 1:
            units.append(doc if pieces[0] == doc.text else Document(doc.id, pieces[0]))
        else:
            units += [Document(f"{doc.id}#{i}", p) for i, p in enumerate(pieces)]
    kept: list[Document] = []
    seen: set[str] = set()
    altered = repeated = 0
    for unit in units:
        text = _UNWRITABLE.sub("\ufffd", unit.text).removeprefix("\ufeff")
        if text != unit.text:
            altered += 1
        if not text.strip():
            continue
        if text in seen:
            repeated += 1
            continue
        seen.add(text)
        kept.append(unit if text == unit.text else Document(unit.id, text))
    if split_bytes is not None:
        echo_err(f"passages: {len(kept)} of at most {split_bytes:,} bytes")
    if altered:
        echo_err(f"note: {altered} document(s) had NUL or unpaired surrogates, written as U+FFFD")
    if repeated:
        echo_err(f"note: {repeated} repeated text(s) written once")
    return kept


def file_names(ids: Sequence[str]) -> list[str]:
    """One file name per document id, unique ignoring case: the id's path below the
    directory all ids share, with every run of characters outside ``A-Za-z0-9._-`` turned
    into ``_``, no leading dot (the reader skips hidden files), at most ``MAX_NAME_CHARS``
    (the end kept), ending in ``.txt`` (so ``x.jsonl:3`` or ``y.gz`` is read as text)."""
    parts = [i.split("/") for i in ids]
    shared = 0
    if parts:
        # Directories only: the last component always stays.
        shortest = min(len(p) for p in parts) - 1
        while shared < shortest and len({p[shared] for p in parts}) == 1:
            shared += 1
    names: list[str] = []
    used: set[str] = set()
    for p in parts:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", "/".join(p[shared:])).lstrip("._-") or "doc"
        if name.lower().endswith(".txt"):
            name = name[:-4]
        name = name[-(MAX_NAME_CHARS - 12) :].lstrip("._-") or "doc"
        candidate, n = f"{name}.txt", 1
        while candidate.lower() in used:
            n += 1
            candidate = f"{name}-{n}.txt"
        used.add(candidate.lower())
        names.append(candidate)
    return names


# -- clustering -----------------------------------------------------------------------------


def _cluster(
    texts: list[str], k: int, *, hierarchy: bool, seed: int, split_bytes: int | None
) -> DomainDiscovery:
    from modelcore.data.discovery import discover_domains

    what = "passage" if split_bytes is not None else "document"
    if k > len(texts):
        what += "" if len(texts) == 1 else "s"
        hint = "lower --k or --split-passages" if split_bytes else "lower --k, or cut them"
        if split_bytes is None:
            hint += " into passages with --split-passages BYTES"
        raise _fail(f"--k {k} is more than the {len(texts)} {what} read; {hint}")
    if hierarchy and len(texts) > HIERARCHY_MAX_DOCUMENTS:
        raise _fail(
            f"--hierarchy clusters at most {HIERARCHY_MAX_DOCUMENTS:,} documents (Ward keeps "
            f"every pairwise distance); {len(texts):,} were read: drop --hierarchy or "
            "cluster fewer"
        )
    method = "agglomerative" if hierarchy else "kmeans"
    echo_err(f"clustering {len(texts)} {what}s into {k} ({method}, seed {seed}) ...")
    started = time.perf_counter()
    try:
        found = discover_domains(texts, k, method=method, seed=seed)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    echo_err(f"clustered in {time.perf_counter() - started:.1f}s")
    return found


def _groups(labels: Sequence[int], n: int, prefix: str) -> list[_Group]:
    members: list[list[int]] = [[] for _ in range(n)]
    for i, label in enumerate(labels):
        members[int(label)].append(i)
    return [_Group(f"{prefix}{j}", m) for j, m in enumerate(members)]


def _describe(
    group: _Group, docs: Sequence[Document], names: Sequence[str], terms: list[str]
) -> dict[str, Any]:
    return {
        "folder": group.folder,
        "documents": len(group.members),
        "bytes": sum(len(docs[i].text.encode("utf-8")) for i in group.members),
        "top_terms": terms,
        "members": [{"id": docs[i].id, "file": names[i]} for i in group.members],
    }


def _write_tree(
    root: Path,
    groups: Sequence[_Group],
    docs: Sequence[Document],
    names: Sequence[str],
) -> None:
    for group in groups:
        folder = root / group.folder
        folder.mkdir()
        for i in group.members:
            # Bytes, not text mode: no newline translation, so the reader gets them back.
            (folder / names[i]).write_bytes(docs[i].text.encode("utf-8"))


def _install(staged: Path, out: Path) -> None:
    """Move the staged output into ``out``, replacing only what an earlier run wrote."""
    if not out.exists():
        staged.rename(out)
        return
    for entry in out.iterdir():
        ours = entry.name in (CLUSTERS_FILE, DISCOVERY_FILE) or (
            entry.is_dir() and entry.name.startswith((CLUSTER_PREFIX, PARENT_PREFIX))
        )
        if ours:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for entry in staged.iterdir():
        entry.rename(out / entry.name)
    staged.rmdir()


def _table(
    clusters: list[dict[str, Any]], parents: list[dict[str, Any]], labels: list[int] | None
) -> None:
    from agora.remote import fitted_table, stdout_console

    def row(entry: dict[str, Any], parent: str) -> tuple[str, ...]:
        cells = [entry["folder"], parent, str(entry["documents"]), f"{entry['bytes']:,}"]
        if labels is None:
            del cells[1]  # no hierarchy, no parent column
        return (*cells, ", ".join(entry["top_terms"]))

    headers: tuple[str, ...] = ("folder", "parent", "docs", "bytes", "top terms")
    if labels is None:
        headers = tuple(h for h in headers if h != "parent")
    rows = [row(p, "") for p in parents]
    rows += [
        row(c, f"{PARENT_PREFIX}{labels[j]}" if labels else "") for j, c in enumerate(clusters)
    ]
    console = stdout_console()
    console.print(
        fitted_table(console, headers, rows, shrink=("top terms",), right=("docs", "bytes"))
    )


def discover(
    *,
    paths: PathsArgument,
    k: Annotated[int, typer.Option("--k", min=2, help="Number of clusters (domains).")],
    out: Annotated[
        Path, typer.Option("--out", help="Directory for cluster-K/ folders and clusters.json.")
    ],
    hierarchy: Annotated[
        bool,
        typer.Option(
            "--hierarchy",
            help="Ward tree instead of balanced k-means; also writes parent-J/ folders.",
        ),
    ] = False,
    parents: Annotated[
        int | None,
        typer.Option(
            "--parents",
            min=1,
            help="With --hierarchy: the number of parents, a coarser cut of the same tree "
            "(default: k // 2, at least 1).",
        ),
    ] = None,
    split_passages: Annotated[
        int | None,
        typer.Option(
            "--split-passages",
            min=256,
            help="Cluster passages of at most this many bytes instead of whole documents.",
        ),
    ] = None,
    seed: Seed = 0,
    text_field: TextField = "text",
    strict_utf8: StrictUtf8 = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier discovery in --out.")
    ] = False,
) -> None:
    """Cluster your documents into domains; one folder per cluster."""
    level = _parent_level(k, hierarchy, parents)
    _check_out(out, overwrite)
    _check_apart(paths, out)
    require_extra("model", "data discover")
    from modelcore.data.discovery import save_discovery

    read, report = _read(paths, text_field, strict_utf8)
    docs = _writable(read, split_passages)
    texts = [d.text for d in docs]
    found = _cluster(texts, k, hierarchy=hierarchy, seed=seed, split_bytes=split_passages)
    names = file_names([d.id for d in docs])
    clusters = _groups(found.labels.tolist(), k, CLUSTER_PREFIX)
    described = [
        _describe(g, docs, names, terms)
        for g, terms in zip(clusters, found.top_terms(texts, n=TOP_TERMS), strict=True)
    ]
    parent_groups: list[_Group] = []
    parent_described: list[dict[str, Any]] = []
    parent_of: list[int] | None = None
    if level is not None:
        assert found.tree is not None
        coarse = found.tree.cut(level)
        parent_groups = _groups(coarse.tolist(), level, PARENT_PREFIX)
        # The tree is nested: every cluster lies inside exactly one parent.
        parent_of = [int(coarse[g.members[0]]) for g in clusters]
        for j, entry in enumerate(described):
            entry["parent"] = parent_of[j]
        for j, (g, terms) in enumerate(
            zip(parent_groups, found.top_terms(texts, labels=coarse, n=TOP_TERMS), strict=True)
        ):
            entry = _describe(g, docs, names, terms)
            entry["children"] = [c for c, p in enumerate(parent_of) if p == j]
            parent_described.append(entry)
    summary: dict[str, Any] = {
        "format": FORMAT,
        "k": k,
        "method": found.method,
        "seed": seed,
        "inputs": [str(p) for p in paths],
        "text_field": text_field,
        "split_passages": split_passages,
        "documents": len(docs),
        "bytes": sum(c["bytes"] for c in described),
        "read": report.to_dict(),
        "top_terms_by": TOP_TERMS_BY,
        "discovery": DISCOVERY_FILE,
        "clusters": described,
    }
    if level is not None:
        summary["parent_level"] = level
        summary["parents"] = parent_described

    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_tree(staged, clusters, docs, names)
        _write_tree(staged, parent_groups, docs, names)
        save_discovery(found, staged / DISCOVERY_FILE)
        (staged / CLUSTERS_FILE).write_text(
            json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        _install(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    echo_err(f"wrote {out} ({time.perf_counter() - started:.1f}s)")
    _table(described, parent_described, parent_of)
    train = f"  agora expert train --base-dir BASE --data {out}/"
    if level is not None:
        echo_err("next: train each parent first, then each cluster from its parent's expert:")
        echo_err(f"{train}{PARENT_PREFIX}J --out {PARENT_PREFIX}J.safetensors")
        echo_err(
            f"{train}{CLUSTER_PREFIX}K --init-from {PARENT_PREFIX}J.safetensors "
            f"--out {CLUSTER_PREFIX}K.safetensors"
        )
    else:
        echo_err("next: one expert per cluster:")
        echo_err(f"{train}{CLUSTER_PREFIX}K --out {CLUSTER_PREFIX}K.safetensors")


def group() -> typer.Typer:
    app = typer.Typer(
        name="data",
        help="Your own text: find its domains before training experts on them.",
        no_args_is_help=True,
    )
    app.command(
        "discover",
        rich_help_panel=LOCAL_PANEL,
        short_help="Cluster your documents into domains: one folder per cluster.",
        help="Cluster your documents into --k domains (c-BTM: TF-IDF, truncated SVD, "
        "balanced k-means; a Ward tree with --hierarchy) and write one folder per "
        "cluster to --out, with clusters.json (sizes, top terms, members) and the "
        "fitted discovery.safetensors. Train one expert per cluster with "
        "`agora expert train --data DIR/cluster-K`; with --hierarchy train each "
        "parent-J first and start its clusters from it with --init-from.",
    )(discover)
    return app
