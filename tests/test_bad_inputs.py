"""A generated bad-input suite, through the real CLI, in-process (CliRunner).

Every case is input a user could give: a spec, hardware, calibration or
Hugging Face config with one field set to a value of the wrong type, not
finite, or beyond any real model or device; a file that is not text, not a
file, too deep or an alias bomb; a command-line number out of range. Each
must end in exactly one line on stderr, `flopsim: error: ...`, exit code 2,
no traceback and no file written. The values are chosen to be invalid for
every field they are tried on, so no case may be accepted.
"""

from __future__ import annotations

import gzip
import json

import pytest
import yaml
from typer.testing import CliRunner

from flopsim.cli import app

BASE = {"name": "t", "layers": 2, "d_model": 64, "heads": 4, "d_ff": 128, "vocab": 100, "max_seq": 256}
BLOCKS = {
    "mod": {"capacity": 0.5, "every": 2, "predictor_hidden": 0},
    "moe": {"experts": 4, "top_k": 2, "d_expert": 32, "shared_experts": 0, "every": 1, "capacity_factor": 1.25},
    "sparse_ff": {"block_size": 8, "d_lowrank": 8},
    "length_reduction": {"method": "power_bert", "keep": [1.0, 0.5]},
}
# invalid for every integer field (sizes, counts): wrong types, fractions, negatives, beyond bounds, not finite
BAD_INTS = [True, False, "16", "x", "", 1.5, 2.0, -1, 1e30, 10 ** 30, 10 ** 401, [], {}, [4], float("inf"),
            float("nan"), None]
BAD_BOOLS = [0, 1, "yes", "true", 1.0, [], {}, None]
BAD_CHOICES = ["nope", 1, True, [], {}, "", None, 1.5]
BAD_FRACTIONS = [float("inf"), float("nan"), -1.0, "0.5", True, [], {}, 10 ** 401]
TOP_INTS = ["layers", "d_model", "heads", "kv_heads", "d_head", "d_ff", "vocab", "max_seq", "token_types", "classes"]
TOP_BOOLS = ["causal", "tied_embeddings", "bias", "lm_transform"]
TOP_CHOICES = ["family", "ffn", "activation", "positions", "norm", "norm_position", "head", "dtype", "attention_impl",
               "loss_impl"]
BLOCK_INTS = [("mod", "every"), ("mod", "predictor_hidden"), ("moe", "experts"), ("moe", "top_k"),
              ("moe", "d_expert"), ("moe", "shared_experts"), ("moe", "every"), ("sparse_ff", "block_size"),
              ("sparse_ff", "d_lowrank")]
BLOCK_FRACTIONS = [("mod", "capacity"), ("moe", "capacity_factor")]
BLOCK_CHOICES = [("moe", "routing"), ("moe", "kernel"), ("length_reduction", "method")]


def _spec_cases():
    for field in TOP_INTS:
        for value in BAD_INTS:
            yield {**BASE, field: value}
    for field in TOP_BOOLS:
        for value in BAD_BOOLS:
            yield {**BASE, field: value}
    for field in TOP_CHOICES:
        for value in BAD_CHOICES:
            yield {**BASE, field: value}
    for family, field, values in ([(f, k, BAD_INTS) for f, k in BLOCK_INTS]
                                  + [(f, k, BAD_FRACTIONS) for f, k in BLOCK_FRACTIONS]
                                  + [(f, k, BAD_CHOICES) for f, k in BLOCK_CHOICES]):
        for value in values:
            yield {**BASE, "family": family, family: {**BLOCKS[family], field: value}}
    for family in BLOCKS:  # the top-level sizes again, on each conditional family
        for field in TOP_INTS:
            for value in BAD_INTS[::2]:
                yield {**BASE, "family": family, family: BLOCKS[family], field: value}
    for field in ("modules", "conv_kernel"):  # sparse QKV, a block of any family
        for value in BAD_INTS + [2 if field == "conv_kernel" else 3]:  # even kernel; 3 modules do not divide 64
            yield {**BASE, "sparse_qkv": {"modules": 4, "conv_kernel": 3, field: value}}
    for field in ("size", "global_every"):  # sliding-window attention
        for value in BAD_INTS[:-1]:  # (global_every may be null)
            yield {**BASE, "sliding_window": {"size": 8, field: value}}
    moe = {**BASE, "family": "moe", "moe": BLOCKS["moe"]}
    for value in BAD_FRACTIONS + [-1, 11]:  # the Zipf exponent: finite, 0 to 10
        yield {**moe, "moe": {**BLOCKS["moe"], "popularity": {"zipf": value}}}
    for value in [[], [1, 2], "1,2,3,4", [float("inf")] * 4, [-1, 1, 1, 1], [0, 0, 0, 0], True, [1, 1, 1, "x"]]:
        yield {**moe, "moe": {**BLOCKS["moe"], "popularity": {"histogram": value}}}
    for value in BAD_FRACTIONS + [[], [0.5, 1.0], [1, -1], [2, 0.5]]:
        keep = value if isinstance(value, list) else [1.0, value]
        yield {**BASE, "family": "length_reduction", "length_reduction": {"method": "power_bert", "keep": keep}}


SPEC_CASES = list(_spec_cases())

HARDWARE = {"name": "hw", "kind": "gpu", "peak_flops_per_s": {"bf16": 1e15, "fp32": 5e13},
            "memory_bandwidth_bytes_per_s": 3e12, "memory_capacity_bytes": 8e10, "launch_overhead_s": 2e-6,
            "sources": {"peak_flops_per_s": "s", "memory_bandwidth_bytes_per_s": "s", "memory_capacity_bytes": "s",
                        "launch_overhead_s": "s"}}
BAD_FIGURES = [float("inf"), float("nan"), 1e-300, 1e300, -1.0, 0.0, "3 TB/s", True, [], None]
# times may be 0 (an ideal launch, link or dispatch); optional figures may be null (not known)
TIMES = ("launch_overhead_s", "fixed_s.matmul", "graph_launch_s", "host_s.launch", "links.scale_up.latency_s")
OPTIONAL = ("last_level_cache_bytes", "interconnect_bytes_per_s", "scale_out_bytes_per_s", "launch_overhead_s",
            "graph_launch_s")


def _valid(field: str, value) -> bool:
    return (field in TIMES and value in (0.0, 1e-300)) or (field in OPTIONAL and value is None)
HARDWARE_FIELDS = ["memory_bandwidth_bytes_per_s", "memory_capacity_bytes", "launch_overhead_s",
                   "last_level_cache_bytes", "interconnect_bytes_per_s", "scale_out_bytes_per_s", "peak_flops_per_s.bf16"]
CALIBRATION_FIELDS = ["default.compute", "default.memory", "kinds.matmul.compute", "fixed_s.matmul",
                      "launch_overhead_s", "graph_launch_s", "host_s.launch", "links.scale_up.bus_bytes_per_s",
                      "links.scale_up.latency_s"]
CALIBRATION = {"device": "hw", "default": {"compute": 0.5, "memory": 0.8}, "kinds": {"matmul": {"compute": 0.6,
               "memory": 0.8}}, "fixed_s": {"matmul": 3e-6}, "launch_overhead_s": 2e-6, "graph_launch_s": 1e-6,
               "host_s": {"launch": 1e-5}, "links": {"scale_up": {"latency_s": 1e-5, "bus_bytes_per_s": 3e11}}}


def _set(data: dict, dotted: str, value):
    out = json.loads(json.dumps(data))
    *path, last = dotted.split(".")
    node = out
    for key in path:
        node = node[key]
    node[last] = value
    return out


def _one_line_exit_2(result, *, must_mention: str = ""):
    assert result.exit_code == 2, (result.exit_code, result.output[-500:])
    err = result.stderr
    assert err.startswith("flopsim: error: ") and err.count("\n") == 1, err[-500:]
    assert "Traceback" not in result.output and len(err) < 500
    if must_mention:
        assert must_mention in err, err


def _write(tmp_path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.mark.parametrize("spec", SPEC_CASES, ids=range(len(SPEC_CASES)))
def test_bad_spec_field(runner, tmp_path, spec):
    _one_line_exit_2(runner.invoke(app, ["count", _write(tmp_path, "spec.yaml", spec)]))


FIGURE_CASES = [("hardware", f) for f in HARDWARE_FIELDS] + [("calibration", f) for f in CALIBRATION_FIELDS]


@pytest.mark.parametrize("file, field", FIGURE_CASES)
@pytest.mark.parametrize("value", BAD_FIGURES, ids=repr)
def test_bad_device_figure(runner, tmp_path, file, field, value):
    """A hardware or calibration figure that is not finite, not positive, not physical or not a number."""
    if _valid(field, value):
        return
    if file == "hardware":
        args = ["--hardware", _write(tmp_path, "hw.yaml", _set(HARDWARE, field, value)), "--calibration", "ideal"]
    else:
        args = ["--hardware", "h100-sxm", "--calibration", _write(tmp_path, "cal.yaml", _set(CALIBRATION, field, value))]
    _one_line_exit_2(runner.invoke(app, ["predict", "gpt2-small", *args]))


BAD_FILES = {
    "latin-1": "name: caf\xe9\n".encode("latin-1"),
    "utf-16": "name: t\nlayers: 2\n".encode("utf-16"),
    "gzip": gzip.compress(b"name: t\n"),
    "binary": bytes(range(256)) * 4,
    "alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\n"
                   + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)},"
                             f" *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)},"
                             f" *{chr(97 + i)}]\n" for i in range(8))).encode(),
    "deep brackets": b"name: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "deep mapping": ("".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n").encode(),
    "long integer": b"name: t\nlayers: " + b"9" * 5001 + b"\n",
    "duplicate key": b"name: t\nlayers: 2\nlayers: 4\nd_model: 64\nheads: 4\nd_ff: 128\nvocab: 100\n",
    "empty": b"",
    "a list": b"- 1\n- 2\n",
    "a scalar": b"42\n",
    "does not parse": b"name: [unclosed\n",
    "tabs": b"name: t\n\tlayers: 2\n",
}


@pytest.mark.parametrize("command", [["count"], ["predict", "gpt2-small", "--calibration", "ideal", "--hardware"],
                                     ["predict", "gpt2-small", "--hardware", "h100-sxm", "--calibration"]],
                         ids=["spec", "hardware", "calibration"])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file(runner, tmp_path, command, kind):
    path = tmp_path / "input.yaml"
    path.write_bytes(BAD_FILES[kind])
    _one_line_exit_2(runner.invoke(app, [*command, str(path)]))


@pytest.mark.parametrize("command", [["count"], ["predict", "gpt2-small", "--calibration", "ideal", "--hardware"],
                                     ["predict", "gpt2-small", "--hardware", "h100-sxm", "--calibration"]],
                         ids=["spec", "hardware", "calibration"])
@pytest.mark.parametrize("what", ["folder", "device", "long name", "empty name", "missing"])
def test_not_a_file(runner, tmp_path, command, what):
    target = {"folder": str(tmp_path), "device": "/dev/zero", "long name": "x" * 300, "empty name": "",
              "missing": str(tmp_path / "none.yaml")}[what]
    _one_line_exit_2(runner.invoke(app, [*command, target]))


HF = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
      "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 256}
HF_FIELDS = ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
             "max_position_embeddings", "num_key_value_heads"]
HF_OPTIONAL = ("max_position_embeddings", "num_key_value_heads")  # null: the architecture's default


@pytest.mark.parametrize("field", HF_FIELDS)
@pytest.mark.parametrize("value", [True, "16", 1.5, -1, 10 ** 30, [], {}, None], ids=repr)
def test_bad_hf_config_field(runner, tmp_path, field, value):
    if field in HF_OPTIONAL and value is None:
        return
    _one_line_exit_2(runner.invoke(app, ["count", _write(tmp_path, "config.json", {**HF, field: value})]))


@pytest.mark.parametrize("value", ["nope", "", "EAGER", 1, True, [], {"": "eager"}], ids=repr)
def test_bad_hf_attn_implementation(runner, tmp_path, value):
    _one_line_exit_2(runner.invoke(app, ["count", _write(tmp_path, "config.json",
                                                          {**HF, "attn_implementation": value})]))


@pytest.mark.parametrize("value", ["nope", "", "Explicit"], ids=repr)
def test_bad_attention_option(runner, value):
    _one_line_exit_2(runner.invoke(app, ["count", "gpt2-small", "--seq", "8", "--attention", value]))


MODEL_TYPES = [["llama"], {"a": 1}, 3, None, True, "", "no-such-model"]


@pytest.mark.parametrize("value", MODEL_TYPES, ids=repr)
def test_bad_hf_model_type(runner, tmp_path, value):
    _one_line_exit_2(runner.invoke(app, ["count", _write(tmp_path, "config.json", {**HF, "model_type": value})]))


TOKEN_OPTIONS, TOKEN_COMMANDS = ["--batch", "--seq", "--context"], ["count", "predict", "memory"]
TOKEN_VALUES = ["0", "-1", "x", "1.5", "1e30", str(10 ** 30), "inf", "nan", ""]


@pytest.mark.parametrize("option", TOKEN_OPTIONS)
@pytest.mark.parametrize("value", TOKEN_VALUES)
@pytest.mark.parametrize("command", TOKEN_COMMANDS)
def test_bad_token_arguments(runner, command, option, value):
    args = [command, "gpt2-small", option, value]
    if command == "predict":
        args += ["--hardware", "h100-sxm"]
    if option == "--context":
        args += ["--phase", "decode"]
    _one_line_exit_2(runner.invoke(app, args))


COMMAND_ARGS = [
    ["isoflop", "--aspect", "inf"], ["isoflop", "--aspect", "nan"], ["isoflop", "--aspect", "-1"],
    ["isoflop", "--aspect", "1e308"], ["isoflop", "--budget", "inf"], ["isoflop", "--budget", "-1"],
    ["isoflop", "--budget", "nan"], ["isoflop", "--ff-ratio", "inf"], ["isoflop", "--head-size", "0"],
    ["isoflop", "--min-layers", "0"], ["isoflop", "--max-layers", "100000000"],
    ["sweep", "decoder-220m-mod", "--vary", "capacity=0.0:1e15:1", "--hardware", "h100-sxm"],
    ["sweep", "decoder-220m-mod", "--vary", "batch=1:1e12:1", "--hardware", "h100-sxm"],
    ["sweep", "decoder-220m-mod", "--vary", "capacity=inf", "--hardware", "h100-sxm"],
    ["sweep", "decoder-220m-mod", "--vary", "layers=1e30", "--hardware", "h100-sxm"],
    ["hardware", "show", ""], ["hardware", "show", "x" * 300],
]


@pytest.mark.parametrize("args", COMMAND_ARGS, ids=lambda a: " ".join(a)[:60])
def test_bad_command_arguments(runner, args):
    _one_line_exit_2(runner.invoke(app, args))


def test_a_name_with_a_newline_is_still_one_line(runner, tmp_path):
    _one_line_exit_2(runner.invoke(app, ["count", "no\nsuch\nspec"]))
    _one_line_exit_2(runner.invoke(app, ["count", _write(tmp_path, "s.yaml", {**BASE, "layers": "two\nlayers"})]))


def test_the_suite_is_at_least_a_thousand_cases():
    """The issue asks for at least 1,000 generated bad inputs; count the ones that run (not skipped as valid)."""
    figures = sum(not _valid(f, v) for _, f in FIGURE_CASES for v in BAD_FIGURES)
    files = 3 * len(BAD_FILES) + 3 * 5  # as spec, hardware and calibration; five non-files each
    hf = len(HF_FIELDS) * 8 - len(HF_OPTIONAL) + len(MODEL_TYPES)  # null is valid for the optional keys
    arguments = len(TOKEN_OPTIONS) * len(TOKEN_VALUES) * len(TOKEN_COMMANDS) + len(COMMAND_ARGS)
    assert len(SPEC_CASES) + figures + files + hf + arguments >= 1000


# -- outputs: checked before any work, written whole, nothing left behind ----------------------

@pytest.mark.parametrize("target", ["", "FOLDER", "FILE/x.csv", "FILE/a/b.csv", "LONG/x.csv"])
def test_bad_output_file_before_any_work(runner, tmp_path, target):
    (tmp_path / "FILE").write_text("a file")
    path = {"": "", "FOLDER": str(tmp_path), "LONG/x.csv": str(tmp_path / ("x" * 300) / "x.csv")}.get(
        target, str(tmp_path / target))
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (["sweep", "decoder-220m-mod", "--vary", "capacity=0.1,0.2", "--hardware", "h100-sxm",
                  "--output", path],
                 ["isoflop", "--budget", "1e20", "--plot", path if path.endswith(".csv") is False else
                  path[:-4] + ".png"],
                 ["calibrate", "--output", path]):
        _one_line_exit_2(runner.invoke(app, args))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("target", ["", "FILE", "FILE/sub"])
def test_bad_output_folder_before_any_work(runner, tmp_path, target):
    (tmp_path / "FILE").write_text("a file")
    path = "" if not target else str(tmp_path / target)
    for args in (["report", "gpt2-small", "--hardware", "h100-sxm", "--out", path],
                 ["validate", "--out", path, "--device", "cpu"]):
        _one_line_exit_2(runner.invoke(app, args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_a_killed_run_leaves_nothing_a_later_run_keeps(tmp_path):
    """Temporary siblings of a process that no longer runs are removed by the next write."""
    import subprocess
    import sys

    from flopsim.outputs import write_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    target = tmp_path / "grid.csv"
    (tmp_path / f".grid.csv.flopsim-{dead}-abc.tmp").write_text("half")
    (tmp_path / f".grid.csv.flopsim-{dead}-def.old").mkdir()
    (tmp_path / ".other.csv.flopsim-1-x.tmp").write_text("not ours")
    write_atomic(target, "a,b\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.csv.flopsim-1-x.tmp", "grid.csv"]


def test_isoflop_plot_goes_where_asked(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["isoflop", "--budget", "1e20", "--plot", "curves.png"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "curves.png").is_file() and not (tmp_path / "reports").exists()


def test_a_union_field_names_the_field_and_the_real_reason(runner, tmp_path):
    """keep entries are an integer or a fraction: a NaN is reported as not finite, at keep.1
    (not as "not an integer" at keep.1.constrained-int, pydantic's first union member)."""
    spec = {**BASE, "family": "length_reduction", "causal": False, "head": "cls", "attention_impl": "explicit",
            "length_reduction": {"method": "power_bert", "keep": [1, float("nan")]}}
    r = runner.invoke(app, ["count", _write(tmp_path, "s.yaml", spec)])
    _one_line_exit_2(r, must_mention="field 'length_reduction.keep.1': value nan: Input should be a finite number")
