"""Serving steps composed from op lists: chunked prefill's mixed step and speculative
decoding's verification step (flopsim.planning.serve_model uses them).

Conventions:
- Op lists come from flopsim.count (`decode`: B sequences, one new token each, T keys;
  `prefill`: S new tokens per sequence attending to T keys, a cached prefix of T - S
  tokens read from the KV cache plus themselves); times from flopsim.roofline's
  `op_time` and `in_sequence`, as flopsim.predict computes them. No cost formula is
  written here.
- A step's time on a tp-way replica: the roofline of one GPU's ops, the lists sharded
  by flopsim.parallel (flopsim.planning.serve.serve_layout), their all-reduces among
  them (collective ops, priced on the link levels).
- Mixed step (chunked prefill, Sarathi-Serve, Agrawal et al. 2024; vLLM's
  --enable-chunked-prefill): ONE forward over the batch's B decode tokens and a chunk
  of S tokens of one prompt. `merge_ops` joins the decode list (B, T) and the chunk's
  prefill list (1 sequence, S tokens, its prefix + S keys) op by op (same names):
  FLOPs, activation and KV-cache bytes add; the weights are read once: the merged
  op's weight bytes are those of a decode list of B + S tokens (every dense matrix
  once; an MoE layer's experts that B + S tokens are expected to reach, as that list
  states; B + S embedding rows); a matrix product's GEMM gets m = B + S rows (other
  kinds keep the GEMM of the part with more FLOPs); one launch (the larger expected
  launches); a collective's messages add (B + S rows).
- Verification (speculative decoding): the target's prefill list of S = k + 1 tokens
  per sequence for B sequences at T keys, with its final norm and LM head taken from
  a decode list of B (k + 1) tokens: verification needs the logits of every one of
  the k + 1 positions, a prefill computes them for the last only.
"""

from __future__ import annotations

from dataclasses import fields, replace

from flopsim.count import OpCost
from flopsim.ops.fields import BYTE_FIELDS

_SUMMED = ("flops", "causal_flops", "other_flops", *(f for f in BYTE_FIELDS if f != "weight_bytes"), "comm_bytes")
_KEY = tuple(f.name for f in fields(OpCost) if f.name not in ("name", "layer", "module", "tags"))


def _merge_one(a: OpCost, b: OpCost, union: OpCost) -> OpCost:
    """One op of a mixed step: `a` (decode) and `b` (chunk) run as one kernel (module docstring)."""
    summed = {f: getattr(a, f) + getattr(b, f) for f in _SUMMED}
    gemm = a.gemm if a.all_flops >= b.all_flops else b.gemm
    if a.kind == "matmul" and a.gemm is not None and b.gemm is not None and \
            (a.gemm[0], a.gemm[2], a.gemm[3]) == (b.gemm[0], b.gemm[2], b.gemm[3]):
        gemm = (a.gemm[0], a.gemm[1] + b.gemm[1], a.gemm[2], a.gemm[3])
    return replace(a, **summed, weight_bytes=union.weight_bytes, gemm=gemm, kernels=max(a.kernels, b.kernels),
                   host_sync=a.host_sync or b.host_sync)


def merge_ops(decode: list, chunk: list, union: list) -> list:
    """The ops of a mixed step: `decode` (B sequences) and `chunk` (S prompt tokens) merged
    by name, weight bytes from `union` (a decode list of B + S tokens); an op in one list
    only is kept as it is."""
    chunk_by, union_by = {op.name: op for op in chunk}, {op.name: op for op in union}
    out, seen = [], set()
    for op in decode:
        other = chunk_by.get(op.name)
        out.append(op if other is None else _merge_one(op, other, union_by.get(op.name, op)))
        seen.add(op.name)
    return out + [op for op in chunk if op.name not in seen]


def with_every_logit(prefill: list, decode: list, blocks: int) -> list:
    """`prefill`'s ops with those after the blocks (final norm, LM head) taken from
    `decode` (a decode list of as many tokens): logits at every position."""
    tail = {op.name: op for op in decode if op.layer >= blocks}
    return [tail.get(op.name, op) if op.layer >= blocks else op for op in prefill]


class StepCoster:
    """Op lists and their step times for one spec, device and calibration; every list and
    every op's roofline is cached (the blocks repeat the same ops), so one StepCoster
    serves every tp and batch of a plan."""

    def __init__(self, spec, hw, cal, links):
        self.spec, self.hw, self.cal, self.links = spec, hw, cal, links
        self._lists: dict = {}
        self._ids: dict = {}  # id(op) of a cached list's op -> the index of its costs
        self._values: dict = {}  # an op's costs (all but its name and place) -> index
        self._times: dict = {}  # index, or (decode index, chunk index, weight bytes) -> OpTime

    def ops(self, phase: str, batch: int, seq: int, context: int, tp: int = 1) -> list:
        """count(spec, phase, batch, seq, context).ops of one GPU of a tp-way replica, cached."""
        from flopsim.count import count
        from flopsim.planning.serve import serve_layout

        key = (phase, batch, seq, context, tp)
        if key not in self._lists:
            self._lists[key] = ops = count(self.spec, phase=phase, batch=batch, seq=seq, context=context,
                                           layout=serve_layout(self.spec, phase, tp, self.links)).ops
            for op in ops:  # held as long as the list: their ids stay theirs
                self._ids[id(op)] = self._index(op)
        return self._lists[key]

    def _index(self, op) -> int:
        i = self._ids.get(id(op))
        return i if i is not None else self._values.setdefault(tuple(getattr(op, f) for f in _KEY), len(self._values))

    def _time(self, key, op):
        from flopsim.roofline import op_time

        if key not in self._times:
            self._times[key] = op_time(op() if callable(op) else op, self.hw, self.spec.compute_dtype, self.cal,
                                       self.links.by_level if self.links is not None else None)
        return self._times[key]

    @staticmethod
    def _step_s(times: list) -> float:
        from flopsim.roofline import in_sequence

        return sum(t.time_s for t in in_sequence(times))

    def step_s(self, ops: list) -> float:
        """One step of `ops` (each an op of a list this StepCoster made, or any OpCost): one
        GPU's ops, collectives included (module docstring)."""
        return self._step_s([self._time(("op", self._index(op)), op) for op in ops])

    def weight_bytes(self, tokens: int, context: int, tp: int = 1) -> dict:
        """{op name: weight bytes} of one GPU's decode list of `tokens` sequences (weights only)."""
        from flopsim.count import evaluate, token_values
        from flopsim.families import build_ops
        from flopsim.parallel.shard import shard
        from flopsim.planning.serve import serve_layout

        key = ("weights", tokens, context, tp)
        if key not in self._lists:
            layout = serve_layout(self.spec, "decode", tp, self.links)
            ops = self._lists.setdefault(("decode ops", tp), build_ops(self.spec, "decode") if layout is None else
                                         shard(build_ops(self.spec, "decode"), self.spec, "decode", layout))
            values = evaluate([op.weight_bytes for op in ops], token_values(self.spec, "decode", tokens, 1, context))
            self._lists[key] = {op.name: w for op, w in zip(ops, values)}
        return self._lists[key]

    def mixed_ops(self, batch: int, context: int, chunk: int, chunk_context: int, tp: int = 1) -> list:
        """A decode of `batch` sequences at `context` keys and a `chunk`-token prompt chunk
        attending to `chunk_context` keys (its prefix + itself), as one step's ops."""
        return merge_ops(self.ops("decode", batch, 1, context, tp), self.ops("prefill", 1, chunk, chunk_context, tp),
                         self.ops("decode", batch + chunk, 1, context, tp))

    def mixed_s(self, tp: int, batch: int, context: int, chunk: int, chunk_context: int) -> float:
        """The mixed step's time: the roofline of merge_ops' list, each merged op cached by its parts."""
        dec, part = self.ops("decode", batch, 1, context, tp), self.ops("prefill", 1, chunk, chunk_context, tp)
        weights, by = self.weight_bytes(batch + chunk, context, tp), {op.name: op for op in part}
        times, seen = [], set()
        for a in dec:
            b = by.get(a.name)
            if b is None:
                times.append(self._time(("op", self._index(a)), a))
                continue
            w = weights.get(a.name, a.weight_bytes)
            times.append(self._time((self._index(a), self._index(b), w),
                                    lambda a=a, b=b, w=w: _merge_one(a, b, replace(a, weight_bytes=w))))
            seen.add(a.name)
        times += [self._time(("op", self._index(b)), b) for b in part if b.name not in seen]
        return self._step_s(times)

    def verify_ops(self, batch: int, draft_len: int, context: int, tp: int = 1) -> list:
        """The target's forward over k + 1 tokens for each of `batch` sequences at `context` keys."""
        s = draft_len + 1
        return with_every_logit(self.ops("prefill", batch, s, context, tp),
                                self.ops("decode", batch * s, 1, context, tp), self.spec.blocks)

    def verify_s(self, tp: int, batch: int, draft_len: int, context: int) -> float:
        return self.step_s(self.verify_ops(batch, draft_len, context, tp))
