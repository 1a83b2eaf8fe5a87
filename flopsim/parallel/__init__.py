"""Parallel layouts and what they do to an op list: `layout` (degrees, groups and
link levels; no sympy), `shard` (one GPU's ops plus the collectives among them).
Attributes load their module on first use, so that a layout costs no sympy import;
import the transformation itself as `from flopsim.parallel.shard import shard`."""

from __future__ import annotations

import importlib

_API = {"Layout": "flopsim.parallel.layout", "make_layout": "flopsim.parallel.layout"}
# the transformation: `from flopsim.parallel.shard import shard` (the module shares its name)

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flopsim.parallel' has no attribute {name!r}")
