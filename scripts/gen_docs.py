"""Generate README.md's recipe key reference from the schema (`make docs`); `--check` fails if it is stale.

The table sits between the markers below; everything else in README.md is hand-written.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from psipo_cli.recipe.schema import Recipe

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- recipe-keys:start (make docs) -->", "<!-- recipe-keys:end -->"


def _section(annotation: object) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(annotation: object) -> str:
    """`Literal['a', 'b'] | None` -> 'a / b / empty'; `list[str]` -> 'list of str'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("empty" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: typing.Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory else field.default
    return "" if isinstance(value, BaseModel) else f"`{value!r}`"


def rows(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section(field.annotation)
        if section is not None and section.__name__ != "DataSource":
            out += rows(section, f"{key}.")
            continue
        kind = "path, hub id or {path, split, subset}" if section else _type_name(field.annotation)
        description = (field.description or "").replace("|", "\\|")
        out.append(f"| `{key}` | {kind} | {_default(field)} | {description} |")
    return out


def table() -> str:
    head = ["| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join([START, *head, *rows(), END])


def render(readme: str) -> str:
    before, _, rest = readme.partition(START)
    _, _, after = rest.partition(END)
    return before + table() + after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite README.md in place")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = parser.parse_args()
    current = README.read_text(encoding="utf-8")
    if START not in current or END not in current:
        print(f"README.md lacks the markers {START} ... {END}", file=sys.stderr)
        return 1
    fresh = render(current)
    if args.write:
        README.write_text(fresh, encoding="utf-8")
    elif args.check and fresh != current:
        print("README.md's recipe key table is stale: run `make docs`", file=sys.stderr)
        return 1
    elif not args.check:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
