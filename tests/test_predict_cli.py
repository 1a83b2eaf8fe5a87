"""predict / compare / memory / sweep: the Python API and the command line
(typer's CliRunner on flopsim.cli.app), bad input included (exit 2, one line)."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from conftest import one_error_line
from conftest import run_cli as run

import flopsim
from flopsim.cli import app
from flopsim.spec.paths import preset_names

runner = CliRunner()
HAS_MOD = "decoder-220m-mod" in preset_names("models")




# -- API ---------------------------------------------------------------------------
def test_lazy_api_names_are_callable_even_after_importing_the_modules():
    import flopsim.memory  # noqa: F401  (the submodule shadows the package attribute)
    import flopsim.predict  # noqa: F401

    assert flopsim.predict("gpt2-small", "h100-sxm", batch=1, seq=32).time_s > 0
    assert flopsim.memory("gpt2-small", phase="train", batch=1, seq=32).total_bytes > 0
    assert flopsim.load_hardware("h200").name == "h200"
    assert flopsim.compare(["gpt2-small"], "h100-sxm", seq=32).rows[0]["speedup"] == 1.0


def test_predict_result_api():
    r = flopsim.predict("gpt2-small", "h100-sxm", phase="train", batch=2, seq=256)
    table = r.table()
    assert len(table) == len(r.ops) and {"name", "pass", "time_s", "bound", "intensity"} <= set(table.columns)
    assert r.ops[-1].kind == "optimizer"  # the update step ends a train step
    assert r.flops == flopsim.count("gpt2-small", batch=2, seq=256, phase="train").flops  # the update adds no `flops`
    assert r.tokens_per_s == pytest.approx(2 * 256 / r.time_s)
    assert r.per_layer()["part"].iloc[-1] == "optimizer"
    no_opt = flopsim.predict("gpt2-small", "h100-sxm", phase="train", batch=2, seq=256, optimizer="none")
    assert no_opt.time_s < r.time_s


# -- predict -----------------------------------------------------------------------
def test_predict_json_has_the_contract_keys():
    r = run("predict", "gpt2-small", "--hardware", "h100-sxm", "--phase", "prefill", "--batch", 2, "--seq", 128,
            "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {"time_s", "flops", "bytes", "bound", "tokens_per_s", "mfu", "ops"} <= set(data)
    assert data["bound"] in ("compute", "memory")
    assert data["time_s"] == pytest.approx(sum(op["time_s"] for op in data["ops"]))
    assert {"name", "time_s", "bound", "intensity"} <= set(data["ops"][0])
    api = flopsim.predict("gpt2-small", "h100-sxm", phase="prefill", batch=2, seq=128)
    assert data["time_s"] == pytest.approx(api.time_s) and data["flops"] == api.flops


def test_predict_table_and_csv():
    r = run("predict", "llama-3-8b", "-H", "h100-sxm", "--phase", "decode", "--context", 4096)
    assert r.exit_code == 0, r.output
    assert "memory-bound" in r.output and "head.lm" in r.output
    r = run("predict", "gpt2-small", "-H", "cpu", "--seq", 64, "--format", "csv", "--calibration", "ideal")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert rows and {"name", "time_s", "bound"} <= set(rows[0])


# -- compare -------------------------------------------------------------------------
def test_compare_rows_and_speedup():
    r = run("compare", "gpt2-small", "gpt2-medium", "-H", "a100-80gb", "--seq", 256, "--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == ["gpt2-small", "gpt2-medium"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] < 1.0
    assert {"name", "time_s", "flops", "speedup"} <= set(rows[0])


@pytest.mark.skipif(not HAS_MOD, reason="decoder-220m-mod preset not present")
def test_compare_dense_and_mod_over_three_phases():
    r = run("compare", "decoder-220m", "decoder-220m-mod", "-H", "h100-sxm", "--phase", "train", "--phase", "prefill",
            "--phase", "decode", "--batch", 8, "--seq", 2048, "--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [(row["phase"], row["name"]) for row in rows] == [
        (p, n) for p in ("train", "prefill", "decode") for n in ("decoder-220m", "decoder-220m-mod")]
    for dense, mod in zip(rows[::2], rows[1::2]):
        assert dense["speedup"] == 1.0
        assert mod["speedup"] > 1.0 and mod["flops"] < dense["flops"]
    table = run("compare", "decoder-220m", "decoder-220m-mod", "-H", "h100-sxm", "-p", "train", "-p", "decode",
                "--seq", 512)
    assert table.exit_code == 0 and "speedup" in table.output


# -- memory ----------------------------------------------------------------------------
def test_memory_cli():
    r = run("memory", "llama-3-8b", "--phase", "decode", "--batch", 4, "--context", 8192, "-H", "h100-sxm",
            "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {"weights_bytes", "kv_cache_bytes", "activations_bytes", "total_bytes", "fits", "max_batch",
            "max_context"} <= set(data)
    assert data["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 2 * 8192 * 4
    r = run("memory", "gpt2-small", "--phase", "train", "--batch", 8, "--seq", 1024, "--recompute", "full", "-H", "l4")
    assert r.exit_code == 0 and "fits" in r.output and "full recomputation" in r.output
    r = run("memory", "gpt2-small", "--format", "csv")
    assert r.stdout.splitlines()[0] == "component,bytes"


@pytest.mark.parametrize("mode", ["none", "selective", "cheap", "full"])
def test_memory_cli_recompute_modes(mode):
    """`memory --recompute` takes the four modes `plan` and `count` take; the JSON is the API's."""
    r = run("memory", "gpt2-small", "--phase", "train", "--batch", 2, "--seq", 256, "--recompute", mode,
            "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    api = flopsim.memory("gpt2-small", phase="train", batch=2, seq=256, recompute=mode)
    assert data["recompute"] == mode and data["activations_bytes"] == int(api.activations_bytes)


def test_memory_cli_recompute_bad_value():
    r = run("memory", "gpt2-small", "--recompute", "some")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "recompute: 'some'" in r.output


# -- sweep --------------------------------------------------------------------------------
def test_sweep_cli_csv_matches_predict():
    r = run("sweep", "gpt2-small", "--vary", "batch=1,8", "--vary", "seq=64:256:64", "-H", "h100-sxm",
            "--phase", "forward", "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 2 * 4
    assert {"batch", "seq", "flops", "bytes", "time_s", "bound"} <= set(rows[0])
    row = next(x for x in rows if x["batch"] == "8" and x["seq"] == "192")
    api = flopsim.predict("gpt2-small", "h100-sxm", phase="forward", batch=8, seq=192)
    assert float(row["time_s"]) == pytest.approx(api.time_s, rel=1e-9)
    assert float(row["flops"]) == api.flops


def test_sweep_table_and_output_file(tmp_path):
    out = tmp_path / "grid.csv"
    r = run("sweep", "gpt2-small", "--vary", "seq=32:1024:*2", "-H", "h100-sxm", "--limit", 3, "--output", out)
    assert r.exit_code == 0, r.output
    assert "first 3 of 6" in r.output
    assert len(out.read_text().splitlines()) == 1 + 6


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["predict", "gpt2-small", "--hardware", "h900"], "h900"),
    (["compare", "gpt2-small", "gpt2-medium", "--hardware", "nope"], "nope"),
    (["predict", "gpt2-small", "--hardware", "h100-sxm", "--phase", "sample"], "phase"),
    (["predict", "gpt2-small", "--hardware", "h100-sxm", "--batch", "0"], "batch"),
    (["predict", "gpt2-small", "--hardware", "h100-sxm", "--seq", "4096"], "max_seq"),
    (["predict", "bert-base", "--hardware", "h100-sxm", "--phase", "decode"], "encoder"),
    (["predict", "gpt2-small", "--hardware", "h100-sxm", "--calibration", "missing.yaml"], "missing.yaml"),
    (["predict", "gpt2-small"], "hardware"),
    (["memory", "gpt2-small", "--optimizer", "lion"], "optimizer"),
    (["memory", "gpt2-small", "--hardware", "h900"], "h900"),
    (["sweep", "gpt2-small", "--vary", "batch", "-H", "h100-sxm"], "NAME=START:STOP:STEP"),
    (["sweep", "gpt2-small", "--vary", "batch=1:8", "-H", "h100-sxm"], "NAME=START:STOP:STEP"),
    (["sweep", "gpt2-small", "--vary", "batch=8:1:1", "-H", "h100-sxm"], "below start"),
    (["sweep", "gpt2-small", "--vary", "batch=1,x", "-H", "h100-sxm"], "not a number"),
    (["sweep", "gpt2-small", "--vary", "batch=0.5,1", "-H", "h100-sxm"], "not an integer"),
    (["sweep", "gpt2-small", "--vary", "wings=1,2", "-H", "h100-sxm"], "unknown axis"),
    (["sweep", "gpt2-small", "--vary", "capacity=0.1,0.2", "-H", "h100-sxm"], "no 'mod' block"),
    (["sweep", "gpt2-small", "--vary", "seq=512,2048", "-H", "h100-sxm"], "max_seq"),
    (["sweep", "gpt2-small", "--vary", "context=64,128", "-H", "h100-sxm", "--phase", "train"], "context"),
    (["sweep", "gpt2-small", "--vary", "heads=5", "-H", "h100-sxm"], "heads"),
    (["sweep", "gpt2-small", "--vary", "batch=1", "--vary", "batch=2", "-H", "h100-sxm"], "twice"),
    (["hardware", "show", "h900"], "h900"),
])
def test_bad_input_exits_2_with_one_line(args, words):
    line = one_error_line(runner.invoke(app, args))
    assert words in line


@pytest.mark.skipif(not HAS_MOD, reason="decoder-220m-mod preset not present")
def test_sweep_bad_capacity_names_the_field():
    line = one_error_line(run("sweep", "decoder-220m-mod", "--vary", "capacity=0.5,1.5", "-H", "h100-sxm"))
    assert "capacity" in line and "1.5" in line


def test_help_lists_the_commands():
    r = run("--help")
    for name in ("predict", "compare", "memory", "sweep", "hardware"):
        assert name in r.output
