"""`plan serve`'s chunked prefill, length distributions, speculative decoding, KV-cache
dtype and the consistency of its verdicts (flopsim.planning.serve_*).

Each arithmetic test writes its derivation out and checks the plan against it."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest
from conftest import one_error_line
from conftest import run_cli as run

import flopsim
from flopsim.count import count
from flopsim.planning import plan_serving
from flopsim.planning.serve_lengths import mean_decode_context, parse_lengths, total_quantile
from flopsim.planning.serve_model import Draft, expected_tokens, serve_model
from flopsim.planning.serve_steps import StepCoster, merge_ops

H100 = "h100-sxm"
KV_PER_TOKEN_GPT2_SMALL = 2 * 12 * 768  # K and V values per token: 2 x layers x kv_heads * d_head


def _predict(spec, phase, batch, seq, context=None):
    return flopsim.predict(spec, H100, phase=phase, batch=batch, seq=seq, context=context).time_s


# -- length distributions -------------------------------------------------------------
def test_length_forms_their_quantiles_and_prefill_groups(tmp_path):
    u = parse_lengths("prompt", "uniform:100:300")
    assert len(u.values) == 201 and u.mean == pytest.approx(200)  # (A + B) / 2
    # P(L <= x) = (x - 99) / 201 reaches 0.99 first at x - 99 = 199: 298
    assert u.quantile(0.99) == 298
    ln = parse_lengths("gen", "lognormal:200:0.5")
    assert ln.quantile(0.5) == 200  # the median: F(ln 199.5) < 1/2 <= F(ln 200.5)
    assert ln.max == math.ceil(math.exp(math.log(200) + 0.5 * NormalDist().inv_cdf(0.999)))  # truncated at p99.9
    assert ln.probs.sum() == pytest.approx(1.0)
    csv = tmp_path / "gen.csv"
    csv.write_text("length,count\n10,1\n20,3\n# a comment\n10,1\n")
    h = parse_lengths("gen", str(csv))
    assert list(h.values) == [10, 20] and h.probs == pytest.approx([2 / 5, 3 / 5]) and h.mean == pytest.approx(16)
    # prefill groups: 24 equally likely lengths in 8 groups of 3, each at its mean length
    g = parse_lengths("prompt", "uniform:1:24").groups()
    assert g == [(3 * i + 2, pytest.approx(1 / 8)) for i in range(8)]
    assert parse_lengths("prompt", 512).groups() == [(512, 1.0)]
    assert sum(p * n for n, p in ln.groups()) == pytest.approx(ln.mean, rel=0.01)


def test_worst_case_is_the_p99_of_prompt_plus_gen():
    # P, G each 1 or 2 with probability 1/2: P + G is 2 (1/4), 3 (1/2), 4 (1/4)
    p, g = parse_lengths("prompt", "uniform:1:2"), parse_lengths("gen", "uniform:1:2")
    assert [total_quantile(p, g, q) for q in (0.2, 0.5, 0.75, 0.99)] == [2, 3, 3, 4]
    assert total_quantile(parse_lengths("prompt", 512), parse_lengths("gen", 128)) == 640


def test_mean_decode_context_is_length_biased_as_a_simulation_of_full_slots_finds():
    prompt, gen = parse_lengths("prompt", "uniform:50:150"), parse_lengths("gen", "lognormal:40:0.8")
    # a slot holds a request for G steps, so the requests in flight are sampled in proportion to G;
    # at a uniformly random step j = 1..G the context is P + j:
    # E[T] = sum_g p(g) g (E[P] + (g + 1) / 2) / sum_g p(g) g = E[P] + E[G (G + 1)] / (2 E[G])
    g = gen.values.astype(float)
    expected = prompt.mean + np.dot(g * (g + 1), gen.probs) / (2 * gen.mean)
    assert mean_decode_context(prompt, gen) == pytest.approx(expected)
    naive = prompt.mean + (gen.mean + 1) / 2  # the unweighted mean
    assert expected > 1.1 * naive

    rng = np.random.default_rng(7)
    slots, steps, burn_in = 256, 3000, 1000

    def draw(d, n):
        return rng.choice(d.values, size=n, p=d.probs)

    p, glen, j = draw(prompt, slots), draw(gen, slots), np.ones(slots, dtype=np.int64)
    total = 0.0
    for step in range(steps):
        if step >= burn_in:
            total += float((p + j).sum())
        j += 1
        done = j > glen  # finished: the slot takes the next request at once
        n = int(done.sum())
        if n:
            p[done], glen[done], j[done] = draw(prompt, n), draw(gen, n), 1
    simulated = total / (slots * (steps - burn_in))
    assert simulated == pytest.approx(expected, rel=0.02)
    assert abs(simulated - naive) > 0.05 * naive


def test_plan_over_length_distributions():
    prompt, gen = parse_lengths("prompt", "uniform:100:300"), parse_lengths("gen", "uniform:20:60")
    s = plan_serving("gpt2-small", H100, prompt="uniform:100:300", gen="uniform:20:60", tp=1, pp=1,
                     max_batch=64)
    b = s.batch
    assert b == 64
    # E[G (G + 1)] over 20..60: E[G^2] + E[G] = (Var + mean^2) + mean, Var = (41^2 - 1) / 12 = 140
    t_mean = math.floor(200 + (140 + 40 ** 2 + 40) / (2 * 40))
    assert s.config["decode_context_mean"] == t_mean == 222
    tpot = _predict("gpt2-small", "decode", b, 1, t_mean)
    assert s.latency["tpot_s"] == pytest.approx(tpot)
    # TTFT of the p99 prompt (298 tokens) alone; the mean over the 8 equal-probability groups
    assert s.config["prompt_p99"] == 298
    assert s.latency["ttft_s"] == pytest.approx(_predict("gpt2-small", "prefill", 1, 298))
    ttft_mean = sum(w * _predict("gpt2-small", "prefill", 1, n) for n, w in prompt.groups())
    assert s.latency["ttft_mean_s"] == pytest.approx(ttft_mean)
    # memory: every slot's KV cache at the p99 of P + G, bf16
    kv_max = total_quantile(prompt, gen)
    assert s.config["kv_context_max"] == kv_max and 298 < kv_max < 360
    assert s.memory["kv_cache_bytes"] == pytest.approx(b * KV_PER_TOKEN_GPT2_SMALL * 2 * kv_max)
    # a cycle serves b requests: b E[TTFT] of prefill + E[G] decode steps
    cycle = b * ttft_mean + 40 * tpot
    assert s.throughput["output_tokens_per_s_per_replica"] == pytest.approx(b * 40 / cycle)
    assert s.latency["tpot_with_prefills_s"] == pytest.approx(cycle / 40)
    assert any("length-biased" in n for n in s.notes)


# -- chunked prefill --------------------------------------------------------------------
def test_mixed_step_sums_the_work_and_reads_the_weights_once():
    spec, b, t, chunk = flopsim.load_model("gpt2-small"), 8, 300, 64
    dec = count(spec, phase="decode", batch=b, seq=1, context=t).ops
    ch = count(spec, phase="prefill", batch=1, seq=chunk, context=2 * chunk).ops  # the second chunk
    union = count(spec, phase="decode", batch=b + chunk, seq=1, context=t).ops
    merged = merge_ops(dec, ch, union)
    for f in ("flops", "causal_flops", "act_read_bytes", "act_write_bytes", "kv_read_bytes", "kv_write_bytes"):
        assert sum(getattr(o, f) for o in merged) == sum(getattr(o, f) for o in dec + ch)
    by = {o.name: o for o in merged}
    # one read of each weight matrix: qkv is 768 x 2304 bf16 + its bias, as in either list alone
    assert by["block.0.attn.qkv"].weight_bytes == (768 * 2304 + 2304) * 2 == \
        {o.name: o for o in dec}["block.0.attn.qkv"].weight_bytes
    assert by["block.0.mlp.up"].gemm == (1, b + chunk, 3072, 768)  # the rows of both
    assert by["embed.tokens"].weight_bytes == (b + chunk) * 768 * 2  # b + chunk rows looked up
    assert sum(o.weight_bytes for o in merged) < sum(o.weight_bytes for o in dec + ch)
    # so the step is no shorter than either part and shorter than both one after the other
    hw = flopsim.load_hardware(H100)
    cal = flopsim.load_calibration("auto", hw)
    mixed = StepCoster(spec, hw, cal, None).step_s(merged)
    d, p = _predict(spec, "decode", b, 1, t), _predict(spec, "prefill", 1, chunk, 2 * chunk)
    assert max(d, p) <= mixed < d + p


def test_chunked_prefill_ttft_tpot_and_cycle():
    prompt, gen, chunk, b = 600, 128, 256, 16
    s = plan_serving("gpt2-small", H100, prompt=prompt, gen=gen, tp=1, pp=1, chunk=chunk, max_batch=b)
    assert s.batch == b and s.config["max_batch_prefill"] == 128 // 3  # b x 3 chunks <= 128 decode steps
    t = prompt + (gen + 1) // 2
    steps = StepCoster(s.spec, s.hw, s.calibration, s.links)
    # 600 = 2 x 256 + 88: two full chunks at their mean prefix, (2 + 1) x 256 // 2 = 384 keys, then 88 at 600
    full, last = steps.mixed_s(1, b, t, 256, 384), steps.mixed_s(1, b, t, 88, 600)
    ttft = 2 * full + last
    assert s.latency["ttft_s"] == pytest.approx(ttft)
    # the chunks one by one (256 and 512 keys): the same, attention being linear in the keys
    assert ttft == pytest.approx(steps.mixed_s(1, b, t, 256, 256) + steps.mixed_s(1, b, t, 256, 512) + last, rel=1e-6)
    tpot = ttft / 3  # the mean mixed step
    assert s.latency["tpot_s"] == pytest.approx(tpot)
    decode = _predict("gpt2-small", "decode", b, 1, t)
    assert s.latency["decode_step_s"] == pytest.approx(decode) and decode < tpot
    cycle = b * 3 * tpot + (gen - b * 3) * decode  # 48 steps carry a chunk, 80 do not
    assert s.throughput["output_tokens_per_s_per_replica"] == pytest.approx(b * gen / cycle)
    whole = _predict("gpt2-small", "prefill", 1, prompt)
    assert any(n.startswith("chunked prefill against whole-prompt") and f"{whole * 1e3:.3g} ms" in n for n in s.notes)


# -- speculative decoding ------------------------------------------------------------------
def test_speculative_decoding_step_and_memory():
    assert expected_tokens(4, 1.0) == 5  # every draft token accepted, plus the target's own
    assert expected_tokens(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)  # sum of a^i, i = 0..k
    k, a, b, prompt, gen = 3, 0.6, 8, 200, 100
    s = plan_serving("gpt2-medium", H100, prompt=prompt, gen=gen, tp=1, draft="gpt2-small", draft_len=k,
                     acceptance=a, max_batch=b)
    e = (1 - a ** (k + 1)) / (1 - a)
    t = prompt + (gen + 1) // 2
    draft = _predict("gpt2-small", "decode", b, 1, t + (k - 1) // 2)  # k steps at T .. T + k - 1 keys
    # verification: the target's prefill of k + 1 tokens at T + k keys, logits at all b (k + 1) rows
    medium = flopsim.load_model("gpt2-medium")
    pre = flopsim.predict(medium, H100, phase="prefill", batch=b, seq=k + 1, context=t + k)
    rows = flopsim.predict(medium, H100, phase="decode", batch=b * (k + 1), seq=1, context=t + k)
    verify = sum(o.time_s for o in pre.ops if o.layer < medium.blocks) + \
        sum(o.time_s for o in rows.ops if o.layer >= medium.blocks)
    assert s.latency["verify_s"] == pytest.approx(verify)
    assert s.latency["tpot_s"] == pytest.approx((k * draft + verify) / e)
    assert s.config["expected_tokens_per_step"] == pytest.approx(e)
    # TTFT: both models prefill the prompt
    assert s.latency["ttft_s"] == pytest.approx(_predict(medium, "prefill", 1, prompt) +
                                                _predict("gpt2-small", "prefill", 1, prompt))
    # memory: the draft's weights and KV cache too, at prompt + gen + k lookahead tokens
    assert s.config["kv_context_max"] == prompt + gen + k
    small = flopsim.count("gpt2-small", seq=1)
    assert s.memory["draft_weights_bytes"] == pytest.approx(small.params * 2)
    assert s.memory["draft_kv_cache_bytes"] == pytest.approx(b * KV_PER_TOKEN_GPT2_SMALL * 2 * (prompt + gen + k))
    assert s.memory["kv_cache_bytes"] == pytest.approx(b * 2 * 24 * 1024 * 2 * (prompt + gen + k))
    assert any("Leviathan" in n for n in s.notes)


# -- KV cache dtype ------------------------------------------------------------------------
def test_kv_dtype_sets_the_cache_bytes_in_memory_and_decode():
    b, prompt, gen = 32, 500, 100
    s16 = plan_serving("gpt2-small", H100, prompt=prompt, gen=gen, tp=1, pp=1, max_batch=b)
    s8 = plan_serving("gpt2-small", H100, prompt=prompt, gen=gen, tp=1, pp=1, max_batch=b, kv_dtype="fp8")
    assert s8.config["kv_dtype"] == "fp8" and s8.spec.precision_label == "bf16, KV fp8"
    # b sequences x 600 tokens x 2 x 12 x 768 values x 1 byte (bf16: 2)
    assert s8.memory["kv_cache_bytes"] == pytest.approx(b * 600 * KV_PER_TOKEN_GPT2_SMALL * 1)
    assert s16.memory["kv_cache_bytes"] == pytest.approx(2 * s8.memory["kv_cache_bytes"])
    # a decode step reads b x T cached values a layer, K and V, at 1 byte each
    t = s8.config["decode_context_mean"]
    fp8 = count(s8.spec, phase="decode", batch=b, seq=1, context=t)
    assert fp8.total("kv_read_bytes") == b * t * KV_PER_TOKEN_GPT2_SMALL * 1
    assert s8.latency["tpot_s"] == pytest.approx(_predict(s8.spec, "decode", b, 1, t))
    assert s8.latency["tpot_s"] < s16.latency["tpot_s"]


# -- verdicts never contradict the figures ---------------------------------------------------
def _check_verdicts(s, ttft_target, tpot_target):
    """Every row meets its targets exactly when its reported figures are within them; the
    plan is feasible exactly when a row meets them, and then reports that row."""
    for r in s.candidates:
        if r.get("batch") is None:
            assert not r["meets"]
            continue
        ok = (ttft_target is None or r["ttft_s"] <= ttft_target) and (tpot_target is None or r["tpot_s"] <= tpot_target)
        assert r["meets"] is ok and (r["reasons"] == "") is ok
    assert s.feasible is any(r["meets"] for r in s.candidates)
    row = next(r for r in s.candidates if (r["tp"], r["pp"], r["ep"]) == (s.tp, s.pp, s.ep))
    assert (s.batch, s.latency["ttft_s"], s.latency["tpot_s"]) == (row["batch"], row["ttft_s"], row["tpot_s"])
    assert s.message.startswith("targets not met") is not s.feasible


def _draft(mode):
    return Draft(flopsim.load_model(mode["draft"]), mode["draft_len"], mode["acceptance"]) if "draft" in mode else None


@pytest.mark.parametrize("mode", [dict(chunk=128), dict(draft="gpt2-small", draft_len=3, acceptance=0.7)])
def test_verdicts_agree_with_figures_in_every_mode(mode):
    spec = "gpt2-small" if "chunk" in mode else "gpt2-medium"
    mode = dict(mode, max_batch=48)
    base = plan_serving(spec, H100, prompt=300, gen=64, gpus=4, **mode)
    tpots = sorted(r["tpot_s"] for r in base.candidates)
    # a TPOT target between the tp degrees' steps at batch 1 splits them; a TTFT target under every one fails all
    one = [plan_serving(spec, H100, prompt=300, gen=64, tp=r["tp"], pp=r["pp"], **dict(mode, max_batch=1))
           for r in base.candidates]
    t1 = sorted(p.latency["tpot_s"] for p in one)
    assert t1[0] < t1[-1]
    for ttft, tpot, meeting in ((None, (t1[0] + t1[-1]) / 2, "some"),
                                (min(p.latency["ttft_s"] for p in one) / 2, None, "none"),
                                (None, tpots[-1] * 2, "all")):
        s = plan_serving(spec, H100, prompt=300, gen=64, gpus=4, ttft_s=ttft, tpot_s=tpot, **mode)
        _check_verdicts(s, ttft, tpot)
        meets = [r["meets"] for r in s.candidates]
        assert {"some": any(meets) and not all(meets), "none": not any(meets), "all": all(meets)}[meeting]
        if tpot is not None and s.feasible:  # the largest batch that meets it
            m = serve_model(s.spec, s.hw, s.calibration, s.links, tp=s.tp, pp=s.pp, prompt=parse_lengths("p", 300),
                            gen=parse_lengths("g", 64), usable_bytes=s.memory["usable_bytes"], chunk=mode.get("chunk"),
                            draft=_draft(mode))
            limit = min(s.config["max_batch_memory"], s.config["max_batch_prefill"] or math.inf)
            assert m.tpot(s.batch) <= tpot and (s.batch == limit or m.tpot(s.batch + 1) > tpot)


def test_chunked_ttft_target_bounds_the_batch():
    # with chunks the TTFT grows with the batch (each mixed step carries the batch's decode tokens)
    lo = plan_serving("gpt2-small", H100, prompt=600, gen=256, tp=1, pp=1, chunk=128, max_batch=1).latency["ttft_s"]
    hi = plan_serving("gpt2-small", H100, prompt=600, gen=256, tp=1, pp=1, chunk=128).latency["ttft_s"]
    target = (lo + hi) / 2
    s = plan_serving("gpt2-small", H100, prompt=600, gen=256, tp=1, pp=1, chunk=128, ttft_s=target)
    _check_verdicts(s, target, None)
    m = serve_model(s.spec, s.hw, s.calibration, s.links, tp=1, prompt=parse_lengths("p", 600),
                    gen=parse_lengths("g", 256), usable_bytes=s.memory["usable_bytes"], chunk=128)
    assert s.feasible and m.ttft(s.batch) <= target < m.ttft(s.batch + 1)


# -- command line ----------------------------------------------------------------------------
def test_cli_serve_chunked_speculative_and_histogram(tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("length,count\n100,3\n300,1\n")
    r = run("plan", "serve", "gpt2-small", "-H", H100, "--prompt", csv, "--gen", "uniform:32:96", "--chunk", 128,
            "--tp", 1, "--pp", 1, "--max-batch", 8, "--kv-dtype", "fp8", "--format", "json")
    assert r.exit_code == 0, r.output
    c = json.loads(r.output)["config"]
    assert (c["prompt"], c["prompt_mean"], c["chunk"], c["kv_dtype"]) == ("prompts.csv", 150, 128, "fp8")
    r = run("plan", "serve", "gpt2-medium", "-H", H100, "--prompt", "lognormal:200:0.5", "--gen", 64, "--draft",
            "gpt2-small", "--draft-len", 3, "--acceptance", 0.7, "--tp", 1, "--max-batch", 8)
    assert r.exit_code == 0, r.output
    for needle in ("speculative decoding", "draft KV cache", "lognormal:200:0.5", "p99 prompt"):
        assert needle in r.output


@pytest.mark.parametrize("extra, needle", [
    (["--prompt", "uniform:50:20", "--gen", 10], "prompt: 'uniform:50:20'"),
    (["--prompt", "lognormal:0:1", "--gen", 10], "prompt: 'lognormal:0:1'"),
    (["--prompt", 10, "--gen", "lots"], "gen: 'lots'"),
    (["--prompt", 10, "--gen", 10, "--kv-dtype", "fp4"], "kv_dtype: 'fp4'"),
    (["--prompt", 10, "--gen", 10, "--chunk", 0], "chunk: 0"),
    (["--prompt", 10, "--gen", 10, "--acceptance", 0.5], "acceptance: 0.5: needs a draft"),
    (["--prompt", 10, "--gen", 10, "--draft", "gpt2-small", "--draft-len", 2, "--acceptance", 1.5], "acceptance: 1.5"),
    (["--prompt", 10, "--gen", 10, "--draft", "gpt2-small", "--acceptance", 0.5], "draft_len: None"),
    (["--prompt", 10, "--gen", 10, "--draft", "llama-2-7b", "--draft-len", 2, "--acceptance", 0.5],
     "draft: 'llama-2-7b'"),  # another vocabulary
    (["--prompt", 10, "--gen", 10, "--chunk", 8, "--draft", "gpt2-small", "--draft-len", 2, "--acceptance", 0.5],
     "chunk: 8"),
    (["--prompt", "uniform:500:900", "--gen", 200], "prompt + gen: 1100"),
])
def test_cli_serve_bad_input_is_one_line_exit_2(extra, needle):
    assert needle in one_error_line(run("plan", "serve", "gpt2-medium", "-H", H100, *extra))


def test_bad_histogram_row_names_the_file_and_line(tmp_path):
    csv = tmp_path / "gen.csv"
    csv.write_text("length,count\n10,1\nten,2\n")
    assert "line 3" in one_error_line(run("plan", "serve", "gpt2-small", "-H", H100, "--prompt", 10, "--gen", csv))
