"""Sizes for the adversarial suite (tests/adversarial): what CI runs, and the heavier
variants run by hand with ``AGORA_ADVERSARIAL=heavy`` (docs/reliability.md)."""

from __future__ import annotations

import os

HEAVY = os.environ.get("AGORA_ADVERSARIAL", "").strip().lower() == "heavy"


def scaled(ci: int, heavy: int) -> int:
    """``ci`` cases in a normal run, ``heavy`` when AGORA_ADVERSARIAL=heavy."""
    return heavy if HEAVY else ci


def report(name: str, **figures: object) -> None:
    """Print one line of figures (run pytest with -s to see them; the heavy variants print
    what docs/reliability.md and the README's Reliability table quote)."""
    fields = " ".join(f"{key}={value}" for key, value in figures.items())
    print(f"\n[adversarial] {name}: {fields}")
