"""Sliding-window attention (the spec's `sliding_window`, flopsim.families.dense):
exact against the torch reference in FLOPs and bytes (every layer local, and
local/global alternation), the executed band against a brute-force count,
decode and memory from their derivations, sweeps over the window, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import flopsim
from flopsim import count
from flopsim.errors import SpecError
from flopsim.spec import load_model

MISTRAL = str(Path(__file__).resolve().parent.parent / "specs" / "models" / "hf" / "mistral-7b-v0.1.json")
BASE = dict(name="sw", layers=3, d_model=32, heads=4, d_ff=64, vocab=61, max_seq=64)
LLAMA_GQA = dict(kv_heads=2, positions="rope", ffn="gated", activation="silu", bias=False, norm="rmsnorm")
CONFIGS = {
    "all-local-w4": dict(sliding_window=dict(size=4)),
    "alternate-w4": dict(sliding_window=dict(size=4, global_every=2)),
    "gqa-rope-w3-every3": dict(LLAMA_GQA, sliding_window=dict(size=3, global_every=3)),
    "window-beyond-context": dict(sliding_window=dict(size=32)),
    "moe-w4": dict(family="moe", moe=dict(experts=4, top_k=2, capacity_factor=1.5), sliding_window=dict(size=4)),
    "explicit-w4": dict(attention_impl="explicit", sliding_window=dict(size=4, global_every=2)),
}
SHAPES = {"forward": (2, 6, None), "train": (2, 6, None), "prefill": (2, 7, None), "decode": (2, 1, 9)}
CASES = [pytest.param(name, phase, id=f"{name}-{phase}") for name in CONFIGS for phase in SHAPES]


def make(name):
    return load_model({**BASE, **CONFIGS[name]})


@pytest.mark.parametrize("name, phase", CASES)
def test_exact_flops_and_bytes_against_torch(name, phase):
    pytest.importorskip("torch")
    from flopsim.torchref.bytes_check import compare_bytes
    from flopsim.torchref.check import compare_with_torch

    spec = make(name)
    batch, seq, context = SHAPES[phase]
    result = compare_with_torch(spec, phase, batch, seq, context)
    assert result.exact, result.describe()
    if not (spec.moe is not None and phase == "decode"):
        cmp = compare_bytes(spec, phase, batch, seq, context)
        assert cmp.exact, cmp.describe()


def band(queries: int, keys: int, window: int) -> int:
    """Brute force: (query, key) pairs of the last `queries` of `keys` positions within the window."""
    q = np.arange(keys - queries, keys)[:, None]
    k = np.arange(keys)[None, :]
    return int(((k <= q) & (k > q - window)).sum())


@pytest.mark.parametrize("queries, cached, window", [(6, 0, 4), (6, 0, 1), (6, 0, 6), (6, 0, 10), (1, 9, 4),
                                                    (5, 3, 4), (5, 10, 4), (4, 2, 8), (64, 0, 16)])
def test_executed_band_is_the_brute_force_count(queries, cached, window):
    """The executed attention FLOPs (Op.causal_flops) are 4 x d_head per (query, key) pair in the band;
    the keys of a prefill after `cached` tokens are min(cached, W) + S (the ring holds W)."""
    spec = load_model({**BASE, "layers": 1, "heads": 1, "d_model": 8, "d_ff": 16,
                       "sliding_window": {"size": window}})
    phase = "decode" if queries == 1 else "prefill" if cached else "forward"
    c = count(spec, batch=1, seq=queries, context=queries + cached if phase != "forward" else None, phase=phase)
    op = next(o for o in c.ops if o.name == "block.0.attn.core")
    keys = min(cached, window) + queries if phase == "prefill" else min(cached + 1, window) if phase == "decode" \
        else queries
    d_head = 8
    assert op.flops == 4 * queries * keys * d_head  # the full product is counted
    assert op.causal_flops == pytest.approx(4 * band(queries, keys, window) * d_head, rel=1e-12)


def test_decode_and_memory_derived():
    from flopsim.memory import memory

    spec = load_model(MISTRAL)
    full = spec.model_copy(update={"sliding_window": None})
    B, T, W, L, hkv, dh = 4, 16384, 4096, 32, 8, 128
    for context in (1024, T):  # below the window nothing changes
        a = count(spec, batch=B, seq=1, context=context, phase="decode")
        b = count(full, batch=B, seq=1, context=context, phase="decode")
        assert b.flops - a.flops == L * 4 * B * 32 * dh * (context - min(context, W))
        assert b.bytes - a.bytes == L * 2 * B * (context - min(context, W)) * hkv * dh * 2  # keys, values; bf16
    kv = memory(spec, phase="decode", batch=B, seq=1, context=T).components["kv_cache_bytes"]
    assert kv == L * 2 * B * W * hkv * dh * 2
    assert memory(full, phase="decode", batch=B, seq=1, context=T).components["kv_cache_bytes"] == kv * T / W
    # Gemma-2-like alternation: half the layers keep the whole context
    alt = spec.model_copy(update={"sliding_window": spec.sliding_window.model_copy(update={"global_every": 2})})
    assert memory(alt, phase="decode", batch=B, seq=1, context=T).components["kv_cache_bytes"] == \
        L // 2 * 2 * B * (W + T) * hkv * dh * 2
    # prefill writes the last W positions of a long prompt per local layer
    p = count(spec, batch=1, seq=T, phase="prefill")
    append = next(o for o in p.ops if o.name == "block.0.attn.kv_cache")
    assert append.bytes == 2 * (2 * 1 * W * hkv * dh * 2)  # read and written once


def test_time_follows_the_window_and_sweeps_it():
    from flopsim.sweep import sweep

    r = sweep(MISTRAL, "h100-sxm", phase="decode",
              vary={"window": [1024, 4096, 16384]}, batch=8, context=16384)
    t = list(r.grids["time_s"])
    assert t[0] < t[1] < t[2]
    one = flopsim.predict(MISTRAL, "h100-sxm", phase="decode", batch=8, context=16384)
    assert one.time_s == pytest.approx(t[1], rel=1e-9)


@pytest.mark.parametrize("changes, message", [
    (dict(causal=False, head="cls", classes=2, sliding_window=dict(size=4)), "causal"),
    (dict(family="mod", mod=dict(capacity=0.5, every=2), sliding_window=dict(size=4)), "not supported"),
    (dict(sliding_window=dict(size=0)), "size"),
    (dict(sliding_window=dict(size=4, global_every=0)), "global_every"),
])
def test_bad_input_is_one_line(changes, message):
    with pytest.raises(SpecError) as err:
        load_model({**BASE, **changes})
    assert message in str(err.value) and "\n" not in str(err.value)
