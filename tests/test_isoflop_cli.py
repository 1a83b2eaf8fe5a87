"""`flopsim isoflop` and `flopsim laws` through typer's CliRunner: the
contract's keys, the formats, the plot, and one-line errors (exit 2)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flopsim.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r, *fragments):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("flopsim: error:"), r.output
    assert "Traceback" not in r.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_json_has_contract_keys():
    r = run("isoflop", "--budget", "5.76e23", "--law", "besiroglu", "--flops-rule", "6N", "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {"params", "tokens", "loss", "curve"} <= set(data)
    assert data["params"] == pytest.approx(7.2e10, rel=0.02)
    assert data["tokens"] / data["params"] == pytest.approx(18.4, abs=0.2)
    assert data["law"] == "besiroglu" and "2404.10102" in data["law_source"]
    row = data["curve"][0]
    assert {"shape", "params", "tokens", "loss", "flops_per_token"} <= set(row)
    assert sum(r["optimal_shape"] for r in data["curve"]) == 1


def test_table_and_csv():
    r = run("isoflop", "--budget", "1e20")
    assert r.exit_code == 0, r.output
    assert "dense optimum" in r.stdout and "tokens/param" in r.stdout and "curve" in r.stdout
    c = run("isoflop", "--budget", "1e20", "--budget", "1e21", "--format", "csv")
    assert c.exit_code == 0, c.output
    table = pd.read_csv(io.StringIO(c.stdout))
    assert {"kind", "family", "budget", "shape", "params", "tokens", "loss"} <= set(table.columns)
    assert set(table["budget"]) == {1e20, 1e21}


def test_mod_comparison_with_hardware():
    r = run("isoflop", "--budget", "1e20", "--family", "dense,mod", "--mod-effective-params", "1.0",
            "--hardware", "h100-sxm", "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert any(a.startswith("ASSUMPTION") for a in data["assumptions"])
    rows = data["comparison"]
    assert [x["role"] for x in rows] == ["optimum", "optimum", "same FLOPs/step"]
    assert rows[1]["speedup_per_step"] > 1
    table = run("isoflop", "--budget", "1e20", "--family", "dense", "--family", "mod",
                "--mod-effective-params", "1.0")
    assert table.exit_code == 0, table.output
    assert "ASSUMPTION" in table.stdout  # said loudly, before the numbers
    assert table.stdout.index("ASSUMPTION") < table.stdout.index("dense optimum")


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "curves.png"
    r = run("isoflop", "--budget", "1e20", "--plot", path)
    assert r.exit_code == 0, r.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary left behind


def test_user_csv_law(tmp_path):
    rng = np.random.default_rng(7)
    N = np.repeat(np.logspace(7, 9.5, 6), 4)
    D = N * np.tile([5, 20, 80, 200], 6)
    L = (1.8 + 480 / N ** 0.35 + 2000 / D ** 0.37) * np.exp(rng.normal(0, 0.002, N.size))
    csv = tmp_path / "runs.csv"
    pd.DataFrame({"name": [f"run{i}" for i in range(N.size)], "params": N, "tokens": D, "loss": L}).to_csv(csv, index=False)
    r = run("isoflop", "--budget", "1e20", "--law", csv, "--format", "json")
    assert r.exit_code == 0, r.output
    fit = json.loads(r.stdout)["fit"]
    assert fit["rmse"] < 0.02 and len(fit["runs"]) == N.size
    assert fit["coefficients"]["alpha"] == pytest.approx(0.35, abs=0.05)
    t = run("isoflop", "--budget", "1e20", "--law", csv)
    assert "RMSE" in t.stdout and "residual" in t.stdout
    laws = run("laws", csv)
    assert laws.exit_code == 0 and "RMSE" in laws.stdout


def test_laws_lists_every_law_with_its_convention_and_source():
    r = run("laws", "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [d["name"] for d in data] == ["chinchilla-1", "chinchilla-2", "chinchilla-3", "chinchilla-3-printed",
                                         "kaplan", "deepseek", "besiroglu", "krajewski", "clark"]
    for d in data:
        assert d["flops_convention"].startswith(("C = 6 N D", "C = M D")) and d["source"] and d["params_kind"]
    gives = {d["name"]: d["gives"] for d in data}
    assert gives["chinchilla-1"] == gives["kaplan"] == "allocation" and gives["chinchilla-3"] == "loss"
    table = run("laws")
    assert table.exit_code == 0 and "fitted FLOPs" in table.stdout and "kaplan" in table.stdout
    assert run("laws", "chinchilla", "-f", "json").exit_code == 0


@pytest.mark.parametrize("args,fragments", [
    (["--budget", "-1e20"], ["budget", "-1e+20"]),
    (["--budget", "0"], ["budget"]),
    (["--budget", "1e20", "--law", "kaplan-2"], ["unknown law", "kaplan-2"]),
    (["--budget", "1e20", "--law", "chinchilla-1", "--family", "dense,mod", "--mod-effective-params", "1"],
     ["chinchilla-1", "allocation only"]),
    (["--budget", "1e20", "--law", "kaplan", "--gpu-hours", "10", "--hardware", "h100-sxm"], ["kaplan", "iso-time"]),
    (["--budget", "1e20", "--law", "chinchilla-2", "--plot", "curves.png"], ["allocation only", "plot"]),
    (["--budget", "1e20", "--flops-rule", "2N"], ["flops-rule"]),
    (["--budget", "1e20", "--family", "sparse"], ["family"]),
    (["--budget", "1e20", "--family", "mod"], ["mod-effective-params"]),
    (["--budget", "1e20", "--family", "moe", "--law", "chinchilla"], ["no MoE variables"]),
    (["--budget", "1e20", "--gpu-hours", "10"], ["needs --hardware"]),
    (["--budget", "1e20", "--plot", "curves.svg"], [".png"]),
    ([], ["--budget"]),
])
def test_bad_input_one_line_exit_2(args, fragments):
    one_line_error(run("isoflop", *args), *fragments)


def test_bad_csv_columns_one_line(tmp_path):
    csv = tmp_path / "runs.csv"
    csv.write_text("N,D,L\n1e8,1e9,3.1\n")
    one_line_error(run("isoflop", "--budget", "1e20", "--law", csv), "missing column", "params")
    missing = tmp_path / "nope.csv"
    one_line_error(run("isoflop", "--budget", "1e20", "--law", missing), "no such file")


def test_a_law_counting_non_embedding_parameters_names_both_counts():
    """krajewski's N is the non-embedding count: the text names it N and gives the total
    beside it, so one shape never shows two unlabelled parameter counts."""
    import re

    from typer.testing import CliRunner

    from flopsim.cli import app
    from flopsim.cli.output import human
    from flopsim.scaling import isoflop

    r = CliRunner().invoke(app, ["isoflop", "--budget", "1e21", "--law", "krajewski"])
    assert r.exit_code == 0, r.output
    shape = isoflop(1e21, law="krajewski").optima[("dense", 1e21)].shape
    line = next(ln for ln in r.stdout.splitlines() if "nearest shape" in ln)
    assert f"N {human(shape.law_params('non_embedding'))}, {human(shape.params)} params in all" in line
    assert re.search(r"optimum \(\w+\): N ", r.stdout)
