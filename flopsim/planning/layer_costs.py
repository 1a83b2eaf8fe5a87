"""Per-layer costs of a sharded training step, cached, so that a plan and a layout
search cost a pipeline stage the same way: as the sum of its layers.

`ShardedModel(spec, hw, cal, links, optimizer, bpp)` shards the train-phase op
list (flopsim.parallel.shard) once per (micro-batch, seq, tp, cp, ep, expert
load) with pp = 1, costs each op on the device (flopsim.roofline.op_time,
collectives on the link levels; one op_time per distinct op) and sums it by
placement key (flopsim.parallel.layout.place: a block's layer, the embeddings,
a stack's position bias, the head) and role (`LayerTable`). A stage under a
full layout (`stage_times`) is
then its layers' sums plus what depends on the rest of the layout, each again
from flopsim.parallel's own ops:
- recomputation: full adds each block's forward compute and its forward
  collectives once more, selective its attention cores' forward, cheap its norms'
  and elementwise ops' (flopsim.ops.op: `Op.cheap`);
- the pipeline sends (flopsim.parallel.shard._pipeline_send's op);
- the ZeRO collectives of each layer's parameters (shard._data_parallel's ops);
- the optimizer update of the stage's parameters (shard._optimizer's share), and
  one micro-batch's gradient accumulation of them (flopsim.ops.grad_accum's op,
  shard._accumulation's share; the ZeRO collectives' gradient message in the
  reduction's dtype, `grad_reduce_dtype`).
The result equals costing the stage's own sharded list (`predict(layout=...)`);
tests/test_search.py checks that. Host-dispatch overlap (roofline.in_sequence)
is not applied: a device whose calibration queues kernels from the host is costed
as if dispatch were hidden behind the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from flopsim.ops.fields import COST_FIELDS
from flopsim.planning.train_step import GROUPS, StageTimes

SCALED = tuple(f for f in COST_FIELDS if f != "params")  # what Op.scaled scales


ROLES = ("fwd_s", "bwd_s", "attention_fwd_s", "cheap_fwd_s",
         *(f"{g}_{p}_{q}" for g in GROUPS for p in ("fwd", "bwd") for q in ("s", "n")))


@dataclass
class LayerTable:
    """One micro-batch on one GPU of a tp x cp x ep layout (pp 1), by placement key
    (`layers`: flopsim.parallel.layout.place, a block's its layer): for each
    role in ROLES (compute by pass, the attention cores' forward, each group's
    collectives' seconds `_s` and count `_n` by pass) an array over `layers`."""

    layers: list
    roles: dict  # role -> np.ndarray over layers
    params: list  # per layer {"dp": dense, "edp": routed-expert} parameters on this GPU
    one: dict  # group -> (message bytes, seconds) of its first collective
    fwd_ops: dict  # layer -> its sharded forward ops (symbolic), for the pipeline sends

    rep_of: dict = field(default_factory=dict)  # layer -> the identical layer costed for it

    def rows(self, held) -> list:
        """The rows of the layers `held` (a layer identical to another reads that one's row)."""
        index = {layer: i for i, layer in enumerate(self.layers)}
        return [index[self.rep_of.get(layer, layer)] for layer in held if self.rep_of.get(layer, layer) in index]


class ShardedModel:
    """A spec's train step on one device, sharded and costed per layer (see the module docstring)."""

    def __init__(self, spec, hw, cal, links, *, optimizer: str = "adam", bytes_per_param: dict,
                 encoder_seq=None, grad_accumulation: str = "autograd", grad_reduce_dtype=None):
        """`encoder_seq`: an encoder-decoder's encoder tokens per sequence (None: the seq costed);
        `grad_accumulation`, `grad_reduce_dtype`: flopsim.ops.grad_accum's form and reduction dtype."""
        from flopsim.ops import grad_accum
        from flopsim.predict import phase_ops

        self.spec, self.hw, self.cal, self.links, self.bpp = spec, hw, cal, links, bytes_per_param
        self.encoder_seq = encoder_seq
        self.base_ops = phase_ops(spec, "train", optimizer=optimizer)
        self.rep_of = _representatives(self.base_ops, spec.blocks)
        self._rep_ops = [op for op in self.base_ops if self.rep_of.get(op.layer, op.layer) == op.layer]
        self._shards: dict = {}
        self._groups: dict = {}  # id of a cached sharded list -> its groups of identical ops
        self._tables: dict = {}
        self._times: dict = {}
        self._values: dict = {}
        self._extras: dict = {}
        from flopsim.count import evaluate_ops

        opt = [op for op in self.base_ops if op.kind == "optimizer"]
        self._optimizer_costs = evaluate_ops(opt, {})  # the whole model's update, scaled per stage
        self._total_params = float(sum(op.params for op in self.base_ops if op.pass_ == "fwd"))
        g = bytes_per_param["gradients"]
        self.reduce_bpp = grad_accum.reduce_bytes(grad_reduce_dtype, g)
        acc = grad_accum.grad_accumulation(self._total_params, grad_accumulation, grad_bytes=g,
                                           buffer_bytes=self.reduce_bpp, layer=spec.blocks + 1)
        self._accumulation_costs = evaluate_ops(acc, {})  # one micro-batch's, the whole model's

    def _time(self, cost):
        """op_time of an evaluated op, once per distinct op (its costs, kind, shape and group)."""
        from flopsim.roofline import op_time

        key = (cost.kind, cost.variant, cost.pass_, cost.flops, cost.other_flops, cost.causal_flops, cost.bytes,
               cost.weight_bytes, cost.kv_read_bytes, cost.act_write_bytes, cost.comm_bytes, cost.gemm, cost.kernels,
               tuple(sorted((k, v) for k, v in cost.tags.items() if k in ("ranks", "level", "in_place"))))
        if key not in self._times:
            self._times[key] = op_time(cost, self.hw, self.spec.compute_dtype, self.cal, self.links.by_level,
                                       train=True)  # a train step's (flopsim.calibration lookup step 8)
        return self._times[key]

    def _costed(self, ops: list, micro_batch: int, seq: int, expert_load: float = 1.0) -> list:
        from flopsim.count import evaluate_ops, token_values
        from flopsim.parallel.shard import EXPERT_LOAD

        if (micro_batch, seq) not in self._values:
            self._values[(micro_batch, seq)] = token_values(self.spec, "train", micro_batch, seq,
                                                            encoder_seq=self.encoder_seq)
        values = {**self._values[(micro_batch, seq)], EXPERT_LOAD: expert_load}
        return [self._time(c) for c in evaluate_ops(ops, values)]

    def table(self, micro_batch: int, seq: int, *, tp: int, cp: int = 1, ep: int = 1,
              expert_load: float = 1.0, sequence_parallel: Optional[bool] = None) -> LayerTable:
        """The LayerTable of one micro-batch (cached; the sharded list is cached per degree)."""
        key = (micro_batch, seq, tp, cp, ep, expert_load, sequence_parallel)
        if key not in self._tables:
            self._tables[key] = self._cost_layers(micro_batch, seq, self._sharded(tp, cp, ep, sequence_parallel),
                                                  expert_load)
        return self._tables[key]

    def _sharded(self, tp: int, cp: int, ep: int, sequence_parallel: Optional[bool] = None) -> list:
        """The sharded list of a tp x cp x ep layout (sequence parallelism: make_layout's default
        when None), the expert load left a symbol."""
        from flopsim.parallel.layout import make_layout
        from flopsim.parallel.shard import EXPERT_LOAD, shard

        key = (tp, cp, ep, sequence_parallel)
        if key not in self._shards:
            layout = replace(make_layout(self.spec, "train", tp=tp, cp=cp, ep=ep, dp=ep,
                                         sequence_parallel=sequence_parallel,
                                         gpus_per_node=self.links.gpus_per_node, torus_axis=self.links.torus_axis),
                             expert_load=EXPERT_LOAD)
            self._shards[key] = [op for op in shard(self._rep_ops, self.spec, "train", layout)
                                 if op.kind != "optimizer"
                                 and op.tags.get("group") not in ("dp", "edp", "dp_shard", "dp_replica")]
        return self._shards[key]

    def _distinct_times(self, ops: list, micro_batch: int, seq: int, expert_load: float) -> list:
        """Each op's OpTime, evaluating one op of each group of identical ops (the same
        expressions, kind, shape and group: a block repeated) once."""
        if id(ops) not in self._groups:
            groups: dict = {}
            which = []
            for op in ops:
                key = (op.kind, op.variant, op.pass_, tuple(op.expressions().items()), op.kernels,
                       tuple(sorted((k, v) for k, v in op.tags.items() if k in ("ranks", "level"))))
                which.append(groups.setdefault(key, (len(groups), op))[0])
            self._groups[id(ops)] = (which, [op for _, op in groups.values()])
        which, reps = self._groups[id(ops)]
        timed = self._costed(reps, micro_batch, seq, expert_load)
        return [timed[i] for i in which]

    def _cost_layers(self, micro_batch: int, seq: int, ops: list, expert_load: float) -> LayerTable:
        from flopsim.parallel.layout import place

        keys = [place(op, self.spec) for op in ops]
        layers = sorted(set(keys))
        index = {layer: i for i, layer in enumerate(layers)}
        roles = {r: np.zeros(len(layers)) for r in ROLES}
        params = [{"dp": 0.0, "edp": 0.0} for _ in layers]
        one: dict = {}
        fwd_ops: dict = {layer: [] for layer in layers}
        for op, key, t in zip(ops, keys, self._distinct_times(ops, micro_batch, seq, expert_load)):
            i, side = index[key], op.pass_
            if side == "fwd":
                fwd_ops[key].append(op)
                params[i]["edp" if ".moe.experts." in op.name else "dp"] += float(op.params)
            if op.kind == "collective":
                group = op.tags["group"]
                roles[f"{group}_{side}_s"][i] += t.time_s
                roles[f"{group}_{side}_n"][i] += 1
                one.setdefault(group, (t.comm_bytes, t.time_s))
            else:
                roles[f"{side}_s"][i] += t.time_s
                if side == "fwd" and op.attention_core:  # what selective recomputation runs again
                    roles["attention_fwd_s"][i] += t.time_s
                if side == "fwd" and op.cheap:  # what cheap recomputation runs again
                    roles["cheap_fwd_s"][i] += t.time_s
        return LayerTable(layers=layers, roles=roles, params=params, one=one, fwd_ops=fwd_ops, rep_of=self.rep_of)

    def stage_times(self, layout, micro_batch: int, seq: int) -> StageTimes:
        """Stage `layout.last_stage` under `layout` (see the module docstring)."""
        from flopsim.parallel.shard import _stage_layers

        table = self.table(micro_batch, seq, tp=layout.tp, cp=layout.cp, ep=layout.ep,
                           expert_load=layout.expert_load, sequence_parallel=layout.sequence_parallel)
        held = sorted(_stage_layers(self.spec, layout))
        rows = table.rows(held)
        blocks = [i for i in rows if 0 <= table.layers[i] < self.spec.blocks]
        again_rows = blocks if layout.recompute != "full" else [  # full: the checkpointed blocks' rows
            row for layer in held if 0 <= layer < self.spec.blocks and layout.recomputes(layer)
            for row in table.rows([layer])]
        r = table.roles
        st = StageTimes(stage=layout.last_stage)
        st.fwd_s, st.bwd_s = float(r["fwd_s"][rows].sum()), float(r["bwd_s"][rows].sum())
        again = {"full": "fwd_s", "selective": "attention_fwd_s", "cheap": "cheap_fwd_s"}.get(layout.recompute)
        st.recompute_s = float(r[again][again_rows].sum()) if again else 0.0
        for g in GROUPS:
            extra = (r[f"{g}_fwd_s"][again_rows].sum(), r[f"{g}_fwd_n"][again_rows].sum()) \
                if layout.recompute == "full" else (0.0, 0)
            st.comm_s[g] = float(r[f"{g}_fwd_s"][rows].sum() + r[f"{g}_bwd_s"][rows].sum() + extra[0])
            st.comm_count[g] = int(r[f"{g}_fwd_n"][rows].sum() + r[f"{g}_bwd_n"][rows].sum() + extra[1])
        st.comm_one = dict(table.one)
        self._add_sends(st, layout, table, held, micro_batch, seq)
        self._add_data_parallel(st, layout, [table.params[i] for i in rows], [lay for lay in held if table.rows([lay])],
                                micro_batch, seq)
        return st

    def _add_sends(self, st: StageTimes, layout, table: LayerTable, held: list, micro_batch: int, seq: int) -> None:
        """The stage's pipeline sends (flopsim.parallel.shard._pipeline_sends' ops)."""
        from flopsim.parallel.shard import _pipeline_sends

        if layout.pp <= 1:
            return
        key = ("send", micro_batch, seq, layout.tp, layout.cp, layout.ep, layout.pp, layout.last_stage, layout.dp,
               layout.virtual_stages, layout.encoder_stages)
        if key not in self._extras:
            fwd = [op for layer in held for op in table.fwd_ops.get(table.rep_of.get(layer, layer), [])]
            sends = _pipeline_sends(fwd, self.spec, layout)
            self._extras[key] = self._costed(sends[0] + sends[1], micro_batch, seq)
        for t in self._extras[key]:
            st.comm_s["pp"] += t.time_s
            st.comm_count["pp"] += 1
            st.comm_one.setdefault("pp", (t.comm_bytes, t.time_s))

    def _add_data_parallel(self, st: StageTimes, layout, params: list, layers: list, micro_batch: int,
                           seq: int) -> None:
        """The ZeRO collectives of the stage's layers (shard._data_parallel's ops, costed once per
        distinct layer; `layers` the held layers, whose recomputation decides ZeRO-3's second
        gather) and the optimizer update of its parameters (shard._optimizer)."""
        from flopsim.collectives import factor
        from flopsim.parallel.shard import _data_parallel, accumulation_share, optimizer_share

        # what the ZeRO collectives depend on: each group's ranks and link level, the stage, recomputation
        group_key = (layout.group("dp")[0], layout.level("dp"), layout.group("edp")[0], layout.level("edp"),
                     layout.zero, layout.shard_ranks, layout.level("dp_shard"), layout.level("dp_replica"))
        for p, layer in zip(params, layers):
            key = ("dp", group_key, layout.zero == 3 and layout.recomputes(layer), p["dp"], p["edp"])
            if key not in self._extras:
                dp_ops = _data_parallel(p, layout, layer, self.reduce_bpp, self.bpp["weights"])
                ops = [op for where in ("pre_fwd", "pre_bwd", "post_bwd") for op in dp_ops[where]]
                self._extras[key] = [(op.tags["per"], op.tags["window"], t.time_s,
                                      factor(op.variant, int(op.tags["ranks"])) * t.comm_bytes)
                                     for op, t in zip(ops, self._costed(ops, micro_batch, seq))]
            for per, window, secs, sent in self._extras[key]:
                st.dp[(per, window)] += secs
                st.dp_bytes[per] += sent
        share = optimizer_share({i: p for i, p in enumerate(params)}, layout, self._total_params)
        st.optimizer_s = self._scaled_s(self._optimizer_costs, share)
        st.accumulate_s = self._scaled_s(self._accumulation_costs, accumulation_share(
            {i: p for i, p in enumerate(params)}, layout, self._total_params))

    def _scaled_s(self, costs: list, share: float) -> float:
        """The time of evaluated whole-model ops scaled to `share` of the parameters."""
        return sum(self._time(replace(c, **{f: getattr(c, f) * share for f in SCALED})).time_s for c in costs)


def _representatives(ops: list, blocks: int) -> dict:
    """{block: the first block with the same ops} (names aside: kind, pass, costs, launches), so
    that a repeated block is sharded and costed once."""
    from flopsim.parallel.shard import local_name

    signature: dict = {}
    for op in ops:
        if 0 <= op.layer < blocks:
            signature.setdefault(op.layer, []).append((local_name(op.name), op.kind, op.variant, op.pass_,
                                                       tuple(op.expressions().items()), op.kernels))
    first: dict = {}
    return {layer: first.setdefault(tuple(sig), layer) for layer, sig in signature.items()}
