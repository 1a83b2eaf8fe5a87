"""benchmarks/eager_bytes.py: what eager implementations of a block's memory-bound ops
move against flopsim's fused ops, counted by the bytes oracle's dispatch counter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "eager_bytes.py"


def _main():
    spec = importlib.util.spec_from_file_location("eager_bytes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_eager_rmsnorm_moves_what_its_kernels_derive(capsys):
    assert _main()(["--model", "llama-2-7b", "--tokens", "8192", "--hardware", "a100-80gb"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = next(line.split() for line in out if line.startswith("rmsnorm hf"))
    # transformers' LlamaRMSNorm in bf16, bytes per element: forward x.to(fp32) 2 + 4, pow 4 + 4,
    # mean 4, x * rsqrt 4 + 4, .to(bf16) 4 + 2, weight * 2 + 2 = 36 (8 kernels with the per-row add
    # and rsqrt); backward 92 over 16 kernels. flopsim's fused norm: 2 + 2 forward, 4 + 2 backward.
    assert row[2] == "8+16"
    assert float(row[5]) == round((36 + 92) / (4 + 6), 1)
    # two norms a block, GB; the per-row statistics (mean, rsqrt, their gradients) add under 0.1%
    assert float(row[3]) == pytest.approx(2 * (36 + 92) * 8192 * 4096 / 1e9, rel=1e-3)
    steps = [line for line in out if line.startswith("a step of 32 blocks")]
    assert len(steps) == 3 and all("a100-80gb" in line for line in steps)


def test_eager_bytes_bad_input_is_one_line(capsys):
    main = _main()
    assert main(["--tokens", "0"]) == 2
    assert main(["--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("benchmarks/eager_bytes.py: error: tokens: 0")
    assert "no-such-model" in err[1]


def test_each_eager_form_is_what_its_spec_option_counts(capsys):
    """The 'option GB' column (flopsim's op list with the option that models the form) equals the
    counter's eager bytes, but for fms's RoPE, whose option also counts the layer's gather of its
    matrices (int64 ids read, then 8 bytes a token and value of d_head read and written)."""
    tokens, d_head = 8192, 128
    assert _main()(["--model", "llama-2-7b", "--tokens", str(tokens), "--hardware", "a100-80gb"]) == 0
    key = lambda line: "swiglu" if line.startswith("swiglu") else " ".join(line.split()[:2])  # noqa: E731
    rows = {key(line): line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("rmsnorm", "rope", "swiglu"))}
    assert len(rows) == 5
    for name, row in rows.items():
        at = 3 if name != "swiglu" else 2  # the one-word name's columns start one earlier
        eager, option = float(row[at]), float(row[at + 3])
        gather = (tokens * 8 + 2 * tokens * d_head * 8) / 1e9 if name == "rope fms" else 0.0
        assert option == pytest.approx(eager + gather, abs=1.5e-3), name
