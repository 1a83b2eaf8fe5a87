"""`flopsim report`: the report builds, its figures are valid files that the
markdown references, its table equals flopsim.predict's numbers, bad input
is one line and exit 2, and the CLI never imports matplotlib up front."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import one_error_line
from conftest import run_cli as run

import flopsim

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPECS = ["decoder-220m", "decoder-220m-mod", "st-800m-sparse-ff", "bert-base-adapler"]
SHAPE = dict(batch=2, seq=256)




@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from flopsim.report import make_report

    out = tmp_path_factory.mktemp("reports") / "mixed"
    calls = []
    rep = make_report(SPECS, "h100-sxm", out_dir=out, figures="both", progress=lambda *a: calls.append(a),
                      **SHAPE)
    return rep, out, calls


def _figures(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) + re.findall(r"\[(?:SVG|PNG)\]\(([^)]+)\)", md)


def test_report_files_are_valid_and_referenced(built):
    rep, out, _ = built
    assert rep.path == out / "README.md" and rep.path.is_file()
    md = rep.path.read_text()
    refs = _figures(md)
    on_disk = sorted(p.name for p in out.iterdir() if p.suffix in (".png", ".svg"))
    assert sorted(set(refs)) == on_disk, "every figure is embedded or linked, and every reference exists"
    # roofline, knobs and memory for each of the 3 groups, in both formats, + isoFLOP (PNG only)
    for group in ("1-decoder-220m-mod", "2-st-800m-sparse-ff", "3-bert-base-adapler"):
        for kind in ("roofline", "knobs", "memory"):
            for ext in ("png", "svg"):
                assert f"{group}-{kind}.{ext}" in on_disk
    assert "isoflop-chinchilla-dense-mod.png" in on_disk
    for name in on_disk:
        data = (out / name).read_bytes()
        if name.endswith(".png"):
            assert data.startswith(PNG_MAGIC), name
            from PIL import Image

            with Image.open(out / name) as img:
                img.verify()
                assert min(img.size) > 200
        else:
            root = ET.fromstring(data)
            assert root.tag.endswith("svg"), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    figures = sum(p.stat().st_size for p in out.iterdir() if p.name != "index.html")
    assert figures < 4e6
    assert (out / "index.html").stat().st_size < 3e6  # plotly.js's basic bundle (1.2 MB) once, then the figures


def test_markdown_table_equals_predict(built):
    from flopsim.report import headline_cells

    rep, out, _ = built
    md = rep.path.read_text()
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 2 * 2 * 3 + 2 * 2  # decoder & sparse-ff groups: 2 specs x 3 phases; bert: 2 x 2
    presets = {"st-800m", "bert-base", *SPECS}
    baselines = {}
    for row in rows:
        assert row["spec"] in presets
        r = flopsim.predict(row["spec"], "h100-sxm", phase=row["phase"], **SHAPE)
        assert float(row["time_s"]) == r.time_s
        assert int(row["flops"]) == r.flops
        assert float(row["mfu"]) == r.mfu
        assert row["bound"] == r.bound
        base = baselines.setdefault((row["group"], row["phase"]), r)  # the baseline comes first
        assert float(row["speedup"]) == pytest.approx(base.time_s / r.time_s, rel=1e-12)
        cells = headline_cells({
            "spec": row["spec"], "params": flopsim.count(row["spec"], batch=1, seq=8).params,
            "phase": row["phase"], "flops_per_token": r.flops / r.tokens, "time_s": r.time_s,
            "tokens_per_s": r.tokens_per_s, "speedup": base.time_s / r.time_s, "flop_speedup": base.flops / r.flops,
            "bound": r.bound, "mfu": r.mfu})
        assert "| " + " | ".join(cells) + " |" in md, cells


def test_report_content(built):
    rep, out, calls = built
    md = rep.path.read_text()
    assert "flopsim report decoder-220m decoder-220m-mod st-800m-sparse-ff bert-base-adapler --hardware h100-sxm" in md
    assert "--batch 2 --seq 256" in md and "--figures both" in md
    # baselines: the user's decoder-220m, the shipped presets for the others
    assert [g.baseline.name for g in rep.groups] == ["decoder-220m", "st-800m", "bert-base"]
    assert "the shipped preset st-800m" in md
    assert rep.groups[2].phases == ["train", "forward"]  # an encoder: no prefill / decode
    assert "bert-base, bert-base-adapler are encoders or have a cls head: prefill and decode are replaced by forward" in md
    for text in ("989.4 TFLOP/s", "3.35 TB/s", "Calibration:", "Shapes", "ASSUMPTION"):
        assert text in md, text
    # progress: every step announced in order, then done
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] and calls[-1][2] == "done"
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    # the knob sweeps: MoD capacity, sparse-FF block size, kept fraction; their own setting is on the grid
    knobs = {(k.spec.name, k.knob) for g in rep.groups for k in g.knobs}
    assert knobs == {("decoder-220m-mod", "capacity"), ("st-800m-sparse-ff", "block_size"),
                     ("bert-base-adapler", "keep")}
    for g in rep.groups:
        for k in g.knobs:
            assert any(abs(x - k.preset_x) < 1e-12 for x in k.x)
            i = min(range(len(k.x)), key=lambda j: abs(k.x[j] - k.preset_x))
            for phase in g.phases:  # at the spec's own setting the sweep equals predict
                assert k.time_s[phase][i] == pytest.approx(rep.groups[rep.groups.index(g)].results[
                    (phase, k.spec.name)].time_s, rel=1e-9)


def test_groups_and_derived_baselines():
    from flopsim.report import dense_baseline, group_specs
    from flopsim.spec import load_model

    specs = [load_model(n) for n in ("mixtral-8x7b", "decoder-220m-mod", "decoder-220m", "decoder-220m-mode")]
    groups = group_specs(specs)
    assert [[s.name for s in g.specs] for g in groups] == [
        ["mixtral-8x7b-dense", "mixtral-8x7b"], ["decoder-220m", "decoder-220m-mod", "decoder-220m-mode"]]
    assert groups[0].derived and groups[1].derived is None  # the given dense spec replaced the derived one
    base = groups[0].baseline
    assert base.family == "dense" and base.moe is None and base.d_ff == 14336 and base.kv_heads == 8
    assert dense_baseline(load_model("bert-base-power-bert")).attention_impl == "fused"
    first = group_specs(specs, "first")
    assert len(first) == 1 and first[0].baseline.name == "mixtral-8x7b"


def test_cli_report_and_replace(tmp_path):
    out = tmp_path / "r"
    args = ["report", "decoder-220m-mod", "--hardware", "h100-sxm", "--batch", 1, "--seq", 128, "--out", out,
            "--phase", "prefill", "--phase", "decode", "--budget", 1e19]
    r = run(*args, "--format", "json")
    assert r.exit_code == 0, r.output
    import json

    data = json.loads(r.stdout)
    assert data["report"] == str(out / "README.md") and "summary.csv" in data["files"]
    assert {row["phase"] for row in data["rows"]} == {"prefill", "decode"}
    assert (out / ".flopsim-report").exists()
    first = (out / "README.md").read_text()
    # regenerating replaces the folder (it is a flopsim report)
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and (out / "README.md").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


@pytest.mark.parametrize("args, needle", [
    (["no-such-model", "--hardware", "h100-sxm"], "no-such-model"),
    (["decoder-220m", "--hardware", "no-such-gpu"], "no-such-gpu"),
    (["decoder-220m", "--hardware", "h100-sxm", "--figures", "gif"], "figures"),
    (["decoder-220m", "--hardware", "h100-sxm", "--phase", "sideways"], "phase"),
    (["decoder-220m", "--hardware", "h100-sxm", "--group", "nope"], "group"),
    (["decoder-220m", "decoder-220m", "--hardware", "h100-sxm"], "twice"),
    (["decoder-220m", "--hardware", "h100-sxm", "--batch", "0"], "batch"),
    (["decoder-220m", "--hardware", "h100-sxm", "--budget", "-1"], "budget"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    out = tmp_path / "out"
    line = one_error_line(run("report", *args, "--out", out))
    assert needle in line
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_out_dir_that_is_not_a_report_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    line = one_error_line(run("report", "decoder-220m", "--hardware", "h100-sxm", "--out", out))
    assert "not a flopsim report" in line
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    import flopsim.plots
    from flopsim.report import build_report

    def boom(*a, **k):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(flopsim.plots, "memory_figure", boom)
    with pytest.raises(RuntimeError):
        build_report(["decoder-220m"], "h100-sxm", batch=1, seq=64, out_dir=tmp_path / "r", budgets=[1e19])
    assert list(tmp_path.iterdir()) == []


def test_cli_import_does_not_load_matplotlib():
    code = ("import sys, flopsim.cli, flopsim.report; "
            "bad = [m for m in ('matplotlib', 'flopsim.plots') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    help_run = subprocess.run([sys.executable, "-m", "flopsim", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "report" in help_run.stdout


def test_the_committed_example_report_is_what_the_readme_command_writes(tmp_path):
    """The README's `flopsim report` command, run now, writes the committed example's
    summary and text (only its --out differs): the example is never stale."""
    import re
    import shlex
    from pathlib import Path

    from typer.testing import CliRunner

    from flopsim.cli import app

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = re.search(r"## Reports: `flopsim report`\s+```bash\n(.*?)```", readme, re.S).group(1)
    args = shlex.split(block.replace("\\\n", " "))[1:]
    committed = root / args[args.index("--out") + 1]
    args[args.index("--out") + 1] = str(tmp_path / "fresh")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    fresh = tmp_path / "fresh"
    assert (fresh / "summary.csv").read_text() == (committed / "summary.csv").read_text()
    text = (fresh / "README.md").read_text().replace(str(fresh), str(committed.relative_to(root)))
    assert text == (committed / "README.md").read_text()
    # the page: byte for byte but plotly's own script and version (a newer plotly.js is not a stale example)
    def page(folder):
        text = (folder / "index.html").read_text().replace(str(fresh), str(committed.relative_to(root)))
        text = re.sub(r'<script id="plotly-js".*?</script>', "", text, flags=re.S)
        return re.sub(r'<meta name="generator"[^>]*>', "", text)

    assert page(fresh) == page(committed)
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in committed.iterdir())


# -- the interactive page ------------------------------------------------------------------------------------
def test_page_holds_every_figure_and_the_csv(built):
    from test_pages import figure_json, parse

    from flopsim.report import document, Figure

    rep, out, _ = built
    text = (out / "index.html").read_text()
    p = parse(text)
    figures = [b for b in document(rep) if isinstance(b, Figure)]
    assert p.figures == ["fig-" + f.name for f in figures]
    kinds = {f.name.split("-", 1)[1] if f.name[0].isdigit() else f.name for f in figures}
    for kind in ("st-800m-sparse-ff-roofline", "st-800m-sparse-ff-knobs", "st-800m-sparse-ff-knob-throughput",
                 "st-800m-sparse-ff-memory", "st-800m-sparse-ff-batch", "isoflop-chinchilla",
                 "isoflop-chinchilla-time"):
        assert kind in kinds, kind
    assert p.srcs == []  # self-contained: no image or script is fetched
    # every Contents link lands on a heading of the page
    for href in p.hrefs:
        if href.startswith("#"):
            assert href[1:] in p.ids, href
    # summary.csv's every float, exactly, in the page's table
    rows = list(csv.DictReader((out / "summary.csv").open()))
    for row in rows:
        for key, value in row.items():
            if "." in value and value.replace(".", "").replace("e-", "").replace("e+", "").isdigit():
                assert value in p.cells, (key, value)
    assert len(p.cells) >= sum(len(r) for r in rows) // 2
    fig = figure_json(text, "fig-2-st-800m-sparse-ff-roofline")
    names = [cd[0] for t in fig["data"] if t.get("mode") == "markers" for cd in t["customdata"]]
    assert any(n.startswith("block.*.mlp") and "gather" in n for n in names), "the no-FLOP weight gather is drawn"


def test_new_views_agree_with_predict(built):
    """The batch sweep at the report's batch, the throughput knob at the spec's own setting and the
    isoFLOP times are predict's and the scaling module's own numbers."""
    from flopsim.report import BATCH_SWEEP, knob_rows, serving_phase
    from flopsim.scaling.isoflop import step_time

    rep, out, _ = built
    for g in rep.groups:
        serve = serving_phase(g)
        for s in g.specs:
            sw = g.batch_sweep[s.name]
            assert sw["batch"] == list(BATCH_SWEEP) and sw["phase"] == serve
            i = sw["batch"].index(rep.batch)
            r = g.results.get((serve, s.name)) or flopsim.predict(s, "h100-sxm", phase=serve, batch=rep.batch,
                                                                   seq=g.seq, context=g.context_for(serve))
            assert sw["time_s"][i] == pytest.approx(r.time_s, rel=1e-9)
            assert sw["tokens_per_s"][i] == pytest.approx(r.tokens_per_s, rel=1e-9)
            largest = g.memory[("serve", s.name)].max_batch
            assert sw["fits"] == [largest is not None and b <= largest for b in BATCH_SWEEP]
        for row, ks in zip(knob_rows(rep, g), g.knobs):
            i = min(range(len(ks.x)), key=lambda j: abs(ks.x[j] - ks.preset_x))
            for phase, ph in zip(g.phases, row["phases"]):
                assert ph["tokens_per_s"][i] == pytest.approx(g.results[(phase, ks.spec.name)].tokens_per_s, rel=1e-9)
    law, result, _ = rep.isoflop[0]
    times = rep.isoflop_times[law]
    assert set(times) == set(result.curves)
    for (fam, b), rows in times.items():
        assert 2 <= len(rows) <= 9
        curve = {r["shape"]: r for r in result.curves[(fam, b)]}
        for r in rows:
            assert r["loss"] == curve[r["shape"]]["loss"]
            step = step_time(result.shape_specs[fam][r["shape"]], rep.hw, batch=result.batch, seq=result.seq,
                             calibration=rep.calibration)
            assert r["train_time_s"] == pytest.approx(r["tokens"] / (result.batch * result.seq) * step, rel=1e-12)
