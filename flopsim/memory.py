"""Device memory of one step: weights, gradients, optimizer state, activations
and KV cache, all read off the same Op lists `count` and `predict` use, and
the largest batch / context that fits a device.

Derivations (w = bytes per value of the spec's dtype; P = parameters, the sum
of the forward ops' `params`):

- weights          = P * w.
- gradients        = P * g (train; g = `grad_bytes`, default w).
- optimizer state  = P * (4 * states + 4 if an fp32 master copy is kept)
                     (train; flopsim.ops.optimizer: Adam keeps m and v in
                     fp32, and a master copy when w < 4: 12 bytes/param in
                     bf16, so weights + gradients + state = 16 bytes/param).
- activations, train, no recomputation: every tensor that a forward op with
  a backward op writes is kept until the backward pass reads it:
      sum over forward ops that have a backward op of act_write_bytes (an op that
      writes intermediates autograd frees says what it keeps: tag `kept_bytes`,
      the eager fp32 RMSNorm's).
  Each tensor is written by exactly one op (an op overwriting its input in place,
  tagged `in_place`, writes no new tensor: not counted), so nothing is counted twice; it
  is an upper bound of what autograd keeps: outputs whose only consumers
  save nothing (projections that feed a residual add, rope's input) are
  counted although autograd frees them. For a GPT-2-style block with fused
  attention this is 36*s*b*h bytes at 2 bytes per value (+4*s*b*h with rope),
  against Korthikanti et al. 2022's 34*s*b*h with dropout masks and without
  the attention-score term (32*s*b*h with no dropout).
- activations, train, full recomputation (a checkpoint per block): the
  input of every block is kept, and one block's activations are rebuilt at a
  time during the backward pass (an op of several kernels names its input:
  tag `input_bytes`):
      sum over blocks l of in_l + max over blocks of A_l + A(embeddings) + A(head)
  with A_l the per-layer sum above and in_l the block's residual-stream
  input: the largest act_read_bytes among the block's forward norm and
  router ops (every block begins by normalising or routing its input).
  Checkpointing only some blocks (`recompute_blocks`, fms-fsdp's and
  torchtitan's every-k-th block): the sums and the max run over the
  checkpointed blocks, and every other block adds its whole A_l.
  Dropout (`dropout`, flopsim.ops.primitives.dropout) keeps its output and
  its one-byte mask: with hidden dropout 2 * 2 + 2 * 1 = 6 * s*b*h per block
  more (the 2 * 2 outputs are the upper bound's: the residual add reads them
  and saves nothing; Korthikanti's 2 * sbh counts the masks). An explicit
  attention's probability dropout keeps 2 + 1 = 3 bytes a score: with the
  softmax's 2, Korthikanti's 5 * a*s^2*b (flopsim also keeps the raw scores,
  2 more); a fused kernel keeps none.
- activations, train, selective recomputation (Korthikanti et al. 2022): as
  without recomputation, less what the attention cores write besides their
  output (the explicit path's scores and probabilities, 2 * B * H * S * T
  values, and its probabilities' dropout's output and mask: `Op.attention_core`;
  a fused kernel writes none), which the backward recomputes.
- activations, train, cheap recomputation (LLaMA's checkpointing, Touvron
  et al. 2023, section 2.4; `Op.cheap`): as without recomputation, less what
  each block's norms, elementwise ops but adds and softmaxes outside the
  attention core keep, plus the largest block's share of that (one block's
  rebuilt at a time): their inputs, the products' and adds' outputs, stay
  kept.
- activations of a pipeline stage (train, `stage_activations`): the same
  sums over the ops the stage runs, grouped by their placement key
  (flopsim.parallel.layout.place: a block's layer, the embeddings, a stack's
  position bias, the head); full recomputation keeps the inputs of the
  stage's blocks and rebuilds its largest. A pipelined encoder-decoder's
  decoder stage also keeps the encoder's output it receives for its
  cross-attention (B x S_enc x d_model values, as the cross.kv projection
  reads it), which the whole-model figure counts once (the encoder's final
  norm writes it).
- activations, inference phases (forward, prefill, decode): the working set
  of the largest op, max over ops of (act_read_bytes + act_write_bytes), or
  of an op of several kernels its largest kernel's (tag `working_bytes`).
- KV cache (prefill, decode): the keys and values of `context` tokens:
      sum of kv_write_bytes * T / (new tokens per sequence)
  (prefill writes S new tokens per sequence, decode 1), so a conditional
  model's expected KV writes per token carry over; a sliding-window layer
  keeps min(T, W) of them (its op's `cache_tokens`, from `written_tokens`).
- One GPU of a parallel layout (`layout=`, inference phases): the same sums
  over its sharded op list (flopsim.parallel.shard: weights / tp or / (tp ep),
  KV heads / min(tp, kv_heads), ...); `evaluate_layers` restricts each sum (the
  largest working set: the max) to the ops of given layers, a pipeline stage's.
- Not counted: framework and allocator overhead, temporary buffers inside a
  kernel, gradients of activations in flight during the backward pass.

Largest batch / context: the smallest total over the device's
`memory_capacity_bytes`, found by doubling then bisection (totals grow with
batch and context). `max_context` varies the sequence (train, forward,
prefill: S = T = n) or the KV-cache length (decode: T = n) at the given
batch, up to max_seq for learned positions (2**40 otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import sympy as sp

from flopsim.errors import InputError
from flopsim.ops.fields import RECOMPUTE_MODES

MAX_SEARCH = 2 ** 40  # upper end of the batch / context search
COMPONENTS = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "kv_cache_bytes")
CHECKPOINT_KINDS = ("norm", "router")


def recompute_mode(recompute: bool | str) -> str:
    """'none' | 'selective' | 'cheap' | 'full', from that string or a boolean (True: full)."""
    if isinstance(recompute, bool):
        return "full" if recompute else "none"
    if recompute not in RECOMPUTE_MODES:
        raise InputError(f"recompute: {recompute!r}: expected none, selective, cheap or full")
    return recompute


def _weights_by_layer(ops: list, w: int) -> dict:
    """{op layer: its weights as stored} (precision.weights: quantized products, the rest in dtype)."""
    out: dict = {}
    for op in ops:
        if op.pass_ == "fwd":
            stored = op.param_bytes if op.param_bytes is not None else op.params * w
            out[op.layer] = out.get(op.layer, 0.0) + float(stored)
    return out


def _cache_by_layer(ops: list, phase: str) -> dict:
    """{op layer: its KV cache}: bytes written per step x (context / new tokens per step) (a
    sliding-window layer keeps its op's cache_tokens, min(T, W), from written_tokens a step), and
    a cache read but not written this step (an encoder-decoder's cross-attention cache at decode)."""
    from flopsim.ops.symbols import S, T

    new_tokens = {"prefill": S, "decode": sp.Integer(1)}.get(phase)
    out: dict = {}
    for op in ops:
        if op.kv_write_bytes != 0 and new_tokens is not None:
            out[op.layer] = out.get(op.layer, 0) + \
                op.kv_write_bytes * op.tags.get("cache_tokens", T) / op.tags.get("written_tokens", new_tokens)
        if "held_cache_bytes" in op.tags:
            out[op.layer] = out.get(op.layer, 0) + op.tags["held_cache_bytes"]
    return out


class MemoryModel:
    """Memory of one spec, phase and set of options as functions of B, S, T."""

    def __init__(self, spec, phase: str, *, recompute: bool | str = False, optimizer: str = "adam",
                 grad_bytes: Optional[int] = None, master_weights: Optional[bool] = None,
                 encoder_seq: Optional[int] = None, layout=None, ops: Optional[list] = None,
                 recompute_blocks: Optional[frozenset] = None):
        """`recompute_blocks` (full recomputation): the blocks checkpointed; the others keep
        their activations as without recomputation (None: every block is).
        `encoder_seq`: an encoder-decoder's encoder tokens per sequence, fixed; None: S
        (at decode: T, the longest context). `layout` (flopsim.parallel.Layout, inference
        phases): one GPU's share, read off its sharded op list (flopsim.parallel.shard).
        `ops`: the phase's op list to read (default build_ops(spec, phase)), e.g. one block
        of each kind, `evaluate_layers`' counts standing for the others."""
        from flopsim.families import build_ops
        from flopsim.numeric import compile_exprs
        from flopsim.ops.optimizer import state_bytes_per_param
        from flopsim.ops.symbols import B, S, S_enc, T

        recompute = {"none": False, "full": True}.get(recompute_mode(recompute), recompute)
        self.spec, self.phase, self.recompute, self.optimizer = spec, phase, recompute, optimizer
        self.recompute_blocks = recompute_blocks
        ops = build_ops(spec, phase) if ops is None else ops
        if layout is not None and not layout.trivial:
            if phase == "train":
                raise ValueError("MemoryModel: a layout applies to inference phases (flopsim.planning.train "
                                 "lays out training memory)")
            from flopsim.parallel.shard import shard

            ops = shard(ops, spec, phase, layout)
        same = {T: S} if phase in ("forward", "train") else {}
        same[S_enc] = sp.Integer(encoder_seq) if encoder_seq is not None else (T if phase == "decode" else S)
        w = spec.dtype_bytes
        self.params = int(sum((op.params for op in ops if op.pass_ == "fwd"), sp.Integer(0)))
        self._layer_weights = _weights_by_layer(ops, w)
        self.weight_bytes = float(sum(self._layer_weights.values()))
        train = phase == "train"
        self.bytes_per_param = {
            # quantized weights: their stored bytes per parameter, scales included (an average)
            "weights": self.weight_bytes / self.params if spec.quantized_weights else w,
            "gradients": (w if grad_bytes is None else grad_bytes) if train else 0,
            "optimizer": state_bytes_per_param(optimizer, w, master_weights) if train else 0,
        }

        pool: list[sp.Expr] = []
        index: dict[sp.Expr, int] = {}

        def ref(expr) -> int:
            expr = sp.sympify(expr).xreplace(same)
            if expr not in index:
                index[expr] = len(pool)
                pool.append(expr)
            return index[expr]

        kv_of = _cache_by_layer(ops, phase)
        self._kv = ref(sum(kv_of.values(), sp.Integer(0)))
        self._kv_layers = [(layer, ref(expr)) for layer, expr in kv_of.items()]

        # activations
        self._sum_terms: list[int] = []  # summed
        self._max_terms: list[int] = []  # the largest one is added
        self._key_terms: dict = {}  # train: placement key -> (its activations, its block's input candidates)
        self._rebuilt: dict = {}  # train, cheap recomputation: block -> what its cheap ops keep, rebuilt at a time
        if train:
            self._train_activations(ops, ref)
        else:
            self._block_inputs = []
            self._max_terms = [ref(op.tags.get("working_bytes", op.act_read_bytes + op.act_write_bytes)) for op in ops]
        self._max_layers = [op.layer for op in ops] if not train else []
        self._fn = compile_exprs(pool, [B, S, T])

    def _train_activations(self, ops: list, ref) -> None:
        """Train: the activations kept for backward, as terms of the compiled pool (`ref`):
        every kept forward output per placement key (see the module docstring), less what
        selective or cheap recomputation recomputes (cheap: plus the largest block's share of
        it), or under full recomputation the largest block's and the blocks' inputs; each
        key's terms for pipeline stages (`stage_activations`)."""
        from flopsim.parallel.layout import RECEIVED_ENCODER_OUTPUT, place

        spec, recompute = self.spec, self.recompute
        with_backward = {op.name for op in ops if op.pass_ == "bwd"}
        kept = [op for op in ops if op.pass_ == "fwd" and op.name in with_backward and not op.tags.get("in_place")]
        key_of = {op.key: place(op, spec) for op in kept}
        layers = sorted(set(key_of.values()))
        per_layer = {lay: sum((op.tags.get("kept_bytes", op.act_write_bytes) for op in kept
                               if key_of[op.key] == lay), sp.Integer(0))
                     for lay in layers}
        blocks = [lay for lay in layers if 0 <= lay < spec.blocks]
        if recompute in ("selective", "cheap"):  # the attention cores' insides, or the cheap ops, recomputed
            inside = self._recomputed_inside if recompute == "selective" else self._recomputed_cheap
            rebuilt = {lay: sum((inside(op) for op in kept if key_of[op.key] == lay), sp.Integer(0))
                       for lay in blocks}
            per_layer = {lay: per_layer[lay] - rebuilt.get(lay, 0) for lay in layers}
            self._sum_terms = [ref(sum(per_layer.values(), sp.Integer(0)))]
            self._block_inputs = []
            if recompute == "cheap":  # one block's cheap ops rebuilt at a time
                self._rebuilt = {lay: ref(rebuilt[lay]) for lay in blocks}
                self._max_terms = list(self._rebuilt.values())
        elif recompute:
            checkpointed = [lay for lay in blocks if self.recompute_blocks is None or lay in self.recompute_blocks]
            for lay in layers:
                if lay not in checkpointed:
                    self._sum_terms.append(ref(per_layer[lay]))
            for lay in checkpointed:
                self._max_terms.append(ref(per_layer[lay]))
            self._block_inputs = [[ref(e) for e in self._block_input_candidates(ops, lay)] for lay in checkpointed]
        else:
            self._sum_terms = [ref(sum(per_layer.values(), sp.Integer(0)))]
            self._block_inputs = []
        full = recompute is True
        self._key_terms = {lay: (ref(per_layer[lay]), [ref(e) for e in self._block_input_candidates(ops, lay)]
                                 if full and 0 <= lay < spec.blocks
                                 and (self.recompute_blocks is None or lay in self.recompute_blocks) else [])
                           for lay in layers}
        received = [op.act_read_bytes for op in kept if op.name.endswith(".cross.kv")][:1]
        if received:  # the encoder's output, as the decoder's key/value projections read it
            self._key_terms[RECEIVED_ENCODER_OUTPUT] = (ref(received[0]), [])

    @staticmethod
    def _recomputed_cheap(op):
        """What cheap recomputation does not keep of an op: all a cheap op keeps (`Op.cheap`)."""
        return op.tags.get("kept_bytes", op.act_write_bytes) if op.cheap else 0

    def _recomputed_inside(self, op):
        """What selective recomputation does not keep of an op: an attention core's writes
        but its output (gemm (B*H, S, T, d_head): B*H*S rows of d_v values), i.e. the explicit
        path's scores and probabilities (a fused kernel writes only its output), and all an
        explicit attention's probability dropout writes (its output and mask)."""
        if op.attention_core and op.kind != "attention":
            return op.act_write_bytes
        if op.kind != "attention" or op.gemm is None:
            return 0
        d_v = self.spec.mla.d_v if self.spec.mla is not None else self.spec.d_head
        return op.act_write_bytes - op.gemm[0] * op.gemm[1] * d_v * self.spec.dtype_bytes

    @staticmethod
    def _block_input_candidates(ops, layer: int) -> list:
        fwd = [op for op in ops if op.pass_ == "fwd" and op.layer == layer]
        chosen = [op.tags.get("input_bytes", op.act_read_bytes) for op in fwd if op.kind in CHECKPOINT_KINDS]
        return chosen or [op.act_read_bytes for op in fwd]

    def stage_activations(self, batch, seq, context, stages: list) -> list[float]:
        """Train: one micro-batch's activations on each pipeline stage, `stages` each stage's
        placement keys (flopsim.parallel.layout.stage_places): the sum of its keys' (full
        recomputation: its non-block keys', its blocks' inputs and its largest block's), the
        RECEIVED_ENCODER_OUTPUT key the encoder's output a decoder stage keeps. One stage
        holding every key (pp 1) gives `evaluate`'s activations."""
        values = [float(v) for v in self._fn(batch, seq, context)]
        out = []
        for keys in stages:
            terms = [self._key_terms[k] for k in sorted(keys) if k in self._key_terms]
            blocks = [values[a] for a, inputs in terms if inputs]
            rebuilt = [values[self._rebuilt[k]] for k in keys if k in self._rebuilt]
            out.append(sum(values[a] for a, inputs in terms if not inputs) + max(blocks, default=0.0)
                       + sum(max(values[i] for i in inputs) for _, inputs in terms if inputs)
                       + max(rebuilt, default=0.0))
        return out

    def evaluate_layers(self, batch, seq, context, stages: list) -> list[dict]:
        """evaluate() of each stage in `stages`: its op layers, an iterable, or {layer: count}
        (a layer standing for `count` identical ones): their weights and caches summed, the
        largest working set among their ops; inference phases."""
        if self.phase == "train":
            raise ValueError("MemoryModel.evaluate_layers: inference phases only")
        values = [float(v) for v in self._fn(batch, seq, context)]
        out = []
        for layers in stages:
            n = layers if isinstance(layers, dict) else dict.fromkeys(layers, 1)
            part = {"weights_bytes": sum(w * n.get(layer, 0) for layer, w in self._layer_weights.items()),
                    "gradients_bytes": 0.0, "optimizer_bytes": 0.0,
                    "activations_bytes": max((values[i] for i, layer in zip(self._max_terms, self._max_layers)
                                              if n.get(layer, 0) > 0), default=0.0),
                    "kv_cache_bytes": sum(values[i] * n.get(layer, 0) for layer, i in self._kv_layers)}
            part["total_bytes"] = sum(part[c] for c in COMPONENTS)
            out.append(part)
        return out

    def evaluate(self, batch, seq, context) -> dict[str, float]:
        """Each component in bytes at B=batch, S=seq, T=context (floats)."""
        values = [float(v) for v in self._fn(batch, seq, context)]
        act = sum(values[i] for i in self._sum_terms)
        if self._max_terms:
            act += max(values[i] for i in self._max_terms)
        act += sum(max(values[i] for i in cands) for cands in self._block_inputs)
        p = self.params
        out = {
            "weights_bytes": self.weight_bytes,
            "gradients_bytes": p * self.bytes_per_param["gradients"],
            "optimizer_bytes": p * self.bytes_per_param["optimizer"],
            "activations_bytes": act,
            "kv_cache_bytes": values[self._kv],
        }
        out["total_bytes"] = sum(out[c] for c in COMPONENTS)
        return out

    # -- capacity searches --------------------------------------------------
    def _largest(self, total_at, capacity: float, upper: int) -> Optional[int]:
        """Largest n in [1, upper] with total_at(n) <= capacity (0 if none fits,
        `upper` when it fits)."""
        if total_at(1) > capacity:
            return 0
        if total_at(upper) <= capacity:
            return upper
        lo, hi = 1, 2
        while hi < upper and total_at(hi) <= capacity:
            lo, hi = hi, min(2 * hi, upper)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if total_at(mid) <= capacity:
                lo = mid
            else:
                hi = mid
        return lo

    def max_batch(self, seq: int, context: int, capacity: float) -> Optional[int]:
        return self._largest(lambda b: self.evaluate(b, seq, context)["total_bytes"], capacity, MAX_SEARCH)

    def max_context(self, batch: int, capacity: float) -> Optional[int]:
        upper = self.spec.max_seq if self.spec.positions == "learned" else MAX_SEARCH
        if self.phase == "decode":
            total = lambda n: self.evaluate(batch, 1, n)["total_bytes"]  # noqa: E731
        else:
            total = lambda n: self.evaluate(batch, n, n)["total_bytes"]  # noqa: E731
        return self._largest(total, capacity, upper)


@dataclass
class MemoryResult:
    """Memory of one step, by component, and what fits the device (if given)."""

    spec: Any
    phase: str
    batch: int
    seq: int
    context: int
    recompute: str  # none | selective | cheap | full
    optimizer: str
    params: int
    bytes_per_param: dict
    components: dict
    hw: Any = None
    max_batch: Optional[int] = None
    max_context: Optional[int] = None
    encoder_seq: Optional[int] = None  # an encoder-decoder's encoder tokens per sequence
    notes: list = field(default_factory=list)

    def __getattr__(self, name):
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(name)

    @property
    def total_bytes(self) -> float:
        return self.components["total_bytes"]

    @property
    def capacity_bytes(self) -> Optional[float]:
        return None if self.hw is None else self.hw.memory_capacity_bytes

    @property
    def fits(self) -> Optional[bool]:
        return None if self.hw is None else self.total_bytes <= self.hw.memory_capacity_bytes

    def to_dict(self) -> dict:
        out = {
            "model": self.spec.name, "family": self.spec.family, "phase": self.phase,
            "batch": self.batch, "seq": 1 if self.phase == "decode" else self.seq, "context": self.context,
            "recompute": self.recompute, "optimizer": self.optimizer, "dtype": self.spec.dtype,
            "params": self.params, "bytes_per_param": self.bytes_per_param,
            **{k: _int(v) for k, v in self.components.items()},
        }
        if self.encoder_seq is not None:
            out["encoder_seq"] = self.encoder_seq
        if self.hw is not None:
            out.update(hardware=self.hw.name, capacity_bytes=_int(self.hw.memory_capacity_bytes), fits=self.fits,
                       max_batch=self.max_batch, max_context=self.max_context)
        out["notes"] = list(self.notes)
        return out

    def table(self):
        import pandas as pd

        rows = [{"component": c.removesuffix("_bytes"), "bytes": _int(self.components[c])}
                for c in (*COMPONENTS, "total_bytes")]
        return pd.DataFrame(rows)


def _int(v):
    return int(round(v)) if isinstance(v, float) else v


def memory(spec, *, phase: str = "train", batch: int = 1, seq: int = 1024, context: Optional[int] = None,
           hw=None, recompute: bool | str = False, optimizer: str = "adam", grad_bytes: Optional[int] = None,
           master_weights: Optional[bool] = None, encoder_seq: Optional[int] = None) -> MemoryResult:
    """Memory of one step of `phase` (see the module docstring); with `hw`,
    whether it fits and the largest batch and context that do (`encoder_seq`: an
    encoder-decoder's encoder tokens per sequence, default `seq`)."""
    from flopsim.count import token_values
    from flopsim.hardware import load_hardware
    from flopsim.ops.optimizer import get_optimizer
    from flopsim.ops.symbols import B, S, S_enc, T
    from flopsim.spec import load_model

    spec = load_model(spec)
    recompute = recompute_mode(recompute)
    get_optimizer(optimizer)
    if grad_bytes is not None and grad_bytes not in (1, 2, 4):
        raise InputError(f"grad_bytes: {grad_bytes!r}: expected 1, 2 or 4")
    values = token_values(spec, phase, batch, seq, context, encoder_seq)
    model = MemoryModel(spec, phase, recompute=recompute, optimizer=optimizer, grad_bytes=grad_bytes,
                        master_weights=master_weights, encoder_seq=values.get(S_enc))
    components = model.evaluate(values[B], values[S], values[T])
    result = MemoryResult(spec=spec, phase=phase, batch=batch, seq=seq, context=int(values[T]),
                          recompute=recompute, optimizer=optimizer, params=model.params,
                          bytes_per_param=model.bytes_per_param, components=components,
                          encoder_seq=values.get(S_enc))
    if recompute != "none" and phase != "train":
        result.notes.append("recompute only changes the train phase")
    if hw is not None:
        hw = load_hardware(hw)
        capacity = hw.memory_capacity_bytes
        result.hw = hw
        result.max_batch = model.max_batch(values[S], values[T], capacity)
        result.max_context = model.max_context(batch, capacity)
        if spec.positions == "learned" and result.max_context == spec.max_seq:
            result.notes.append(f"max_context is limited by max_seq {spec.max_seq} (learned positions)")
    return result


from flopsim._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, "memory")
