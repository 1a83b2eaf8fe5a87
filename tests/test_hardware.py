"""Hardware specs: presets load, every figure has a source, datasheet figures
the rest of flopsim relies on, dtype fallbacks, one-line errors, the CLI."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from flopsim.cli import app
from flopsim.errors import SpecError
from flopsim.hardware import FIGURES, HardwareSpec, hardware_names, load_hardware

DESIGN_NAMES = ["h100-sxm", "h100-pcie", "h200", "a100-40gb", "a100-80gb", "l4", "l40s", "mi300x", "tpu-v5e", "cpu"]
runner = CliRunner()


def test_every_design_preset_exists_and_validates():
    assert set(DESIGN_NAMES) <= set(hardware_names())
    for name in hardware_names():
        hw = load_hardware(name)
        assert hw.name == name
        for figure in FIGURES:
            if getattr(hw, figure) is not None:
                assert hw.sources[figure].strip(), (name, figure)
        assert all(v > 0 for v in hw.peak_flops_per_s.values())


def test_datasheet_figures_match_references():
    """docs/measurements.md and the datasheets: H100 SXM 989 TFLOP/s bf16 dense, 67 fp32, 3.35 TB/s, 80 GB;
    H200 the same compute, 4.8 TB/s, 141 GB; A100 SXM 80 GB 312 bf16, 19.5 fp32, 2.04 TB/s."""
    h100 = load_hardware("h100-sxm")
    assert h100.peak_flops_per_s["bf16"] == pytest.approx(989e12, rel=1e-3)
    assert h100.peak_flops_per_s["fp32"] == pytest.approx(67e12, rel=2e-3)
    assert h100.memory_bandwidth_bytes_per_s == 3.35e12
    assert h100.memory_capacity_bytes == 80e9
    h200 = load_hardware("h200")
    assert h200.peak_flops_per_s == h100.peak_flops_per_s
    assert (h200.memory_bandwidth_bytes_per_s, h200.memory_capacity_bytes) == (4.8e12, 141e9)
    a100 = load_hardware("a100-80gb")
    assert (a100.peak_flops_per_s["bf16"], a100.peak_flops_per_s["fp32"]) == (312e12, 19.5e12)
    assert a100.memory_bandwidth_bytes_per_s == pytest.approx(2.04e12, rel=1e-3)


# Devices whose matrix engines break the usual 2x-per-halving ladder, with the datasheet's own ratios.
# Gaudi 3's MME runs fp8 at the bf16 rate and bf16 at 4x tf32 / fp16 (Intel Gaudi 3 white paper).
LADDER_EXCEPTIONS = {"gaudi3": {"fp8": 1.0, "tf32": 0.25, "fp16": 0.25}}


def test_dense_peaks_are_ordered():
    """Dense, not sparse: narrower types are at most 2x the wider tensor-core rate."""
    for name, ratios in LADDER_EXCEPTIONS.items():
        p = load_hardware(name).peak_flops_per_s
        for dtype, ratio in ratios.items():
            assert p[dtype] == pytest.approx(ratio * p["bf16"], rel=0.01), (name, dtype)
    for name in hardware_names():
        if name in LADDER_EXCEPTIONS:
            continue
        p = load_hardware(name).peak_flops_per_s
        if "bf16" in p and "fp8" in p:
            assert p["fp8"] == pytest.approx(2 * p["bf16"], rel=0.03), name
        if "tf32" in p and "bf16" in p:
            assert p["bf16"] == pytest.approx(2 * p["tf32"], rel=0.03), name


def test_dtype_fallbacks():
    assert load_hardware("a100-40gb").peak_flops_per_s_for("fp8") == (312e12, "fp16")
    assert load_hardware("cpu").peak_flops_per_s_for("bf16") == (210e9, "fp32")
    assert load_hardware("tpu-v5e").peak_flops_per_s_for("fp32") == (197e12, "bf16")
    assert load_hardware("tpu-v5e").vector_flops_per_s == 197e12
    assert load_hardware("h100-sxm").ridge_flops_per_byte("bf16") == pytest.approx(989.4e12 / 3.35e12)


def _write(tmp_path, data):
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base():
    from flopsim.spec.paths import specs_dir

    return yaml.safe_load((specs_dir() / "hardware" / "l4.yaml").read_text())


@pytest.mark.parametrize("change, words", [
    (lambda d: d["sources"].pop("memory_bandwidth_bytes_per_s"), "memory_bandwidth_bytes_per_s"),
    (lambda d: d.update(memory_bandwidth_bytes_per_s=-1), "memory_bandwidth_bytes_per_s"),
    (lambda d: d.update(flux=3), "flux"),
    (lambda d: d["peak_flops_per_s"].update(fp2=1e15), "fp2"),
    (lambda d: d["peak_flops_per_s"].update(bf16=0), "bf16"),
    (lambda d: d.pop("memory_capacity_bytes"), "memory_capacity_bytes"),
])
def test_bad_specs_fail_in_one_line_naming_the_field(tmp_path, change, words):
    data = _base()
    change(data)
    with pytest.raises(SpecError) as err:
        load_hardware(str(_write(tmp_path, data)))
    message = str(err.value)
    assert "\n" not in message and words in message


def test_unknown_hardware_lists_presets():
    with pytest.raises(SpecError, match="h100-sxm"):
        load_hardware("h900")
    assert isinstance(load_hardware(load_hardware("l4")), HardwareSpec)


def test_cli_list_and_show():
    r = runner.invoke(app, ["hardware", "list"])
    assert r.exit_code == 0, r.output
    assert "h100-sxm" in r.output and "tpu-v5e" in r.output
    r = runner.invoke(app, ["hardware", "list", "--format", "json"])
    rows = json.loads(r.stdout)
    assert {row["name"] for row in rows} >= set(DESIGN_NAMES)
    r = runner.invoke(app, ["hardware", "list", "--format", "csv"])
    assert r.stdout.splitlines()[0].startswith("name,kind,description,peak_flops_per_s_fp32")
    r = runner.invoke(app, ["hardware", "show", "h100-sxm", "--format", "json"])
    data = json.loads(r.stdout)
    assert data["peak_flops_per_s"]["bf16"] == 989.4e12 and "datasheet" in data["sources"]["peak_flops_per_s"]
    assert data["unverified"] == ["launch_overhead_s"]
    r = runner.invoke(app, ["hardware", "show", "mi300x"])
    assert r.exit_code == 0 and "Infinity" in r.output
    r = runner.invoke(app, ["hardware", "show", "cpu", "--format", "csv"])
    assert "docs/measurements.md" in r.stdout


def test_cli_unknown_hardware_exits_2_in_one_line():
    r = runner.invoke(app, ["hardware", "show", "h900"])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("flopsim: error:") and "h900" in lines[0]
