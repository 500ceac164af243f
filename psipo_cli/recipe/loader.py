"""Turn a recipe file plus `key.path=value` overrides into a validated `Recipe`.

Order: read YAML (safe loader, duplicate keys rejected) → merge `extends:` bases (relative to the recipe,
cycles rejected) → apply overrides (keys checked against the schema, values parsed as YAML scalars) →
validate with the schema → resolve local paths to absolute ones. Every failure is a one-line `UserError`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from psipo_cli.errors import UserError, shown
from psipo_cli.recipe.schema import Recipe

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def _reject_duplicate_keys(text: str) -> None:
    """PyYAML keeps the last of two equal keys silently; a recipe with both is refused, naming the line.

    Checked on the composed node tree (no objects are built): each node once, so aliases cannot multiply the work.
    """
    stack, visited = [yaml.compose(text, Loader=yaml.SafeLoader)], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            _check_keys(node)
            stack += [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


def _check_keys(node: yaml.MappingNode) -> None:
    keys: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = (key_node.tag, key_node.value)
        if key in keys:
            raise UserError(f"duplicate key '{key_node.value}'", where=f"line {key_node.start_mark.line + 1}")
        keys.add(key)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one recipe file as a mapping; no tags beyond plain YAML (safe loader)."""
    if not path.is_file():
        raise UserError("recipe file not found" if not path.exists() else "recipe path is not a file", where=str(path))
    try:
        text = path.read_text(encoding="utf-8")
        _reject_duplicate_keys(text)
        data = yaml.safe_load(text)
    except UserError as err:
        raise UserError(str(err), where=str(path)) from None
    except UnicodeDecodeError:
        raise UserError("recipe is not UTF-8 text", where=str(path)) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise UserError("recipe nests too deeply", where=str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"invalid YAML: {line}{problem}", where=str(path)) from None
    if data is None:
        raise UserError("recipe is empty", where=str(path))
    if not isinstance(data, dict):
        raise UserError("a recipe must be a mapping of sections (model:, data:, ...)", where=str(path))
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else in `override` replaces the base value."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _absolutise_local_paths(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Make the recipe's own relative paths absolute against the directory of the file that wrote them.

    Done per file before merging, so a base recipe's paths stay relative to the base, not to the child.
    """
    raw = deep_merge(raw, {})
    data = raw.get("data")
    if isinstance(data, dict):
        data = raw["data"] = dict(data)
        for split in ("train", "eval"):
            source = data.get(split)
            if isinstance(source, str):
                data[split] = _absolutise(source, base_dir)
            elif isinstance(source, dict) and isinstance(source.get("path"), str):
                data[split] = {**source, "path": _absolutise(source["path"], base_dir)}
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        raw["model"] = {**model, "name_or_path": _absolutise(model["name_or_path"], base_dir)}
    adapter = raw.get("adapter")
    if isinstance(adapter, dict) and isinstance(adapter.get("init_from"), str):
        raw["adapter"] = {**adapter, "init_from": _absolutise(adapter["init_from"], base_dir)}
    distributed = raw.get("distributed")
    if isinstance(distributed, dict) and isinstance(distributed.get("deepspeed_config"), str):
        path = str((base_dir / Path(distributed["deepspeed_config"]).expanduser()).resolve())
        raw["distributed"] = {**distributed, "deepspeed_config": path}
    return raw


def looks_local(value: str) -> bool:
    """A path rather than a hub id: explicit relative/absolute/home prefix or a data-file suffix."""
    return value.startswith(("/", "./", "../", "~")) or value.lower().endswith(DATA_SUFFIXES)


def _absolutise(value: str, base_dir: Path) -> str:
    if "\0" in value:  # no file system path holds NUL; left as given, the check of its key reports it
        return value
    candidate = (base_dir / Path(value).expanduser()).resolve()
    if looks_local(value) or candidate.exists():
        return str(candidate)
    return value  # a hub id


def load_raw(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read `path` and merge its `extends:` chain (bases first), with relative paths made absolute."""
    path = path.expanduser().resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise UserError(f"extends cycle: {cycle}", where=str(_chain[0]))
    raw = _absolutise_local_paths(read_yaml(path), path.parent)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise UserError(f"extends must be a path to another recipe (got {shown(parent)})", where=f"{path}: extends")
    base_path = path.parent / parent
    if not base_path.exists():
        raise UserError(f"base recipe '{parent}' not found (looked at {base_path})", where=f"{path}: extends")
    return deep_merge(load_raw(base_path, (*_chain, path)), raw)


def _suggest(dotted: str, siblings: list[str]) -> str:
    """A did-you-mean among sibling keys, matched on the last name only ('model.nme' -> 'model.name_or_path')."""
    leaf = dotted.rsplit(".", 1)[-1]
    leaves = {s.rsplit(".", 1)[-1]: s for s in siblings}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.4)
    return f" (did you mean '{leaves[close[0]]}'?)" if close else ""


def _section_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The pydantic model behind field `key` of `model` (also through `X | None`), if that field is a section."""
    annotation = model.model_fields[key].annotation
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    """The section model at key path `loc` (e.g. ['data', 'columns']), or None if it is not a section."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        model = _section_model(model, part)
    return model


def _unknown_key(loc: list[str]) -> str:
    """'unknown key' plus a did-you-mean among the keys beside it."""
    model = _model_at(loc[:-1])
    siblings = [".".join([*loc[:-1], name]) for name in model.model_fields] if model else []
    return f"unknown key{_suggest('.'.join(loc), siblings)}"


def check_key_path(dotted: str) -> None:
    """Fail unless `dotted` (e.g. 'objective.tau') names a key the schema declares."""
    parts = dotted.split(".")
    for depth in range(1, len(parts) + 1):
        parent = _model_at(parts[: depth - 1])
        if parent is None:
            raise UserError(f"'{'.'.join(parts[: depth - 1])}' has no sub-keys", where=dotted)
        if parts[depth - 1] not in parent.model_fields:
            raise UserError(_unknown_key(parts[:depth]), where=dotted)


def parse_override(item: str) -> tuple[str, Any]:
    """'objective.tau=0.5' -> ('objective.tau', 0.5); the value is parsed as a YAML scalar or flow list."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError("overrides look like key.path=value", where=item)
    check_key_path(key.strip())
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise UserError("cannot parse the value", where=key) from None
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: list[str], cwd: Path) -> dict[str, Any]:
    """Set each dotted key; override paths are relative to the working directory, as on any command line."""
    for item in overrides:
        key, value = parse_override(item)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        raw = deep_merge(raw, _absolutise_local_paths(nested, cwd))
    return raw


def format_validation_error(err: ValidationError) -> UserError:
    """The first schema error as one line naming the key path, with a did-you-mean for unknown keys."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"] if not str(p).startswith("function-")]
    where = ".".join(loc) or "recipe"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return UserError(f"{_unknown_key(loc)}{more}", where=where)
    if first["type"] == "missing":
        return UserError(f"required key is missing{more}", where=where)
    message = first["msg"].removeprefix("Value error, ")
    if not loc:  # a cross-field rule: its message names the keys itself
        return UserError(f"{message}{more}")
    return UserError(f"{message} (got {shown(first.get('input'))}){more}", where=where)


def validate(raw: dict[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, cwd: Path | None = None) -> Recipe:
    """The validated recipe at `path` with `overrides` applied; paths in it are absolute."""
    raw = load_raw(Path(path))
    raw = apply_overrides(raw, overrides or [], cwd or Path.cwd())
    recipe = validate(raw)
    recipe.output.dir = str(Path(recipe.output.dir).expanduser().resolve())
    if recipe.rollout is not None:  # a run directory like output.dir: from the working directory, kept absolute
        recipe.rollout.reward_model = str(Path(recipe.rollout.reward_model).expanduser().resolve())
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, keys in schema order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
