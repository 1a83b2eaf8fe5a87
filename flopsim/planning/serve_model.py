"""Per-GPU times and memory of one serving configuration on one replica
(flopsim.planning.serve): continuous batching as is, with chunked prefill, or with
speculative decoding, over request length distributions (flopsim.planning.serve_lengths).

Conventions (P, G: prompt and generated lengths, E[.] over their distributions; T: the
mean KV length of a decode step, floor(E[P] + E[G (G + 1)] / (2 E[G])); Pw: the p99
prompt; b: the batch of one engine, i.e. of one attention group on one pipeline stage;
the replica (flopsim.planning.serve_layouts) is tp x pp x ep GPUs running pp x ep such
engines). Every time is flopsim.planning.serve_steps' roofline of one GPU's sharded ops,
its collectives (tp all-reduces and the logits' all-gather, ep all-to-alls, pipeline
sends) included, per stage s:
- prefill_s(P) = the prefill of one prompt of P tokens on stage s (every ep group
  prefilling one, as under load: shard's symmetric expert parallelism);
  decode_s(b) = a decode step of b sequences at T keys on stage s.
- A pass alone sums the stages, an engine's step in steady state takes its period,
  pp max_s (serve_layouts); with pp = 1 both are the stage's time.
- As is: TTFT(P) = sum_s prefill_s(P) (the prompt alone, no queueing);
  TPOT(b) = pp max_s decode_s(b).
- Chunked prefill, chunk C (flopsim.planning.serve_steps' mixed step): a prompt of
  P = q C + r tokens takes n(P) = q + [r > 0] mixed steps; its q full chunks attend to
  C, 2C, .., qC keys and are costed as q steps at their mean, (q + 1) C // 2 keys (time
  is linear in the keys while no op changes bound), its last r tokens at P keys; each
  step is an engine's step, so it takes the mixed step's period:
      TTFT(P, b) = q mixed(b, C, (q + 1) C // 2) + [r > 0] mixed(b, r, P)
  TPOT(b) = the mean mixed step, E[TTFT(P, b)] / E[n(P)]: a decode step that carries a
  chunk, as every step does while prompts wait.
- Speculative decoding (Leviathan, Kalman and Matias 2023, "Fast Inference from
  Transformers via Speculative Decoding", ICML; pp = 1): a draft model proposes k tokens
  and the target verifies them in one forward; each is accepted with probability a,
  independently, so a step yields E = (1 - a^(k+1)) / (1 - a) tokens (k + 1 at a = 1).
  The draft runs on the same GPUs at the target's tp (vLLM's default draft tensor
  parallel size), in each ep group:
      step(b) = k draft_decode(b, T + (k - 1) // 2) + verify(b, k + 1 tokens, T + k keys)
      TPOT(b) = step(b) / E;  TTFT(P) = prefill(P) + draft_prefill(P) (the draft caches
      the prompt too). Both KV caches keep k lookahead tokens more (vLLM's lookahead slots).
- Cycle: the time in which an engine's b requests pass through its b slots in steady state:
      as is:        cycle = pp max_s (b E[prefill_s(P)] + E[G] decode_s(b))
                    (pp = 1: b E[TTFT] + E[G] TPOT(b); the busiest stage serves every engine)
      speculative:  cycle = b E[TTFT] + E[G] TPOT(b)
      chunked:      cycle = b E[n] TPOT(b) + max(0, E[G] - b E[n]) TPOT_alone(b)
  (a slot decodes for E[G] steps a request; b E[n] of them carry a chunk; TPOT_alone: the
  decode step's period). Slots stay full while b E[n] <= E[G]: with chunked prefill the
  batch is at most max(1, floor(E[G] / E[n])) (`batch_limit`); beyond it prompts queue.
  Output tokens/s of a replica = engines b E[G] / cycle; mean time between tokens =
  cycle / E[G]; decode time per output token (for cost): TPOT_alone(b), speculative TPOT(b).
- Memory per GPU (its stage; the fullest stage is reported): flopsim.memory on the
  sharded op list (weights; KV heads split over min(tp, kv_heads), a latent MLA cache
  whole on every rank) -- the weights of the stage's layers, the KV cache of its layers
  for pp b sequences at the p99 of P + G (+ k), and the largest working set among its
  ops of a decode step of b sequences, the prefill of Pw (chunked: a decode step and a
  chunk together; speculative: the verification, the logits of its b (k + 1) rows and the
  draft's decode); a draft adds its weights and KV cache the same way.
- Encoder-decoder (pp = 1; neither chunked nor speculative): the prompt is the
  encoder's input. TTFT(P) = the prefill list of one decoder token (the start token)
  with an encoder of P tokens: the encoder's forward, the cross-attention K/V of the P
  encoder outputs projected and cached, the decoder's first step. A decode step's self
  attention reads the decoder's own cache, 1 + j keys at step j, so T = floor(1 +
  E[G (G + 1)] / (2 E[G])), and its cross-attention the E[P] (rounded) cached encoder
  outputs. KV cache per sequence: self-attention K/V of its decoder tokens plus the
  cross-attention K/V of its P encoder outputs, in every decoder layer, both of
  2 kv_heads d_head values a token: at the p99 of P + G, (p99(P + G) - Pw + 1)
  decoder tokens and Pw encoder outputs, 1 + p99(P + G) tokens in all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from flopsim.planning.serve_lengths import (Lengths, WORST_QUANTILE, fixed_length, mean_decode_context,
                                            total_quantile)
from flopsim.planning.serve_steps import StepCoster


def expected_tokens(k: int, a: float) -> float:
    """Tokens a speculative step yields: (1 - a^(k+1)) / (1 - a), k + 1 at a = 1 (Leviathan et al. 2023)."""
    return float(k + 1) if a == 1 else (1 - a ** (k + 1)) / (1 - a)


@dataclass(frozen=True)
class Draft:
    """A speculative-decoding draft model: `k` tokens proposed a step, acceptance `a`."""

    spec: Any
    k: int
    acceptance: float

    @property
    def expected_tokens(self) -> float:
        return expected_tokens(self.k, self.acceptance)


def _sum_groups(parts: list) -> dict:
    out: dict = {}
    for part in parts:
        for g, s in part.items():
            out[g] = out.get(g, 0.0) + s
    return out


class ServeModel:
    """Continuous batching as is (see the module docstring); cached by batch and length."""

    def __init__(self, spec, hw, cal, links, *, replica, prompt: Lengths, gen: Lengths, usable_bytes: float,
                 lookahead: int = 0, steps: Optional[StepCoster] = None):
        self.spec, self.hw, self.cal, self.links, self.replica = spec, hw, cal, links, replica
        self.tp, self.pp = replica.tp, replica.pp
        self.prompt, self.gen, self.usable_bytes = prompt, gen, usable_bytes
        self.steps = steps or StepCoster(spec, hw, cal, links)
        self.p_worst = prompt.quantile(WORST_QUANTILE)
        total = total_quantile(prompt, gen)
        self.encoder_decoder = spec.is_encoder_decoder
        if self.encoder_decoder:  # the decoder's own tokens: the start token and the generated ones
            self.t_mean = math.floor(mean_decode_context(fixed_length(1), gen))
            self.enc_mean, self.enc_worst = round(prompt.mean), self.p_worst
            self.t_max = total - self.p_worst + 1
        else:
            self.t_mean = math.floor(mean_decode_context(prompt, gen))
            self.enc_mean = self.enc_worst = None
            self.t_max = total + lookahead
        self.kv_tokens_max = self.t_max + (self.p_worst if self.encoder_decoder else 0)
        self.groups = prompt.groups()
        self.stages = self.steps.layer_counts(replica)
        self._cache: dict = {}

    def _cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    # -- times -----------------------------------------------------------------------
    def prefill_times(self, p: int) -> list:
        """Each stage's OpTimes of one prompt's prefill (an encoder-decoder: encoder over p tokens)."""
        b, s, t, e = (1, 1, 1, p) if self.encoder_decoder else (1, p, p, None)
        return self._cached(("prefill", p), lambda: self.steps.stage_times("prefill", b, s, t, self.replica, e))

    def prefill_stages(self, p: int) -> list:
        return self._cached(("prefill s", p), lambda: [self.steps.seconds(t) for t in self.prefill_times(p)])

    def prefill_s(self, p: int) -> float:
        """One prompt's prefill alone: the sum of the stages."""
        return sum(self.prefill_stages(p))

    def decode_times(self, batch: int) -> list:
        return self._cached(("decode", batch), lambda: self.steps.stage_times(
            "decode", batch, 1, self.t_mean, self.replica, self.enc_mean))

    def decode_stages(self, batch: int) -> list:
        return self._cached(("decode s", batch), lambda: [self.steps.seconds(t) for t in self.decode_times(batch)])

    def decode_s(self, batch: int) -> float:
        """A decode step's period: pp x the busiest stage."""
        return self.pp * max(self.decode_stages(batch))

    def ttft_of(self, batch: int, p: int) -> float:
        return self.prefill_s(p)

    def ttft_mean(self, batch: int) -> float:
        return sum(w * self.ttft_of(batch, p) for p, w in self.groups)

    def ttft(self, batch: int) -> float:
        """The TTFT a target bounds: that of the p99 prompt."""
        return self.ttft_of(batch, self.p_worst)

    def tpot(self, batch: int) -> float:
        return self.decode_s(batch)

    def decode_token_s(self, batch: int) -> float:
        return self.decode_s(batch)

    def _pass_groups(self, times: list) -> dict:
        """{group: seconds} of the collectives a step passes through: every stage's, summed."""
        return _sum_groups([self.steps.by_group(t) for t in times])

    def comm(self, batch: int) -> dict:
        """{'ttft': {group: seconds}, 'tpot': {group: seconds}}: the collectives within each figure
        (of one pass through the stages)."""
        return {"ttft": self._pass_groups(self.prefill_times(self.p_worst)),
                "tpot": self._pass_groups(self.decode_times(batch))}

    def cycle(self, batch: int) -> float:
        pre = [sum(w * self.prefill_stages(p)[s] for p, w in self.groups) for s in range(self.pp)]
        return self.pp * max(batch * x + self.gen.mean * y for x, y in zip(pre, self.decode_stages(batch)))

    def batch_limit(self) -> Optional[int]:
        """The largest batch the slots stay full at, when the mode limits it (None: no limit)."""
        return None

    def throughput(self, batch: int) -> dict:
        cycle, n = self.cycle(batch), self.replica.engines * batch
        return {"cycle_s": cycle, "output_tokens_per_s": n * self.gen.mean / cycle,
                "input_tokens_per_s": n * self.prompt.mean / cycle}

    # -- memory ----------------------------------------------------------------------
    def _by_stage(self, phase: str, batch: int, seq: int, context: int) -> list:
        """flopsim.memory's components of each stage's GPU at (batch, seq, context)."""
        m = self.steps.memory_model(phase, self.tp, self.replica.ep, self.enc_worst)
        return m.evaluate_layers(batch, seq, context, self.stages)

    def _acts(self, phase: str, batch: int, seq: int, context: int) -> list:
        return [x["activations_bytes"] for x in self._by_stage(phase, batch, seq, context)]

    def working_sets(self, batch: int) -> list:
        """Each stage's working sets (the largest is held): a decode step, the prefill of Pw."""
        pre = self._cached("prefill ws", lambda: self._acts(
            "prefill", 1, *((1, 1) if self.encoder_decoder else (self.p_worst, self.p_worst))))
        return [list(x) for x in zip(self._acts("decode", batch, 1, self.t_max), pre)]

    def memory(self, batch: int) -> dict:
        """The fullest stage's GPU: weights, the KV cache of its pp x batch sequences, working set."""
        held = self._by_stage("decode", self.pp * batch, 1, self.t_max)
        parts = [{"weights_bytes": h["weights_bytes"], "kv_cache_bytes": h["kv_cache_bytes"],
                  "activations_bytes": max(ws)} for h, ws in zip(held, self.working_sets(batch))]
        for p in parts:
            p["total_bytes"] = sum(p.values())
        s = max(range(len(parts)), key=lambda i: parts[i]["total_bytes"])
        return {**parts[s], **({"stage": s} if self.pp > 1 else {})}

    def fits(self, batch: int) -> bool:
        return self.memory(batch)["total_bytes"] <= self.usable_bytes


class ChunkedModel(ServeModel):
    """Chunked prefill: `chunk` prompt tokens ride along each decode step (module docstring)."""

    def __init__(self, *args, chunk: int, **kw):
        super().__init__(*args, **kw)
        self.chunk = chunk

    def chunks(self, p: int) -> int:
        return -(-p // self.chunk)

    def mean_chunks(self) -> float:
        return sum(w * self.chunks(p) for p, w in self.groups)

    def mixed_times(self, batch: int, chunk: int, chunk_context: int) -> list:
        return self._cached(("mixed", batch, chunk, chunk_context), lambda: self.steps.mixed_times(
            self.replica, batch, self.t_mean, chunk, chunk_context))

    def mixed_s(self, batch: int, chunk: int, chunk_context: int) -> float:
        return self.steps.period(self.mixed_times(batch, chunk, chunk_context))

    def ttft_of(self, batch: int, p: int) -> float:
        q, r = divmod(p, self.chunk)
        full = q * self.mixed_s(batch, self.chunk, (q + 1) * self.chunk // 2) if q else 0.0
        return full + (self.mixed_s(batch, r, p) if r else 0.0)

    def tpot(self, batch: int) -> float:
        return self.ttft_mean(batch) / self.mean_chunks()

    def comm(self, batch: int) -> dict:
        """TTFT: the collectives of the p99 prompt's mixed steps; TPOT: of a step carrying a chunk."""
        q, r = divmod(self.p_worst, self.chunk)
        full = self._pass_groups(self.mixed_times(batch, self.chunk, (q + 1) * self.chunk // 2)) if q else {}
        last = self._pass_groups(self.mixed_times(batch, r, self.p_worst)) if r else {}
        step = min(self.chunk, self.p_worst)
        return {"ttft": _sum_groups([{g: q * s for g, s in full.items()}, last]),
                "tpot": self._pass_groups(self.mixed_times(batch, step, self.p_worst))}

    def batch_limit(self) -> int:
        """max(1, floor(E[G] / E[n])): beyond it the chunks cannot keep up with the prompts."""
        return max(1, math.floor(self.gen.mean / self.mean_chunks()))

    def cycle(self, batch: int) -> float:
        chunk_steps = batch * self.mean_chunks()
        return chunk_steps * self.tpot(batch) + max(0.0, self.gen.mean - chunk_steps) * self.decode_s(batch)

    def working_sets(self, batch: int) -> list:
        chunk = min(self.chunk, self.p_worst)
        pre = self._cached("chunk ws", lambda: self._acts("prefill", 1, chunk, self.p_worst))
        return [[d + p] for d, p in zip(self._acts("decode", batch, 1, self.t_max), pre)]


class SpeculativeModel(ServeModel):
    """Speculative decoding with a draft model (module docstring); pp 1."""

    def __init__(self, *args, draft: Draft, **kw):
        from flopsim.planning.serve_layouts import Replica

        super().__init__(*args, lookahead=draft.k, **kw)
        self.draft = draft
        self.draft_replica = Replica(tp=self.tp)  # in each ep group, at the target's tp
        self.draft_steps = StepCoster(draft.spec, self.hw, self.cal, self.links,
                                      vocab_parallel=self.steps.vocab_parallel)

    def draft_decode_times(self, batch: int) -> list:
        context = self.t_mean + (self.draft.k - 1) // 2
        return self._cached(("draft", batch), lambda: self.draft_steps.stage_times(
            "decode", batch, 1, context, self.draft_replica))

    def draft_decode_s(self, batch: int) -> float:
        return self.draft_steps.period(self.draft_decode_times(batch))

    def draft_prefill_times(self, p: int) -> list:
        return self._cached(("draft prefill", p), lambda: self.draft_steps.stage_times(
            "prefill", 1, p, p, self.draft_replica))

    def verify_times(self, batch: int) -> list:
        return self._cached(("verify", batch), lambda: self.steps.verify_times(
            self.replica, batch, self.draft.k, self.t_mean + self.draft.k))

    def verify_s(self, batch: int) -> float:
        return self.steps.period(self.verify_times(batch))

    def step_s(self, batch: int) -> float:
        return self.draft.k * self.draft_decode_s(batch) + self.verify_s(batch)

    def prefill_s(self, p: int) -> float:
        return super().prefill_s(p) + sum(self.draft_steps.seconds(t) for t in self.draft_prefill_times(p))

    def tpot(self, batch: int) -> float:
        return self.step_s(batch) / self.draft.expected_tokens

    def cycle(self, batch: int) -> float:
        return batch * self.ttft_mean(batch) + self.gen.mean * self.tpot(batch)

    def comm(self, batch: int) -> dict:
        """TTFT: target's and draft's prefill; TPOT: k draft decodes and a verification, / E."""
        e, k = self.draft.expected_tokens, self.draft.k
        draft = self._pass_groups(self.draft_decode_times(batch))
        step = _sum_groups([{g: k * s for g, s in draft.items()}, self._pass_groups(self.verify_times(batch))])
        ttft = _sum_groups([super().comm(batch)["ttft"]] +
                           [self.draft_steps.by_group(t) for t in self.draft_prefill_times(self.p_worst)])
        return {"ttft": ttft, "tpot": {g: s / e for g, s in step.items()}}

    def decode_token_s(self, batch: int) -> float:
        return self.tpot(batch)

    def working_sets(self, batch: int) -> list:
        k1 = self.draft.k + 1
        return [super().working_sets(batch)[0] + [
            self._acts("prefill", batch, k1, self.t_max)[0], self._acts("decode", batch * k1, 1, self.t_max)[0],
            self._draft_memory(batch)["activations_bytes"]]]

    def _draft_memory(self, batch: int) -> dict:
        m = self.draft_steps.memory_model("decode", self.tp, 1)
        return m.evaluate_layers(batch, 1, self.t_max, self.draft_steps.layer_counts(self.draft_replica))[0]

    def memory(self, batch: int) -> dict:
        out = super().memory(batch)
        d = self._draft_memory(batch)
        out.pop("total_bytes")
        out["draft_weights_bytes"] = d["weights_bytes"]
        out["draft_kv_cache_bytes"] = d["kv_cache_bytes"]
        out["total_bytes"] = sum(v for k, v in out.items() if k != "stage")
        return out


def serve_model(spec, hw, cal, links, *, tp: int = 1, pp: int = 1, ep: int = 1, replica=None, prompt: Lengths,
                gen: Lengths, usable_bytes: float, chunk: Optional[int] = None, draft: Optional[Draft] = None,
                steps: Optional[StepCoster] = None) -> ServeModel:
    """The model of one configuration on `replica` (else tp x pp x ep): chunked, speculative
    or as is (`steps`: a StepCoster of the spec to share between replicas)."""
    from flopsim.planning.serve_layouts import Replica

    kw = dict(replica=replica or Replica(tp, pp, ep), prompt=prompt, gen=gen, usable_bytes=usable_bytes, steps=steps)
    if chunk is not None:
        return ChunkedModel(spec, hw, cal, links, chunk=chunk, **kw)
    if draft is not None:
        return SpeculativeModel(spec, hw, cal, links, draft=draft, **kw)
    return ServeModel(spec, hw, cal, links, **kw)
