"""Load a spec from a YAML path, a preset name or a dict, and turn every
validation failure into one line naming the field and the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Type, TypeVar

from pydantic import BaseModel, ValidationError

from flopsim.errors import SpecError
from flopsim.spec.paths import exists, is_dir, preset_names, resolve

M = TypeVar("M", bound=BaseModel)


UNION_MEMBERS = ("int", "float", "str", "bool", "constrained-int", "constrained-float")


def _field_path(loc) -> str:
    """A pydantic location as a field path, without the union members pydantic names in it."""
    return ".".join(str(p) for p in loc if p != "__root__" and p not in UNION_MEMBERS)


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line: `source: field: value: reason` for the first error pydantic found (for a
    field whose type is a union, the error that says more than "not of this type")."""
    errors = err.errors()
    first = errors[0]
    same = [e for e in errors if _field_path(e.get("loc", ())) == _field_path(first.get("loc", ()))]
    first = next((e for e in same if not e.get("type", "").endswith("_type")), first)
    loc = _field_path(first.get("loc", ()))
    msg = first.get("msg", "invalid").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        return f"{source}: unknown field '{loc}'"
    if first.get("type") == "missing":
        return f"{source}: missing field '{loc}'"
    value = repr(first.get("input"))
    if len(value) > 60:  # a 400-digit number, a long list: the start is enough to find it
        value = value[:57] + "..."
    if loc:
        return f"{source}: field '{loc}': value {value}: {msg}"
    return f"{source}: {msg}"


def validate(model: Type[M], data: Any, source: str) -> M:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(describe_validation_error(err, source)) from None


def read_yaml(path: Path, kind: str, given: str | None = None) -> Any:
    """Parse a spec file; `kind` is the presets folder (models, hardware)."""
    if not exists(path):  # (a name the system cannot even look up, too long say, does not exist)
        names = ", ".join(preset_names(kind))
        raise SpecError(f"{kind.rstrip('s')} spec '{given or path}' is neither a file nor a preset "
                        f"(presets: {names})")
    from flopsim.spec.reading import parse_yaml, read_input_text

    return parse_yaml(read_input_text(path, kind.rstrip("s")), str(path))


def load_model(path_or_name: Any):
    """A ModelSpec from a ModelSpec, a dict, a YAML path, an HF config.json or a preset name."""
    from flopsim.spec.model import ModelSpec

    if isinstance(path_or_name, ModelSpec):
        return path_or_name
    if isinstance(path_or_name, dict):
        return validate(ModelSpec, path_or_name, "model spec")
    path = resolve("models", str(path_or_name))
    if path.suffix == ".json" or is_dir(path):  # an HF config.json, or a folder holding one
        from flopsim.spec import hf

        return hf.load_hf_config(path)
    data = read_yaml(path, "models", str(path_or_name))
    _read_histogram_file(data, path)
    return validate(ModelSpec, data, str(path_or_name))


def _read_histogram_file(data: Any, spec_path: Path) -> None:
    """`moe.popularity.histogram: FILE` in a spec file: the counts read from FILE (beside the
    spec, or a path): numbers separated by commas, spaces or new lines, or a YAML/JSON list."""
    popularity = ((data or {}).get("moe") or {}).get("popularity") if isinstance(data, dict) else None
    if not isinstance(popularity, dict) or not isinstance(popularity.get("histogram"), str):
        return
    import re

    from flopsim.spec.reading import parse_yaml, read_input_text

    name = popularity["histogram"]
    path = Path(name) if Path(name).is_absolute() else spec_path.parent / name
    text = read_input_text(path, "histogram")
    if text.lstrip().startswith("["):
        counts = parse_yaml(text, str(path))
    else:
        counts = []
        for field in re.split(r"[\s,;]+", text.strip()):
            try:
                counts.append(float(field))
            except ValueError:
                raise SpecError(f"{path}: moe.popularity.histogram: {field[:40]!r} is not a number") from None
    popularity["histogram"] = counts
