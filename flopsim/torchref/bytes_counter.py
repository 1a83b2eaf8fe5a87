"""Bytes and elementwise FLOPs of every aten op the torch reference runs: the
raw measurement behind flopsim's bytes oracle (flopsim.torchref.bytes_check
groups it into kernels and compares it with the op lists; docs/bytes.md).

`BytesCounterMode` is a TorchDispatchMode. For each aten op it records an
`Event`: the tensors it reads and writes (storage, view, bytes), its
elementwise arithmetic from this module's own table, the module that ran it
and, in backward, the autograd node running it. Everything here is written
independently of flopsim.ops.primitives: the tables below are the counter's,
and flopsim is checked against them.

What one aten op moves (the counter's conventions):
- VIEW: an op whose outputs share its inputs' storage (view, reshape of a
  contiguous tensor, t, transpose, permute, expand, squeeze, slice, select,
  split, chunk, detach, _unsafe_view, ...) moves 0 bytes: no data moves.
- READ: each distinct input view costs its *distinct* elements times the
  element size: a broadcast (expanded, stride-0) dimension counts once, as a
  kernel reads that memory once (a bias added to every row reads d_out values).
- WRITE: each output costs numel times element size.
- IN-PLACE (a `Tensor(a!)` argument in the op's schema: add_, copy_,
  index_put_, fill_, ...): the mutated tensor is written; it is also read
  unless the op overwrites it (copy_, fill_, zero_, random fills).
- COPY: clone, contiguous and _to_copy read their source and write the copy.
- INDEX: embedding, index_select, index and gather read the index and only
  the rows they select (output-sized, each selected row counted);
  embedding's backward reads the gradient and the index and writes the whole
  table's gradient. Scatters (index_add, scatter_add, index_put, scatter):
  the index and the source are read, the target's touched elements are read
  (when added into) and written; an out-of-place scatter also copies its
  whole `self`, which the event keeps apart (`Event.self_copy`).
- FACTORY: tensors made from nothing (zeros, ones, full, arange, randint,
  and the `_like` / `new_` forms, whose input gives only a shape) write their
  output and read nothing; empty* writes nothing (allocation only).
- SCALAR: 0-d tensors (a loss, its seed gradient, nll's total weight) move
  no bytes, and an op whose tensors are all 0-d has no arithmetic.

Arithmetic (`Event.flops`, the oracle for `other_flops`; FlopCounterMode's
matrix-product FLOPs are not repeated here), per output element unless said:
add, sub, mul, div, floor_divide, neg, pow, exp, log, rsqrt, cos, sin,
comparisons, clamp, relu 1; tanh, sigmoid 4 (exp, add, divide, and a scale
or sign); silu 4 (x / (1 + exp(-x))); gelu 8 (x^3, two multiply-adds, tanh,
1 +, two products); softmax and log-softmax 5 (max, subtract, exp, sum,
divide or log); native_layer_norm 8 (mean, subtract, square, mean,
normalise, scale, shift; the rsqrt per row folded in); reductions (sum,
mean, amax, argmax, topk, sort, cumsum, bincount) 1 per *input* element;
scatter-adds and embedding's backward 1 per source element (the add);
selects, copies, gathers, masks 0; addmm / baddbmm / convolution with a
bias, the bias add, 1 per output element; fused attention (the CPU flash
kernel) 6 per score (softmax 5, the 1/sqrt(d) scale 1), B * H * S * T
scores. Backward kernels: twice the forward per element (the derivative and
the product with the incoming gradient): gelu 16, silu 8, tanh 8, sigmoid 8,
relu 2, softmax 10, layer norm 16 per input element, fused attention 11 per
score (softmax's 10 and the scale's 1, as the explicit path's kernels);
log-softmax's backward 5. A complex output element counts in real operations
(COMPLEX_PER_OUTPUT: a product 6, a sum 2; RoPE's complex form).

Attribution: forward ops belong to the innermost module running
(torch.utils.module_tracker.ModuleTracker, as FlopCounterMode uses), the
root class name dropped (`block.0.attn.qkv`). A backward op belongs to the
autograd node running it (torch._C._current_autograd_node); bytes_check
charges a node to the module whose forward op made it. The gradient sums the
engine runs between nodes are marked `accumulate`, with the node that
delivered the earlier gradient (`deliverer`), from post-hooks on every node.

Fused regions: the reference marks code that flopsim counts as one kernel
with `fused(kind)`; the events inside carry the region. Outside a counter,
`fused` does nothing (so timing the reference does not time the marker). torch is imported only by the
functions that use it.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

# ---- fused regions (declared by the reference) ----------------------------

_ACTIVE_REGIONS: list = []
_REGION_IDS = itertools.count()


@dataclass(eq=False)
class Region:
    """One run of a fused region. `path`: the module it is charged to (None:
    where it runs); `elements`: the basis of its kernel's arithmetic."""

    kind: str
    path: Optional[str] = None
    elements: int = 0
    id: int = field(default_factory=lambda: next(_REGION_IDS))

    def basis(self, *tensors) -> None:
        """Count these tensors' elements as the region kernel's elements."""
        self.elements += sum(int(t.numel()) for t in tensors)

    @staticmethod
    def take(*tensors):
        """The region's inputs, each as one alias (a view: no data moves) used inside
        the region: autograd then sums a reused input's gradients inside the region's
        backward, which hands on one gradient per input (as a fused kernel does)."""
        views = tuple(t.view_as(t) for t in tensors)
        return views if len(views) > 1 else views[0]


class _NoRegion:
    """What `fused` gives outside a counter: nothing is recorded and `take` makes no
    aliases, so the reference runs (and is timed) without the marker's cost."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def take(*tensors):
        return tensors if len(tensors) > 1 else tensors[0]

    def basis(self, *tensors) -> None:
        return None


_NO_REGION = _NoRegion()
_COUNTING = [0]  # BytesCounterMode instances active


@contextlib.contextmanager
def _region(kind: str, path: Optional[str]):
    region = Region(kind, path)
    _ACTIVE_REGIONS.append(region)
    try:
        yield region
    finally:
        _ACTIVE_REGIONS.pop()


def fused(kind: str, path: Optional[str] = None):
    """Mark the code inside as one fused kernel of `kind` (see REGION_FLOPS in bytes_check);
    a no-op outside a counter (`count_bytes`)."""
    return _region(kind, path) if _COUNTING[0] else _NO_REGION


def active_region() -> Optional[Region]:
    return _ACTIVE_REGIONS[-1] if _ACTIVE_REGIONS else None


_EAGER_JOINS = [0]  # eager_joins scopes open


@contextlib.contextmanager
def _eager_scope():
    _EAGER_JOINS[0] += 1
    try:
        yield
    finally:
        _EAGER_JOINS[0] -= 1


def eager_joins():
    """Mark the splits and unbinds made inside as joined by eager copies in backward:
    their gradients' concatenation is a kernel of its own, not the free join of the
    SPLIT rule (bytes_check). MoE's per-expert loop (moe.kernel loop) runs this way.
    A no-op outside a counter, as `fused` is."""
    return _eager_scope() if _COUNTING[0] else _NO_REGION


# ---- the arithmetic table ---------------------------------------------------

PER_OUTPUT = {
    **dict.fromkeys(("add", "sub", "mul", "div", "rsub", "neg", "pow", "exp", "log", "rsqrt", "sqrt",
                     "reciprocal", "cos", "sin", "abs", "eq", "ne", "gt", "ge", "lt", "le", "clamp",
                     "clamp_min", "clamp_max", "maximum", "minimum", "relu", "log1p", "expm1", "floor_divide",
                     "remainder"), 1),
    "addcmul": 2, "lerp": 2,
    "tanh": 4, "sigmoid": 4, "silu": 4, "gelu": 8,
    "_softmax": 5, "_log_softmax": 5, "native_layer_norm": 8,
    "threshold_backward": 2, "tanh_backward": 8, "sigmoid_backward": 8, "silu_backward": 8,
    "gelu_backward": 16, "_softmax_backward_data": 10, "_log_softmax_backward_data": 5,
    # the random draw compared with p and the product by mask / (1 - p); backward grad * mask / (1 - p)
    "native_dropout": 2, "native_dropout_backward": 2,
}
# a complex output element in real operations: (a + bi)(c + di) = 4 products and 2 sums
COMPLEX_PER_OUTPUT = {"mul": 6, "add": 2, "sub": 2, "neg": 2}
PER_INPUT = dict.fromkeys(("sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "topk", "sort",
                           "argsort", "cumsum", "logsumexp", "any", "all", "bincount"), 1)
PER_SOURCE = dict.fromkeys(("index_add", "scatter_add", "embedding_dense_backward"), 1)
SDPA_FORWARD_PER_SCORE = 6
SDPA_BACKWARD_PER_SCORE = 11
SDPA_FORWARD = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
INDEX_READS = {"embedding": 1, "index_select": 2, "gather": 2}  # op -> argument holding the index
SCATTERS = ("index_add", "scatter_add", "index_put", "scatter")
ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")


def _tensors(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _scores(q, k) -> int:
    """B * H * S * T of an attention call with q [B, H, S, d] and k [B, H_kv, T, d]."""
    return _numel(q.shape[:-1]) * int(k.shape[-2])


def elementwise_flops(name: str, args, kwargs, out) -> int:
    """The counter's arithmetic for one aten op (`name`: its overload packet, `add_` -> `add`)."""
    base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    outs = _tensors(out)
    if all(t.dim() == 0 for t in _tensors(args) + outs):
        return 0  # SCALAR
    if base in ("addmm", "baddbmm"):
        return int(outs[0].numel())  # the bias add
    if base == "convolution":
        return int(outs[0].numel()) if len(args) > 2 and args[2] is not None else 0  # the bias add
    if base in SDPA_FORWARD:
        return SDPA_FORWARD_PER_SCORE * _scores(args[0], args[1])
    if base.endswith("_backward") and base[: -len("_backward")] in SDPA_FORWARD:
        return SDPA_BACKWARD_PER_SCORE * _scores(args[1], args[2])
    if base == "native_layer_norm_backward":
        return 16 * int(args[1].numel())
    if base == "index_put":
        return int(args[2].numel()) if (len(args) > 3 and args[3]) else 0  # accumulate: the add
    if base in PER_SOURCE:
        source = args[0] if base == "embedding_dense_backward" else args[3]
        return PER_SOURCE[base] * int(source.numel())
    if base in PER_INPUT:
        return PER_INPUT[base] * int(args[0].numel())
    if base in PER_OUTPUT:
        per = COMPLEX_PER_OUTPUT.get(base, PER_OUTPUT[base]) if outs[0].is_complex() else PER_OUTPUT[base]
        return per * int(outs[0].numel())
    return 0


# ---- what an op reads and writes ---------------------------------------------

@dataclass(frozen=True)
class Access:
    storage: int  # the storage's identity (kept alive by the counter, so never reused)
    view: tuple  # (storage, offset, shape, stride, dtype, element size)
    nbytes: int
    integer: bool  # an integer or bool tensor (indices, masks)
    partial: bool = False  # only part of the view is touched (selected rows, scattered rows)


def union_bytes(accesses) -> int:
    """Bytes of the distinct storage elements a set of accesses touches: views of one
    storage (a tensor and its slices) count their union once; partial accesses
    (selected rows) count their bytes, once per distinct access."""
    import numpy as np

    total = 0
    by_storage: dict = {}
    for a in dict.fromkeys(accesses):
        if a.partial:
            total += a.nbytes
        else:
            by_storage.setdefault(a.storage, {})[a.view] = a.nbytes
    for views in by_storage.values():
        if len(views) == 1:
            total += next(iter(views.values()))
            continue
        offsets = []
        for _, offset, shape, stride, _, _ in views:
            grid = np.zeros((1,), dtype=np.int64) + offset
            for size, step in zip(shape, stride):
                grid = (grid[..., None] + np.arange(size, dtype=np.int64) * step).reshape(-1)
            offsets.append(grid)
        element = next(iter(views))[5]
        total += int(np.unique(np.concatenate(offsets)).size) * element
    return total


def distinct_bytes(t) -> int:
    """Bytes of the distinct storage elements a view covers (broadcast dimensions once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= int(size)
    return n * t.element_size()


_KEYS: dict = {}  # id(tensor) -> storage key, for the op being recorded


def _storage_key(t) -> int:
    key = _KEYS.get(id(t))
    if key is None:
        key = _KEYS[id(t)] = t.untyped_storage()._cdata
    return key


def access(t, nbytes: Optional[int] = None) -> Access:
    key = _storage_key(t)
    view = (key, t.storage_offset(), tuple(t.shape), tuple(t.stride()), str(t.dtype), t.element_size())
    full = distinct_bytes(t)
    return Access(key, view, full if nbytes is None else nbytes, not (t.is_floating_point() or t.is_complex()),
                  partial=nbytes is not None and nbytes != full)


_MUTATED: dict = {}  # op -> [(position, name)] of its schema's `Tensor(a!)` arguments


def mutated_arguments(func, args, kwargs) -> list:
    """The tensors an op writes in place (its schema's `Tensor(a!)` arguments)."""
    slots = _MUTATED.get(func)
    if slots is None:
        slots = _MUTATED[func] = [(i, a.name) for i, a in enumerate(func._schema.arguments)
                                  if a.alias_info is not None and a.alias_info.is_write]
    out = []
    for i, name in slots:
        out += _tensors(args[i] if i < len(args) else kwargs.get(name))
    return out


def _rows_bytes(t, rows: int) -> int:
    return rows * t.element_size()


@dataclass
class Moves:
    reads: list
    writes: list
    self_copy: tuple = ()  # (read, write) accesses of an out-of-place scatter's copy of self


def moves(name: str, func, args, kwargs, out, tensors_in=None, tensors_out=None) -> Moves:
    """Reads and writes of one aten op under the module docstring's conventions
    (`tensors_in`, `tensors_out`: its tensor arguments and outputs, if already listed)."""
    if tensors_in is None:
        tensors_in = _tensors(args) + _tensors(list(kwargs.values()))
    outs = [t for t in (_tensors(out) if tensors_out is None else tensors_out) if t.dim() > 0]
    ins = [t for t in tensors_in if t.dim() > 0]
    base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    in_storages = {_storage_key(t) for t in tensors_in}
    mutated = [t for t in mutated_arguments(func, args, kwargs) if t.dim() > 0]
    if not mutated and outs and all(_storage_key(t) in in_storages for t in outs):
        return Moves([], [])  # VIEW
    if base in ALLOCATIONS:
        return Moves([], [])
    if base.endswith("_like") or base.startswith("new_"):
        return Moves([], [access(t) for t in outs])  # FACTORY: the input gives only a shape
    if base in INDEX_READS or base == "index":
        index = _tensors(args[1]) if base == "index" else [args[INDEX_READS[base]]]
        selected = distinct_bytes(outs[0]) if outs else 0
        return Moves([access(i) for i in index] + [access(args[0], selected)], [access(t) for t in outs])
    if base in SCATTERS:
        return _scatter_moves(base, args, outs, mutated)
    if base in ("nll_loss_forward",):
        picked = _rows_bytes(args[0], int(args[1].numel()))
        return Moves([access(args[1]), access(args[0], picked)], [access(t) for t in outs])
    reads = [access(t) for t in ins]
    overwrite = base in ("copy", "fill", "zero", "normal", "uniform", "random", "bernoulli", "exponential")
    if mutated:
        if overwrite:
            mutated_keys = {id(t) for t in mutated}
            reads = [access(t) for t in ins if id(t) not in mutated_keys]
        return Moves(reads, [access(t) for t in mutated])
    return Moves(reads, [access(t) for t in outs])


def _scatter_moves(base: str, args, outs, mutated) -> Moves:
    """index_add / scatter_add (self, dim, index, source), scatter (self, dim, index, src|value),
    index_put (self, indices, values, accumulate)."""
    target = args[0]
    if base == "index_put":
        indices = [t for t in _tensors(args[1])]
        values = args[2]
        accumulate = len(args) > 3 and bool(args[3])
        leading = _numel(_broadcast_shape([i.shape for i in indices])) if indices else 1
        touched = leading * _numel(target.shape[len(args[1]):])
        reads = [access(i) for i in indices] + ([access(values)] if values.dim() > 0 else [])
    else:
        index = args[2]
        source = args[3] if len(args) > 3 and hasattr(args[3], "dim") else None
        accumulate = base != "scatter"
        touched = int(source.numel()) if base == "index_add" else int(index.numel())
        reads = [access(index)] + ([access(source)] if source is not None and source.dim() > 0 else [])
    touched_bytes = _rows_bytes(target, touched)
    dest = mutated[0] if mutated else outs[0]
    if accumulate:
        reads.append(access(target, touched_bytes))
    writes = [access(dest, touched_bytes)]
    copy = () if mutated else (access(target), access(dest))  # out of place: self copied whole
    return Moves(reads, writes, copy)


def _broadcast_shape(shapes) -> tuple:
    import torch

    return tuple(torch.broadcast_shapes(*shapes))


# ---- events and the dispatch mode ---------------------------------------------

@dataclass
class Event:
    index: int
    op: str  # overload packet name, e.g. "addmm", "add_"
    pass_: str  # "fwd" or "bwd"
    path: str  # forward: the innermost module; backward: the module ModuleTracker reports
    reads: list
    writes: list
    outputs: list  # storages the op created (not views, not in place)
    flops: int
    region: Optional[Region] = None  # forward: the fused region running
    eager_join: bool = False  # forward: made inside eager_joins (its backward join is a kernel)
    node: Any = None  # backward: the autograd node running
    accumulate: bool = False  # backward: a gradient sum between nodes
    deliverer: Any = None  # for a gradient sum: the node that delivered the earlier gradient
    self_copy: tuple = ()
    input_storages: tuple = ()  # every tensor argument's storage (views included), for liveness


SKIP = ("size", "sym_size", "stride", "sym_stride", "numel", "sym_numel", "dim", "is_contiguous",
        "sym_is_contiguous", "storage_offset", "sym_storage_offset", "is_strides_like_format",
        "is_non_overlapping_and_dense", "layout", "_local_scalar_dense", "item", "is_same_size",
        "equal", "_has_compatible_shallow_copy_type", "set_")


def _innermost(parents) -> str:
    names = [p for p in parents if p != "Global"]
    if not names:
        return ""
    _, _, path = max(names, key=len).partition(".")
    return path


class Capture:
    """The state of one counted run: events, kept storages, autograd bookkeeping."""

    def __init__(self):
        self.events: list[Event] = []
        self.storages: dict = {}  # key -> UntypedStorage, kept alive so keys are never reused
        self.forward_outputs: list = []  # (tensor, event index): for each node, the forward op that made it
        self.node_event: dict = {}  # autograd node -> index of the forward event that made it
        self._pending: list = []  # the last forward event's outputs, whose nodes autograd sets next
        self.results: set = set()  # storages the run hands back (its output, parameter gradients)
        self.hooked: set = set()
        self.finished_node: Any = None
        self.delivered: dict = {}  # id(tensor) -> (weakref, node)

    def resolve_nodes(self) -> None:
        """Map the nodes autograd attached to the last forward op's outputs (read before a
        later in-place op replaces a tensor's grad_fn)."""
        for t, index in self._pending:
            if t.grad_fn is not None:
                self.node_event.setdefault(t.grad_fn, index)
        self._pending = []

    def keep(self, tensors) -> None:
        for t in tensors:
            key = _storage_key(t)
            if key not in self.storages:
                self.storages[key] = t.untyped_storage()


class BytesCounterMode:
    """Context manager: records an Event per aten op run inside it (`capture.events`)."""

    def __init__(self):
        from torch.utils.module_tracker import ModuleTracker

        self.tracker = ModuleTracker()
        self.capture = Capture()
        self._mode = None

    def __enter__(self):
        self.tracker.__enter__()
        self._mode = _mode_class()(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self.tracker.__exit__()
        self._mode = None
        return False

    def mark_results(self, value) -> None:
        self.capture.keep(_tensors(value))
        self.capture.results |= {_storage_key(t) for t in _tensors(value)}

    def record(self, func, args, kwargs, out) -> None:
        import torch

        name = func._overloadpacket.__name__
        if name in SKIP:
            return
        cap = self.capture
        cap.resolve_nodes()
        _KEYS.clear()
        tensors_in = _tensors(args) + _tensors(list(kwargs.values()))
        outs = _tensors(out)
        cap.keep(tensors_in + outs)
        bw = torch._C._current_graph_task_id() != -1
        node = torch._C._current_autograd_node() if bw else None
        if bw:
            self._hook_graph(node)
        m = moves(name, func, args, kwargs, out, tensors_in, outs)
        in_keys = {_storage_key(t) for t in tensors_in}
        created = [_storage_key(t) for t in outs if _storage_key(t) not in in_keys]
        event = Event(index=len(cap.events), op=name, pass_="bwd" if bw else "fwd",
                      path=_innermost(self.tracker.parents), reads=m.reads, writes=m.writes,
                      outputs=list(dict.fromkeys(created)), flops=elementwise_flops(name, args, kwargs, out),
                      region=None if bw else active_region(), eager_join=not bw and _EAGER_JOINS[0] > 0,
                      node=node, self_copy=m.self_copy,
                      input_storages=tuple(dict.fromkeys(_storage_key(t) for t in tensors_in)))
        if bw:
            self._mark_accumulation(event, node, tensors_in, outs)
            if node is not None and type(node).__name__.endswith("AccumulateGrad"):
                cap.results |= set(event.input_storages)  # a parameter's gradient: kept
        else:
            cap.forward_outputs += [(t, event.index) for t in outs]
            cap._pending = [(t, event.index) for t in outs]
        cap.events.append(event)

    # -- backward bookkeeping: which node delivered which gradient --

    def _hook_graph(self, root) -> None:
        """Post-hooks on every node reachable from `root` (once): they mark the end of a
        node's own kernels and record the gradients it delivers."""
        cap = self.capture
        stack = [root]
        while stack:
            node = stack.pop()
            if node is None or node in cap.hooked:
                continue
            cap.hooked.add(node)
            node.register_hook(self._post_hook(node))
            stack += [n for n, _ in node.next_functions]

    def _post_hook(self, node):
        cap = self.capture

        def hook(grad_inputs, grad_outputs):
            cap.finished_node = node
            for t in _tensors(grad_inputs):
                cap.delivered[id(t)] = (weakref.ref(t), node)

        return hook

    def _mark_accumulation(self, event: Event, node, tensors_in, outs) -> None:
        """A gradient sum: an add after `node`'s post-hook, before the next node starts."""
        cap = self.capture
        if node is None or cap.finished_node is not node or event.op not in ("add", "add_"):
            return
        event.accumulate = True
        deliverer = None
        for t in tensors_in:
            ref, by = cap.delivered.get(id(t), (None, None))
            if ref is not None and ref() is t and by is not node:
                deliverer = by
        event.deliverer = deliverer
        for t in outs or tensors_in[:1]:
            cap.delivered[id(t)] = (weakref.ref(t), deliverer or node)


_MODE = []


def _mode_class():
    """The TorchDispatchMode recording into a BytesCounterMode (made once, torch imported lazily)."""
    if not _MODE:
        from torch.utils._python_dispatch import TorchDispatchMode

        class _RecordingMode(TorchDispatchMode):
            @classmethod
            def _should_skip_dynamo(cls) -> bool:
                return False  # nothing here is compiled: skip torch._disable_dynamo's per-call wrapper

            def __init__(self, counter):
                super().__init__()
                self.counter = counter

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                self.counter.record(func, args, kwargs or {}, out)
                return out

        _MODE.append(_RecordingMode)
    return _MODE[0]


def count_bytes(fn, *, results=True) -> Capture:
    """Run `fn()` under a BytesCounterMode; its return value counts as the run's result."""
    counter = BytesCounterMode()
    _COUNTING[0] += 1
    try:
        with counter:
            value = fn()
            counter.capture.resolve_nodes()
            if results:
                counter.mark_results(value)
    finally:
        _COUNTING[0] -= 1
    return counter.capture
