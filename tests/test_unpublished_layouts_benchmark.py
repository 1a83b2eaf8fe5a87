"""benchmarks/unpublished_layouts.py: a published row whose layout is not published,
predicted again under the other layouts a reader could assume (its figures are printed,
not asserted as targets)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from flopsim.published import load_published, predict_row

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "unpublished_layouts.py"
ROW = next(r for r in load_published().rows if r.id == "llama2-70b-gpu-hours")


def _module():
    spec = importlib.util.spec_from_file_location("unpublished_layouts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_layout_takes_the_largest_micro_batch_that_fits_and_the_scored_one_is_the_suites():
    module = _module()
    layouts = {(g, tp): (dp, mb, result, fits) for g, tp, dp, mb, result, fits in module._layouts(ROW, [1024, 512])}
    assert set(layouts) == {(g, tp) for g in (1024, 512) for tp in (1, 2, 4, 8)}
    sequences = 4194304 // 4096  # the 4M-token batch at sequence 4096
    for (gpus, tp), (dp, mb, _, fits) in layouts.items():
        assert dp == gpus // tp and (sequences // dp) % mb == 0
        assert fits or mb == 1  # only a micro-batch of one is shown when nothing fits
    dp, mb, result, fits = layouts[(1024, 8)]
    assert (dp, mb, fits) == (128, 8, True)  # 8 sequences a replica, all in one micro-batch
    assert result.predicted == pytest.approx(predict_row(ROW, {}).predicted, rel=1e-12)  # the scored row
    dp, mb, _, fits = layouts[(512, 8)]
    assert (dp, mb, fits) == (64, 8, True)  # 16 sequences a replica: 16 does not fit, 8 does
    too_big = module._variant(ROW, 512, 8, 16)
    from flopsim.published import _setup, _train_plan
    assert not _train_plan(too_big, _setup(too_big), tokens=float(ROW.shape["tokens"])).fits


def test_prints_the_scored_layout_marked_and_the_spread(capsys):
    module = _module()
    assert module.main(["--rows", ROW.id, "--gpus", "1024"]) == 0
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and marked[0].split()[1:5] == ["1024", "8", "128", "8"]
    assert "over the layouts that fit:" in out


def test_bad_input_is_one_line_and_exit_2(capsys):
    module = _module()
    assert module.main(["--rows", "no-such-row"]) == 2
    assert module.main(["--gpus", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("--rows: no-such-row:") and err[1].startswith("--gpus: 0:")
