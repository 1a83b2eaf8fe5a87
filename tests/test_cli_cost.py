"""`flopsim count` / `flopsim formula` through typer's CliRunner, and the
light-import promise of the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from flopsim.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_count_json_gpt2_small():
    r = run("count", "gpt2-small", "--batch", "1", "--seq", "1024", "--phase", "forward", "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["flops"] == 291_648_307_200 and data["params"] == 124_439_808
    assert isinstance(data["flops"], int) and isinstance(data["params"], int)
    assert {"causal_flops", "bytes", "ops"} <= set(data)
    op = data["ops"][0]
    assert {"name", "layer", "kind", "flops", "bytes"} <= set(op)
    assert sum(o["flops"] for o in data["ops"]) == data["flops"]


def test_count_csv_has_one_row_per_op():
    r = run("count", "llama-3-8b", "--seq", "128", "--phase", "train", "--format", "csv")
    assert r.exit_code == 0, r.output
    table = pd.read_csv(io.StringIO(r.stdout))
    from flopsim.count import count

    expected = count("llama-3-8b", batch=1, seq=128, phase="train")
    assert len(table) == len(expected.ops)
    assert int(table["flops"].sum()) == expected.flops


def test_count_table_shows_per_layer_breakdown():
    r = run("count", "gpt2-small", "--seq", "64")
    assert r.exit_code == 0, r.output
    assert "block.11" in r.stdout and "embed" in r.stdout and "head" in r.stdout
    assert "124,439,808" in r.stdout
    ops = run("count", "gpt2-small", "--seq", "64", "--ops")
    assert "block.0.attn.qkv" in ops.stdout


def test_decode_uses_context():
    r = run("count", "llama-3-8b", "--phase", "decode", "--batch", "8", "--context", "2048", "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["context"] == 2048 and data["kv_read_bytes"] > 0


def test_formula_prints_polynomial_and_latex():
    r = run("formula", "gpt2-small")
    assert r.exit_code == 0
    # 2 N B S + 4 L H d_head B S^2, N = matrix weights a token meets (head tied)
    n = 12 * (768 * 3 * 768 + 768 * 768 + 2 * 768 * 3072) + 768 * 50257
    assert (2 * n, 4 * 12 * 12 * 64) == (1536 * 160849, 1536 * 24)
    assert r.stdout.strip() == "1536*B*S*(24*S + 160849)"
    assert 1536 * 1 * 1024 * (24 * 1024 + 160849) == 291_648_307_200
    latex = run("formula", "llama-3-8b", "--symbolic", "--latex", "--phase", "decode")
    assert "d_{model}" in latex.stdout
    js = json.loads(run("formula", "gpt2-small", "--per-layer", "--format", "json").stdout)
    assert [row["part"] for row in js][:2] == ["embed", "block.0"]


BAD_YAML = {
    "unknown": ({"colour": "red"}, "unknown field 'colour'"),
    "type": ({"layers": "many"}, "field 'layers': value 'many'"),
    "negative": ({"d_model": -768}, "field 'd_model': value -768"),
    "zero": ({"heads": 0}, "field 'heads': value 0"),
    "kv": ({"kv_heads": 5}, "heads 12 is not divisible by kv_heads 5"),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_spec_one_line_exit_2(tmp_path, case):
    from flopsim.spec import load_model

    data = load_model("gpt2-small").model_dump(exclude_none=True)
    change, expected = BAD_YAML[case]
    data.update(change)
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(data))
    r = run("count", str(path))
    assert r.exit_code == 2
    assert expected in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_unparseable_yaml_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    r = run("formula", str(path))
    assert r.exit_code == 2 and "YAML does not parse" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("args,expected", [
    (["count", "gpt2-small", "--batch", "0"], "batch: 0"),
    (["count", "gpt2-small", "--batch", "x"], "--batch"),
    (["count", "gpt2-small", "--phase", "backward"], "phase: 'backward'"),
    (["count", "gpt2-small", "--seq", "4096"], "seq: 4096: exceeds max_seq 1024"),
    (["count", "bert-base", "--phase", "decode"], "encoder"),
    (["count", "gpt2-small", "--phase", "train", "--context", "9"], "context: 9"),
    (["formula", "gpt2-small", "--field", "joules"], "field: 'joules'"),
])
def test_bad_arguments_one_line_exit_2(args, expected):
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert expected in r.stderr and r.stderr.count("\n") == 1


def test_cli_and_core_import_neither_torch_nor_matplotlib():
    code = ("import sys, flopsim.cli, flopsim.count, flopsim.spec, flopsim.families;"
            "flopsim.count.count('gpt2-small', seq=8);"
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "flopsim", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "count" in out.stdout and "formula" in out.stdout


def test_main_builds_only_the_command_it_runs(monkeypatch, capsys):
    """`flopsim.cli.main` hands typer the one command argv names (a start-up saving); the
    full app where argv names none, so the help and click's suggestions still see them all."""
    from flopsim.cli import main
    from flopsim.cli.app import narrowed

    one = narrowed(app, ["count", "gpt2-small"])
    assert [c.callback.__name__ for c in one.registered_commands] == ["count"] and one.registered_groups == []
    assert [g.name for g in narrowed(app, ["plan", "train"]).registered_groups] == ["plan"]
    assert narrowed(app, ["--version"]) is app and narrowed(app, ["cuont"]) is app and narrowed(app, []) is app
    assert len(app.registered_commands) > 1  # the full app is left as it was
    monkeypatch.setattr(sys, "argv", ["flopsim", "count", "gpt2-small", "--seq", "1024", "--format", "json"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    assert json.loads(capsys.readouterr().out)["flops"] == 291_648_307_200
