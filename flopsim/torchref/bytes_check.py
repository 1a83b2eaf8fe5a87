"""Bytes oracle: flopsim's op-list bytes and `other_flops` against what the
torch reference moves, per module and pass (docs/bytes.md).

`compare_bytes(spec, phase, batch, seq, context)` runs the reference (fp32)
under flopsim.torchref.bytes_counter.BytesCounterMode, groups its aten ops
into the kernels flopsim models (`build_kernels`), and compares, for every
module path and pass (fwd, bwd), the kernels' bytes and arithmetic with the
sums of `op.bytes` and `op.other_flops` over flopsim's ops (at dtype fp32)
whose `module` is that path or lies below it. Exact, to the byte and FLOP.

flopsim's convention is that each op is its own kernel: what it reads comes
from memory, what it writes goes to memory. Eager PyTorch runs more kernels
than that. These rules, applied mechanically here, say which of its traffic
a flopsim op stands for; tests/test_bytes_rules.py pins each one.

- OP: outside the cases below, each aten op is one kernel. A kernel's bytes
  are the union of the storage elements it reads plus those it writes
  (a tensor and its slices read by one kernel count once).
- REGION: code the reference marks `fused(kind)` (RoPE on q and k, RMSNorm,
  the gated activation, the explicit attention's scale + mask + softmax, the
  losses, MoE's grouped GEMM and slot assignment, the length-reduction soft
  mask, the sparse-FF Gumbel mask, the embeddings' sum) is one kernel: it
  reads the tensors it takes from outside and writes each tensor it hands on
  whole (the views it wrote or its consumers read; not a constant fill's
  scattered elements). Its backward -- every autograd node its forward made --
  is one kernel too. Its arithmetic is the counter's aten table summed over
  its ops, or, for the kinds in REGION_FLOPS, the fused kernel's own figure
  per element of its basis (eager RMSNorm and RoPE decompose into ops whose
  per-row and table arithmetic a fused kernel does not do).
- ON-CHIP: inside a region, what is derived from integers and constants
  alone (RoPE's angle table from the position ids, the causal mask, MoE's
  slot bookkeeping) is computed on chip: free to the region and to its
  backward, which read the integer inputs it comes from instead.
- NODE: in backward, the kernels one autograd node runs (a Linear's
  grad-input and grad-weight products and bias-gradient sum) are one kernel:
  each tensor they read comes from memory once.
- ACCUMULATE: the engine's sum of a tensor's gradients (a tensor used twice:
  the residual stream, a tied weight, MoE's router input) is a kernel charged
  to the module of the node that delivered the earlier gradient: the forward's
  last user of the tensor (the residual add, the tied LM head).
- SPLIT: the concatenation autograd runs to join a split's or chunk's
  gradients (QKV, gate/up) is free: a kernel writes the pieces into one buffer.
  Except where the reference marks the code `eager_joins()` (MoE's per-expert
  loop, moe.kernel loop): there each join is the copy it is in eager code.
- LAYOUT: copies that only change layout (clone, contiguous, `reshape` of a
  strided tensor, `_to_copy` to the same dtype, AccumulateGrad's copy of a
  gradient into the parameter's layout) are free; their consumers read the
  copy as if from memory.
- INIT: constant fills (zeros, ones, full and their _like / new_ forms) are
  free, and so is reading them before anything is written into them (a
  scatter-add into a zero-filled output reads no target rows).
- SCATTER: an out-of-place scatter is costed in place: the copy of its
  untouched `self` (`Event.self_copy`) is not counted.
- RECOMPUTE: a value a kernel makes only for its own backward (LayerNorm's
  mean and rstd, attention's log-sum-exp, the gated activation's act(gate),
  the loss's log-probabilities) is recomputed by the backward kernel from the
  forward's inputs: not written, and the backward reads those inputs instead.
- RANDOM: a random mask (native_dropout's) is kept, not recomputed: the
  forward writes it and its backward reads it (drawn at random, it cannot be
  remade from the forward's inputs; a fused attention regenerating its mask
  from the RNG seed is not in the reference).
- DEAD: an output of a multi-output op that nothing reads is not written
  (statistics at inference, unused top-k values); nor is anything a fused
  kernel makes and keeps to itself.
- SCALAR (counter): 0-d tensors move nothing (a loss and its seed).

The reference follows flopsim where flopsim assumes something of it: the
dropless grouped GEMM runs every expert (one with no row included), and the
loss, run outside the model, is charged to `head` (flopsim's head.loss).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

REGION_FLOPS = {  # kernel arithmetic per element of the region's basis: (forward, backward)
    "rmsnorm": (4, 8),  # square, sum, normalise, scale; backward twice
    "rope": (3, 3),  # x * cos + rotate(x) * sin; backward is the inverse rotation
    "cross_entropy": (5, 5),  # log-softmax and the pick; backward softmax - one-hot, scaled
    "bce": (5, 5),  # binary cross-entropy with logits, per score
    "slots": (1, 0),  # capacity routing: the cumsum's add per one-hot element; backward moves data only
    "soft_mask": (6, 12),  # sigmoid(n * s - 1): the affine 2, the sigmoid 4; backward twice
    "gumbel_mask": (6, 10),  # log-softmax 5, the noisy argmax's comparison 1 (the Gumbel noise, made
    # on chip, not counted); backward the log-softmax's, twice
}
RANDOM_OPS = ("native_dropout",)  # RANDOM: their outputs are kept for backward, never recomputed
SPLIT_NODES = ("SplitWithSizesBackward0", "SplitBackward0", "UnbindBackward0")
LAYOUT_OPS = ("clone", "contiguous")
INIT_OPS = ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
            "scalar_tensor")


@dataclass
class Kernel:
    key: tuple
    path: str
    pass_: str
    events: list = field(default_factory=list)
    reads: list = field(default_factory=list)  # Access
    writes: list = field(default_factory=list)  # Access
    flops: int = 0
    free: bool = False  # SPLIT / LAYOUT: costs nothing
    region: object = None
    creator: Optional[tuple] = None  # backward: the forward kernel whose nodes these are

    @property
    def read_bytes(self) -> int:
        from flopsim.torchref.bytes_counter import union_bytes

        return union_bytes(self.reads)

    @property
    def write_bytes(self) -> int:
        from flopsim.torchref.bytes_counter import union_bytes

        return union_bytes(self.writes)

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes


def _is_layout(event) -> bool:
    """LAYOUT and INIT events: free (a constant fill's tensor is written by its first kernel)."""
    if event.op in LAYOUT_OPS or event.op in INIT_OPS:
        return True
    if event.op == "copy_" and type(event.node).__name__.endswith("AccumulateGrad"):
        return True  # a gradient copied into the parameter's layout
    if event.op == "_to_copy" and event.reads and event.writes:
        return event.reads[0].view[4] == event.writes[0].view[4]  # same dtype
    return False


class _Builder:
    def __init__(self, capture):
        self.cap = capture
        self.events = capture.events
        self.node_event = dict(capture.node_event)  # autograd node -> the forward event that made it
        for t, index in capture.forward_outputs:
            if t.grad_fn is not None and t.grad_fn not in self.node_event:
                self.node_event[t.grad_fn] = index

    def forward_of(self, node):
        index = self.node_event.get(node)
        return None if index is None else self.events[index]

    def key(self, e) -> tuple:
        if e.pass_ == "fwd":
            return ("region", e.region.id, "fwd") if e.region is not None else ("op", e.index)
        if e.accumulate:
            mine, theirs = self.forward_of(e.node), self.forward_of(e.deliverer)
            if mine is not None and theirs is not None and mine.region is not None \
                    and mine.region is theirs.region:
                return ("region", mine.region.id, "bwd")
            return ("acc", e.index)
        origin = self.forward_of(e.node)
        if origin is not None and origin.region is not None:
            return ("region", origin.region.id, "bwd")
        return ("node", id(e.node)) if e.node is not None else ("op", e.index)

    def place(self, e, key) -> tuple[str, Optional[tuple]]:
        """(module path, creator forward kernel) of the kernel `e` belongs to."""
        if key[0] == "region":
            region = self.forward_of(e.node).region if e.pass_ == "bwd" and not e.accumulate else None
            region = region or e.region or self.forward_of(e.node).region
            first = next(x for x in self.events if x.region is region)
            path = region.path if region.path is not None else first.path
            return path, (("region", region.id, "fwd") if key[2] == "bwd" else None)
        if key[0] == "acc":
            origin = self.forward_of(e.deliverer) or self.forward_of(e.node)
            return (origin.path if origin is not None else e.path), None
        if key[0] == "node":
            origin = self.forward_of(e.node)
            if origin is None:
                return e.path, None
            return origin.path, (("region", origin.region.id, "fwd") if origin.region is not None
                                 else ("op", origin.index))
        return e.path, None

    def group(self) -> dict:
        kernels: dict = {}
        for e in self.events:
            k = self.key(e)
            if k not in kernels:
                path, creator = self.place(e, k)
                kernels[k] = Kernel(key=k, path=path, pass_=e.pass_, creator=creator,
                                    region=e.region if k[0] == "region" and k[2] == "fwd" else None)
            kernel = kernels[k]
            kernel.events.append(e)
            if k[0] == "region" and kernel.region is None and e.pass_ == "fwd":
                kernel.region = e.region
            if k[0] == "node" and type(e.node).__name__ in SPLIT_NODES:
                origin = self.forward_of(e.node)
                kernel.free = origin is None or not origin.eager_join  # SPLIT, unless an eager join
        for kernel in kernels.values():
            if all(_is_layout(e) or not (e.reads or e.writes) for e in kernel.events):
                kernel.free = True  # LAYOUT (and kernels of views only)
        return kernels


def _on_chip(kernels: dict) -> dict:
    """ON-CHIP: {storage: the integer inputs it derives from} for the values a forward
    region computes from integers and constants alone (free to the region and its
    backward, which read those integer inputs instead)."""
    chip: dict = {}
    for kernel in kernels.values():
        if kernel.key[0] != "region" or kernel.pass_ != "fwd":
            continue
        for e in kernel.events:
            if _is_layout(e) or all(r.integer or r.storage in chip for r in e.reads):
                sources = [x for r in e.reads for x in (chip[r.storage] if r.storage in chip else [r])]
                for storage in list(e.outputs) + [w.storage for w in e.writes]:
                    chip[storage] = list(dict.fromkeys(sources + chip.get(storage, [])))
    return chip


def build_kernels(capture) -> list[Kernel]:
    """The kernels flopsim models, from a capture, under the module docstring's rules."""
    builder = _Builder(capture)
    kernels = builder.group()
    owner = {}  # storage -> kernel key that created it
    for k, kernel in kernels.items():
        for e in kernel.events:
            for s in e.outputs:
                owner.setdefault(s, k)
    readers = defaultdict(set)  # storage -> kernel keys whose ops take it
    consumed = defaultdict(list)  # storage -> (kernel key, Access) of every read of it
    for k, kernel in kernels.items():
        for e in kernel.events:
            for s in e.input_storages:
                readers[s].add(k)
            for r in e.reads:
                consumed[r.storage].append((k, r))
    chip = _on_chip(kernels)
    init = _constant_until(kernels)
    recompute = {s: k for s, k in _recomputed(kernels, owner, readers).items() if s not in chip}
    for kernel in kernels.values():
        if not kernel.free:
            _cost(kernel, kernels, owner, readers, chip, recompute, capture.results, init)
            if kernel.key[0] == "region":
                _region_writes(kernel, owner, consumed)
    return list(kernels.values())


def _region_writes(kernel, owner, consumed) -> None:
    """REGION: a fused kernel writes each tensor it makes and hands on whole: the union of
    the views its eager ops wrote and the views its consumers read -- not the scattered
    elements its eager ops wrote into a constant-filled buffer (duplicates included)."""
    out = []
    for storage in dict.fromkeys(w.storage for w in kernel.writes):
        written = [w for w in kernel.writes if w.storage == storage]
        whole = [w for w in written if not w.partial]
        reads = [a for k, a in consumed[storage] if k != kernel.key and not a.partial]
        if owner.get(storage) == kernel.key and (whole or reads):
            written = whole + reads
        out += written
    kernel.writes = out


def _constant_until(kernels) -> dict:
    """INIT: {storage made by a constant fill: the index of the first op writing into it}."""
    made = {s: None for k in kernels.values() for e in k.events if e.op in INIT_OPS for s in e.outputs}
    for e in sorted((e for k in kernels.values() for e in k.events), key=lambda e: e.index):
        for w in e.writes:
            if w.storage in made and made[w.storage] is None and e.op not in INIT_OPS:
                made[w.storage] = e.index
    return {s: (i if i is not None else 1 << 62) for s, i in made.items()}


def _recomputed(kernels, owner, readers) -> dict:
    """RECOMPUTE: storage -> its forward kernel, for values only that kernel's backward reads."""
    out = {}
    for s, maker in owner.items():
        kernel = kernels[maker]
        if kernel.pass_ != "fwd" or any(e.op in RANDOM_OPS for e in kernel.events):
            continue  # RANDOM: a random mask is kept
        others = readers[s] - {maker}
        if others and all(kernels[o].creator == maker for o in others):
            out[s] = maker
    return out


def _own(kernel, maker) -> bool:
    """`kernel` is the forward kernel `maker` or its backward."""
    return maker is not None and (kernel.key == maker or kernel.creator == maker)


def _cost(kernel, kernels, owner, readers, chip, recompute, results, init) -> None:
    made: set = set()
    for e in kernel.events:
        if _is_layout(e):
            continue  # LAYOUT / INIT: free; what reads the copy reads it as from memory
        for r in e.reads:
            if r.storage in made or e.index <= init.get(r.storage, -1):
                continue  # INIT: a constant-filled tensor is read before anything is written into it
            if r.storage in chip and _own(kernel, owner.get(r.storage)):
                kernel.reads += [x for x in chip[r.storage] if x.storage not in made]
                continue
            if r.storage in recompute and _own(kernel, recompute[r.storage]):
                continue
            kernel.reads.append(r)
        for w in e.writes:
            if w.storage in made or owner.get(w.storage) == kernel.key:
                if w.storage in recompute:
                    continue
                others = {k for k in readers[w.storage] - {kernel.key}
                          if not (w.storage in chip and _own(kernels[k], kernel.key))}
                several = len(e.outputs) > 1
                if not others and w.storage not in results and (several or kernel.key[0] != "op"):
                    continue  # DEAD (an output of a multi-output op, or inside a fused kernel) or on chip
            kernel.writes.append(w)
        made |= set(e.outputs)
        kernel.flops += e.flops
    if kernel.creator is not None and kernel.creator in kernels:
        forward = kernels[kernel.creator]
        if any(s in recompute and recompute[s] == kernel.creator for e in kernel.events
               for s in (r.storage for r in e.reads)):
            kernel.reads += forward.reads
    region = kernel.region or (kernels[kernel.creator].region if kernel.creator in kernels else None)
    if kernel.key[0] == "region" and region is not None and region.kind in REGION_FLOPS:
        fwd, bwd = REGION_FLOPS[region.kind]
        kernel.flops = (fwd if kernel.pass_ == "fwd" else bwd) * region.elements


# ---- per-module totals and the comparison ---------------------------------------

def module_totals(kernels) -> dict:
    """{(path, pass): [bytes, flops]} of the kernels charged to exactly that path."""
    totals = defaultdict(lambda: [0, 0])
    for k in kernels:
        if k.free:
            continue
        totals[(k.path, k.pass_)][0] += k.bytes
        totals[(k.path, k.pass_)][1] += k.flops
    return dict(totals)


def _paths(modules) -> set:
    out = {""}
    for m in modules:
        parts = m.split(".") if m else []
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return out


@dataclass
class BytesComparison:
    spec_name: str
    phase: str
    torch: dict  # (path, pass) -> (bytes, flops), hierarchical
    flopsim: dict
    mismatches: list = field(default_factory=list)  # (path, pass, field, torch, flopsim)

    @property
    def exact(self) -> bool:
        return not self.mismatches

    def describe(self, n: int = 6) -> str:
        rows = "; ".join(f"{p or '<root>'} {ps} {f}: torch {t} flopsim {s} (diff {t - s})"
                         for p, ps, f, t, s in self.mismatches[:n])
        return f"{self.spec_name} {self.phase}: {len(self.mismatches)} mismatches: {rows}"


def hierarchical(flat: dict, paths) -> dict:
    """{(path, pass): (bytes, flops)} summed over each path and everything below it."""
    out = {(path, pass_): [0, 0] for path in paths for pass_ in ("fwd", "bwd")}
    for (module, pass_), (b, f) in flat.items():
        parts = module.split(".") if module else []
        for i in range(len(parts) + 1):
            total = out.setdefault((".".join(parts[:i]), pass_), [0, 0])
            total[0] += b
            total[1] += f
    return {key: tuple(v) for key, v in out.items()}


def flopsim_totals(ops) -> dict:
    flat = defaultdict(lambda: [0, 0])
    for op in ops:
        flat[(op.module, op.pass_)][0] += int(op.bytes)
        flat[(op.module, op.pass_)][1] += int(op.other_flops)
    return dict(flat)


def compare(spec_name: str, phase: str, kernels, ops) -> BytesComparison:
    measured = module_totals(kernels)
    modelled = flopsim_totals(ops)
    paths = _paths([p for p, _ in measured] + [p for p, _ in modelled])
    torch_h, flopsim_h = hierarchical(measured, paths), hierarchical(modelled, paths)
    mismatches = []
    for key in sorted(torch_h):
        for i, name in enumerate(("bytes", "other_flops")):
            if torch_h[key][i] != flopsim_h[key][i]:
                mismatches.append((key[0], key[1], name, torch_h[key][i], flopsim_h[key][i]))
    return BytesComparison(spec_name, phase, torch_h, flopsim_h, mismatches)


def measure(spec, phase: str, batch: int, seq: int, context: Optional[int] = None, seed: int = 0,
            encoder_seq: Optional[int] = None):
    """The reference's kernels for one phase (inputs made outside the count). The train
    phase stops after the backward: the optimizer's update is checked on its own
    (`optimizer_bytes`), since count's op lists hold the model's ops only."""
    from flopsim.torchref.bytes_counter import count_bytes
    from flopsim.torchref.model import build_reference, prepare_phase

    model = build_reference(spec, seed=seed)
    run = prepare_phase(model, spec, phase, batch, seq, context, seed=seed, optimizer="none",
                        encoder_seq=encoder_seq)
    return build_kernels(count_bytes(run))


def compare_bytes(spec, phase: str, batch: int, seq: int, context: Optional[int] = None,
                  seed: int = 0, encoder_seq: Optional[int] = None) -> BytesComparison:
    from flopsim.count import count

    kernels = measure(spec, phase, batch, seq, context, seed, encoder_seq=encoder_seq)
    reference = spec.with_changes(dtype="fp32")  # the reference runs in fp32
    ops = count(reference, batch=batch, seq=seq, phase=phase, context=context, encoder_seq=encoder_seq).ops
    return compare(spec.name, phase, kernels, ops)


def optimizer_bytes(spec, seed: int = 0) -> tuple[int, int]:
    """(bytes torch's fused Adam step moves on the reference's parameters, the bytes
    flopsim's optimizer op states for them): the update after a backward, counted alone.
    Convention: aten's schema marks `_fused_adam_`'s gradients as mutable (they are
    unscaled in place when a grad scale is given), so the counter charges them a
    write, 4 bytes per fp32 parameter that the kernel does not write here; flopsim's
    28 bytes per parameter (flopsim.ops.optimizer) = the counter's 32 - 4."""
    import torch

    from flopsim.count import evaluate_ops
    from flopsim.ops.optimizer import optimizer_update
    from flopsim.torchref.bytes_counter import count_bytes
    from flopsim.torchref.model import build_reference, make_optimizer

    model = build_reference(spec, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    step = make_optimizer(model, "adam")
    step()  # the first step allocates the state
    measured = sum(k.bytes for k in build_kernels(count_bytes(step)) if not k.free)
    op = optimizer_update(sum(p.numel() for p in params), weight_bytes=4, layer=0)[0]
    return int(measured), int(evaluate_ops([op], {})[0].bytes)
