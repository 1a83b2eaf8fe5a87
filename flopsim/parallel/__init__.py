"""Parallel layouts and what they do to an op list: `layout` (degrees, groups and
link levels), `shard` (one GPU's ops plus the collectives among them)."""

from __future__ import annotations

from flopsim.parallel.layout import Layout, make_layout
from flopsim.parallel.shard import shard

__all__ = ["Layout", "make_layout", "shard"]
