"""The notes of a serving plan (flopsim.planning.serve): what its figures assume and
how a mode compares.

Conventions: chunked prefill and speculative decoding are compared with plain
continuous batching (flopsim.planning.serve_model.ServeModel) at the same tp and batch;
times in ms to 3 significant digits; a note is one sentence a reader can act on.
"""

from __future__ import annotations

from flopsim.planning.serve_lengths import WORST_QUANTILE


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g} ms"


def _lengths_note(x, model) -> list:
    if x.prompt.fixed and x.gen.fixed:
        return []
    q = f"p{WORST_QUANTILE * 100:g}"
    mean = f"E[P] + E[G(G+1)]/(2E[G]) = {model.t_mean:,}" if not model.encoder_decoder else \
        f"1 + E[G(G+1)]/(2E[G]) = {model.t_mean:,} decoder tokens, and E[P] = {model.enc_mean:,} encoder outputs"
    return [f"lengths: prompt {x.prompt.describe()}, gen {x.gen.describe()}, independent; in steady state the "
            f"requests in flight are weighted by their gen (length-biased), so a decode step reads a mean KV length "
            f"of {mean}; memory holds every slot at the {q} of prompt + gen ({model.kv_tokens_max:,} tokens) and "
            f"a TTFT target bounds the {q} prompt ({model.p_worst:,} tokens)"]


def _layout_notes(x, model, batch: int) -> list:
    """What a pipeline, expert parallelism or an encoder-decoder change in the figures."""
    r, notes = model.replica, []
    if r.pp > 1:
        dec = model.decode_stages(batch)
        notes.append(f"pipeline of {r.pp} stages (vLLM's virtual engines): {r.pp} batches of {batch:,} in flight, "
                     f"each stepping once every {r.pp} x the busiest stage's {_ms(max(dec))} (stages "
                     f"{', '.join(_ms(t) for t in dec)}, sends included); a prompt alone passes the stages one "
                     f"after the other; each GPU holds its stage's weights and the KV cache of its layers for all "
                     f"{r.pp * batch:,} sequences")
    if r.ep > 1:
        notes.append(f"expert parallel {r.ep}: {r.ep} attention groups of tp {r.tp}, each with its own batch of "
                     f"{batch:,} (data-parallel attention), stepping together; each GPU holds "
                     f"{x.spec.moe.experts // r.ep} of the {x.spec.moe.experts} routed experts of every MoE layer "
                     f"(split tp {r.tp} ways) and every dense weight; two all-to-alls per MoE layer")
    if model.encoder_decoder:
        notes.append(f"encoder-decoder: the prompt is the encoder's input; TTFT is the encoder's forward over it "
                     f"and the decoder's first step (writing both caches); a decode step attends to its "
                     f"{model.t_mean:,} decoder tokens (mean) and cross-attends to the {model.enc_mean:,} cached "
                     f"encoder outputs (mean); the KV cache holds both, {model.kv_tokens_max:,} tokens a sequence "
                     f"at the p99")
    return notes


def _chunk_notes(model, batch: int) -> list:
    from flopsim.planning.serve_model import ServeModel

    m = model
    plain = ServeModel(m.spec, m.hw, m.cal, m.links, replica=m.replica, prompt=m.prompt, gen=m.gen,
                       usable_bytes=m.usable_bytes, steps=m.steps)
    per_gpu = lambda mm: mm.throughput(batch)["output_tokens_per_s"] / m.replica.gpus  # noqa: E731
    gap = lambda mm: mm.throughput(batch)["cycle_s"] / m.gen.mean  # noqa: E731
    notes = [f"chunked prefill against whole-prompt prefills at the same tp and batch ({m.chunk:,} prompt tokens a "
             f"step beside the {batch:,} decode tokens: vLLM's max_num_batched_tokens {batch + m.chunk:,}): TTFT "
             f"{_ms(m.ttft(batch))} against {_ms(plain.ttft(batch))}; a decode step carrying a chunk takes "
             f"{_ms(m.tpot(batch))} (alone {_ms(m.decode_s(batch))}) where a whole prompt prefilled between steps "
             f"stalls every sequence for {_ms(plain.ttft_mean(batch))}; mean time between tokens "
             f"{_ms(gap(m))} against {_ms(gap(plain))}; {per_gpu(m):,.0f} against {per_gpu(plain):,.0f} output "
             f"tokens/s per GPU"]
    chunk_steps = batch * m.mean_chunks()
    if chunk_steps > m.gen.mean:
        notes.append(f"prefill-limited: {batch:,} requests need {chunk_steps:,.0f} chunk steps for every "
                     f"{m.gen.mean:,.0f} decode steps, so slots wait for their prompts; a larger --chunk or a "
                     f"smaller batch keeps them full")
    return notes


def _draft_notes(model, batch: int) -> list:
    m, d = model, model.draft
    notes = [f"speculative decoding ({d.spec.name} drafts k = {d.k} tokens at the target's tp {m.tp}, acceptance "
             f"{d.acceptance:g}): {d.expected_tokens:.3g} tokens per step of {_ms(m.step_s(batch))} "
             f"({d.k} draft steps of {_ms(m.draft_decode_s(batch))}, a verification of {d.k + 1} tokens of "
             f"{_ms(m.verify_s(batch))}): TPOT {_ms(m.tpot(batch))} against {_ms(m.decode_s(batch))} for the "
             f"target's decode step alone (Leviathan et al. 2023)"]
    if m.tpot(batch) > m.decode_s(batch):
        notes.append(f"at batch {batch:,} speculation is slower than plain decoding: the verification of "
                     f"{d.k + 1} tokens a sequence costs more than the {d.expected_tokens:.3g} decode steps it "
                     f"replaces (decode is no longer memory-bound); a smaller batch or a shorter --draft-len gains")
    return notes


def serving_notes(x, model, row: dict, latency: dict, tpot_target) -> list:
    """Every note of a plan that fits, at its batch."""
    batch, notes = row["batch"], []
    longest = x.prompt.max + x.gen.max + (x.draft.k if x.draft else 0)
    if x.spec.is_encoder_decoder:
        longest = max(x.prompt.max, 1 + x.gen.max)  # the encoder's input, the decoder's tokens
    if longest > x.spec.max_seq:
        notes.append(f"the longest request, {longest:,} tokens, exceeds max_seq {x.spec.max_seq} of {x.spec.name} "
                     f"({x.spec.positions} positions: costed as is)")
    notes += _lengths_note(x, model) + _layout_notes(x, model, batch)
    if x.chunk is not None:
        notes += _chunk_notes(model, batch)
    if x.draft is not None:
        notes += _draft_notes(model, batch)
    if tpot_target is not None and latency["tpot_with_prefills_s"] > tpot_target:
        fix = "a larger --chunk or a smaller batch" if x.chunk else "a lower --max-batch, prefill on separate GPUs" + \
            ("" if x.draft else " or --chunk")
        notes.append(f"with other requests' prefills the mean time between tokens is "
                     f"{_ms(latency['tpot_with_prefills_s'])}, over the {_ms(tpot_target)} TPOT target (the target "
                     f"bounds the step reported as TPOT); try {fix}")
    if tpot_target is None and row["batch"] == row.get("max_batch_memory"):
        notes.append("no TPOT target: the batch is the largest that fits memory (give --tpot to bound latency)")
    elif row.get("max_batch_prefill") is not None and \
            row["batch"] == row["max_batch_prefill"] < row["max_batch_memory"]:
        notes.append(f"the batch is the largest whose prompts {x.chunk:,}-token chunks keep up with (batch x E[chunks "
                     f"per prompt] = {row['batch'] * model.mean_chunks():,.0f} <= E[gen] = {x.gen.mean:,.0f}); memory "
                     f"allows {row['max_batch_memory']:,}: a larger --chunk allows more")
    return notes
