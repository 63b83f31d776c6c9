"""Where the demo's text came from, and under which terms: the datasheets' `sources` and
`license` (docs/demo.md, "Honest datasheets").

The demo trains on text this machine carries (modelcore/data/sources.py): the Python
interpreter's own files, the installed distributions' license files and descriptions,
the system Perl's modules and the C headers. Every passage id says which file it came
from (``domain:document#n``), so each expert's datasheet lists the origins of exactly
the passages it was trained on, each with the license that origin declares; an origin
that declares none says so instead of being given one.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# The datasheet schema's grammar for `license` (registry/validation/datasheet.schema.json).
_SPDX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*(?: (?:AND|OR|WITH) [A-Za-z0-9][A-Za-z0-9.+-]*)*$")
# The `license` of a datasheet whose sources' terms are not one expression: each source
# states its own (an SPDX LicenseRef: "see the document").
MIXED = "LicenseRef-agora-see-sources"
NOT_DECLARED = "not declared by its distribution"
_PSF = "PSF-2.0"
# Perl 5 itself and the modules shipped with it are under "the same terms as Perl".
_PERL = "Artistic-1.0-Perl OR GPL-1.0-or-later"

# Trove classifiers of the licenses most distributions declare that way.
_CLASSIFIERS = {
    "MIT License": "MIT",
    "BSD License": "BSD-3-Clause",
    "Apache Software License": "Apache-2.0",
    "Python Software Foundation License": _PSF,
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "ISC License (ISCL)": "ISC",
    "GNU Lesser General Public License v2 or later (LGPLv2+)": "LGPL-2.0-or-later",
    "GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0-only",
    "GNU General Public License v2 (GPLv2)": "GPL-2.0-only",
    "GNU General Public License v3 (GPLv3)": "GPL-3.0-only",
    "The Unlicense (Unlicense)": "Unlicense",
    "Historical Permission Notice and Disclaimer (HPND)": "HPND",
}


@dataclass(frozen=True)
class Origin:
    """One place text came from: a name, what it is, and its license ("" if unknown)."""

    name: str
    description: str
    license: str
    url: str | None = None

    def source(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "license": self.license or NOT_DECLARED,
        }
        if self.url:
            entry["url"] = self.url
        return entry


def distribution_license(name: str) -> str:
    """The SPDX expression an installed distribution declares ("" if none is readable):
    its License-Expression (PEP 639), else one trove classifier, else a short License
    field that is already an expression."""
    try:
        meta = importlib.metadata.distribution(name).metadata
    except importlib.metadata.PackageNotFoundError:
        return ""
    expression = (meta.get("License-Expression") or "").strip()
    if _SPDX.match(expression):
        return expression
    found = {
        _CLASSIFIERS[c.split(" :: ")[-1]]
        for c in meta.get_all("Classifier") or []
        if c.startswith("License :: ") and c.split(" :: ")[-1] in _CLASSIFIERS
    }
    if len(found) == 1:
        return found.pop()
    field = (meta.get("License") or "").strip()
    if len(field) <= 60 and _SPDX.match(field):
        return field
    return ""


def _python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def origin_of(passage_id: str) -> Origin:
    """The origin of one corpus passage, from its id (``domain:document#n``)."""
    domain, _, rest = passage_id.partition(":")
    doc = rest.rsplit("#", 1)[0]
    py = _python()
    if domain in {"python_stdlib", "python_tests"}:
        what = "standard library" if domain == "python_stdlib" else "standard library's tests"
        return Origin(
            f"CPython {py} {what}",
            f"The .py files of this interpreter's {what} ({sys.prefix}).",
            _PSF,
            f"https://docs.python.org/{py}/license.html",
        )
    if domain == "python_docs":
        return Origin(
            f"CPython {py} documentation (pydoc_data.topics)",
            "The help topics of the Python documentation, as the interpreter ships them.",
            _PSF,
            f"https://docs.python.org/{py}/",
        )
    if domain in {"licenses", "package_readmes"}:
        dist = doc.split("/", 1)[0]
        what = "license files" if domain == "licenses" else "long description (METADATA)"
        return Origin(
            f"{dist} ({what})",
            f"The {what} of the installed Python distribution {dist}.",
            distribution_license(dist),
            f"https://pypi.org/project/{dist}/",
        )
    if domain == "perl_modules":
        return Origin(
            "System Perl modules",
            "The .pm files of this system's Perl: Perl's own modules and those of the "
            "distribution's Perl packages, which mostly use Perl's terms.",
            _PERL,
            "https://dev.perl.org/licenses/",
        )
    if domain == "c_headers":
        return Origin(
            "C headers",
            "Python's include directory and /usr/include: headers of many projects, each "
            "under its own terms (PSF-2.0 for Python's; glibc LGPL-2.1-or-later; Linux's "
            "GPL-2.0-only WITH Linux-syscall-note).",
            "",
        )
    return Origin(domain, f"Text of the {domain} domain.", "")


def origins(passage_ids: Iterable[str]) -> list[Origin]:
    """The distinct origins of some passages, in a stable order (by name)."""
    found = {o.name: o for o in map(origin_of, passage_ids)}
    return [found[name] for name in sorted(found)]


def combined_license(found: Iterable[Origin]) -> str:
    """One datasheet `license` for text of several origins: their common expression, the
    conjunction (``A AND B``) of simple ones, else ``MIXED`` (each source names its own)."""
    terms = sorted({o.license for o in found})
    if not terms or "" in terms:
        return MIXED
    if len(terms) == 1:
        return terms[0]
    if any(" OR " in t for t in terms):
        return MIXED  # the grammar has no parentheses: A AND (B OR C) cannot be written
    joined = " AND ".join(terms)
    return joined if len(joined) <= 200 else MIXED
