"""flopsim.opcache: the command line's sympy-free evaluation equals sympy's, op for op
and field for field, in every phase of every kind of model; keys change with the spec;
what the printer cannot print exactly, and a folder it cannot write, fall back to sympy."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import sympy as sp

from flopsim import opcache
from flopsim.count import count
from flopsim.errors import FlopsimError
from flopsim.ops.op import Op
from flopsim.spec import load_model

SPECS = ["gpt2-small", "t5-v1.1-base", "switch-base-128", "decoder-220m-mode", "deepseek-v2-lite", "gemma-2-9b",
         "llama-2-7b-int4", "bert-base-power-bert", "st-800m-encdec-sparse-ff-qkv"]
ZIPF = dict(name="zipf", family="moe", layers=2, d_model=32, heads=4, d_ff=64, vocab=97,
            moe=dict(experts=8, top_k=2, popularity=dict(zipf=0.7), capacity_factor=1.25))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOPSIM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLOPSIM_CACHE", raising=False)
    opcache.enable()
    yield tmp_path
    opcache.enable(False)


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12)
    return a == b and type(a) is type(b)


def assert_same_costs(reference, cached):
    assert [op.key for op in reference.ops] == [op.key for op in cached.ops]
    for a, b in zip(reference.ops, cached.ops):
        da, db = a.to_dict(), b.to_dict()
        assert da.keys() == db.keys(), a.name
        bad = [k for k in da if not same(da[k], db[k])]
        assert not bad, (a.name, [(k, da[k], db[k]) for k in bad])


@pytest.mark.parametrize("name", SPECS + ["zipf"])
def test_cached_equals_sympy(name, cache):
    spec = load_model(ZIPF if name == "zipf" else name)
    for phase in ("forward", "train", "prefill", "decode"):
        shape = dict(batch=3, seq=20, context=40 if phase == "decode" else None)
        opcache.enable(False)
        try:
            reference = count(spec, phase=phase, **shape)
        except FlopsimError:  # a phase the model has not (an encoder's decode)
            continue
        opcache.enable()
        written = count(spec, phase=phase, **shape)  # built, printed, compiled, stored
        read = count(spec, phase=phase, **shape)  # loaded from the file
        assert_same_costs(reference, written)
        assert_same_costs(reference, read)
    assert list(cache.glob("*.ops")) and not list(cache.glob(".tmp-*"))


def test_keys_follow_the_spec_and_the_options():
    spec = load_model("gpt2-small")
    assert opcache.key(spec, "forward") != opcache.key(spec.with_changes(d_ff=3000), "forward")
    assert opcache.key(spec, "forward") != opcache.key(spec, "train")
    assert opcache.key(spec, "train", "optimizer=adam") != opcache.key(spec, "train", "optimizer=sgd")


def test_unprintable_expressions_are_not_cached():
    from flopsim.opcache_print import module_source

    op = Op(name="x", kind="elementwise", layer=0, module="x", other_flops=sp.log(sp.Symbol("S")))
    assert module_source([op]) is None
    op = Op(name="x", kind="elementwise", layer=0, module="x", other_flops=sp.Symbol("d_model"))
    assert module_source([op]) is None  # only the token symbols are arguments


def test_powers_stay_exact():
    from fractions import Fraction

    from flopsim.opcache_print import expr_source

    S = sp.Symbol("S", positive=True, integer=True)
    e = (1 - sp.Rational(1, 8)) ** S * 8 ** 12 + S ** -2
    value = eval(expr_source(e), {"F": Fraction, "S": 3})  # noqa: S307 - our own printed source
    assert value == e.subs(S, 3) and isinstance(value, Fraction)


def test_an_unwritable_folder_still_counts(tmp_path, monkeypatch):
    reference = count("gpt2-small", seq=16, phase="train")
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("FLOPSIM_CACHE_DIR", str(blocked / "cache"))
    opcache.enable()
    try:
        assert_same_costs(reference, count("gpt2-small", seq=16, phase="train"))
    finally:
        opcache.enable(False)
    assert blocked.read_text() == "not a folder"


def test_parsed_yaml_keeps_plain_data_only(cache):
    text = "a: 1\n" + "# padding\n" * 600
    assert opcache.parsed(text) is None
    opcache.store_parsed(text, {"a": 1})
    assert opcache.parsed(text) == {"a": 1}
    dated = "d: 2024-01-01\n" + "# padding\n" * 600
    import datetime

    opcache.store_parsed(dated, {"d": datetime.date(2024, 1, 1)})
    assert opcache.parsed(dated) is None


def test_command_line_uses_it_and_env_turns_it_off(tmp_path):
    env_on = {"FLOPSIM_CACHE_DIR": str(tmp_path / "on"), "PATH": "/usr/bin:/bin"}
    env_off = {**env_on, "FLOPSIM_CACHE_DIR": str(tmp_path / "off"), "FLOPSIM_CACHE": "0"}
    for env in (env_on, env_off):
        out = subprocess.run([sys.executable, "-m", "flopsim", "count", "gpt2-small", "--seq", "16", "-f", "json"],
                             capture_output=True, text=True, env=env, check=True)
        assert '"flops"' in out.stdout
    assert list((tmp_path / "on").glob("*.ops")) and not (tmp_path / "off").exists()


def test_efficiencies_are_read_back_exactly_and_keyed_by_the_calibration(cache, monkeypatch):
    """op_times' look-ups, stored per calibration, read back equal to a fresh lookup's (the
    h200's measured points: scipy's triangulation; h100-sxm's published ones: inverse distance);
    a changed calibration is another file, looked up afresh."""
    from flopsim.calibration import Calibration, Efficiency, load_calibration
    from flopsim.hardware import load_hardware
    from flopsim.roofline import op_times

    for device in ("h200", "h100-sxm"):
        hw = load_hardware(device)
        cal = load_calibration(None, hw)
        ops = [*count("llama-3-8b", phase="prefill", batch=2, seq=256).ops,
               *count("llama-3-8b", phase="decode", batch=8, context=512).ops]
        opcache.enable(False)
        reference = op_times(ops, hw, "bf16", cal)
        opcache.enable()
        assert op_times(ops, hw, "bf16", cal) == reference  # looked up, then stored
        with monkeypatch.context() as m:
            m.setattr(Calibration, "efficiency", lambda *a: pytest.fail("looked up again"))
            assert op_times(ops, hw, "bf16", cal) == reference  # every look-up from the file
        changed = cal.model_copy(update={"default": Efficiency(compute=0.5, memory=0.5), "kinds": {}, "sizes": []})
        opcache.enable(False)
        fresh = op_times(ops, hw, "bf16", changed)
        opcache.enable()
        assert fresh != reference and op_times(ops, hw, "bf16", changed) == fresh
    assert len(list(cache.glob("*.eff.json"))) == 4


def test_a_cached_predict_follows_edited_hardware_and_calibration_files(tmp_path):
    """The command line, cache on: a repeated predict imports neither numpy nor sympy nor
    PyYAML and prints what it printed; an edited calibration or hardware file (a copy in
    tmp_path) changes the output, to what the same command prints with the cache off."""
    from flopsim.spec.paths import specs_dir

    hw, cal = tmp_path / "hw.yaml", tmp_path / "cal.yaml"
    hw.write_text((specs_dir() / "hardware" / "h100-sxm.yaml").read_text())
    cal.write_text((specs_dir() / "calibration" / "h100-sxm.yaml").read_text())
    argv = [sys.executable, "-X", "importtime", "-m", "flopsim", "predict", "gpt2-small", "-H", str(hw),
            "--calibration", str(cal), "--phase", "decode", "-f", "json"]

    def run(cache="1"):
        env = {**os.environ, "FLOPSIM_CACHE_DIR": str(tmp_path / "cache"), "FLOPSIM_CACHE": cache}
        out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
        imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines()}
        return out.stdout, imported

    first, _ = run()
    again, imported = run()
    assert again == first and not imported & {"numpy", "sympy", "yaml"}
    for path, old, new in [(cal, "memory: 0.896}", "memory: 0.5}"),
                           (hw, "memory_bandwidth_bytes_per_s: 3.35e12", "memory_bandwidth_bytes_per_s: 2.0e12")]:
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
        edited, _ = run()
        assert edited != first and edited == run(cache="0")[0]
        first = edited


def test_the_folder_is_bounded_oldest_written_first(tmp_path, monkeypatch):
    """Every key changes with the code, so old entries are never read again: the first
    write of a process removes the files written longest ago once the folder holds more
    than FLOPSIM_CACHE_MAX_MB, down to three quarters of it, and stale temporaries."""
    import time

    monkeypatch.setattr(opcache, "_pruned", False)
    monkeypatch.setenv("FLOPSIM_CACHE_MAX_MB", "0.5")  # 512 KiB
    now = time.time()
    for i in range(8):  # 800 KiB, entry-0 written first
        f = tmp_path / f"entry-{i}.ops"
        f.write_bytes(b"x" * 100 * 1024)
        os.utime(f, (now - 100 + i, now - 100 + i))
    stale, fresh = tmp_path / ".tmp-stale", tmp_path / ".tmp-fresh"
    for f, age in ((stale, 2 * opcache.STALE_TMP_S), (fresh, 0.0)):
        f.write_bytes(b"")
        os.utime(f, (now - age, now - age))
    opcache._write(tmp_path / "new.ops", b"y")
    # 800 KiB > 512: the oldest go until at most 384 KiB are left (the three newest, 300 KiB)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".tmp-fresh", "entry-5.ops", "entry-6.ops", "entry-7.ops", "new.ops"])
    for i in range(8, 12):
        (tmp_path / f"entry-{i}.ops").write_bytes(b"x" * 100 * 1024)
    opcache._write(tmp_path / "newer.ops", b"z")  # once a process: nothing more removed
    assert len(list(tmp_path.glob("entry-*.ops"))) == 7
    assert opcache.max_bytes() == 2**19
    for unusable in ("-1", "0", "lots", "inf", "nan"):
        monkeypatch.setenv("FLOPSIM_CACHE_MAX_MB", unusable)
        assert opcache.max_bytes() == opcache.MAX_BYTES
    monkeypatch.delenv("FLOPSIM_CACHE_MAX_MB")
    assert opcache.max_bytes() == opcache.MAX_BYTES
