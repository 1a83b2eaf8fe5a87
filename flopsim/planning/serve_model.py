"""Per-GPU times and memory of one serving configuration at one tensor-parallel degree
(flopsim.planning.serve): continuous batching as is, with chunked prefill, or with
speculative decoding, over request length distributions (flopsim.planning.serve_lengths).

Conventions (P, G: prompt and generated lengths, E[.] over their distributions; T: the
mean KV length of a decode step, floor(E[P] + E[G (G + 1)] / (2 E[G])); Pw: the p99
prompt; b: the batch; tp all-reduces in every time, through flopsim.planning.serve's
tp_prefill_s / tp_decode_s / tp_allreduce_s: one GPU's sharded op lists, all-reduces included):
- prefill(P) = tp_prefill_s(one prompt of P tokens); decode(b) = tp_decode_s(b, T).
- As is: TTFT(P) = prefill(P) (the prompt alone, no queueing); TPOT(b) = decode(b).
- Chunked prefill, chunk C (flopsim.planning.serve_steps' mixed step): a prompt of
  P = q C + r tokens takes n(P) = q + [r > 0] mixed steps; its q full chunks attend to
  C, 2C, .., qC keys and are costed as q steps at their mean, (q + 1) C // 2 keys (time
  is linear in the keys while no op changes bound), its last r tokens at P keys:
      TTFT(P, b) = q mixed(b, C, (q + 1) C // 2) + [r > 0] mixed(b, r, P)
  TPOT(b) = the mean mixed step, E[TTFT(P, b)] / E[n(P)]: a decode step that carries a
  chunk, as every step does while prompts wait.
- Speculative decoding (Leviathan, Kalman and Matias 2023, "Fast Inference from
  Transformers via Speculative Decoding", ICML): a draft model proposes k tokens and
  the target verifies them in one forward; each is accepted with probability a,
  independently, so a step yields E = (1 - a^(k+1)) / (1 - a) tokens (k + 1 at a = 1).
  The draft runs on the same GPUs at the target's tp (vLLM's default draft tensor
  parallel size):
      step(b) = k draft_decode(b, T + (k - 1) // 2) + verify(b, k + 1 tokens, T + k keys)
      TPOT(b) = step(b) / E;  TTFT(P) = prefill(P) + draft_prefill(P) (the draft caches
      the prompt too). Both KV caches keep k lookahead tokens more (vLLM's lookahead slots).
- Cycle: the time in which b requests pass through the b slots in steady state:
      as is, speculative: cycle = b E[TTFT] + E[G] TPOT(b)
      chunked:            cycle = b E[n] TPOT(b) + max(0, E[G] - b E[n]) decode(b)
  (a slot decodes for E[G] steps a request; b E[n] of them carry a chunk). Slots stay
  full while b E[n] <= E[G]: with chunked prefill the batch is at most
  max(1, floor(E[G] / E[n])) (`batch_limit`); beyond it prompts queue.
  Output tokens/s = b E[G] / cycle; mean time between tokens = cycle / E[G]; decode
  time per output token (for cost): decode(b), speculative TPOT(b).
- Memory per GPU: weights / tp + the KV cache of b sequences at the p99 of P + G (+ k)
  / min(tp, kv_heads) (a latent MLA cache whole on every rank) + the largest working
  set / tp among a decode step, the prefill of Pw (chunked: a decode step and a chunk
  together; speculative: the verification, the logits of its b (k + 1) rows and the
  draft's decode); a draft adds its weights and KV cache the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from flopsim.planning.serve_lengths import Lengths, WORST_QUANTILE, mean_decode_context, total_quantile
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


def _kv_split(spec, tp: int) -> int:
    """KV heads split over tp (replicated beyond kv_heads); MLA's latent cache is whole on every rank."""
    return 1 if spec.mla is not None else min(tp, spec.kv_heads)


class ServeModel:
    """Continuous batching as is (see the module docstring); cached by batch and length."""

    def __init__(self, spec, hw, cal, links, *, tp: int, prompt: Lengths, gen: Lengths, usable_bytes: float,
                 lookahead: int = 0):
        from flopsim.memory import MemoryModel

        self.spec, self.hw, self.cal, self.links, self.tp = spec, hw, cal, links, tp
        self.prompt, self.gen, self.usable_bytes = prompt, gen, usable_bytes
        self.t_mean = math.floor(mean_decode_context(prompt, gen))
        self.t_max = total_quantile(prompt, gen) + lookahead
        self.p_worst = prompt.quantile(WORST_QUANTILE)
        self.groups = prompt.groups()
        self._mem = MemoryModel(spec, "decode")
        self._prefill_mem = MemoryModel(spec, "prefill")
        self._cache: dict = {}

    def _cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    # -- times -----------------------------------------------------------------------
    def prefill_s(self, p: int) -> float:
        from flopsim.planning.serve import tp_prefill_s

        return self._cached(("prefill", p), lambda: tp_prefill_s(
            self.spec, self.hw, self.cal, self.links, tp=self.tp, batch=1, prompt=p)[0])

    def decode_s(self, batch: int) -> float:
        from flopsim.planning.serve import tp_decode_s

        return self._cached(("decode", batch), lambda: tp_decode_s(
            self.spec, self.hw, self.cal, self.links, tp=self.tp, batch=batch, context=self.t_mean)[0])

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

    def ttft_tp_s(self, batch: int) -> float:
        """The tp all-reduces within the TTFT of the p99 prompt."""
        from flopsim.planning.serve import tp_allreduce_s

        return tp_allreduce_s(self.spec, self.links, self.tp, self.p_worst)

    def decode_tp_s(self, batch: int) -> float:
        from flopsim.planning.serve import tp_allreduce_s

        return tp_allreduce_s(self.spec, self.links, self.tp, batch)

    def cycle(self, batch: int) -> float:
        return batch * self.ttft_mean(batch) + self.gen.mean * self.tpot(batch)

    def batch_limit(self) -> Optional[int]:
        """The largest batch the slots stay full at, when the mode limits it (None: no limit)."""
        return None

    def throughput(self, batch: int) -> dict:
        cycle = self.cycle(batch)
        return {"cycle_s": cycle, "output_tokens_per_s": batch * self.gen.mean / cycle,
                "input_tokens_per_s": batch * self.prompt.mean / cycle}

    # -- memory ----------------------------------------------------------------------
    def working_sets(self, batch: int) -> list:
        return [self._mem.evaluate(batch, 1, self.t_max)["activations_bytes"],
                self._prefill_mem.evaluate(1, self.p_worst, self.p_worst)["activations_bytes"]]

    def memory(self, batch: int) -> dict:
        m = self._mem.evaluate(batch, 1, self.t_max)
        out = {"weights_bytes": m["weights_bytes"] / self.tp,
               "kv_cache_bytes": m["kv_cache_bytes"] / _kv_split(self.spec, self.tp),
               "activations_bytes": max(self.working_sets(batch)) / self.tp}
        out["total_bytes"] = sum(out.values())
        return out

    def fits(self, batch: int) -> bool:
        return self.memory(batch)["total_bytes"] <= self.usable_bytes


class ChunkedModel(ServeModel):
    """Chunked prefill: `chunk` prompt tokens ride along each decode step (module docstring)."""

    def __init__(self, *args, chunk: int, steps: Optional[StepCoster] = None, **kw):
        super().__init__(*args, **kw)
        self.chunk = chunk
        self.steps = steps or StepCoster(self.spec, self.hw, self.cal, self.links)

    def chunks(self, p: int) -> int:
        return -(-p // self.chunk)

    def mean_chunks(self) -> float:
        return sum(w * self.chunks(p) for p, w in self.groups)

    def mixed_s(self, batch: int, chunk: int, chunk_context: int) -> float:
        return self._cached(("mixed", batch, chunk, chunk_context), lambda: self.steps.mixed_s(
            self.tp, batch, self.t_mean, chunk, chunk_context))

    def ttft_of(self, batch: int, p: int) -> float:
        q, r = divmod(p, self.chunk)
        full = q * self.mixed_s(batch, self.chunk, (q + 1) * self.chunk // 2) if q else 0.0
        return full + (self.mixed_s(batch, r, p) if r else 0.0)

    def tpot(self, batch: int) -> float:
        return self.ttft_mean(batch) / self.mean_chunks()

    def decode_tp_s(self, batch: int) -> float:
        """The tp all-reduces of a mixed step with a full chunk."""
        return super().decode_tp_s(batch + self.chunk)

    def ttft_tp_s(self, batch: int) -> float:
        from flopsim.planning.serve import tp_allreduce_s

        q, r = divmod(self.p_worst, self.chunk)
        one = lambda rows: tp_allreduce_s(self.spec, self.links, self.tp, rows)  # noqa: E731
        return q * one(batch + self.chunk) + (one(batch + r) if r else 0.0)

    def batch_limit(self) -> int:
        """max(1, floor(E[G] / E[n])): beyond it the chunks cannot keep up with the prompts."""
        return max(1, math.floor(self.gen.mean / self.mean_chunks()))

    def cycle(self, batch: int) -> float:
        chunk_steps = batch * self.mean_chunks()
        return chunk_steps * self.tpot(batch) + max(0.0, self.gen.mean - chunk_steps) * self.decode_s(batch)

    def working_sets(self, batch: int) -> list:
        chunk = min(self.chunk, self.p_worst)
        together = self._mem.evaluate(batch, 1, self.t_max)["activations_bytes"] + \
            self._prefill_mem.evaluate(1, chunk, self.p_worst)["activations_bytes"]
        return [together]


class SpeculativeModel(ServeModel):
    """Speculative decoding with a draft model (module docstring)."""

    def __init__(self, *args, draft: Draft, steps: Optional[StepCoster] = None, **kw):
        from flopsim.memory import MemoryModel

        super().__init__(*args, lookahead=draft.k, **kw)
        self.draft = draft
        self.steps = steps or StepCoster(self.spec, self.hw, self.cal, self.links)
        self._draft_mem = MemoryModel(draft.spec, "decode")

    def draft_decode_s(self, batch: int) -> float:
        from flopsim.planning.serve import tp_decode_s

        context = self.t_mean + (self.draft.k - 1) // 2
        return self._cached(("draft", batch), lambda: tp_decode_s(
            self.draft.spec, self.hw, self.cal, self.links, tp=self.tp, batch=batch, context=context)[0])

    def verify_s(self, batch: int) -> float:
        return self._cached(("verify", batch), lambda: self.steps.verify_s(
            self.tp, batch, self.draft.k, self.t_mean + self.draft.k))

    def step_s(self, batch: int) -> float:
        return self.draft.k * self.draft_decode_s(batch) + self.verify_s(batch)

    def prefill_s(self, p: int) -> float:
        from flopsim.planning.serve import tp_prefill_s

        draft = self._cached(("draft prefill", p), lambda: tp_prefill_s(
            self.draft.spec, self.hw, self.cal, self.links, tp=self.tp, batch=1, prompt=p)[0])
        return super().prefill_s(p) + draft

    def tpot(self, batch: int) -> float:
        return self.step_s(batch) / self.draft.expected_tokens

    def decode_tp_s(self, batch: int) -> float:
        """The tp all-reduces of a step (k draft decodes, one verification) per token."""
        from flopsim.planning.serve import tp_allreduce_s

        draft = self.draft.k * tp_allreduce_s(self.draft.spec, self.links, self.tp, batch)
        return (draft + super().decode_tp_s(batch * (self.draft.k + 1))) / self.draft.expected_tokens

    def ttft_tp_s(self, batch: int) -> float:
        from flopsim.planning.serve import tp_allreduce_s

        return super().ttft_tp_s(batch) + tp_allreduce_s(self.draft.spec, self.links, self.tp, self.p_worst)

    def decode_token_s(self, batch: int) -> float:
        return self.tpot(batch)

    def working_sets(self, batch: int) -> list:
        k1 = self.draft.k + 1
        return super().working_sets(batch) + [
            self._prefill_mem.evaluate(batch, k1, self.t_max)["activations_bytes"],
            self._mem.evaluate(batch * k1, 1, self.t_max)["activations_bytes"],
            self._draft_mem.evaluate(batch, 1, self.t_max)["activations_bytes"]]

    def memory(self, batch: int) -> dict:
        out = super().memory(batch)
        d = self._draft_mem.evaluate(batch, 1, self.t_max)
        out.pop("total_bytes")
        out["draft_weights_bytes"] = d["weights_bytes"] / self.tp
        out["draft_kv_cache_bytes"] = d["kv_cache_bytes"] / _kv_split(self.draft.spec, self.tp)
        out["total_bytes"] = sum(out.values())
        return out


def serve_model(spec, hw, cal, links, *, tp: int, prompt: Lengths, gen: Lengths, usable_bytes: float,
                chunk: Optional[int] = None, draft: Optional[Draft] = None,
                steps: Optional[StepCoster] = None) -> ServeModel:
    """The model of one configuration: chunked, speculative or as is (`steps`: a StepCoster
    of the spec to share between tp degrees)."""
    kw = dict(tp=tp, prompt=prompt, gen=gen, usable_bytes=usable_bytes)
    if chunk is not None:
        return ChunkedModel(spec, hw, cal, links, chunk=chunk, steps=steps, **kw)
    if draft is not None:
        return SpeculativeModel(spec, hw, cal, links, draft=draft, steps=steps, **kw)
    return ServeModel(spec, hw, cal, links, **kw)
