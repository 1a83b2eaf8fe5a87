"""The `flopsim` command line: a thin layer over the Python API.

Each module in COMMAND_MODULES registers its commands on `app`.
"""

from __future__ import annotations

import importlib
import os
import sys

from flopsim.cli.app import app, narrowed

COMMAND_MODULES = [
    "flopsim.cli.cost",  # count, formula
    "flopsim.cli.scaling_cmds",  # isoflop, laws
    "flopsim.cli.hardware_cmds",  # hardware list|show
    "flopsim.cli.predict_cmds",  # predict, compare, memory, sweep
    "flopsim.cli.report_cmds",  # report
    "flopsim.cli.plan_cmds",  # plan train|serve
    "flopsim.cli.validation_cmds",  # calibrate, validate
    # -- more command modules above this line --
]

for _module in COMMAND_MODULES:
    importlib.import_module(_module)


def main() -> None:
    from flopsim import opcache

    # flopsim's schemas need no pydantic plugin; looking plugins up scans every installed
    # package's entry points when the first schema is built (~15 ms of each command).
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    opcache.allow()  # count, predict, ... read repeated op lists from the cache (flopsim.opcache)
    narrowed(app, sys.argv[1:])()
