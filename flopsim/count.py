"""Exact counts: the Op lists evaluated at a batch, sequence and context.

`count(spec, batch=, seq=, phase=, context=)` substitutes B, S, T into every
op's expressions. Layers that share a formula share its sympy expression, so
each distinct expression is evaluated once. Integers stay integers (FLOPs
are exact); an expectation that is not a whole number becomes a float.

Token arguments by phase:
- forward, train: `seq` tokens per sequence, T = S (`context` must be
  omitted or equal `seq`);
- prefill: `seq` prompt tokens attending to `context` keys (default `seq`;
  a larger context means a cached prefix);
- decode: one new token per sequence attending to `context` keys (the new
  one included); `context` defaults to `seq`.
An encoder-decoder's encoder reads `encoder_seq` tokens per sequence (the
symbol S_enc; default `seq`, in every phase: at decode the cross-attention
cache holds that many); the arguments above are the decoder's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from flopsim.errors import InputError, bad_value
from flopsim.families import check_phase
from flopsim.ops.fields import BYTE_FIELDS, COST_FIELDS

# sympy (and the op lists built with it) load where they are needed: a command line
# count read from flopsim.opcache runs without them

GEMM_AXES = ("gemm_batch", "gemm_m", "gemm_n", "gemm_k")


def _number(value):
    if value.is_Integer:
        return int(value)
    if value.is_number:
        f = float(value)
        return int(f) if f.is_integer() and value.is_rational else f
    raise InputError(f"expression still has free symbols {sorted(map(str, value.free_symbols))}: {value}")


def evaluate(exprs, values: dict) -> list:
    """Evaluate many expressions at `values` ({sympy symbol: number}), each distinct expression once."""
    import sympy as sp

    cache: dict = {}
    subs = {k: sp.Integer(v) if isinstance(v, int) else sp.sympify(v) for k, v in values.items()}
    out = []
    for e in exprs:
        if e not in cache:
            cache[e] = _number(e.xreplace(subs))
        out.append(cache[e])
    return out


@dataclass(frozen=True)
class OpCost:
    """One op's evaluated costs (integers where exact)."""

    name: str
    kind: str
    layer: int
    module: str
    pass_: str
    flops: int
    causal_flops: Any
    other_flops: Any
    weight_bytes: Any
    act_read_bytes: Any
    act_write_bytes: Any
    kv_read_bytes: Any
    kv_write_bytes: Any
    params: int
    gemm: Optional[tuple] = None
    tags: dict = field(default_factory=dict, compare=False)
    variant: str = ""
    kernels: Any = 1  # expected launches (flopsim.ops.op.Op.kernels)
    host_sync: bool = False  # the host waits for the device after it (flopsim.ops.op.Op.host_sync)
    comm_bytes: Any = 0  # a collective's message (flopsim.ops.op.Op.comm_bytes)

    @property
    def bytes(self):
        return sum(getattr(self, f) for f in BYTE_FIELDS)

    @property
    def all_flops(self):
        return self.flops + self.other_flops

    @property
    def key(self) -> str:
        return self.name if self.pass_ == "fwd" else f"{self.name}:bwd"

    def to_dict(self) -> dict:
        row = {
            "name": self.name, "layer": self.layer, "kind": self.kind, "pass": self.pass_,
            "module": self.module, "flops": self.flops, "causal_flops": self.causal_flops,
            "all_flops": self.all_flops, "bytes": self.bytes,
        }
        row.update({f: getattr(self, f) for f in BYTE_FIELDS})
        row["params"] = self.params
        row["comm_bytes"] = self.comm_bytes
        row["kernels"] = self.kernels
        if self.gemm is not None:
            row.update(dict(zip(GEMM_AXES, self.gemm)))
        row.update({f"tag_{k}": v for k, v in self.tags.items()})
        return row


def evaluate_ops(ops: list, values: dict) -> list[OpCost]:
    """Every op's costs at `values` (B, S, T and, for symbolic ops, the dims).
    Tags whose values are sympy expressions (tokens kept, experts active) are
    evaluated too."""
    import sympy as sp

    fields_per_op = []
    for op in ops:
        exprs = op.expressions()
        exprs.update({f"tag:{k}": v for k, v in op.tags.items() if isinstance(v, sp.Basic)})
        fields_per_op.append(exprs)
    flat = [e for exprs in fields_per_op for e in exprs.values()]
    numbers = iter(evaluate(flat, values))
    costs = []
    for op, exprs in zip(ops, fields_per_op):
        got = {name: next(numbers) for name in exprs}
        gemm = tuple(got[a] for a in GEMM_AXES) if op.gemm is not None else None
        tags = {k: got.get(f"tag:{k}", v) for k, v in op.tags.items()}
        costs.append(OpCost(
            name=op.name, kind=op.kind, layer=op.layer, module=op.module, pass_=op.pass_,
            gemm=gemm, tags=tags, variant=op.variant, kernels=got["kernels"], host_sync=op.host_sync,
            **{f: got[f] for f in COST_FIELDS},
        ))
    return costs


MAX_TOKEN_ARGUMENT = 2 ** 40  # batch, seq, context: beyond any real run, and where counts stay exact


def token_values(spec, phase: str, batch: int, seq: int, context: Optional[int] = None,
                 encoder_seq: Optional[int] = None) -> dict:
    """{B, S, T} for a phase (and S_enc for an encoder-decoder), validated (see the module
    docstring): sympy symbol -> int."""
    from flopsim.ops.symbols import B, S, S_enc, T

    symbols = {"B": B, "S": S, "T": T, "S_enc": S_enc}
    return {symbols[k]: v for k, v in token_numbers(spec, phase, batch, seq, context, encoder_seq).items()}


def token_numbers(spec, phase: str, batch: int, seq: int, context: Optional[int] = None,
                  encoder_seq: Optional[int] = None) -> dict[str, int]:
    """token_values keyed by the symbols' names ("B", "S", "T", "S_enc"), without sympy."""
    check_phase(spec, phase)
    if encoder_seq is not None and not spec.is_encoder_decoder:
        raise bad_value("encoder_seq", encoder_seq, f"{spec.name} has no encoder stack (encoder_layers 0)")
    for name, value in (("batch", batch), ("seq", seq), ("context", context), ("encoder_seq", encoder_seq)):
        if value is None and name in ("context", "encoder_seq"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_value(name, value, "must be a positive integer")
        if value > MAX_TOKEN_ARGUMENT:
            raise bad_value(name, value, f"must be at most {MAX_TOKEN_ARGUMENT:,} (2^40)")
    if phase == "decode":
        keys = context if context is not None else seq
        queries = 1
    else:
        queries = seq
        keys = context if context is not None else seq
        if phase != "prefill" and keys != seq:
            raise bad_value("context", context, f"phase {phase} attends to its own {seq} tokens; omit --context")
        if keys < queries:
            raise bad_value("context", context, f"must be at least seq ({seq})")
    if spec.positions == "learned" and keys > spec.max_seq:
        raise bad_value("seq" if context is None else "context", keys,
                        f"exceeds max_seq {spec.max_seq} of {spec.name} (learned positions)")
    if not spec.is_encoder_decoder:
        return {"B": batch, "S": queries, "T": keys}
    encoder_tokens = seq if encoder_seq is None else encoder_seq
    if spec.positions == "learned" and encoder_tokens > spec.max_seq:
        raise bad_value("encoder_seq" if encoder_seq is not None else "seq", encoder_tokens,
                        f"exceeds max_seq {spec.max_seq} of {spec.name} (learned positions)")
    return {"B": batch, "S": queries, "T": keys, "S_enc": encoder_tokens}


class OpTotals:
    """Totals over a result's `.ops` (CountResult here, PredictResult in flopsim.predict)."""

    ops: list

    def total(self, name: str):
        return sum(getattr(op, name) for op in self.ops)

    @property
    def flops(self) -> int:
        return self.total("flops")

    @property
    def all_flops(self):
        return self.total("all_flops")

    @property
    def bytes(self):
        return self.total("bytes")


@dataclass
class CountResult(OpTotals):
    """Costs of one model, phase and shape. `.flops` etc. are totals; `.ops` per op."""

    spec: Any
    phase: str
    batch: int
    seq: int
    context: int
    ops: list[OpCost]
    encoder_seq: Optional[int] = None  # an encoder-decoder's encoder tokens per sequence

    @property
    def causal_flops(self):
        return self.total("causal_flops")

    @property
    def params(self) -> int:
        return sum(op.params for op in self.ops if op.pass_ == "fwd")

    @property
    def tokens(self) -> int:
        return self.batch * (1 if self.phase == "decode" else self.seq)

    def active_params(self, *, blocks_only: bool = False, lookups: bool = True) -> Optional[float]:
        """Parameters one token uses, in expectation: each forward op's parameters times the
        share its FLOPs imply, flops / (2 * params * tokens) capped at 1 (an MoE expert
        product: k / E; an op without FLOPs, e.g. the embedding lookup, whole).
        `blocks_only`: the blocks' (no embeddings, no head); `lookups` False: without the
        embedding tables (DeepSeek's convention for activated parameters). Forward and
        train only (prefill and decode run the head on fewer rows): None elsewhere."""
        if self.phase not in ("forward", "train"):
            return None
        total = 0.0
        for op in self.ops:
            if op.pass_ != "fwd" or not op.params:
                continue
            if blocks_only and not 0 <= op.layer < self.spec.blocks:
                continue
            if not lookups and op.kind == "embedding":
                continue
            tokens = self.batch * self.encoder_seq if op.name.startswith("encoder.") else self.tokens
            total += op.params * (1.0 if not op.flops else min(1.0, op.flops / (2.0 * op.params * tokens)))
        return total

    def table(self):
        """One row per op (pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame([op.to_dict() for op in self.ops])

    def per_layer_rows(self) -> list[dict]:
        """One dict per layer, in layer order: FLOPs, bytes, params and the ops' tags (each
        tag's first value among the layer's ops; None where no op has it). Plain Python,
        so that a command printing it need not import pandas."""
        fields = ("flops", "causal_flops", "all_flops", "bytes", "params")
        rows: dict[int, dict] = {}
        tags: list[str] = []
        for op in self.ops:
            d = op.to_dict()
            row = rows.setdefault(op.layer, {"layer": op.layer, "part": layer_label(op.layer, self.spec),
                                             **dict.fromkeys(fields, 0)})
            for f in fields:
                row[f] += d[f]
            for key, value in d.items():
                if key.startswith("tag_"):
                    name = key.removeprefix("tag_")
                    if name not in tags:
                        tags.append(name)
                    if row.get(name) is None:
                        row[name] = value
        return [{**row, **{t: row.get(t) for t in tags}} for _, row in sorted(rows.items())]

    def per_layer(self):
        """One row per layer (pandas DataFrame of per_layer_rows)."""
        import pandas as pd

        return pd.DataFrame(self.per_layer_rows())

    def to_dict(self, ops: bool = True) -> dict:
        out = {
            "model": self.spec.name, "family": self.spec.family, "kernel_impls": self.spec.kernel_impls,
            "phase": self.phase, "batch": self.batch, "seq": 1 if self.phase == "decode" else self.seq,
            "context": self.context,
            "flops": self.flops, "causal_flops": self.causal_flops, "all_flops": self.all_flops,
            "params": self.params, "active_params": self.active_params(), "bytes": self.bytes,
            **{f: self.total(f) for f in BYTE_FIELDS},
        }
        if self.encoder_seq is not None:
            out["encoder_seq"] = self.encoder_seq
        if ops:
            out["ops"] = [op.to_dict() for op in self.ops]
        return out


def layer_label(layer: int, spec) -> str:
    """`embed`, `block.3` (an encoder-decoder's `encoder.block.3`, `decoder.block.0`) or `head`."""
    if layer < 0:
        return "embed"
    if layer >= spec.blocks:
        return "head"
    if not spec.is_encoder_decoder:
        return f"block.{layer}"
    if layer < spec.encoder_layers:
        return f"encoder.block.{layer}"
    return f"decoder.block.{layer - spec.encoder_layers}"


def count(spec, *, batch: int = 1, seq: int = 1, phase: str = "forward",
          context: Optional[int] = None, encoder_seq: Optional[int] = None, layout=None) -> CountResult:
    """Exact FLOPs, bytes and parameters of `spec` (a ModelSpec, path or preset).
    `layout` (flopsim.parallel.Layout): one GPU's ops under it, collectives included
    (`batch` is then the micro-batch); shares that do not divide evenly are fractions."""
    from flopsim.spec import load_model

    from flopsim import opcache
    from flopsim.families import build_ops

    spec = load_model(spec)
    numbers = token_numbers(spec, phase, batch, seq, context, encoder_seq)
    if layout is not None and not layout.trivial:
        from flopsim.parallel.shard import shard

        ops = shard(build_ops(spec, phase), spec, phase, layout)
        costs = evaluate_ops(ops, token_values(spec, phase, batch, seq, context, encoder_seq))
    else:
        costs = opcache.costs(spec, phase, numbers, lambda: build_ops(spec, phase))
    return CountResult(spec=spec, phase=phase, batch=batch, seq=seq, context=numbers["T"], ops=costs,
                       encoder_seq=numbers.get("S_enc"))


def formula(spec, *, phase: str = "forward", field: str = "flops", symbolic: bool = False,
            per_layer: bool = False):
    """The total of `field` as a sympy expression in B, S, T (and the dims when
    `symbolic`). In forward and train T = S; decode has S = 1."""
    import sympy as sp

    from flopsim.families import build_ops
    from flopsim.ops.symbols import S, T
    from flopsim.spec import load_model

    spec = load_model(spec)
    if field not in (*COST_FIELDS, "bytes", "all_flops"):
        raise bad_value("field", field, f"expected one of {', '.join((*COST_FIELDS, 'bytes', 'all_flops'))}")
    ops = build_ops(spec, phase, symbolic=symbolic)
    tokens = {T: S} if phase in ("forward", "train") else {}

    def total(selected):
        expr = sum((getattr(op, field) for op in selected), sp.Integer(0))
        return sp.factor_terms(sp.expand(expr.xreplace(tokens)))

    if not per_layer:
        return total(ops)
    layers = sorted({op.layer for op in ops})
    return {layer_label(lay, spec): total([op for op in ops if op.layer == lay]) for lay in layers}


# `flopsim.count(...)` stays the function even after `import flopsim.count`
from flopsim._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, "count")
