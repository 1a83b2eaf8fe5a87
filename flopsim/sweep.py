"""Sweeps: FLOPs, bytes and predicted time over whole grids of batch,
sequence, context and model dimensions, evaluated at once in numpy.

How: the phase's Op list is built once with the dimensions symbolic
(`phase_ops(spec, phase, symbolic=True)`); dimensions that are not varied
are substituted by the spec's values, the varied ones stay symbols (`c` for
mod capacity, `E` experts, `k` top_k, `d_ff`, ...); ops with identical
expressions (the same block repeated) are merged with a multiplicity; every
distinct expression is compiled once with sympy.lambdify and evaluated on
broadcast axes, so an op that depends on two of five varied axes costs a
two-dimensional array. The roofline (flopsim.roofline.roofline_time, the same
function `predict` uses) then runs per distinct op on the full grid.

Axes (`vary` keys):
- `batch` (B), `seq` (S), `context` (T). forward/train: T = S. prefill: T =
  context if given or varied, else T = S. decode: one new token per
  sequence; `seq` or `context` (not both) sets T, the KV-cache length.
- model dimensions, by the spec field (`capacity` / `mod.capacity`,
  `experts` / `moe.experts`, `top_k`, `d_expert`, `capacity_factor`,
  `block_size`, `d_lowrank`, `d_model`, `d_ff`, `heads`, `kv_heads`,
  `d_head`, `vocab`, ...) or the symbol (`c`, `E`, `k`, `N`, ...). Derived
  defaults follow the varied fields: d_head = d_model // heads and kv_heads =
  heads unless the spec sets them; d_expert = d_ff unless set.
- structural fields (`layers`, `mod.every`, `moe.every`, or a dimension
  whose value changes which ops exist, e.g. `shared_experts` from 0): one
  Op list per value, each evaluated the same way.
Each varied value is validated against the spec (a capacity above 1 is an
error naming the field); combinations are validated while there are at
most VALIDATE_COMBINATIONS of them.

Grid syntax (`parse_vary`): `NAME=START:STOP:STEP` (stop included),
`NAME=START:STOP:*FACTOR` (geometric), `NAME=V1,V2,...`.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import sympy as sp

from flopsim.errors import InputError, SpecError
from flopsim.roofline import executed_flops, fresh_pages_s, overlap_times, products_per_kernel, roofline_time

TOKEN_AXES = ("batch", "seq", "context")
# short names and dotted spec paths -> Dims names (flopsim.ops.symbols.SYMBOL_NAMES)
ALIASES = {
    "capacity": "mod_capacity", "mod.capacity": "mod_capacity",
    "mod.predictor_hidden": "mod_predictor_hidden",
    "experts": "experts", "moe.experts": "experts",
    "top_k": "top_k", "moe.top_k": "top_k",
    "d_expert": "d_expert", "moe.d_expert": "d_expert",
    "shared_experts": "shared_experts", "moe.shared_experts": "shared_experts",
    "capacity_factor": "capacity_factor", "moe.capacity_factor": "capacity_factor",
    "block_size": "block_size", "sparse_ff.block_size": "block_size",
    "d_lowrank": "d_lowrank", "sparse_ff.d_lowrank": "d_lowrank",
    "window": "window", "sliding_window.size": "window",
    "sparse_qkv": "sparse_qkv", "sparse_qkv.modules": "sparse_qkv",
    "conv_kernel": "conv_kernel", "sparse_qkv.conv_kernel": "conv_kernel",
    "length_reduction.predictor_hidden": "lr_predictor_hidden",
}
# Dims name -> (spec block or None, field) for validation through ModelSpec.with_changes
DIM_PATHS = {
    "mod_capacity": ("mod", "capacity"), "mod_predictor_hidden": ("mod", "predictor_hidden"),
    "experts": ("moe", "experts"), "top_k": ("moe", "top_k"), "d_expert": ("moe", "d_expert"),
    "shared_experts": ("moe", "shared_experts"), "capacity_factor": ("moe", "capacity_factor"),
    "block_size": ("sparse_ff", "block_size"), "d_lowrank": ("sparse_ff", "d_lowrank"),
    "sparse_qkv": ("sparse_qkv", "modules"), "conv_kernel": ("sparse_qkv", "conv_kernel"),
    "window": ("sliding_window", "size"),
    "lr_predictor_hidden": ("length_reduction", "predictor_hidden"),
    "dtype_bytes": None,  # follows `dtype`; not sweepable
}
REAL_DIMS = ("mod_capacity", "capacity_factor")
MAX_POINTS = 200_000_000
MAX_AXIS_VALUES = 10_000_000  # one axis's values (the grid's product is MAX_POINTS)
VALIDATE_COMBINATIONS = 4096
PARALLEL_MIN_POINTS = 200_000


# -- grid syntax ---------------------------------------------------------------
def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--vary {where!r}: {text!r} is not a number") from None


def _not_too_many(n, text: str) -> None:
    if n > MAX_AXIS_VALUES:
        raise InputError(f"--vary {text!r}: {n:.4g} values is too many (at most {MAX_AXIS_VALUES:,} per axis)")


def parse_vary(text: str) -> tuple[str, list]:
    """'capacity=0.05:1:0.05' -> ('capacity', [0.05, 0.1, ..., 1.0]); see the module docstring."""
    usage = "expected NAME=START:STOP:STEP, NAME=START:STOP:*FACTOR or NAME=V1,V2,..."
    if text.count("=") != 1:
        raise InputError(f"--vary {text!r}: {usage}")
    name, spec = (part.strip() for part in text.split("="))
    if not name or not spec:
        raise InputError(f"--vary {text!r}: {usage}")
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) != 3 or not all(parts):
            raise InputError(f"--vary {text!r}: {usage}")
        start, stop = _number(parts[0], text), _number(parts[1], text)
        if stop < start:
            raise InputError(f"--vary {text!r}: stop {parts[1]} is below start {parts[0]}")
        if parts[2].startswith("*"):
            factor = _number(parts[2][1:], text)
            if factor <= 1 or start <= 0:
                raise InputError(f"--vary {text!r}: a geometric grid needs START > 0 and FACTOR > 1")
            n = int(math.floor(math.log(stop / start) / math.log(factor) + 1e-9)) + 1
            _not_too_many(n, text)
            values = start * factor ** np.arange(n)
        else:
            step = _number(parts[2], text)
            if step <= 0:
                raise InputError(f"--vary {text!r}: STEP must be positive")
            n = math.floor((stop - start) / step + 1e-9) + 1
            _not_too_many(n, text)  # before any allocation
            values = start + step * np.arange(n)
        values = [float(v) for v in np.round(values, 12)]
    else:
        values = [_number(v.strip(), text) for v in spec.split(",") if v.strip()]
        if not values:
            raise InputError(f"--vary {text!r}: {usage}")
    return name, [int(v) if float(v).is_integer() else v for v in values]


def parse_varies(texts: Sequence[str]) -> dict[str, list]:
    out: dict[str, list] = {}
    for text in texts:
        name, values = parse_vary(text)
        if name in out:
            raise InputError(f"--vary {text!r}: {name} is varied twice")
        out[name] = values
    return out


# -- axes ----------------------------------------------------------------------
@dataclass(eq=False)
class _Axis:
    key: str  # as the user wrote it
    kind: str  # token | dim | structural
    target: str  # B/S/T, a Dims name, or a spec field path
    values: np.ndarray


def _dims_names(spec) -> list[str]:
    from flopsim.ops.symbols import Dims

    return [k for k in Dims.of(spec)._values if DIM_PATHS.get(k, ()) is not None]


def _spec_change(target: str, value, spec) -> dict:
    """The ModelSpec.with_changes argument setting a Dims name or a field path to value."""
    path = DIM_PATHS.get(target)
    if path is None and "." in target:
        path = tuple(target.split(".", 1))
    if path is None:
        return {target: value}
    block, name = path
    return {block: {name: value}}


def _resolve_axis(key: str, spec) -> tuple[str, str]:
    from flopsim.ops.symbols import SYMBOL_NAMES

    if key in TOKEN_AXES:
        return "token", key
    dims = _dims_names(spec)
    by_symbol = {v: k for k, v in SYMBOL_NAMES.items()}
    target = ALIASES.get(key, by_symbol.get(key, key))
    if target in dims:
        return "dim", target
    # a structural spec field (layers, mod.every, ...)
    block, _, name = key.rpartition(".")
    data = spec.model_dump()
    holder = data.get(block) if block else data
    if isinstance(holder, dict) and name in holder and isinstance(holder[name], (int, float)) \
            and not isinstance(holder[name], bool):
        return "structural", key
    names = ", ".join([*TOKEN_AXES, *sorted(set(dims) | {"layers"})])
    if target in DIM_PATHS and DIM_PATHS[target] is not None:
        block = DIM_PATHS[target][0]
        raise InputError(f"--vary {key!r}: {spec.name} ({spec.family}) has no '{block}' block; can vary {names}")
    raise InputError(f"--vary {key!r}: unknown axis; {spec.name} can vary {names}")


def _validate_values(axis: _Axis, spec, validate_alone: bool = True) -> None:
    integer = not (axis.kind == "dim" and axis.target in REAL_DIMS)
    for v in axis.values:
        if integer and not float(v).is_integer():
            raise InputError(f"--vary {axis.key!r}: {v!r} is not an integer")
        if axis.kind == "token" and v < 1:
            raise InputError(f"--vary {axis.key!r}: {v!r}: must be a positive integer")
    if axis.kind != "token" and validate_alone:
        for v in axis.values:
            value = int(v) if integer else float(v)
            try:
                spec.with_changes(**_spec_change(axis.target, value, spec))
            except SpecError as err:
                raise InputError(f"--vary {axis.key!r}: {err}") from None


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# -- the result ------------------------------------------------------------------
@dataclass
class SweepResult:
    """The grid (one point per combination of the axes' values, C order) and,
    per point, flops, bytes, time_s, bound, tokens_per_s and mfu."""

    spec: Any
    hw: Any
    phase: str
    axes: dict  # name -> 1-D numpy array of values
    grids: dict  # column -> numpy array shaped like the grid
    fixed: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple:
        return tuple(len(v) for v in self.axes.values())

    @property
    def points(self) -> int:
        return int(np.prod(self.shape)) if self.axes else 1

    def columns(self) -> dict[str, np.ndarray]:
        """Flat columns: every axis value, then the results, one entry per point."""
        shape = self.shape
        out = {}
        for i, (name, values) in enumerate(self.axes.items()):
            view = [1] * len(shape)
            view[i] = -1
            out[name] = np.broadcast_to(np.asarray(values).reshape(view), shape).ravel()
        for name, grid in self.grids.items():
            out[name] = np.broadcast_to(grid, shape).ravel()
        return out

    def table(self):
        """One row per grid point; FLOPs and bytes as integers where they are whole (counts, not
        measurements), which they are except at fractional expected values (MoD decode); the
        device and the calibration priced on (source and kind) in every row."""
        import pandas as pd

        frame = pd.DataFrame(self.columns())
        for name in ("flops", "bytes"):
            values = frame[name].to_numpy(dtype=float)
            if np.all(np.isfinite(values)) and np.all(values == np.round(values)) and np.all(values < 2 ** 63):
                frame[name] = values.astype(np.int64)
        for name in ("hardware", "calibration", "calibration_kind"):  # what every point was priced on
            if name in self.fixed:
                frame[name] = self.fixed[name]
        return frame

    def at(self, **point) -> dict:
        """The results at one grid point, e.g. `result.at(capacity=0.5, batch=8)`."""
        index = []
        for name, values in self.axes.items():
            if name not in point:
                raise InputError(f"at: give a value for {name}")
            hits = np.flatnonzero(np.isclose(np.asarray(values, dtype=float), float(point[name])))
            if not len(hits):
                raise InputError(f"at: {name}={point[name]} is not on the grid")
            index.append(int(hits[0]))
        return {k: np.broadcast_to(g, self.shape)[tuple(index)].item() for k, g in self.grids.items()}


# -- the sweep ----------------------------------------------------------------------
def sweep(spec, hw, *, phase: str = "forward", vary: dict[str, Sequence] | None = None, batch: int = 1,
          seq: int = 1024, context: Optional[int] = None, calibration=None, optimizer: str = "adam",
          threads: Optional[int] = None, progress=None) -> SweepResult:
    """Evaluate `phase` of `spec` on `hw` at every point of the grid `vary`
    (axis -> values; see the module docstring). Non-varied tokens come from
    batch/seq/context as in `predict`. `progress`: called as progress(done, total) over the
    spec variants a structural axis makes (one when none)."""
    from flopsim.calibration import load_calibration
    from flopsim.count import token_values
    from flopsim.families import check_phase
    from flopsim.hardware import load_hardware
    from flopsim.spec import load_model

    spec = load_model(spec)
    hw = load_hardware(hw)
    cal = load_calibration(calibration, hw)
    check_phase(spec, phase)
    vary = dict(vary or {})
    axes: list[_Axis] = []
    for key, values in vary.items():
        values = list(values)
        if not values:
            raise InputError(f"--vary {key!r}: no values")
        kind, target = _resolve_axis(key, spec)
        axis = _Axis(key, kind, target, np.asarray(values, dtype=float))
        if any(a.target == target for a in axes):
            raise InputError(f"--vary {key!r}: {target} is varied twice")
        axes.append(axis)
    spec_axes = [a for a in axes if a.kind != "token"]
    combinations = int(np.prod([len(a.values) for a in spec_axes])) if spec_axes else 0
    # each value alone, unless the combinations (which interact: d_model and heads) are checked below
    alone = len(spec_axes) < 2 or combinations > VALIDATE_COMBINATIONS
    for axis in axes:
        _validate_values(axis, spec, validate_alone=alone)
    points = int(np.prod([len(a.values) for a in axes])) if axes else 1
    if points > MAX_POINTS:
        raise InputError(f"--vary: {points} grid points is too many (at most {MAX_POINTS})")

    token_axes = {a.target: a for a in axes if a.kind == "token"}
    _check_tokens(spec, phase, token_axes, seq, context)
    # fixed token values, validated as predict validates them
    base_values = token_values(spec, phase, batch, seq, context)

    _validate_combinations(spec, spec_axes)
    _detect_structural(spec, phase, spec_axes, optimizer)

    structural = [a for a in axes if a.kind == "structural"]
    shape = tuple(len(a.values) for a in axes)
    grids = {name: np.zeros(shape) for name in ("flops", "bytes", "time_s", "compute_bound_s", "memory_bound_s")}
    combos = list(itertools.product(*[range(len(a.values)) for a in structural])) if structural else [()]
    for done, combo in enumerate(combos):
        if progress is not None:
            progress(done, len(combos))
        changes: dict = {}
        for axis, i in zip(structural, combo):
            value = axis.values[i]
            value = int(value) if float(value).is_integer() else float(value)
            changes = _merge(changes, _spec_change(axis.target, value, spec))
        variant = spec.with_changes(**changes) if changes else spec
        plan = _Plan(variant, phase, axes, base_values, hw, cal, optimizer, context_given=context is not None)
        index = tuple(slice(combo[structural.index(a)], combo[structural.index(a)] + 1) if a in structural
                      else slice(None) for a in axes)
        out = plan.evaluate(threads)
        for name in grids:
            grids[name][index] = np.broadcast_to(out[name], grids[name][index].shape)
    if progress is not None:
        progress(len(combos), len(combos))

    tokens = _tokens_grid(phase, axes, base_values)
    time_s = grids["time_s"]
    with np.errstate(divide="ignore", invalid="ignore"):
        grids["tokens_per_s"] = np.broadcast_to(tokens, shape) / time_s
        grids["mfu"] = grids["flops"] / (time_s * hw.peak_flops_per_s_for(spec.compute_dtype)[0])
    grids["bound"] = np.where(grids["compute_bound_s"] >= grids["memory_bound_s"], "compute", "memory")
    fixed = {"batch": batch, "seq": seq, "context": context, "phase": phase, "hardware": hw.name,
             "calibration": cal.source, "calibration_kind": cal.kind,
             "calibration_label": cal.provenance_label}
    return SweepResult(spec=spec, hw=hw, phase=phase, axes={a.key: _values_for_output(a) for a in axes},
                       grids=grids, fixed=fixed)


def _values_for_output(axis: _Axis) -> np.ndarray:
    if axis.kind == "dim" and axis.target in REAL_DIMS:
        return axis.values
    if all(float(v).is_integer() for v in axis.values):
        return axis.values.astype(np.int64)
    return axis.values


def _check_tokens(spec, phase, token_axes: dict, seq, context) -> None:
    if phase in ("forward", "train") and "context" in token_axes:
        raise InputError(f"--vary 'context': phase {phase} attends to its own tokens; vary seq")
    if phase == "decode" and "context" in token_axes and "seq" in token_axes:
        raise InputError("--vary: decode has one new token per sequence; vary context (the KV-cache length), not both")
    if spec.positions == "learned":
        for name in ("seq", "context"):
            if name in token_axes and token_axes[name].values.max() > spec.max_seq:
                raise InputError(f"--vary {name!r}: {int(token_axes[name].values.max())} exceeds max_seq "
                                 f"{spec.max_seq} of {spec.name} (learned positions)")
    if phase == "prefill" and "context" in token_axes:
        low = token_axes["seq"].values.max() if "seq" in token_axes else seq
        if token_axes["context"].values.min() < low:
            raise InputError(f"--vary 'context': must be at least seq ({int(low)})")
    if phase == "prefill" and "seq" in token_axes and "context" not in token_axes and context is not None:
        if token_axes["seq"].values.max() > context:
            raise InputError(f"--vary 'seq': {int(token_axes['seq'].values.max())} exceeds --context {context}")


def _op_keys(spec, phase, optimizer) -> tuple:
    from flopsim.predict import phase_ops

    return tuple(op.key for op in phase_ops(spec, phase, symbolic=True, optimizer=optimizer))


def _point_value(axis: _Axis, v):
    return float(v) if (axis.kind == "dim" and axis.target in REAL_DIMS) else (int(v) if float(v).is_integer() else float(v))


def _variant(spec, axis: _Axis, value, others: list):
    """A valid spec with `axis` at `value`, the other spec axes at the spec's
    values or, if that is invalid (d_model vs heads), at some grid value."""
    choices = [[None, *o.values] for o in others]
    for combo in itertools.islice(itertools.product(*choices), 512):
        changes = _spec_change(axis.target, _point_value(axis, value), spec)
        for other, v in zip(others, combo):
            if v is not None:
                changes = _merge(changes, _spec_change(other.target, _point_value(other, v), spec))
        try:
            return spec.with_changes(**changes)
        except SpecError:
            continue
    return None


def _detect_structural(spec, phase, spec_axes: list, optimizer) -> None:
    """Mark a varied dimension structural when its values change which ops exist."""
    dims = [a for a in spec_axes if a.kind == "dim"]
    if not dims:
        return
    base = _op_keys(spec, phase, optimizer)
    for axis in dims:
        others = [a for a in spec_axes if a is not axis]
        probes = sorted({axis.values.min(), axis.values.max(), float(np.median(axis.values))})
        for v in probes:
            variant = _variant(spec, axis, v, others)
            if variant is not None and _op_keys(variant, phase, optimizer) != base:
                axis.kind = "structural"
                break


def _validate_combinations(spec, spec_axes: list) -> None:
    if len(spec_axes) < 2:
        return
    n = int(np.prod([len(a.values) for a in spec_axes]))
    if n > VALIDATE_COMBINATIONS:
        return
    for combo in itertools.product(*[a.values for a in spec_axes]):
        changes: dict = {}
        for axis, v in zip(spec_axes, combo):
            changes = _merge(changes, _spec_change(axis.target, _point_value(axis, v), spec))
        try:
            spec.with_changes(**changes)
        except SpecError as err:
            point = ", ".join(f"{a.key}={v:g}" for a, v in zip(spec_axes, combo))
            raise InputError(f"--vary: the point {point} is not a valid model: {err}") from None


def _tokens_grid(phase, axes, base_values):
    from flopsim.ops.symbols import B, S

    def axis_array(name, default):
        for i, a in enumerate(axes):
            if a.kind == "token" and a.target == name:
                view = [1] * len(axes)
                view[i] = -1
                return a.values.reshape(view)
        return np.asarray(float(default))

    b = axis_array("batch", base_values[B])
    if phase == "decode":
        return b
    return b * axis_array("seq", base_values[S])


class _Plan:
    """One Op list with the varied dimensions symbolic, compiled for numpy."""

    def __init__(self, spec, phase, axes, base_values, hw, cal, optimizer, context_given: bool):
        from flopsim.numeric import compile_exprs
        from flopsim.ops.symbols import Dims, symbol
        from flopsim.predict import phase_ops
        from flopsim.roofline import op_peak_flops_per_s

        self.hw, self.cal, self.axes = hw, cal, axes
        self.train = phase == "train"  # a train step's ops are priced as one runs them (calibration step 8)
        ops = phase_ops(spec, phase, symbolic=True, optimizer=optimizer)
        dims = Dims.of(spec)
        varied = {a.target for a in axes if a.kind == "dim"}
        subs: dict = {sym: value for sym, value in dims.substitutions().items()
                      if sym not in {symbol(k) for k in varied}}
        # derived defaults follow the varied fields
        set_fields = spec.model_fields_set
        if varied & {"d_model", "heads"} and "d_head" not in set_fields:
            subs[symbol("d_head")] = sp.floor(symbol("d_model") / symbol("heads"))
        if "heads" in varied and "kv_heads" not in set_fields:
            subs[symbol("kv_heads")] = symbol("heads")
        if "d_ff" in varied and spec.moe is not None and spec.moe.d_expert is None:
            subs[symbol("d_expert")] = symbol("d_ff")
        args, self.arg_axes = [], []
        for i, a in enumerate(axes):
            if a.kind == "dim":
                args.append(symbol(a.target))
                self.arg_axes.append(i)
        self._token_arguments(phase, axes, base_values, context_given, args, subs)
        self.args = args

        # merge identical ops
        groups: dict = {}
        order = []  # each op's group, in execution order (the host-device pipeline needs it)
        for op in ops:
            shape_aware = op.gemm is not None and cal.uses_gemm_shape(op.kind)
            gemm = tuple(_sub(g, subs) for g in op.gemm) if shape_aware else None
            key = (op.kind, op.variant, _sub(op.flops, subs), _sub(executed_flops(op), subs), _sub(op.bytes, subs), gemm,
                   _sub(op.kernels, subs), op.pass_ == "bwd", op.host_sync, _sub(op.act_write_bytes, subs),
                   bool(op.tags.get("in_place")))
            groups[key] = groups.get(key, 0) + 1
            order.append(key)
        self.groups = list(groups.items())
        position = {key: i for i, (key, _) in enumerate(self.groups)}
        self.sequence = [position[key] for key in order]
        exprs: list = []
        index: dict = {}

        def ref(e):
            if e not in index:
                index[e] = len(exprs)
                exprs.append(e)
            return index[e]

        self.items = []
        for (kind, variant, flops, executed, nbytes, gemm, kernels, backward, host_sync, written, in_place), mult \
                in self.groups:
            self.items.append(dict(
                kind=kind, variant=variant, mult=mult, peak=op_peak_flops_per_s(kind, hw, spec.compute_dtype),
                flops=ref(flops), executed_flops=ref(executed), bytes=ref(nbytes), kernels=ref(kernels),
                gemm=tuple(ref(g) for g in gemm) if gemm is not None else None,
                never_empty=bool((executed + nbytes).is_positive),
                fixed_s=cal.fixed_cost_s(kind, variant, hw, backward), backward=backward,
                host_s=cal.host_cost_s(kind, variant, backward), host_sync=host_sync,
                written=ref(written), in_place=in_place,
            ))
        self.queued = any(item["host_s"] for item in self.items)
        self.total_flops = ref(sp.Add(*[mult * key[2] for key, mult in self.groups]))
        self.total_bytes = ref(sp.Add(*[mult * key[4] for key, mult in self.groups]))
        self.fn = compile_exprs(exprs, args)

    def _token_arguments(self, phase, axes, base_values, context_given: bool, args: list, subs: dict) -> None:
        """The varied token axes as arguments (appended to `args`, their axes to arg_axes);
        the others substituted with their base values; T following S, S_enc following a
        varied seq (its default)."""
        from flopsim.ops.symbols import B, S, S_enc, T

        token_axis = {a.target: a for a in axes if a.kind == "token"}
        sym_for = {"batch": B, "seq": S, "context": T}
        seq_varied = "seq" in token_axis
        if phase == "decode" and "seq" in token_axis:  # decode: seq sets the KV-cache length
            token_axis["context"] = token_axis.pop("seq")
        for name, a in token_axis.items():
            args.append(sym_for[name])
            self.arg_axes.append(axes.index(a))
        for name, sym in sym_for.items():
            if name not in token_axis:
                subs[sym] = sp.Integer(int(base_values[sym]))
        # T follows S in forward/train, and in prefill unless a context is given or varied
        if phase in ("forward", "train") or (phase == "prefill" and "context" not in token_axis
                                             and not context_given):
            subs[T] = S if S in args else subs[S]
        if S_enc in base_values:
            subs[S_enc] = ((T if phase == "decode" else S) if seq_varied
                           else sp.Integer(int(base_values[S_enc])))
        if phase == "decode":
            subs[S] = sp.Integer(1)

    def _arrays(self, chunk: Optional[tuple] = None) -> list:
        n = len(self.axes)
        out = []
        for sym, i in zip(self.args, self.arg_axes):
            values = self.axes[i].values
            if chunk is not None and chunk[0] == i:
                values = values[chunk[1]]
            view = [1] * n
            view[i] = -1
            out.append(values.reshape(view))
        return out

    def _run(self, chunk: Optional[tuple] = None) -> dict:
        """Totals over the ops. FLOPs and bytes are linear, so their totals are
        single compiled expressions; the roofline is per op. Partial sums are
        kept per broadcast shape (an op that depends on two of five axes adds
        into a two-dimensional sum) and combined once at the end; the op's
        multiplicity is folded into the roofline's scalars (mult * max(c, m)
        = max(mult * c, mult * m))."""
        values = self.fn(*self._arrays(chunk))
        bw = self.hw.memory_bandwidth_bytes_per_s
        roof: dict[tuple, Any] = {}  # shape -> sum of mult * max(compute_s, memory_s)
        cbound: dict[tuple, Any] = {}  # shape -> the same over compute-bound ops
        launch: Any = 0.0
        host, device = [], []  # one op of each group (the pipeline, when the device queues kernels)

        def accumulate(sums, t, owned):
            key = np.shape(t)
            if key not in sums:
                sums[key] = t if owned or not key else np.array(t, dtype=float)
            elif key:
                sums[key] += t
            else:
                sums[key] = sums[key] + t

        for item in self.items:
            af, by = values[item["executed_flops"]], values[item["bytes"]]
            gemm = tuple(values[g] for g in item["gemm"]) if item["gemm"] is not None else None
            per_kernel = products_per_kernel(gemm, values[item["kernels"]])
            ce, me = self.cal.efficiency(item["kind"], gemm, by, item["variant"], item["backward"], per_kernel, af,
                                         self.train)
            mult = item["mult"]
            # the roofline (flopsim.roofline.roofline_time) with the multiplicity folded in
            c, m, t = roofline_time(af, by, item["peak"] / mult, bw / mult, ce, me, 0.0)
            busy = t / mult if self.queued else None  # one op's max(compute_s, memory_s)
            accumulate(roof, t, owned=False)
            mask = c >= m
            if np.ndim(mask) == 0 or mask.all():
                if bool(np.all(mask)):
                    accumulate(cbound, t, owned=False)
            elif mask.any():
                t = t * mask
                accumulate(cbound, t, owned=True)
            launched = values[item["kernels"]] * (1.0 if item["never_empty"] else (np.add(af, by) > 0))
            fresh = fresh_pages_s(values[item["written"]], values[item["kernels"]], item["in_place"], self.cal.fresh_pages)
            launch = launch + mult * (item["fixed_s"] * launched + fresh)  # fixed cost x launches, fresh pages
            if self.queued:
                host.append(item["host_s"] * launched)
                device.append(busy + item["fixed_s"] * launched + fresh)
        roofline_s = sum(roof.values(), 0.0)
        compute_bound = sum(cbound.values(), 0.0)
        time_s = roofline_s + launch
        if self.queued:  # the host-device pipeline over the ops in order (flopsim.roofline.overlap_times)
            time_s = sum(overlap_times([host[i] for i in self.sequence], [device[i] for i in self.sequence],
                                       [self.items[i]["host_sync"] for i in self.sequence]))
        return {"time_s": time_s, "compute_bound_s": compute_bound,
                "memory_bound_s": roofline_s - compute_bound,
                "flops": values[self.total_flops], "bytes": values[self.total_bytes]}

    def evaluate(self, threads: Optional[int] = None) -> dict:
        points = int(np.prod([len(self.axes[i].values) for i in self.arg_axes])) if self.arg_axes else 1
        threads = threads or min(os.cpu_count() or 1, 8)
        if threads <= 1 or points < PARALLEL_MIN_POINTS or not self.arg_axes:
            return self._run()
        # split the longest varied axis into chunks evaluated in threads (numpy releases the GIL)
        i = max(self.arg_axes, key=lambda j: len(self.axes[j].values))
        n = len(self.axes[i].values)
        if n < 2:
            return self._run()
        bounds = np.linspace(0, n, min(threads, n) + 1).astype(int)
        chunks = [(i, slice(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(chunks)) as pool:
            parts = list(pool.map(self._run, chunks))
        shape = [1] * len(self.axes)
        for j in self.arg_axes:
            shape[j] = len(self.axes[j].values)
        out = {}
        for name in parts[0]:
            pieces = []
            for (_, sl), part in zip(chunks, parts):
                piece_shape = list(shape)
                piece_shape[i] = sl.stop - sl.start
                pieces.append(np.broadcast_to(part[name], piece_shape))
            out[name] = np.concatenate(pieces, axis=i)
        return out


def _sub(expr, subs):
    expr = sp.sympify(expr).xreplace(subs)
    return expr

