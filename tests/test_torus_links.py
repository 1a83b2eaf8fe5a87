"""Torus link levels (TPU ICI): a group of whole torus axes runs bidirectional rings over
the wraparound links (level `scale_up_torus`), a smaller group the line without them
(`scale_up`); flopsim.parallel.layout decides, flopsim.planning.links and the calibration
give the figures, flopsim.collectives prices them (its one formula)."""

from __future__ import annotations

import pytest

from flopsim.calibration import Calibration, LinkLevel, load_calibration
from flopsim.collectives import collective_s
from flopsim.hardware import load_hardware
from flopsim.parallel.layout import closes_torus_rings, make_layout
from flopsim.planning import plan_training
from flopsim.planning.links import resolve_links
from flopsim.spec import load_model

V5E = "tpu-v5e"


@pytest.mark.parametrize("ranks, span, axis, closes", [
    (16, 16, 16, True),     # one row of a 16x16 torus (tp 16)
    (32, 32, 16, True),     # two whole rows: one ring through both
    (256, 256, 16, True),   # the whole pod
    (16, 256, 16, True),    # one column: stride 16 (dp 16 under tp 16)
    (4, 4, 16, False),      # part of a row: a line without wraparound
    (64, 256, 16, False),   # stride 4: every 4th chip of 4 rows, no whole axis
    (8, 16, 16, False),     # fewer ranks than an axis
    (16, 16, None, False),  # no torus
])
def test_which_groups_close_torus_rings(ranks, span, axis, closes):
    assert closes_torus_rings(ranks, span, axis) is closes


def test_layout_levels_on_a_torus():
    spec = load_model("llama-2-7b")  # 32 heads
    whole = make_layout(spec, "train", tp=16, dp=16, gpus_per_node=256, torus_axis=16)
    assert (whole.level("tp"), whole.level("dp")) == ("scale_up_torus", "scale_up_torus")
    part = make_layout(spec, "train", tp=4, dp=64, gpus_per_node=256, torus_axis=16)
    assert (part.level("tp"), part.level("dp")) == ("scale_up", "scale_up")
    gpu = make_layout(spec, "train", tp=16, dp=16, gpus_per_node=256)  # no torus: the plain level
    assert gpu.level("tp") == "scale_up"


def test_links_take_the_calibrations_torus_figure_and_fall_back_to_the_line():
    hw = load_hardware(V5E)
    cal = load_calibration("auto", hw)
    links = resolve_links(hw, cal, None, None, None, None, needed=True)
    assert links.torus_axis == hw.torus_axis == 16
    assert links.scale_up_torus == cal.links["scale_up_torus"]
    assert links.by_level["scale_up_torus"].bus_bytes_per_s == cal.links["scale_up_torus"].bus_bytes_per_s
    line = LinkLevel(latency_s=1e-5, bus_bytes_per_s=1e10, source="a line")
    assert Calibration(links={"scale_up": line}).link("scale_up_torus") == line
    given = resolve_links(hw, cal, 2e11, None, None, None, needed=True)  # the user's figure sets both
    assert given.scale_up_torus.bus_bytes_per_s == given.scale_up.bus_bytes_per_s == 1e11


def _tp_message(tp: int, hw):
    plan = plan_training("llama-2-7b", hw, gpus=tp, tokens=1e9, seq=2048, global_batch=tp, tp=tp, dp=1,
                         micro_batch=1, zero=0)
    comm = plan.communication
    return comm["tp_bytes_per_collective"], comm["tp_collective_s"], comm["tp_link"], plan


def test_a_whole_axis_tensor_group_is_priced_on_the_wrapped_rings():
    hw = load_hardware(V5E)
    cal = load_calibration("auto", hw)
    nbytes, one, where, _ = _tp_message(16, hw)
    torus = cal.links["scale_up_torus"]
    # Megatron's sequence-parallel all-gather / reduce-scatter over 16 ranks: (n - 1) / n of the message
    assert one == pytest.approx(torus.latency_s + 15 / 16 * nbytes / torus.bus_bytes_per_s, rel=1e-9)
    assert where == "intra-node, torus rings"
    line = cal.links["scale_up"]
    nbytes4, one4, where4, _ = _tp_message(4, hw)  # part of an axis: the line's figure
    assert one4 == pytest.approx(line.latency_s + 3 / 4 * nbytes4 / line.bus_bytes_per_s, rel=1e-9)
    assert where4 == "intra-node"
    no_torus = hw.model_copy(update={"torus_axis": None})
    _, one_line, where_line, _ = _tp_message(16, no_torus)
    assert one_line == pytest.approx(collective_s("all_gather", nbytes, 16, line.bus_bytes_per_s, line.latency_s),
                                     rel=1e-9)
    assert where_line == "intra-node"
