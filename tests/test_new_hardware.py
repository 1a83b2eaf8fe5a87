"""The issue-13 devices (B200, GB200 NVL72, MI325X, TPU v5p, TPU v6e, Gaudi 3): datasheet
figures as the sources state them, published-seeded calibrations whose every figure is cited
and whose substitutes are tagged, golden decode times derived by hand from those figures,
and the CLI naming the calibration and its provenance."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flopsim import predict
from flopsim.calibration import load_calibration
from flopsim.cli import app
from flopsim.hardware import FIGURES, load_hardware

NEW = ["b200", "gb200", "mi325x", "tpu-v5p", "tpu-v6e", "gaudi3"]
runner = CliRunner()

# (bf16 dense peak, HBM bytes/s, HBM bytes, scale-up bytes/s both ways, scale-up domain, network bytes/s both ways)
DATASHEET = {
    # HGX B200 table: BF16 4.5 PFLOPS with sparsity -> 2.25 dense; 180 GB at 7.7 TB/s; NVLink 5 1.8 TB/s;
    # 8 GPUs per board; one 400 Gb/s ConnectX-7 per GPU (DGX B200) -> 2 x 50 GB/s
    "b200": (2.25e15, 7.7e12, 180e9, 1.8e12, 8, 2 * 400e9 / 8),
    # GB200 NVL72: 360 PFLOPS sparse bf16 per rack / 72 / 2; 576 TB/s / 72; 130 TB/s NVLink / 72 (1.8 TB/s);
    # one 400G NIC per GPU
    "gb200": (360e15 / 72 / 2, 576e12 / 72, 186e9, 1.8e12, 72, 2 * 400e9 / 8),
    # MI325X: MI300X compute, 256 GB HBM3E at 6 TB/s, 7 x 128 GB/s Infinity Fabric
    "mi325x": (1307.4e12, 6.0e12, 256e9, 7 * 128e9, 8, 2 * 400e9 / 8),
    # v5p: 459 TFLOPs, 2765 GBps, 1200 GBps bidirectional ICI, largest slice 6144, DCN 50 Gbps per chip
    "tpu-v5p": (459e12, 2765e9, 95e9, 1200e9, 6144, 2 * 50e9 / 8),
    # v6e: 918 TFLOPs, 1640 GBps, 32 GB, 800 GBps bidirectional ICI, 256-chip pod, 4 x 200 Gbps per 8-chip host
    "tpu-v6e": (918e12, 1640e9, 32e9, 800e9, 256, 2 * (4 * 200e9 / 8) / 8),
    # Gaudi 3: 1835 TFLOPs, 3.67 TB/s, 128 GB, 21 x 200 Gbps scale-up ports, 8 per HLS-3, 3 x 200 Gbps scale-out
    "gaudi3": (1835e12, 3.67e12, 128e9, 2 * 21 * 200e9 / 8, 8, 2 * 3 * 200e9 / 8),
}


@pytest.mark.parametrize("name", NEW)
def test_datasheet_figures_as_the_sources_state_them(name):
    hw = load_hardware(name)
    bf16, bw, cap, link, domain, net = DATASHEET[name]
    assert hw.peak_flops_per_s_for("bf16")[0] == pytest.approx(bf16, rel=1e-9)
    assert hw.memory_bandwidth_bytes_per_s == pytest.approx(bw, rel=1e-9)
    assert hw.memory_capacity_bytes == pytest.approx(cap, rel=1e-9)
    assert hw.interconnect_bytes_per_s == pytest.approx(link, rel=1e-9)
    assert hw.scale_up_domain == domain
    assert hw.scale_out_bytes_per_s == pytest.approx(net, rel=1e-9)
    for figure in FIGURES:
        if getattr(hw, figure) is not None:
            assert len(hw.sources[figure]) > 20, (name, figure)


def test_gb200_is_one_gpu_of_the_nvl72_domain_and_tpus_fall_back_to_bf16():
    gb200, b200 = load_hardware("gb200"), load_hardware("b200")
    assert gb200.scale_up_domain == 72 and b200.scale_up_domain == 8
    assert gb200.peak_flops_per_s["bf16"] > b200.peak_flops_per_s["bf16"]  # 1,200 W vs 1,000 W part
    for name in ("tpu-v5p", "tpu-v6e"):
        hw = load_hardware(name)
        assert hw.peak_flops_per_s_for("fp32") == (hw.peak_flops_per_s["bf16"], "bf16")
        assert hw.peak_flops_per_s_for("fp8") == (hw.peak_flops_per_s["bf16"], "bf16")
    # Gaudi 3: fp8 at the bf16 rate, non-matrix ops at the TPC vector rate
    gaudi = load_hardware("gaudi3")
    assert gaudi.peak_flops_per_s["fp8"] == gaudi.peak_flops_per_s["bf16"]
    assert gaudi.vector_flops_per_s == 28.7e12


@pytest.mark.parametrize("name", NEW)
def test_calibration_is_published_and_every_figure_cited(name):
    hw = load_hardware(name)
    cal = load_calibration("auto", hw)
    assert cal.kind == "published" and cal.device == name
    assert cal.provenance_label.startswith(f"{name}: published")
    assert not cal.is_ideal
    keys = set(cal.sources)
    assert {"default.compute", "default.memory", "kinds.attention", "kinds.attention@bwd",
            "launch_overhead_s"} <= keys
    assert "fixed_s.matmul" in keys and cal.fixed_s
    for point in [*cal.gemm, *cal.sizes]:
        assert point.source, (name, point)
    for level, link in cal.links.items():
        assert link.source and f"links.{level}" in keys, (name, level)
    assert all(text.strip() for text in cal.sources.values())


@pytest.mark.parametrize("name", NEW)
def test_no_end_to_end_result_sets_an_efficiency(name):
    """Calibrations are seeded from microbenchmarks, never from MFU / tokens/s / GPU-hours."""
    cal = load_calibration("auto", load_hardware(name))
    for text in cal.cited_sources():
        lowered = text.lower()
        assert "mfu" not in lowered and "tokens/s" not in lowered and "gpu-hours" not in lowered, (name, text)


def test_substitutes_are_tagged():
    """A figure not measured on the device itself says what it is instead."""
    tagged = ("[sibling", "[derived", "[assumption", "[model", "[secondary")
    expect = {
        "b200": ["fixed_s.matmul", "kinds.attention", "kinds.attention@bwd"],
        "gb200": ["default.memory", "fixed_s.matmul", "kinds.attention", "links.scale_out"],
        "mi325x": ["default.memory", "kinds.attention", "links.scale_up", "links.scale_out"],
        "tpu-v5p": ["default.compute", "default.memory", "kinds.attention", "links.scale_up", "fixed_s.matmul"],
        "tpu-v6e": ["default.memory", "kinds.attention", "links.scale_up", "fixed_s.matmul"],
        "gaudi3": ["default.memory", "kinds.attention", "fixed_s.matmul"],
    }
    for name, keys in expect.items():
        cal = load_calibration("auto", load_hardware(name))
        for key in keys:
            assert cal.sources[key].startswith(tagged), (name, key)


@pytest.mark.parametrize("name", ["tpu-v5p", "tpu-v6e", "gaudi3"])
def test_unmeasured_links_fall_back_to_the_datasheet_labelled_ideal(name):
    hw = load_hardware(name)
    cal = load_calibration("auto", hw)
    out = cal.link("scale_out", hw)
    assert "scale_out" not in cal.links and "ideal link" in out.source
    assert out.bus_bytes_per_s == hw.scale_out_bytes_per_s / 2


# Decode of Llama 3 8B at batch 1, context 64: every op is memory-bound and streams its bytes at
# the calibration's default memory efficiency (no GEMV or size points on these devices), so the
# step is bytes / (datasheet bandwidth x memory efficiency) + kernels x fixed cost per launch.
# bf16 weights: 2 x 8,030,261,248 parameters, less the embedding table (128,256 x 4,096) of which
# decode reads one row, = 15.01 GB; the KV cache and activations add ~0.1%.
WEIGHT_BYTES = 2 * (8_030_261_248 - 128_256 * 4_096)
GOLDEN = {  # (HBM bytes/s from the datasheet, memory efficiency and fixed seconds per kernel from the calibration)
    "b200": (7.7e12, 0.838, 2.43e-6),     # FluidX3D 6.449 TB/s / 7.7; RRZE H200 launch loop [sibling]
    "gb200": (8.0e12, 0.806, 2.43e-6),    # FluidX3D B200 6.449 TB/s / 8 [sibling]
    "mi325x": (6.0e12, 0.766, 2.05e-6),   # RRZE MI300X stream 4058 / 5300 [sibling]; MI210 launch [sibling]
    "tpu-v5p": (2765e9, 0.85, 1.0e-6),    # [assumption] 0.85, 1 us per op
    "tpu-v6e": (1640e9, 0.85, 1.0e-6),
    "gaudi3": (3.67e12, 0.85, 2.0e-6),
}


@pytest.mark.parametrize("name", NEW)
def test_golden_decode_step_from_the_datasheet(name):
    bandwidth, memory_eff, fixed = GOLDEN[name]
    s = predict("llama-3-8b", name, phase="decode", batch=1, seq=1, context=64).summary()
    assert s["calibration_kind"] == "published" and s["calibration_label"].startswith(f"{name}: published")
    assert s["bound"] == "memory" and s["compute_bound_s"] == 0
    assert s["bytes"] == pytest.approx(WEIGHT_BYTES, rel=5e-3)
    assert s["memory_bound_s"] == pytest.approx(s["bytes"] / (bandwidth * memory_eff), rel=1e-9)
    assert s["overhead_s"] == pytest.approx(s["kernels"] * fixed, rel=1e-9)
    assert s["time_s"] == pytest.approx(s["memory_bound_s"] + s["overhead_s"], rel=1e-9)
    # the weights alone bound the step from below at the ideal roofline
    assert s["time_s"] > WEIGHT_BYTES / bandwidth


def test_golden_decode_numbers():
    """The same bound written out: B200 15.01 GB / (7.7 TB/s x 0.838) = 2.33 ms of streaming;
    TPU v6e 15.01 GB / (1.64 TB/s x 0.85) = 10.8 ms."""
    b200 = predict("llama-3-8b", "b200", phase="decode", batch=1, seq=1, context=64).summary()
    assert b200["memory_bound_s"] == pytest.approx(2.33e-3, rel=5e-3)
    v6e = predict("llama-3-8b", "tpu-v6e", phase="decode", batch=1, seq=1, context=64).summary()
    assert v6e["memory_bound_s"] == pytest.approx(10.78e-3, rel=5e-3)


def test_gemm_shapes_interpolate_between_the_cited_points():
    """MI325X's own torch.matmul curve (HipKittens): exact at a measured size, in between elsewhere."""
    cal = load_calibration("auto", load_hardware("mi325x"))
    assert cal.efficiency("matmul", (1, 4096, 4096, 4096))[0] == pytest.approx(752.54 / 1307.4, abs=1e-3)
    mid = cal.efficiency("matmul", (1, 3000, 3000, 3000))[0]
    assert 324.96 / 1307.4 < mid < 752.54 / 1307.4
    b200 = load_calibration("auto", load_hardware("b200"))
    assert b200.efficiency("matmul", (1, 1792, 16128, 3072))[0] == pytest.approx(1745.0 / 2250, abs=1e-3)


@pytest.mark.parametrize("name", NEW)
def test_cli_show_and_predict_name_the_calibration(name):
    r = runner.invoke(app, ["hardware", "show", name, "--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["name"] == name and set(data["sources"]) >= {"peak_flops_per_s", "memory_bandwidth_bytes_per_s"}
    r = runner.invoke(app, ["predict", "llama-3-8b", "--hardware", name, "--phase", "decode", "--format", "json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    summary = out.get("summary", out)
    assert summary["calibration_kind"] == "published"
    assert summary["calibration_label"].startswith(f"{name}: published")
    r = runner.invoke(app, ["predict", "llama-3-8b", "--hardware", name, "--phase", "decode"])
    assert r.exit_code == 0 and f"{name}: published" in r.output


def test_cli_list_shows_the_new_devices():
    r = runner.invoke(app, ["hardware", "list", "--format", "json"])
    assert r.exit_code == 0
    assert {row["name"] for row in json.loads(r.stdout)} >= set(NEW)


@pytest.mark.parametrize("device_name, preset", [
    ("NVIDIA B200", "b200"), ("NVIDIA GB200", "gb200"), ("AMD Instinct MI325X", "mi325x"),
    ("AMD Instinct MI300X", "mi300x"), ("NVIDIA H200", "h200"),
])
def test_calibrate_maps_the_gpu_name_to_its_preset(monkeypatch, device_name, preset):
    import torch

    from flopsim.calibrate import guess_hardware

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: device_name)
    assert guess_hardware("cuda") == preset


def test_show_keeps_the_substitute_tags_in_its_text():
    """Sources carry tags such as [secondary] and [derived]; the table output must not eat them as markup."""
    r = runner.invoke(app, ["hardware", "show", "gaudi3"])
    assert r.exit_code == 0 and "[secondary]" in r.output and "[derived]" in r.output
