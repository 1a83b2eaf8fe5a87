"""Multi-head latent attention (the spec's `mla` block) and DeepSeek-style MoE routing
(`moe.first_dense`, `gate`, `selection_bias`, `groups`, `normalize`, `scale`).

- exactness against FlopCounterMode on the torch reference (flopsim.torchref.mla and
  .moe), every phase, both decode forms, with and without a query latent, explicit and
  fused attention (a fused train step against torch's own sdpa_backward_flop_count:
  torch's CPU kernel runs the math path when value and query widths differ);
- the absorbed and expanded decode forms against their derivation, symbolically;
- bytes and elementwise FLOPs against the reference's kernels (explicit attention), and
  in train the one stated difference (the eager assembly of the query's gradient);
- the latent cache: the bytes decode reads and the memory it holds;
- presets: DeepSeek-V3 and DeepSeek-V2-Lite parameters derived term by term from their
  configs, against the published totals and activated counts;
- bad input: one line.
"""

from __future__ import annotations

import pytest
import sympy as sp

from conftest import assert_exact, one_error_line, run_cli
from flopsim.count import count, formula
from flopsim.errors import SpecError
from flopsim.ops.symbols import B, T, symbol
from flopsim.spec import load_model

BASE = dict(name="mla", layers=2, d_model=48, heads=4, d_ff=96, vocab=61, positions="rope", ffn="gated",
            activation="silu", bias=False, norm="rmsnorm", max_seq=64)
MLA = dict(kv_rank=16, q_rank=24, d_nope=8, d_rope=4, d_v=6)
CONFIGS = {
    "q-latent-absorbed": dict(mla=MLA),
    "q-latent-expanded": dict(mla={**MLA, "decode": "expanded"}),
    "direct-q-explicit": dict(mla=dict(kv_rank=12, d_nope=6, d_rope=2, d_v=6), attention_impl="explicit"),
    "bias-layernorm": dict(mla=MLA, bias=True, norm="layernorm", attention_impl="explicit"),
    "deepseek-v3-like": dict(family="moe", layers=3, mla=MLA, moe=dict(
        experts=8, top_k=2, d_expert=16, shared_experts=1, first_dense=1, gate="sigmoid", selection_bias=True,
        normalize=True, scale=2.5, groups=4, top_groups=2)),
    "deepseek-v2-like": dict(family="moe", layers=3, attention_impl="explicit",
                             mla=dict(kv_rank=16, d_nope=8, d_rope=4, d_v=8, decode="expanded"),
                             moe=dict(experts=8, top_k=3, d_expert=16, shared_experts=2, first_dense=1)),
    "groups-capacity-every2": dict(family="moe", layers=4, moe=dict(
        experts=8, top_k=2, d_expert=16, gate="sigmoid", normalize=True, groups=2, top_groups=1,
        capacity_factor=1.25, first_dense=1, every=2)),
}
SHAPES = {"forward": (2, 5, None), "train": (2, 5, None), "prefill": (2, 6, None), "decode": (3, 1, 9)}


def make(name: str, **changes):
    return load_model({**BASE, **CONFIGS[name], **changes})


def cases():
    for name in CONFIGS:
        for phase in SHAPES:
            spec = make(name)
            if phase == "train" and spec.mla is not None and spec.attention_impl == "fused":
                continue  # below: torch's CPU kernel is not the fused one here
            yield pytest.param(name, phase, id=f"{name}-{phase}")


@pytest.mark.parametrize("name, phase", list(cases()))
def test_exact_against_torch(name, phase):
    pytest.importorskip("torch")
    batch, seq, context = SHAPES[phase]
    assert_exact(make(name), phase, batch, seq, context)


BYTES_CONFIGS = ["direct-q-explicit", "bias-layernorm", "deepseek-v2-like"]


@pytest.mark.parametrize("name, phase", [(n, p) for n in BYTES_CONFIGS for p in ("forward", "prefill", "decode")
                                          if not (n.startswith("deepseek") and p == "decode")]
                         + [("q-latent-absorbed", "decode"), ("q-latent-expanded", "decode")])
def test_bytes_exact_against_the_reference(name, phase):
    """Bytes and elementwise FLOPs per module equal what the reference's kernels move
    (flopsim.torchref.bytes_check), explicit attention (torch's CPU SDPA runs its math
    path for unequal query and value widths, so a fused kernel has no CPU counterpart).
    (An MoE's decode reads the expected distinct experts, an expectation: not here.)"""
    pytest.importorskip("torch")
    from flopsim.torchref.bytes_check import compare_bytes

    spec = make(name, attention_impl="explicit")
    batch, seq, context = SHAPES[phase]
    cmp = compare_bytes(spec, phase, batch, seq, context)
    assert cmp.exact, cmp.describe()


@pytest.mark.parametrize("name", BYTES_CONFIGS)
def test_train_bytes_differ_by_the_eager_query_gradient_assembly(name):
    """In train the reference's eager autograd assembles the query's gradient from its two
    slices (latent part, rotated part): two zero-filled full copies (slice_backward: reads
    each part, writes N H d_qk) and their sum (reads 2 N H d_qk, writes N H d_qk, an add
    each). flopsim writes both parts into one buffer, as a fused kernel does: exactly
    6 N H d_qk values (fp32: 4 bytes each) and N H d_qk adds a layer apart, nothing else."""
    pytest.importorskip("torch")
    from flopsim.torchref.bytes_check import compare_bytes

    spec = make(name, attention_impl="explicit")
    batch, seq, _ = SHAPES["train"]
    cmp = compare_bytes(spec, "train", batch, seq)
    m = spec.mla
    values = batch * seq * spec.heads * (m.d_nope + m.d_rope)  # N H d_qk
    for i in range(spec.layers):
        torch_bytes, torch_flops = cmp.torch[(f"block.{i}.attn", "bwd")]
        ours_bytes, ours_flops = cmp.flopsim[(f"block.{i}.attn", "bwd")]
        assert (torch_bytes - ours_bytes, torch_flops - ours_flops) == (6 * values * 4, values)
    # and no other module differs (only the attention modules and the totals above them)
    above = {"", "block"} | {f"block.{i}" for i in range(spec.layers)} | {f"block.{i}.attn" for i in range(spec.layers)}
    assert {path for path, *_ in cmp.mismatches} <= above, cmp.describe()


def test_fused_train_attention_is_torchs_sdpa_backward_formula():
    """The fused kernel's backward (FlashAttention: the scores recomputed, then dQ, dK, dV,
    dP) with d_qk-wide queries and keys and d_v-wide values, as torch counts it for the
    fused kernels it has on the GPU (torch.utils.flop_counter.sdpa_backward_flop_count)."""
    pytest.importorskip("torch")
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    spec = make("q-latent-absorbed")
    b, s = 2, 5
    h, d_qk, d_v = spec.heads, MLA["d_nope"] + MLA["d_rope"], MLA["d_v"]
    q, k, v = (b, h, s, d_qk), (b, h, s, d_qk), (b, h, s, d_v)
    ops = {(op.name, op.pass_): op for op in count(spec, batch=b, seq=s, phase="train").ops}
    assert ops[("block.0.attn.core", "fwd")].flops == sdpa_flop_count(q, k, v)
    assert ops[("block.0.attn.core", "bwd")].flops == sdpa_backward_flop_count((b, h, s, d_v), q, k, v)
    # and every other module of the step is exact against the reference
    explicit = make("q-latent-absorbed", attention_impl="explicit")
    assert_exact(explicit, "train", b, s)


def test_decode_forms_against_their_derivation_symbolically():
    """Per layer, absorbed minus expanded decode FLOPs: the expanded form up-projects
    every key's latent (2 B T d_c H (d_nope + d_v)) and attends with d_qk-wide keys and
    d_v-wide values; the absorbed form folds W_UK into the query (2 B H d_nope d_c) and
    W_UV into the output (2 B H d_c d_v) and attends over the latents (keys d_c + d_rope,
    values d_c)."""
    absorbed = make("q-latent-absorbed")
    expanded = make("q-latent-expanded")
    H, r, dn, dr, dv = (symbol(n) for n in ("heads", "kv_rank", "d_nope", "d_rope", "d_v"))
    diff = formula(absorbed, phase="decode", symbolic=True) - formula(expanded, phase="decode", symbolic=True)
    per_layer = (2 * B * H * dn * r + 2 * B * H * r * dv + 2 * B * H * T * ((r + dr) + r)
                 - 2 * B * T * r * H * (dn + dv) - 2 * B * H * T * ((dn + dr) + dv))
    assert sp.expand(diff - absorbed.layers * per_layer) == 0
    # the parameters are the same: the absorbed products own kv_b's
    assert count(absorbed, phase="decode", batch=2, context=9).params == count(expanded, seq=4).params


def test_latent_cache_bytes_at_decode_and_in_memory():
    """DeepSeek-V3 keeps d_c + d_rope = 512 + 64 values per token and layer (bf16: 2 bytes):
    61 * 576 * 2 = 70,272 bytes a token, read whole by each decode step and written once
    for the new token, against 2 * 128 * 192 ... per head for the expanded keys and values
    that the cache does not hold."""
    from flopsim.memory import MemoryModel

    spec = load_model("deepseek-v3")
    per_token = 61 * (512 + 64) * 2  # layers * (kv_rank + d_rope) * bf16
    b, t = 4, 32768
    r = count(spec, phase="decode", batch=b, context=t)
    assert r.total("kv_read_bytes") == b * t * per_token
    assert r.total("kv_write_bytes") == b * per_token
    m = MemoryModel(spec, "decode").evaluate(b, 1, t)
    assert m["kv_cache_bytes"] == b * t * per_token
    # expanded decode reads the same latents (kv_b's input and the rotary keys from the cache)
    expanded = count(spec.with_changes(mla={"decode": "expanded"}), phase="decode", batch=b, context=t)
    assert expanded.total("kv_read_bytes") == b * (t - 1) * per_token


# -- presets ----------------------------------------------------------------------------

def deepseek_params(*, layers, d, heads, vocab, d_ff, kv_rank, q_rank, d_nope, d_rope, d_v, experts,
                    d_expert, shared, first_dense, selection_bias=False):
    """Parameters from a DeepSeek config, term by term (transformers' DeepseekV3 modules):
    per block q (q_a, q_a_layernorm, q_b, or q_proj), kv_a_proj_with_mqa, kv_a_layernorm,
    kv_b_proj, o_proj, two RMSNorms; a dense gated MLP in the first blocks, else the router
    (and its selection bias), the routed experts and the shared experts (gated); embeddings,
    final norm and the untied head."""
    d_qk = d_nope + d_rope
    q = d * heads * d_qk if q_rank is None else d * q_rank + q_rank + q_rank * heads * d_qk
    attention = q + d * (kv_rank + d_rope) + kv_rank + kv_rank * heads * (d_nope + d_v) + heads * d_v * d
    dense_mlp = 3 * d * d_ff
    moe = d * experts + (experts if selection_bias else 0) + (experts + shared) * 3 * d * d_expert
    blocks = layers * (attention + 2 * d) + first_dense * dense_mlp + (layers - first_dense) * moe
    return blocks + 2 * vocab * d + d


def test_deepseek_v3_parameters():
    """DeepSeek-V3's config (transformers' DeepseekV3Config defaults): 671,026,404,352 main-model
    parameters, published as 671B (arXiv 2412.19437; the model card's 685B adds the 14B
    multi-token-prediction module). The selection bias is a buffer in transformers (not
    counted); DeepSeek's own inference code stores it as a parameter: 58 * 256 = 14,848 more."""
    spec = load_model("deepseek-v3")
    expected = deepseek_params(layers=61, d=7168, heads=128, vocab=129280, d_ff=18432, kv_rank=512, q_rank=1536,
                               d_nope=128, d_rope=64, d_v=128, experts=256, d_expert=2048, shared=1, first_dense=3)
    r = count(spec, seq=16)
    assert r.params == expected == 671_026_404_352
    assert round(expected / 1e9) == 671
    # activated per token: 8 of 256 routed experts; published 37B without the embedding lookup
    routed = 58 * 256 * 3 * 7168 * 2048
    embedding = 129280 * 7168
    assert r.active_params() == pytest.approx(expected - routed * (1 - 8 / 256), rel=1e-12)
    assert round(r.active_params(lookups=False) / 1e9) == 37
    assert r.active_params(lookups=False) == pytest.approx(r.active_params() - embedding, rel=1e-12)


def test_deepseek_v2_lite_parameters():
    """DeepSeek-V2-Lite (arXiv 2405.04434, appendix B): 15.7B parameters and 2.4B activated.
    flopsim: 15,706,484,224 (15.7B) and 2.45B activated without the embedding lookup (the
    paper's figure is 2.1% lower: a rounding down, or a convention the paper does not state)."""
    spec = load_model("deepseek-v2-lite")
    expected = deepseek_params(layers=27, d=2048, heads=16, vocab=102400, d_ff=10944, kv_rank=512, q_rank=None,
                               d_nope=128, d_rope=64, d_v=128, experts=64, d_expert=1408, shared=2, first_dense=1)
    r = count(spec, seq=16)
    assert r.params == expected == 15_706_484_224
    assert round(expected / 1e8) / 10 == 15.7
    routed = 26 * 64 * 3 * 2048 * 1408
    assert r.active_params() == pytest.approx(expected - routed * (1 - 6 / 64), rel=1e-12)
    assert r.active_params(lookups=False) / 1e9 == pytest.approx(2.4, rel=0.025)


def test_scaling_shape_cost_extrapolates_past_the_dense_blocks():
    """isoFLOP's shape costs count three small depths and extrapolate: with first_dense
    blocks the depths start after them, and the result equals the full count."""
    from flopsim.scaling.ladder import shape_cost

    spec = load_model("deepseek-v2-lite")
    cost = shape_cost(spec, 64)
    full = count(spec, seq=64, phase="train")
    assert cost.params == full.params
    assert cost.flops_per_token * 64 == pytest.approx(full.flops, rel=1e-12)
    assert cost.active == pytest.approx(full.active_params(), rel=1e-12)


def test_count_cli_prints_activated_parameters():
    r = run_cli("count", "deepseek-v3", "--seq", "16")
    assert r.exit_code == 0, r.output
    assert "671,026,404,352" in r.output
    assert "activated    37,552,282,624 per token" in r.output and "36.63 G" in r.output


# -- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("changes, expect", [
    (dict(positions="learned", mla=MLA), "mla: positions 'learned'"),
    (dict(kv_heads=2, mla=MLA), "mla: kv_heads 2"),
    (dict(mla={**MLA, "d_rope": 3}), "d_rope 3 must be even"),
    (dict(mla={**MLA, "kv_rank": 0}), "mla.kv_rank"),
    (dict(mla={**MLA, "decode": "folded"}), "mla.decode"),
    (dict(family="moe", moe=dict(experts=8, groups=3)), "groups 3 does not divide experts 8"),
    (dict(family="moe", moe=dict(experts=8, groups=4, top_groups=5)), "top_groups 5 exceeds groups 4"),
    (dict(family="moe", moe=dict(experts=8, top_k=4, groups=4, top_groups=1)), "top_k 4 exceeds the experts"),
    (dict(family="moe", moe=dict(experts=8, first_dense=2)), "moe.first_dense 2 leaves no MoE block"),
    (dict(family="moe", moe=dict(experts=8, gate="relu")), "moe.gate"),
    (dict(family="moe", moe=dict(experts=8, scale=0)), "moe.scale"),
])
def test_bad_input_is_one_line(changes, expect):
    with pytest.raises(SpecError) as err:
        load_model({**BASE, **changes})
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_bad_mla_spec_on_the_command_line(tmp_path):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, "mla": {**MLA, "d_v": -1}}))
    assert "mla.d_v" in one_error_line(run_cli("count", path))
