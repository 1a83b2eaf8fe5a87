"""Serving steps composed from op lists: chunked prefill's mixed step and speculative
decoding's verification step (flopsim.planning.serve_model uses them).

Conventions:
- Op lists come from flopsim.count (`decode`: B sequences, one new token each, T keys;
  `prefill`: S new tokens per sequence attending to T keys, a cached prefix of T - S
  tokens read from the KV cache plus themselves); times from flopsim.roofline's
  `op_time` and `in_sequence`, as flopsim.predict computes them. No cost formula is
  written here.
- A step's time on a replica (flopsim.planning.serve_layouts: tp x pp x ep GPUs): for
  each pipeline stage, the roofline of one GPU's ops -- the list sharded by
  flopsim.parallel.shard for tp x ep (pp 1; the expert load left a symbol, set at
  evaluation), the ops of the stage's layers, then its pipeline send (shard's send op for
  that stage) -- its collectives among them (priced on the link levels). That is the
  stage's own sharded list (shard with pp and the stage) op for op; tests check it
  against flopsim.predict(layout=...).
- Speed: the blocks repeat, so a list's identical ops (same expressions, kind, launches
  and group) are evaluated and priced once per step (`_Listed`), and every evaluated
  op's roofline is cached by its values.
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
from typing import Optional

from flopsim.count import OpCost
from flopsim.ops.fields import BYTE_FIELDS

_SUMMED = ("flops", "causal_flops", "other_flops", *(f for f in BYTE_FIELDS if f != "weight_bytes"), "comm_bytes")
_KEY = tuple(f.name for f in fields(OpCost) if f.name not in ("name", "layer", "module", "tags"))
_PRICING_TAGS = ("group", "ranks", "level", "in_place")  # what prices an op besides its values (a collective's link)


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


def _op_key(op) -> tuple:
    """What an op's cost depends on (symbolic Op or OpCost): its expressions or values, kind and group."""
    tags = tuple((k, op.tags[k]) for k in _PRICING_TAGS if k in op.tags)
    if isinstance(op, OpCost):
        return tuple(getattr(op, f) for f in _KEY) + tags
    return (op.kind, op.variant, op.pass_, tuple(op.expressions().items()), op.host_sync) + tags


def _runs(ops: list) -> list[tuple]:
    """Contiguous runs of one layer's ops, keyed (layer, occurrence of that layer): [(key, ops)]."""
    out: list = []
    seen: dict = {}
    for op in ops:
        if out and out[-1][0][0] == op.layer:
            out[-1][1].append(op)
        else:
            seen[op.layer] = seen.get(op.layer, -1) + 1
            out.append(((op.layer, seen[op.layer]), [op]))
    return out


class _Listed:
    """One GPU's ops of a phase on a replica, stored once per kind of block: `ops` the sharded
    ops of the representative blocks, the embeddings and the head, then each stage's send;
    `which[i]`: op i's identical representative in `reps`; `runs`: {(layer, occurrence): op
    indices} of those runs; `order`: the full list's runs in execution order, each (key of the
    run it repeats, stage); `sends[s]`: stage s's send; `members[s]`: stage s's op indices in
    execution order (the full list's, a repeated block's ops once per block)."""

    def __init__(self, runs: list, order: list, sends: dict, pp: int):
        self.ops, self.runs, self.names = [], {}, {}
        for key, ops in runs:
            self.runs[key] = list(range(len(self.ops), len(self.ops) + len(ops)))
            self.names[key] = {op.name: i for i, op in zip(self.runs[key], ops)}
            self.ops += ops
        self.sends = {}
        for s, ops in sends.items():
            self.sends[s] = list(range(len(self.ops), len(self.ops) + len(ops)))
            self.ops += ops
        groups: dict = {}
        self.which = [groups.setdefault(_op_key(op), (len(groups), op))[0] for op in self.ops]
        self.reps = [op for _, op in groups.values()]
        self.order = order
        self.evaluate = None  # the representatives' compiled evaluation (flopsim.opcache.compiled), once built
        self.members = [[i for key, st in order if st == s for i in self.runs[key]] + self.sends.get(s, [])
                        for s in range(pp)]


class StepCoster:
    """Op lists and their step times for one spec, device and calibration, on any replica;
    lists, evaluations and rooflines are cached, so one StepCoster serves every replica and
    batch of a plan. `links` None: one GPU only; `vocab_parallel` False: the embedding and LM
    head whole on every tensor-parallel rank (flopsim.parallel.layout)."""

    def __init__(self, spec, hw, cal, links, vocab_parallel: bool = True):
        self.spec, self.hw, self.cal, self.links = spec, hw, cal, links
        self.vocab_parallel = vocab_parallel
        self.gpus_per_node = links.gpus_per_node if links is not None else 8
        self.torus_axis = links.torus_axis if links is not None else None
        self._lists: dict = {}
        self._evaluated: dict = {}
        self._memory: dict = {}
        self._loads: dict = {}
        self._values: dict = {}  # an op's costs (all but its name and place) -> index
        self._times: dict = {}  # index, or a merged op's key -> OpTime
        self._rep: Optional[dict] = None

    # -- op lists ----------------------------------------------------------------------
    def rep_of(self) -> dict:
        """{block: the first block with the same ops in decode and prefill} (layer_costs' rule)."""
        from flopsim.families import build_ops
        from flopsim.planning.layer_costs import _representatives

        if self._rep is None:
            both = build_ops(self.spec, "decode") + build_ops(self.spec, "prefill")
            self._rep = _representatives(both, self.spec.blocks)
        return self._rep

    def rep_ops(self, phase: str) -> list:
        """The phase's ops of the representative blocks, the embeddings and the head, in order."""
        from flopsim.families import build_ops

        rep = self.rep_of()
        return [op for op in build_ops(self.spec, phase) if rep.get(op.layer, op.layer) == op.layer]

    def _sharded(self, phase: str, tp: int, ep: int) -> list:
        """The runs of one GPU's representative ops of a tp x ep replica (pp 1), the expert
        load a symbol (set at evaluation)."""
        from flopsim.parallel.shard import EXPERT_LOAD, shard
        from flopsim.planning.serve_layouts import Replica, replica_layout

        key = ("sharded", phase, tp, ep)
        if key not in self._lists:
            layout = replica_layout(self.spec, phase, Replica(tp, 1, ep), self.gpus_per_node, expert_load=EXPERT_LOAD,
                                    torus_axis=self.torus_axis, vocab_parallel=self.vocab_parallel)
            ops = self.rep_ops(phase)
            self._lists[key] = _runs(ops if layout is None else shard(ops, self.spec, phase, layout))
        return self._lists[key]

    def layer_counts(self, replica) -> list:
        """Each stage's {representative layer: layers it stands for} (flopsim.memory's evaluate_layers)."""
        from flopsim.planning.serve_layouts import stage_layers

        rep, out = self.rep_of(), []
        for layers in stage_layers(self.spec, replica):
            counts: dict = {}
            for layer in layers:
                counts[rep.get(layer, layer)] = counts.get(rep.get(layer, layer), 0) + 1
            out.append(counts)
        return out

    def listed(self, phase: str, replica) -> _Listed:
        """The replica's ops of `phase` (a _Listed): the tp x ep runs, the full list's runs on
        their layers' stages, then each stage's send (shard's, for the stage's layout), cached."""
        from flopsim.families import build_ops
        from flopsim.parallel.shard import EXPERT_LOAD, _pipeline_sends
        from flopsim.planning.serve_layouts import replica_layout, stage_layers

        key = (phase, replica.tp, replica.ep, replica.pp)
        if key not in self._lists:
            runs, rep = self._sharded(phase, replica.tp, replica.ep), self.rep_of()
            of = {layer: s for s, layers in enumerate(stage_layers(self.spec, replica)) for layer in layers}
            order = [((rep.get(layer, layer), k), of[layer] if replica.pp > 1 else 0)
                     for (layer, k), _ in _runs(build_ops(self.spec, phase))]
            by_key, sends = dict(runs), {}
            for s in range(replica.pp - 1):
                layout = replica_layout(self.spec, phase, replica, self.gpus_per_node, stage=s,
                                        expert_load=EXPERT_LOAD, torus_axis=self.torus_axis,
                                        vocab_parallel=self.vocab_parallel)
                fwd = [op for k, st in order if st == s for op in by_key[k] if op.pass_ == "fwd"]
                sends[s] = _pipeline_sends(fwd, self.spec, layout)[0]
            self._lists[key] = _Listed(runs, order, sends, replica.pp)
        return self._lists[key]

    def _load(self, ep: int, tokens: int) -> float:
        from flopsim.planning.serve_layouts import expert_load

        if (ep, tokens) not in self._loads:
            self._loads[(ep, tokens)] = expert_load(self.spec, ep, tokens)
        return self._loads[(ep, tokens)]

    def _costs(self, phase: str, replica, batch: int, seq: int, context: int, encoder_seq=None,
               routed: int = None) -> tuple:
        """(the listed ops, each representative's OpCost) at one step's token numbers; the
        expert load from `routed` tokens a group (default batch x seq)."""
        from flopsim import opcache
        from flopsim.count import evaluate_ops, token_numbers, token_values
        from flopsim.parallel.shard import EXPERT_LOAD

        listed = self.listed(phase, replica)
        load = self._load(replica.ep, routed if routed is not None else batch * seq)
        key = (phase, replica.tp, replica.ep, replica.pp, batch, seq, context, encoder_seq, load)
        if key not in self._evaluated:
            if listed.evaluate is None:  # exact Python arithmetic, compiled once (sympy when unprintable)
                listed.evaluate = opcache.compiled(listed.reps, (EXPERT_LOAD.name,)) or False
            if listed.evaluate:
                costs = listed.evaluate(token_numbers(self.spec, phase, batch, seq, context, encoder_seq), load)
            else:
                values = {**token_values(self.spec, phase, batch, seq, context, encoder_seq), EXPERT_LOAD: load}
                costs = evaluate_ops(listed.reps, values)
            self._evaluated[key] = costs
        return listed, self._evaluated[key]

    # -- times -------------------------------------------------------------------------
    def _index(self, op) -> int:
        return self._values.setdefault(_op_key(op), len(self._values))

    def _time(self, key, op):
        from flopsim.roofline import op_time

        if key not in self._times:
            self._times[key] = op_time(op() if callable(op) else op, self.hw, self.spec.compute_dtype, self.cal,
                                       self.links.by_level if self.links is not None else None)
        return self._times[key]

    def _priced(self, cost):
        return self._time(("op", self._index(cost)), cost)

    @staticmethod
    def seconds(times: list) -> float:
        """One step of these OpTimes, in order (flopsim.roofline.in_sequence)."""
        from flopsim.roofline import in_sequence

        return sum(t.time_s for t in in_sequence(times))

    @staticmethod
    def by_group(times: list) -> dict:
        """{collective group: seconds} among these OpTimes."""
        out: dict = {}
        for t in times:
            if t.kind == "collective":
                out[t.tags["group"]] = out.get(t.tags["group"], 0.0) + t.time_s
        return out

    def step_s(self, ops: list) -> float:
        """One step of `ops` (any OpCosts, in order): one GPU's ops, collectives included."""
        return self.seconds([self._priced(op) for op in ops])

    def stage_times(self, phase: str, batch: int, seq: int, context: int, replica, encoder_seq=None) -> list:
        """Each pipeline stage's OpTimes of one step of `phase` (a list per stage, in order)."""
        listed, costs = self._costs(phase, replica, batch, seq, context, encoder_seq)
        times = [self._priced(c) for c in costs]
        return [[times[listed.which[i]] for i in members] for members in listed.members]

    def _assemble(self, listed: _Listed, run_times: dict, send_times: dict, pp: int) -> list:
        """Each stage's OpTimes: its runs' (a run repeated for each block it stands for), then its send."""
        out: list = [[] for _ in range(pp)]
        for key, s in listed.order:
            out[s] += run_times[key]
        for s, times in send_times.items():
            out[s] += times
        return out

    def mixed_times(self, replica, batch: int, context: int, chunk: int, chunk_context: int,
                    encoder_seq=None) -> list:
        """Each stage's OpTimes of a mixed step: a decode of `batch` sequences at `context` keys
        and a `chunk`-token prompt chunk at `chunk_context` keys, merged op by op within each
        run (merge_ops' rule; a chunk-only op after its run's), each merged op priced once."""
        routed = batch + chunk
        dec, dc = self._costs("decode", replica, batch, 1, context, encoder_seq, routed)
        part, pc = self._costs("prefill", replica, 1, chunk, chunk_context, encoder_seq, routed)
        _, uc = self._costs("decode", replica, batch + chunk, 1, context, encoder_seq, routed)

        def merged(ours: list, names: dict) -> list:
            theirs, out = dict(names), []
            for i in ours:
                a, j = dc[dec.which[i]], theirs.pop(dec.ops[i].name, None)
                if j is None:
                    out.append(self._priced(a))
                    continue
                b, w = pc[part.which[j]], uc[dec.which[i]].weight_bytes
                out.append(self._time((self._index(a), self._index(b), w),
                                      lambda a=a, b=b, w=w: _merge_one(a, b, replace(a, weight_bytes=w))))
            return out + [self._priced(pc[part.which[j]]) for j in theirs.values()]
        runs = {key: merged(idx, part.names.get(key, {})) for key, idx in dec.runs.items()}
        sends = {s: merged(idx, {part.ops[j].name: j for j in part.sends.get(s, [])}) for s, idx in dec.sends.items()}
        return self._assemble(dec, runs, sends, replica.pp)

    def verify_times(self, replica, batch: int, draft_len: int, context: int) -> list:
        """Each stage's OpTimes of the target's forward over k + 1 tokens for each of `batch`
        sequences at `context` keys, logits at every position (with_every_logit's rule: the
        final norm and head from a decode list of batch (k + 1) tokens)."""
        s = draft_len + 1
        pre, pc = self._costs("prefill", replica, batch, s, context)
        dec, dc = self._costs("decode", replica, batch * s, 1, context)
        runs = {}
        for key, idx in pre.runs.items():
            tail = key[0] >= self.spec.blocks and key in dec.runs
            runs[key] = [self._priced(dc[dec.which[i]]) for i in dec.runs[key]] if tail else \
                [self._priced(pc[pre.which[i]]) for i in idx]
        sends = {st: [self._priced(pc[pre.which[i]]) for i in idx] for st, idx in pre.sends.items()}
        return self._assemble(pre, runs, sends, replica.pp)

    def period(self, stage_times: list) -> float:
        """An engine's step in steady state: pp x the busiest stage (serve_layouts)."""
        return len(stage_times) * max(self.seconds(t) for t in stage_times)

    def mixed_s(self, replica, batch: int, context: int, chunk: int, chunk_context: int) -> float:
        """The mixed step's period (one stage: its time); `replica` a Replica or a tp."""
        return self.period(self.mixed_times(_replica(replica), batch, context, chunk, chunk_context))

    def verify_s(self, replica, batch: int, draft_len: int, context: int) -> float:
        return self.period(self.verify_times(_replica(replica), batch, draft_len, context))

    # -- memory ------------------------------------------------------------------------
    def memory_model(self, phase: str, tp: int, ep: int, encoder_seq=None):
        """flopsim.memory.MemoryModel of one GPU of a tp x ep replica over the representative
        blocks (evaluate_layers with `layer_counts`), cached."""
        from flopsim.memory import MemoryModel
        from flopsim.planning.serve_layouts import Replica, replica_layout

        key = (phase, tp, ep, encoder_seq)
        if key not in self._memory:
            layout = replica_layout(self.spec, phase, Replica(tp, 1, ep), self.gpus_per_node,
                                    torus_axis=self.torus_axis, vocab_parallel=self.vocab_parallel)
            self._memory[key] = MemoryModel(self.spec, phase, encoder_seq=encoder_seq, layout=layout,
                                            ops=self.rep_ops(phase))
        return self._memory[key]


def _replica(r):
    from flopsim.planning.serve_layouts import Replica

    return Replica(tp=r) if isinstance(r, int) else r
