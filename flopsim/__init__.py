"""flopsim: symbolic FLOP, byte, memory and wall-clock costs of transformer
language models that spend compute conditionally (MoD, MoE, MoDE, sparse FF,
token dropping), each against its dense baseline.

The package imports lazily so that `flopsim --help` stays fast: attributes
below load their module on first use.

    import flopsim
    spec = flopsim.load_model("gpt2-small")
    r = flopsim.count(spec, batch=1, seq=1024, phase="forward")
    r.flops, r.params, r.bytes, r.table()
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "flopsim.spec.loader",
    "ModelSpec": "flopsim.spec.model",
    "count": "flopsim.count",
    "formula": "flopsim.count",
    "build_ops": "flopsim.families",
    "load_hardware": "flopsim.hardware",
    "load_calibration": "flopsim.calibration",
    "run_published": "flopsim.published",
    "predict": "flopsim.predict",
    "compare": "flopsim.predict",
    "memory": "flopsim.memory",
    "isoflop": "flopsim.scaling",
    "plan_training": "flopsim.planning",
    "plan_serving": "flopsim.planning",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flopsim' has no attribute {name!r}")
