"""Specs: the model spec (pydantic) and its loaders.

`load_model`, `ModelSpec` and `DTYPE_BYTES` load on first use (PEP 562), so that
importing a light submodule (`flopsim.spec.paths`, which the command line needs for
every command) does not import pydantic."""

from __future__ import annotations

__all__ = ["ModelSpec", "load_model", "DTYPE_BYTES"]


def __getattr__(name: str):
    if name == "load_model":
        from flopsim.spec.loader import load_model

        return load_model
    if name in ("ModelSpec", "DTYPE_BYTES"):
        from flopsim.spec import model

        return getattr(model, name)
    raise AttributeError(f"module 'flopsim.spec' has no attribute {name!r}")
