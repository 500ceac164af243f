"""One entry of the table of TRL/transformers internals psipo relies on (`trl_internals.HOOKS`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hook:
    where: str  # the module, class or function the name lives on (importable dotted path)
    name: str
    kind: str  # how `check` verifies it (see the module docstring)
    used_by: str  # psipo files relying on it
    used_for: str
    why_private: str  # why no public API serves
