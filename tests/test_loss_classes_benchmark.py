"""benchmarks/loss_classes.py: the loss at one size of logits, split into rows and
classes several ways (its figures are printed, not asserted: no timed test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "loss_classes.py"


def _module():
    spec = importlib.util.spec_from_file_location("loss_classes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_split_holds_the_same_logits_and_is_printed_against_1024_classes(capsys):
    module = _module()
    assert module.main(["--repeats", "1", "--megabytes", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:]]
    assert [int(r[3]) for r in rows] == list(module.CLASSES)
    elements = int(0.5e6 / 4)
    assert [int(r[0]) for r in rows] == [elements // c for c in module.CLASSES]
    ref = next(r for r in rows if r[3] == "1024")
    assert ref[8] == "(1.00x" and ref[15] == "(1.00x)"


def test_bad_input_is_one_line_and_exit_2(capsys):
    module = _module()
    assert module.main(["--repeats", "0"]) == 2
    assert module.main(["--megabytes", "1e9"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("--repeats: 0:") and err[1].startswith("--megabytes: 1000000000.0:")
