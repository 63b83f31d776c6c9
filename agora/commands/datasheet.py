"""``agora expert datasheet`` (write a datasheet from your text) and ``agora expert check``
(the registry's validation of an expert and its datasheet, offline).

``datasheet`` reads the text the expert was trained on the way ``agora expert train
--data`` does (modelcore/data/userdata.py: the same reader, the same split by content
hash), and writes the computed fields: ``token_count`` (the train split's tokens with the
base's tokenizer), ``language`` (modelcore/data/language.py's guess), ``sources`` (the
paths given) and ``samples`` (whole held-out passages, within the registry's cap). The
human fields come from flags; one not given is written as a value beginning with
``FILL IN:`` that says what to write, and the registry refuses the datasheet until none is
left (``datasheet_unfilled``; docs/validation.md, "Datasheet"). docs/data.md, "Generated
datasheets", has an example.

``check`` runs the two calls the registry makes on ``POST /v1/experts``
(registry/services/experts.py, ``validate_submission``) with the server's default limits,
against the base bundle's ``expert_schema`` and revision computed as the registry does on
``POST /v1/base-models``: the same codes, messages and per-field problems as the server's
problem+json. It reports both files; the server stops at the first (the datasheet).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agora import modeling
from agora.common import echo_err, require_extra
from agora.modeling import (
    DEFAULT_HELDOUT_SHARE,
    BaseDirOption,
    DataPaths,
    HeldoutShare,
    LegacyBaseOption,
    StrictUtf8,
    TextField,
    base_dir_of,
)

if TYPE_CHECKING:
    from modelcore.data.userdata import Document, Split

# The human fields: front matter key, flag, whether a list, and what to write there.
HUMAN_FIELDS: tuple[tuple[str, str, bool, str], ...] = (
    (
        "domain",
        "--domain",
        False,
        "what text this expert models, in a sentence or two (e.g. 'Release notes of "
        "Debian packages')",
    ),
    (
        "intended_uses",
        "--intended-use",
        True,
        "what the expert is for, one use per list item (e.g. 'Language modelling of "
        "package documentation')",
    ),
    (
        "out_of_scope_uses",
        "--out-of-scope-use",
        True,
        "uses it is not suited for, one per list item, or delete this key",
    ),
    (
        "pii_handling",
        "--pii-handling",
        False,
        "how personal data (names, e-mail addresses, phone numbers) was found and removed, "
        "or why the text holds none",
    ),
    (
        "collection",
        "--collection",
        False,
        "how the text was collected and cleaned, or delete this key",
    ),
    (
        "contact",
        "--contact",
        False,
        "an e-mail address, mailto: or URL where the maintainer can be reached",
    ),
)
# Front matter paths -> the flag that sets them (a refusal names the flag to fix).
FLAG_OF = {"name": "--name", "license": "--license", "language": "--language"} | {
    key: flag for key, flag, _, _ in HUMAN_FIELDS
}
# Samples below this size are taken only when nothing larger fits: a stray closing brace
# or a signature line tells retrieval nothing about a domain.
MIN_SAMPLE_BYTES = 64
LANGUAGE_DOCS = 2000  # documents the language guess reads at most
TOKENIZE_CHUNK = 256  # documents per encode_batch call: bounded memory on a large corpus


def _server_limits() -> tuple[int, int, int]:
    """The registry's default limits (registry/settings.py, registry/validation/datasheet.py):
    expert bytes, datasheet bytes, samples bytes. Defaults, not this shell's AGORA_*: the
    registry a contributor submits to is not configured by their environment."""
    from registry.settings import Settings
    from registry.validation import DEFAULT_MAX_SAMPLES_BYTES

    fields = Settings.model_fields
    return (
        int(fields["max_expert_bytes"].default),
        int(fields["max_datasheet_bytes"].default),
        DEFAULT_MAX_SAMPLES_BYTES,
    )


# -- agora expert datasheet -------------------------------------------------------------------


def _load_tokenizer(bundle: Path) -> tuple[Any, str]:
    """The bundle's tokenizer and revision, without building the model."""
    from modelcore.artifacts import BUNDLE_FILES, compute_revision, read_config

    if not bundle.is_dir():
        raise typer.BadParameter(f"{bundle}: no such directory", param_hint="--base-dir")
    missing = [name for name in BUNDLE_FILES if not (bundle / name).is_file()]
    if missing:
        raise typer.BadParameter(
            f"{bundle} is not a base bundle: it lacks {', '.join(missing)}",
            param_hint="--base-dir",
        )
    from tokenizers import Tokenizer

    try:
        read_config(bundle)
        tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    except Exception as exc:  # a config ModelConfig refuses; tokenizers raises Exception
        raise typer.BadParameter(f"{bundle}: {exc}", param_hint="--base-dir") from None
    return tokenizer, compute_revision(bundle)


def train_token_count(tokenizer: Any, split: Split) -> int:
    """Tokens of the train split's documents with the base's tokenizer: the text's own
    tokens, without the ``<|endoftext|>`` that training appends after each document
    (modelcore/data/batches.py, ``encode_texts``)."""
    from modelcore.data.batches import encode_texts

    texts = [d.text for d in split.train]
    return sum(
        len(ids)
        for start in range(0, len(texts), TOKENIZE_CHUNK)
        for ids in encode_texts(tokenizer, texts[start : start + TOKENIZE_CHUNK], append_eot=False)
    )


def draw_samples(heldout: Sequence[Document], max_bytes: int) -> list[str]:
    """Whole held-out passages, at most ``max_bytes`` of UTF-8 together, deterministic:
    round robin over the held-out documents (each document's first passage, then each
    one's second, ...), a passage that does not fit skipped for the next. Passages the
    registry could not store or would read as a placeholder are left out."""
    from modelcore.data.userdata import passages
    from registry.validation.datasheet import UNFILLED_MARKER
    from registry.validation.text import text_problem

    per_doc = [
        [
            p
            for p in passages([d])
            if text_problem(p) is None and not p.lstrip().startswith(UNFILLED_MARKER)
        ]
        for d in heldout
    ]
    rounds = max((len(d) for d in per_doc), default=0)
    order = [doc[i] for i in range(rounds) for doc in per_doc if i < len(doc)]
    for min_bytes in (MIN_SAMPLE_BYTES, 1):
        chosen: list[str] = []
        left = max_bytes
        for passage in order:
            size = len(passage.encode("utf-8"))
            if min_bytes <= size <= left:
                chosen.append(passage)
                left -= size
        if chosen:
            return chosen
    return []


def _source_entries(paths: Sequence[Path], docs: Sequence[Document]) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        given = os.fspath(path)
        mine = [
            d
            for d in docs
            if d.id == given or d.id.startswith((given + os.sep, given + ":", given + "#"))
        ]
        size = sum(len(d.text.encode("utf-8")) for d in mine)
        out.append(
            {
                # The path as typed, never resolved: an absolute path would publish the
                # contributor's home directory with the datasheet.
                "name": given,
                "description": f"{len(mine)} document(s), {size} bytes of text",
            }
        )
    return out


def _placeholder(instruction: str, flag: str) -> str:
    from registry.validation.datasheet import UNFILLED_MARKER

    return f"{UNFILLED_MARKER} {instruction} (or regenerate with {flag})"


def dump_yaml(front: dict[str, Any]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        # Passages as literal blocks, readable and editable; PyYAML falls back to a
        # double-quoted scalar (escapes) where a block cannot hold the text exactly.
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(front, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=88, indent=2)


def _body(front: dict[str, Any], computed: dict[str, Any]) -> str:
    def said(key: str, what: str) -> str:
        value = front.get(key)
        if value is None or _is_placeholder(value):
            return f"<!-- {what} -->"
        return "\n".join(f"- {v}" for v in value) if isinstance(value, list) else str(value)

    return "\n".join(
        [
            f"# {front['name']}",
            "",
            said("domain", "What this expert models, and for whom."),
            "",
            "## Data",
            "",
            textwrap.fill(
                f"{computed['documents']} document(s), {computed['bytes']} bytes of text, read "
                f"from {', '.join(computed['paths'])}. The train split: "
                f"{computed['train_documents']} document(s), {computed['token_count']} tokens "
                f"with the base's tokenizer. Held out by a hash of their content (share "
                f"{computed['heldout_share']}): {computed['heldout_documents']} document(s), "
                "from which the `samples` are drawn.",
                width=88,
            ),
            "",
            said("collection", "How the text was collected and cleaned."),
            "",
            "## Intended uses",
            "",
            said("intended_uses", "What the expert is for."),
            "",
            "## Out-of-scope uses",
            "",
            said("out_of_scope_uses", "What it should not be used for."),
            "",
            "## Personal data",
            "",
            said("pii_handling", "How personal data was found and removed."),
            "",
            "## Training and evaluation",
            "",
            "<!-- Steps, learning rate, and the held-out bits per byte of the base and of "
            "the expert that `agora expert train` printed. -->",
            "",
            "## Contact",
            "",
            said("contact", "Where to reach the maintainer."),
            "",
        ]
    )


def _is_placeholder(value: Any) -> bool:
    from registry.validation.datasheet import unfilled_fields

    return bool(unfilled_fields(value))


def _header(revision: str, paths: Sequence[Path]) -> str:
    # One comment line, whatever the paths hold.
    shown = " ".join(", ".join(os.fspath(p) for p in paths).split())
    return (
        f"# Written by `agora expert datasheet` from {shown} against base {revision[:12]}.\n"
        "# Computed: language (a guess: correct it if wrong), sources, token_count (the\n"
        "# train split), samples (held-out passages). Every value that begins with\n"
        "# 'FILL IN:' is yours to write: `agora expert check` and the registry refuse the\n"
        "# datasheet until none is left. Schema: registry/validation/datasheet.schema.json.\n"
    )


def _self_check(data: bytes) -> list[str]:
    """Validate what is about to be written as the registry will; the unfilled fields'
    paths, or a usage error naming the flag behind the first other problem."""
    from registry.errors import AgoraError
    from registry.validation import parse_datasheet

    _, max_datasheet, max_samples = _server_limits()
    try:
        parse_datasheet(data, max_bytes=max_datasheet, max_samples_bytes=max_samples)
    except AgoraError as exc:
        problems = exc.errors or [{"path": "$", "message": exc.detail}]
        if exc.code == "datasheet_unfilled":
            return [str(p["path"]) for p in problems]
        first = problems[0]
        key = str(first.get("path", "$")).removeprefix("$.").split("[")[0].split(".")[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        hint = FLAG_OF.get(key, "--max-samples-bytes" if key == "samples" else None)
        raise typer.BadParameter(
            f"the registry would refuse this datasheet: {exc.code}: {first.get('path')}: "
            f"{first.get('message')}{more}",
            param_hint=hint,
        ) from None
    return []


def _write_atomically(out: Path, data: bytes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def expert_datasheet(
    *,
    base_dir: BaseDirOption = None,
    data: DataPaths = None,
    name: Annotated[str, typer.Option("--name", help="Short name of the expert.")],
    license: Annotated[
        str, typer.Option("--license", help="SPDX license of the expert: MIT, CC-BY-4.0, ...")
    ],
    out: Annotated[Path, typer.Option("--out", help="Datasheet to write (markdown).")],
    domain: Annotated[
        str | None, typer.Option("--domain", help="What text the expert models.")
    ] = None,
    intended_use: Annotated[
        list[str] | None,
        typer.Option("--intended-use", help="What the expert is for; repeat for several."),
    ] = None,
    out_of_scope_use: Annotated[
        list[str] | None,
        typer.Option("--out-of-scope-use", help="What it is not for; repeat for several."),
    ] = None,
    pii_handling: Annotated[
        str | None,
        typer.Option("--pii-handling", help="How personal data was found and removed."),
    ] = None,
    contact: Annotated[
        str | None, typer.Option("--contact", help="E-mail, mailto: or URL of the maintainer.")
    ] = None,
    collection: Annotated[
        str | None, typer.Option("--collection", help="How the text was collected and cleaned.")
    ] = None,
    language: Annotated[
        list[str] | None,
        typer.Option("--language", help="BCP-47 tag(s) instead of the guess; repeatable."),
    ] = None,
    text_field: TextField = "text",
    strict_utf8: StrictUtf8 = False,
    heldout_share: HeldoutShare = DEFAULT_HELDOUT_SHARE,
    max_samples_bytes: Annotated[
        int | None,
        typer.Option(
            "--max-samples-bytes",
            min=1,
            help="Bytes of held-out samples at most. Default: the registry's cap (64 KiB).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out file.")
    ] = False,
    legacy_base: LegacyBaseOption = None,
) -> None:
    """Write a datasheet for an expert trained on your text; print a JSON summary."""
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a directory, not a file", param_hint="--out")
    if out.exists() and not overwrite:
        raise typer.BadParameter(
            f"{out} exists (pass --overwrite to replace it)", param_hint="--out"
        )
    if not data:
        raise typer.BadParameter(
            "give the text the expert was trained on, as to `agora expert train`",
            param_hint="--data",
        )
    modeling.check_heldout_share(heldout_share)
    bundle = base_dir_of(base_dir, legacy_base)
    require_extra("model", "expert datasheet")
    require_extra("server", "expert datasheet")
    from modelcore.data.language import guess_languages

    tokenizer, revision = _load_tokenizer(bundle)
    docs, report, split = modeling.read_data(
        data, text_field=text_field, strict_utf8=strict_utf8, heldout_share=heldout_share
    )
    assert split is not None  # a held-out share was given
    token_count = train_token_count(tokenizer, split)
    # Documents spread evenly over the data, each judged on its first 20,000 characters:
    # the guess costs seconds on any corpus (~1 MB/s of pure Python; docs/data.md).
    guessed = guess_languages(d.text for d in docs[:: -(-len(docs) // LANGUAGE_DOCS)])
    tags = list(dict.fromkeys(language)) if language else [tag for tag, _ in guessed]
    samples_cap = _server_limits()[2] if max_samples_bytes is None else max_samples_bytes
    samples = draw_samples(split.heldout, samples_cap)
    sizes = split.sizes()
    flags: dict[str, Any] = {
        "domain": domain,
        "intended_uses": intended_use,
        "out_of_scope_uses": out_of_scope_use,
        "pii_handling": pii_handling,
        "collection": collection,
        "contact": contact,
    }
    human: dict[str, Any] = {}
    for key, flag, is_list, instruction in HUMAN_FIELDS:
        given = flags[key]
        if given:
            human[key] = list(given) if is_list else given
        else:
            placeholder = _placeholder(instruction, flag)
            human[key] = [placeholder] if is_list else placeholder
    front: dict[str, Any] = {
        "name": name,
        "license": license,
        "language": tags,
        **{k: human[k] for k in ("domain", "intended_uses", "out_of_scope_uses")},
        **{k: human[k] for k in ("pii_handling", "collection", "contact")},
        "sources": _source_entries(data, docs),
        "token_count": token_count,
        "x-agora-datasheet": {
            "generator": "agora expert datasheet",
            "base_revision": revision,
            "heldout_share": heldout_share,
            "token_count_of": "the train split, with the base's tokenizer",
            **sizes,
            "language_guess": {tag: round(share, 3) for tag, share in guessed},
        },
        "samples": samples,
    }
    computed = {
        "documents": report.documents,
        "bytes": report.bytes,
        "paths": [os.fspath(p) for p in data],
        "token_count": token_count,
        "heldout_share": heldout_share,
        **sizes,
    }
    _, max_datasheet, _ = _server_limits()
    while True:
        text = f"---\n{_header(revision, data)}{dump_yaml(front)}---\n\n{_body(front, computed)}"
        encoded = text.encode("utf-8")
        # Escaped samples can outgrow the upload cap: drop the last until the file fits.
        if len(encoded) <= max_datasheet or len(front["samples"]) <= 1:
            break
        front["samples"] = front["samples"][:-1]
    if not front["samples"]:
        raise typer.BadParameter(
            "no held-out passage fits in --max-samples-bytes "
            f"({samples_cap} bytes); raise it or add text",
            param_hint="--max-samples-bytes",
        )
    unfilled = _self_check(encoded)
    _write_atomically(out, encoded)
    samples_bytes = sum(len(s.encode("utf-8")) for s in front["samples"])
    if unfilled:
        echo_err(
            f"{out}: fill in {', '.join(unfilled)} (each says what to write), then run "
            "`agora expert check`"
        )
    summary = {
        "path": os.fspath(out),
        "base_revision": revision,
        "read": report.to_dict(),
        **sizes,
        "token_count": token_count,
        "language": tags,
        "language_guess": dict(guessed),
        "samples": len(front["samples"]),
        "samples_bytes": samples_bytes,
        "unfilled": unfilled,
    }
    typer.echo(json.dumps(summary))


# -- agora expert check -----------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def registry_view_of_base(bundle: Path) -> tuple[str, dict[str, Any]]:
    """The revision and ``expert_schema`` the registry would record for this bundle
    (registry/services/base_models.py, ``upload_base_model``); a usage error if it would
    refuse the bundle."""
    from registry.errors import AgoraError
    from registry.services.base_models import BASE_FILES, revision_id
    from registry.validation import validate_base_config, validate_base_weights, validate_tokenizer

    if not bundle.is_dir():
        raise typer.BadParameter(f"{bundle}: no such directory", param_hint="--base-dir")
    paths = {field: bundle / name for field, name in BASE_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise typer.BadParameter(
            f"{bundle} is not a base bundle: it lacks {', '.join(missing)}",
            param_hint="--base-dir",
        )
    try:
        config = dict(validate_base_config(paths["config"].read_bytes()).raw)
        validate_tokenizer(paths["tokenizer"].read_bytes())
        validate_base_weights(paths["weights"])
    except AgoraError as exc:
        raise typer.BadParameter(
            f"{bundle}: the registry would refuse this base: {exc.code}: {exc.detail}",
            param_hint="--base-dir",
        ) from None
    revision = revision_id({field: _sha256(path) for field, path in paths.items()})
    return revision, config["expert_schema"]


def _too_large(field: str, limit: int) -> dict[str, Any]:
    # What the server's upload parser answers (registry/api/uploads.py) before validation.
    return {
        "ok": False,
        "status": 413,
        "code": "file_too_large",
        "detail": f"file {field!r} exceeds the limit of {limit} bytes",
    }


def _refusal(exc: Any) -> dict[str, Any]:
    body = exc.problem()
    return {"ok": False, **{k: body[k] for k in ("status", "code", "detail")}} | (
        {"errors": body["errors"]} if "errors" in body else {}
    )


def check_submission(
    weights: Path, datasheet: Path, *, revision: str, expert_schema: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each file's verdict as the registry gives it on ``POST /v1/experts``: ``{"ok": True,
    ...summary}`` or the problem's status, code, detail and errors."""
    from registry.errors import AgoraError
    from registry.validation import parse_datasheet, validate_expert

    max_expert, max_datasheet, _ = _server_limits()
    verdicts: dict[str, dict[str, Any]] = {}
    if datasheet.stat().st_size > max_datasheet:
        verdicts["datasheet"] = _too_large("datasheet", max_datasheet)
    else:
        try:
            sheet = parse_datasheet(datasheet.read_bytes(), max_bytes=max_datasheet)
        except AgoraError as exc:
            verdicts["datasheet"] = _refusal(exc)
        else:
            verdicts["datasheet"] = {
                "ok": True,
                "name": sheet.name,
                "license": sheet.license,
                "language": list(sheet.language),
                "token_count": sheet.token_count,
                "samples": len(sheet.samples),
                "samples_bytes": sheet.samples_bytes,
            }
    if weights.stat().st_size > max_expert:
        verdicts["weights"] = _too_large("weights", max_expert)
    else:
        try:
            info = validate_expert(
                weights, expert_schema=expert_schema, base_revision=revision, max_bytes=max_expert
            )
        except AgoraError as exc:
            verdicts["weights"] = _refusal(exc)
        else:
            verdicts["weights"] = {
                "ok": True,
                "layers": list(info.layers),
                "n_modules": info.n_modules,
                "dtype": info.dtype,
                "parameters": info.n_parameters,
                "bytes": info.size,
            }
    return verdicts


def _problem_lines(what: str, path: Path, verdict: dict[str, Any]) -> list[str]:
    lines = [f"{what} {path}: {verdict['code']}: {verdict['detail']}"]
    for error in verdict.get("errors") or []:
        where = next((str(error[k]) for k in ("path", "tensor", "key", "dtype") if k in error), "-")
        rest = {k: v for k, v in error.items() if k not in ("path", "tensor", "key", "message")}
        message = error.get("message") or ", ".join(f"{k} {v}" for k, v in rest.items())
        lines.append(f"  {where}: {message}")
    return lines


def expert_check(
    *,
    weights: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, readable=True, help="Expert file (.safetensors)."
        ),
    ],
    datasheet: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="Datasheet (markdown)."),
    ],
    base_dir: BaseDirOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="The verdicts as one JSON object (problem bodies).")
    ] = False,
    legacy_base: LegacyBaseOption = None,
) -> None:
    """Check an expert and its datasheet as the registry will on upload, offline.

    Exit 0 when the registry would accept both, 1 with its problems when not."""
    bundle = base_dir_of(base_dir, legacy_base)
    require_extra("server", "expert check")
    revision, schema = registry_view_of_base(bundle)
    verdicts = check_submission(weights, datasheet, revision=revision, expert_schema=schema)
    ok = all(v["ok"] for v in verdicts.values())
    if as_json:
        typer.echo(json.dumps({"ok": ok, "base_revision": revision, **verdicts}))
        raise typer.Exit(0 if ok else 1)
    w, d = verdicts["weights"], verdicts["datasheet"]
    if w["ok"]:
        typer.echo(
            f"ok weights {weights}: layers {w['layers']}, {w['dtype']}, "
            f"{w['parameters']:,} parameters, base {revision[:12]}"
        )
    else:
        typer.echo("\n".join(_problem_lines("weights", weights, w)))
    if d["ok"]:
        typer.echo(
            f"ok datasheet {datasheet}: {d['name']!r}, {d['license']}, "
            f"{', '.join(d['language'])}, {d['samples']} samples ({d['samples_bytes']:,} bytes)"
        )
    else:
        typer.echo("\n".join(_problem_lines("datasheet", datasheet, d)))
    if not ok:
        # The server validates the datasheet first and answers with the first refusal.
        first = d if not d["ok"] else w
        typer.echo(f"the registry would refuse this upload: {first['status']} {first['code']}")
        raise typer.Exit(1)
