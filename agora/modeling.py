"""The local side of the command line: loading a base bundle and expert files, the corpus,
the device, and the options the local commands share.

Cheap to import: torch and modelcore are imported inside the functions, which only the
local commands call (after ``require_extra("model", ...)``).

``--base-dir`` is a base bundle *directory* on this machine; ``--base`` is a base
*revision* on a registry. The local commands still accept their old ``--base DIR``
(hidden, with a deprecation line) for one release.

``--data PATH...`` is a contributor's own text (modelcore/data/userdata.py, docs/data.md,
"A contributor's own text"): ``read_data`` reads and splits it for ``agora expert train``
and ``agora local eval``; a command registered with ``cls=DataCommand`` reads
``--data A B`` as ``--data A --data B``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand

from agora.common import deprecation, echo_err

if TYPE_CHECKING:
    import torch

    from modelcore.artifacts import BaseBundle
    from modelcore.config import ModelConfig
    from modelcore.data.corpus import Corpus
    from modelcore.data.userdata import Document, ReadReport, Split

PRESET_HELP = "Model preset: tiny (tests), small (CPU demo) or molm_4b_k2 (GPU shapes)."
CORPUS_HELP = "Bytes of text per corpus domain (train + held-out)."
DEFAULT_BYTES = 256 * 1024

BaseDirOption = Annotated[
    Path | None, typer.Option("--base-dir", help="Base bundle directory (required).")
]
# The old spelling of --base-dir: hidden, accepted with a deprecation line.
LegacyBaseOption = Annotated[Path | None, typer.Option("--base", hidden=True)]
ExpertPaths = Annotated[
    list[Path] | None,
    typer.Option("--experts", help="Expert file; repeat for several (order = weights order)."),
]
Preset = Annotated[str, typer.Option("--preset", help=PRESET_HELP)]
OutDir = Annotated[Path, typer.Option("--out", help="Directory for the base bundle.")]
Seed = Annotated[int, typer.Option("--seed")]
MaxBytes = Annotated[int, typer.Option("--max-bytes-per-domain", min=1024, help=CORPUS_HELP)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")]
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda, ... (default: auto)")]
ShowProgress = Annotated[bool, typer.Option("--progress/--no-progress")]
Lr = Annotated[float | None, typer.Option("--lr", min=0.0, help="Default: per preset.")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", min=1)]
SeqLen = Annotated[int | None, typer.Option("--seq-len", min=2)]
DataPaths = Annotated[
    list[Path] | None,
    typer.Option(
        "--data",
        help="Your text: a file, a folder (recursive), .gz, or .jsonl; several paths may "
        "follow one --data.",
    ),
]
TextField = Annotated[
    str, typer.Option("--text-field", help="JSON Lines: the field that holds the text.")
]
StrictUtf8 = Annotated[
    bool,
    typer.Option(
        "--strict-utf8", help="Refuse bytes that are not UTF-8 (default: replace and count)."
    ),
]
HeldoutShare = Annotated[
    float,
    typer.Option(
        "--heldout-share",
        help="Share of --data documents held out (by a hash of their text), in (0, 1).",
    ),
]
DEFAULT_HELDOUT_SHARE = 0.1


def base_dir_of(base_dir: Path | None, legacy_base: Path | None) -> Path:
    """The bundle directory from ``--base-dir`` or, deprecated, ``--base``."""
    if base_dir is not None and legacy_base is not None:
        raise typer.BadParameter("give --base-dir only (--base DIR is its old spelling)")
    if legacy_base is not None:
        deprecation("--base DIR", "--base-dir DIR")
        return legacy_base
    if base_dir is None:
        raise typer.BadParameter("the base bundle directory is required", param_hint="--base-dir")
    return base_dir


def device(name: str | None) -> torch.device:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from exc


def preset(name: str) -> ModelConfig:
    from modelcore.config import ModelConfig

    try:
        return ModelConfig.from_name(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--preset") from exc


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a directory", param_hint="--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise typer.BadParameter(
            f"{out} is not empty (a base revision is immutable; pass --overwrite to replace it)",
            param_hint="--out",
        )


def corpus(max_bytes: int, seed: int = 0) -> Corpus:
    from modelcore.train import recipes

    started = time.perf_counter()
    loaded = recipes.load_corpus(max_bytes, seed=seed, cache_dir=recipes.default_cache_dir())
    sizes = {n: d.sizes()["train_bytes"] for n, d in loaded.domains.items()}
    echo_err(f"corpus: {sizes} train bytes ({time.perf_counter() - started:.1f}s)")
    return loaded


def domain_texts(loaded: Corpus, domain: str, split: str) -> list[str]:
    if domain not in loaded.domains:
        raise typer.BadParameter(
            f"unknown domain {domain!r}; known: {', '.join(sorted(loaded.domains))}",
            param_hint="--domain",
        )
    texts = getattr(loaded.domains[domain], split)
    if not texts:
        raise typer.BadParameter(f"domain {domain!r} has no {split} text", param_hint="--domain")
    return list(texts)


def load_base(path: Path, on: torch.device) -> BaseBundle:
    from modelcore.artifacts import BUNDLE_FILES
    from modelcore.artifacts import load_base as load

    missing = [name for name in BUNDLE_FILES if not (path / name).is_file()]
    if missing:
        what = "no such directory" if not path.is_dir() else f"it lacks {', '.join(missing)}"
        raise typer.BadParameter(
            f"{path} is not a base bundle directory ({what}); make one with "
            "`agora base train --out DIR` or fetch one with `agora base download`",
            param_hint="--base-dir",
        )
    try:
        return load(path, device=on)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="--base-dir") from exc


def load_expert_for(path: Path, bundle: BaseBundle, option: str) -> dict[str, torch.Tensor]:
    from modelcore.experts import load_expert

    try:
        tensors, metadata = load_expert(path, config=bundle.config)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint=option) from exc
    if metadata["base_revision"] != bundle.revision:
        raise typer.BadParameter(
            f"{path} was trained against base {metadata['base_revision'][:12]}, "
            f"not {bundle.revision[:12]}",
            param_hint=option,
        )
    return tensors


def load_experts(
    paths: list[Path] | None, bundle: BaseBundle, *, at_least: int = 1
) -> list[dict[str, torch.Tensor]]:
    chosen = list(paths or [])
    if len(chosen) < at_least:
        raise typer.BadParameter(f"give at least {at_least} expert file(s)", param_hint="--experts")
    return [load_expert_for(p, bundle, "--experts") for p in chosen]


# -- a contributor's own text (--data) ------------------------------------------------------
DATA_OPTION = "--data"
# The name of a contributor's text among the text sets `agora local eval` reports.
DATA_TEXT_SET = "data"


def spread_option(args: list[str], option: str) -> list[str]:
    """``OPTION A B`` as ``OPTION A OPTION B``: the bare words after one occurrence of
    ``option`` (up to the next ``-...`` word) are more of its values. Only for commands
    without positional arguments, where such words would otherwise be an error."""
    out: list[str] = []
    spreading = False
    words = iter(args)
    for word in words:
        if word == "--":
            out += [word, *words]
            break
        if word == option:
            out.append(word)
            value = next(words, None)
            if value is not None:
                out.append(value)
            spreading = True
        elif word.startswith(option + "="):
            out.append(word)
            spreading = True
        elif word.startswith("-"):
            out.append(word)
            spreading = False
        elif spreading:
            out += [option, word]
        else:
            out.append(word)
    return out


class DataCommand(TyperCommand):
    """A command whose ``--data`` takes several paths after one flag (click gives an
    option one value per occurrence): ``--data A B`` is ``--data A --data B``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, spread_option(list(args), DATA_OPTION))


def check_heldout_share(share: float) -> float:
    if not 0.0 < share < 1.0:
        raise typer.BadParameter(
            f"must be between 0 and 1 (exclusive), e.g. {DEFAULT_HELDOUT_SHARE}; got {share}",
            param_hint="--heldout-share",
        )
    return share


def read_data(
    paths: list[Path], *, text_field: str, strict_utf8: bool, heldout_share: float | None
) -> tuple[list[Document], ReadReport, Split | None]:
    """The documents of ``--data``, what reading them found, and their train / held-out
    split (``None`` without a ``heldout_share``); any problem is one usage-error line
    naming the path (docs/data.md, "A contributor's own text")."""
    from modelcore.data.userdata import DataError, read_documents, split_documents

    if heldout_share is not None:
        check_heldout_share(heldout_share)
    started = time.perf_counter()
    try:
        docs, report = read_documents(paths, text_field=text_field, strict_utf8=strict_utf8)
        split = None if heldout_share is None else split_documents(docs, heldout_share)
    except DataError as exc:
        raise typer.BadParameter(str(exc), param_hint=DATA_OPTION) from exc
    found = [f"{report.documents} documents, {report.bytes} bytes from {report.files} file(s)"]
    if split is not None:
        found.append(f"{len(split.train)} train / {len(split.heldout)} held out")
    if report.binary_files:
        found.append(f"{report.binary_files} binary file(s) skipped")
    if report.replaced:
        found.append(f"{report.replaced} invalid UTF-8 sequence(s) replaced")
    echo_err(f"data: {'; '.join(found)} ({time.perf_counter() - started:.1f}s)")
    return docs, report, split
