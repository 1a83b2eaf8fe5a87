"""Where the shipped specs live: `specs/` beside the package in a checkout,
`flopsim/_specs` in an installed wheel, or `$FLOPSIM_SPECS`."""

from __future__ import annotations

import os
from pathlib import Path


def specs_dir() -> Path:
    env = os.environ.get("FLOPSIM_SPECS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "specs", here / "_specs"):
        if candidate.is_dir():
            return candidate
    return here.parent / "specs"


def preset_names(kind: str) -> list[str]:
    """Names of the YAML presets under specs/<kind>/ (models, hardware)."""
    folder = specs_dir() / kind
    return sorted(p.stem for p in folder.glob("*.yaml"))


def resolve(kind: str, path_or_name: str) -> Path:
    """An existing file or folder, else the preset of that name under
    specs/<kind>/ (`name.yaml`, or `name.json` for shipped HF configs such as
    `hf/gpt2`), else the path as given (the loader reports it missing)."""
    path = Path(path_or_name)
    if exists(path):
        return path
    for suffix in (".yaml", ".json"):
        preset = specs_dir() / kind / f"{path_or_name}{suffix}"
        if exists(preset) and preset.is_file():
            return preset
    if path.suffix in (".yaml", ".yml", ".json") or os.sep in path_or_name:
        return path
    return specs_dir() / kind / f"{path_or_name}.yaml"


def exists(path: Path) -> bool:
    """path.exists(), False for a name the system cannot look up (too long, a NUL in it)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def is_dir(path: Path) -> bool:
    """path.is_dir(), False for a name the system cannot look up."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False
