"""Sweeps: grid syntax, and every grid point equal to `predict` at that
configuration (the same roofline on the same Op lists), for token axes, model
dimensions, derived defaults, structural fields and shape-aware calibration."""

from __future__ import annotations

import numpy as np
import pytest

from flopsim.errors import InputError
from flopsim.predict import predict
from flopsim.spec import load_model
from flopsim.spec.paths import preset_names
from flopsim.sweep import parse_vary, parse_varies, sweep

HAS_MOD = "decoder-220m-mod" in preset_names("models")


def test_parse_vary():
    name, values = parse_vary("capacity=0.05:1:0.05")
    assert name == "capacity" and len(values) == 20 and values[0] == 0.05 and values[-1] == 1 and values[2] == 0.15
    assert parse_vary("batch=1,8,64") == ("batch", [1, 8, 64])
    assert parse_vary("seq=128:2048:*2") == ("seq", [128, 256, 512, 1024, 2048])
    assert parse_vary("seq=128:2000:*2")[1][-1] == 1024
    assert parse_vary("k=2") == ("k", [2])
    assert list(parse_varies(["a=1", "b=2,3"])) == ["a", "b"]
    for bad in ("batch", "batch=", "=1,2", "batch=1:2", "batch=1:2:0", "batch=2:1:1", "batch=0:8:*2", "batch=a,b"):
        with pytest.raises(InputError):
            parse_vary(bad)


def _same(grid_point: dict, r) -> None:
    assert grid_point["time_s"] == pytest.approx(r.time_s, rel=1e-9)
    assert grid_point["flops"] == pytest.approx(r.flops, rel=1e-12)
    assert grid_point["bytes"] == pytest.approx(r.bytes, rel=1e-12)
    assert grid_point["bound"] == r.bound
    assert grid_point["mfu"] == pytest.approx(r.mfu, rel=1e-9)


@pytest.mark.parametrize("phase", ["forward", "train", "prefill", "decode"])
def test_token_axes_match_predict(phase):
    g = sweep("gpt2-small", "h100-sxm", phase=phase, vary={"batch": [1, 4, 32], "seq": [16, 200, 1024]})
    assert g.points == 9 and g.table().shape[0] == 9
    for b, s in [(1, 16), (4, 200), (32, 1024)]:
        kw = dict(batch=b, seq=s) if phase != "decode" else dict(batch=b, context=s)
        _same(g.at(batch=b, seq=s), predict("gpt2-small", "h100-sxm", phase=phase, **kw))


def test_prefill_context_axis():
    g = sweep("llama-3-8b", "h200", phase="prefill", seq=128, vary={"context": [128, 1024, 8192]})
    for t in (128, 8192):
        _same(g.at(context=t), predict("llama-3-8b", "h200", phase="prefill", batch=1, seq=128, context=t))


def test_dimension_axes_and_derived_defaults():
    """Varying d_model re-derives d_head = d_model // heads (not set in gpt2-small);
    varying heads re-derives kv_heads = heads."""
    spec = load_model("gpt2-small")
    g = sweep(spec, "a100-80gb", phase="train", seq=128, vary={"d_model": [512, 768, 1024], "heads": [8, 16]})
    for d_model, heads in [(512, 8), (1024, 16), (768, 16)]:
        _same(g.at(d_model=d_model, heads=heads),
              predict(spec.with_changes(d_model=d_model, heads=heads), "a100-80gb", phase="train", batch=1, seq=128))


def test_structural_axis():
    spec = load_model("gpt2-small")
    g = sweep(spec, "h100-sxm", phase="prefill", vary={"layers": [2, 12, 24], "batch": [1, 16]}, seq=256)
    for layers in (2, 24):
        _same(g.at(layers=layers, batch=16),
              predict(spec.with_changes(layers=layers), "h100-sxm", phase="prefill", batch=16, seq=256))


def test_shape_aware_calibration_is_applied_per_grid_point():
    """The cpu calibration's efficiency depends on each product's shape."""
    g = sweep("gpt2-small", "cpu", phase="forward", vary={"seq": [8, 64, 512]})
    for s in (8, 512):
        _same(g.at(seq=s), predict("gpt2-small", "cpu", phase="forward", batch=1, seq=s))


@pytest.mark.skipif(not HAS_MOD, reason="decoder-220m-mod preset not present")
@pytest.mark.parametrize("phase", ["train", "prefill", "decode"])
def test_mod_capacity_axis(phase):
    spec = load_model("decoder-220m-mod")
    caps = [0.05, 0.125, 0.5, 1.0]
    g = sweep(spec, "h100-sxm", phase=phase, vary={"capacity": caps, "batch": [1, 8]}, seq=512)
    for c in (0.05, 0.5, 1.0):
        _same(g.at(capacity=c, batch=8),
              predict(spec.with_changes(mod={"capacity": c}), "h100-sxm", phase=phase, batch=8, seq=512))
    time = np.asarray(g.grids["time_s"])
    assert np.all(np.diff(time, axis=0) >= 0)  # more capacity, more time


def test_grid_columns_are_c_ordered():
    g = sweep("gpt2-small", "h100-sxm", vary={"batch": [1, 2], "seq": [8, 16, 32]})
    table = g.table()
    assert list(table["batch"]) == [1, 1, 1, 2, 2, 2] and list(table["seq"]) == [8, 16, 32] * 2
    assert (table["tokens_per_s"] * table["time_s"]).round().tolist() == [8, 16, 32, 16, 32, 64]


def test_bad_axes():
    with pytest.raises(InputError, match="unknown axis"):
        sweep("gpt2-small", "h100-sxm", vary={"wings": [1]})
    with pytest.raises(InputError, match="decode"):
        sweep("gpt2-small", "h100-sxm", phase="decode", vary={"seq": [8], "context": [16]})
    with pytest.raises(InputError, match="at least seq"):
        sweep("llama-3-8b", "h100-sxm", phase="prefill", seq=512, vary={"context": [128]})


def test_sweep_and_isoflop_report_progress():
    """The progress callbacks that the CLI's progress bars read: (done, total), ending done == total."""
    from flopsim.scaling import isoflop
    from flopsim.sweep import sweep

    seen = []
    sweep("decoder-220m-mod", "h100-sxm", vary={"layers": [2, 4, 6], "batch": [1, 8]}, seq=128,
          progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]  # one spec variant per layer count
    ticks = []
    isoflop(1e20, progress=lambda done, total: ticks.append((done, total)))
    assert ticks and ticks[-1][0] == ticks[-1][1] and [d for d, _ in ticks] == list(range(1, len(ticks) + 1))


def test_train_sweep_prices_its_ops_as_predict_does_on_a_cpu():
    """The shipped CPU calibration has points measured as a train step runs its forward and
    backward kernels (flopsim.calibration lookup step 8): a train sweep prices its ops by
    them, as predict does, point for point."""
    from flopsim.calibration import load_calibration
    from flopsim.hardware import load_hardware

    sizes = load_calibration("cpu", load_hardware("cpu")).sizes
    assert any(p.train and not p.backward for p in sizes) and any(p.train and p.backward for p in sizes)
    g = sweep("gpt2-small", "cpu", phase="train", vary={"batch": [1, 2], "seq": [16, 64]})
    for b, s in [(1, 16), (2, 64)]:
        _same(g.at(batch=b, seq=s), predict("gpt2-small", "cpu", phase="train", batch=b, seq=s))
