"""`flopsim report`: a self-contained report comparing model specs on one
device -- a markdown file (README.md, so that a code host renders the
folder) with the headline table, figures embedded by relative path, the
assumptions and the command that regenerates it.

    import flopsim.report
    path = flopsim.report.build_report(["decoder-220m", "decoder-220m-mod"], "h100-sxm",
                                       out_dir="reports/mod")

Comparison groups. A conditional model is only worth comparing with its own
dense baseline: the same trunk with the routing removed (MoD with every
token, MoE with one dense FFN of width d_ff, sparse FF with the dense FF,
length reduction keeping every token; attention_impl back to fused unless
T5's relative position bias needs the explicit scores). With
`group="auto"` (the default) the specs are grouped by that trunk: a dense
spec given on the command line is the baseline of the conditional specs
that share its trunk; a conditional spec without one gets a derived
baseline (a shipped preset with that trunk when there is one, e.g. st-800m,
else `<name>-dense`). Each group gets its own figures and its own speedups.
`group="first"` puts every spec in one group with the first as baseline
(what `flopsim compare` does).

Per group (figures in flopsim.plots, matplotlib imported lazily):
1. roofline: every op by arithmetic intensity (all_flops / bytes) and
   achieved FLOP/s (all_flops / predicted time), one panel per phase;
2. speedup vs knob: predicted time speedup and FLOP speedup over the
   baseline as each conditional spec's knob varies (flopsim.sweep grids;
   length reduction by predict loops over kept-fraction schedules);
3. memory: weights, gradients, optimizer state, activations and KV cache
   for a training and a serving step, with the device's capacity.
Then 4. isoFLOP curves (flopsim.scaling) for the families present.

Shapes: every phase uses --batch; train/forward/prefill use --seq tokens
per sequence; decode appends one token per sequence to a KV cache of
--context tokens (default --seq); prefill attends to --context keys when it
is given. A group whose model has learned positions with max_seq below
--seq runs at max_seq (stated in the report). Encoders (and cls heads) have
no prefill or decode: their groups run `forward` instead.

The output folder is built in a temporary sibling folder and renamed into
place, so a reader never sees half a report; an existing folder is only
replaced when it is empty or an earlier flopsim report (it holds
MARKER_FILE).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from flopsim.errors import InputError, bad_value
from flopsim.outputs import remove_stale, temp_prefix

DEFAULT_PHASES = ("train", "prefill", "decode")
DEFAULT_BUDGETS = (6e18, 2e19, 1e20)  # Raposo et al. 2024's isoFLOP budgets
DEFAULT_BATCH = 8
DEFAULT_SEQ = 2048
FIGURE_FORMATS = ("png", "svg")
GROUPINGS = ("auto", "first")
MARKER_FILE = ".flopsim-report"
REPORT_FILE = "README.md"
PAGE_FILE = "index.html"
SUMMARY_FILE = "summary.csv"
CONDITIONAL_BLOCKS = ("mod", "moe", "mode", "sparse_ff", "length_reduction", "sparse_qkv")
# families the scaling laws can place on isoFLOP curves
ISOFLOP_FAMILIES = {"mod": ("mod",), "moe": ("moe",), "mode": ("mod", "moe")}


# -- formatting (the markdown table and the tests use the same functions) ---------
def fmt_si(value: float, unit: str = "") -> str:
    """4 significant digits with an SI prefix: 2.414e9 -> '2.414 G' + unit."""
    from flopsim.units import human

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return human(float(value), unit)


def fmt_time(seconds: float) -> str:
    from flopsim.units import human_time

    return human_time(float(seconds))


def fmt_ratio(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}x"


def fmt_pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def fmt_gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "report"


# -- comparison groups -----------------------------------------------------------
def dense_baseline(spec, name: Optional[str] = None):
    """The dense model with `spec`'s trunk: the conditional block removed,
    family dense, fused attention where the positions allow (see the module docstring)."""
    from flopsim.spec.loader import validate
    from flopsim.spec.model import ModelSpec

    data = spec.model_dump(exclude_unset=True)
    for block in CONDITIONAL_BLOCKS:
        data.pop(block, None)
    if data.get("positions") != "relative":  # T5's bias is added to explicit scores: kept
        data.pop("attention_impl", None)
    data["family"] = "dense"
    data["name"] = name or (spec.name if spec.family == "dense" else f"{spec.name}-dense")
    return validate(ModelSpec, data, data["name"])


def is_baseline(spec) -> bool:
    """A dense spec with nothing of CONDITIONAL_BLOCKS (sparse QKV too makes a variant)."""
    return spec.family == "dense" and all(getattr(spec, b, None) is None for b in CONDITIONAL_BLOCKS)


def trunk_key(spec) -> str:
    """Specs with equal keys share a dense trunk."""
    data = dense_baseline(spec).model_dump()
    data.pop("name")
    return json.dumps(data, sort_keys=True)


@lru_cache(maxsize=1)
def _preset_trunks() -> dict:
    """trunk key -> the first dense preset with that trunk."""
    from flopsim.errors import FlopsimError
    from flopsim.spec import load_model
    from flopsim.spec.paths import preset_names

    out = {}
    for name in preset_names("models"):
        try:
            spec = load_model(name)
        except FlopsimError:
            continue
        if spec.family == "dense":
            out.setdefault(trunk_key(spec), name)
    return out


@dataclass
class KnobSweep:
    """One conditional spec's knob against its group's baseline, per phase."""

    spec: Any
    knob: str  # capacity | top_k | experts | block_size | keep
    label: str  # x-axis label
    x: list
    preset_x: float
    log_x: bool
    time_s: dict = field(default_factory=dict)  # phase -> list of seconds
    flops: dict = field(default_factory=dict)  # phase -> list of FLOPs


@dataclass
class Group:
    """Specs compared with one dense baseline (the first spec)."""

    specs: list  # ModelSpecs, the baseline first
    derived: Optional[str] = None  # how the baseline was obtained, when not given
    phases: list = field(default_factory=list)
    seq: int = DEFAULT_SEQ
    context: Optional[int] = None
    notes: list = field(default_factory=list)
    results: dict = field(default_factory=dict)  # (phase, name) -> PredictResult
    memory: dict = field(default_factory=dict)  # (setting, name) -> MemoryResult
    knobs: list = field(default_factory=list)  # KnobSweep
    figures: dict = field(default_factory=dict)  # kind -> [relative paths]
    pages: dict = field(default_factory=dict)  # kind -> interactive (plotly) figure for the page
    batch_sweep: dict = field(default_factory=dict)  # spec name -> serving throughput against the batch
    slug: str = ""
    batch: int = DEFAULT_BATCH

    @property
    def baseline(self):
        return self.specs[0]

    @property
    def title(self) -> str:
        others = [s.name for s in self.specs[1:]]
        return f"{', '.join(others)} vs {self.baseline.name}" if others else self.baseline.name

    def context_for(self, phase: str) -> Optional[int]:
        return None if phase in ("train", "forward") else self.context

    def shape(self, phase: str) -> str:
        if phase == "decode":
            return f"B={self.batch} T={self.context or self.seq}"
        if phase == "prefill" and self.context and self.context != self.seq:
            return f"B={self.batch} S={self.seq} T={self.context}"
        return f"B={self.batch} S={self.seq}"


def group_specs(specs: Sequence, mode: str = "auto") -> list[Group]:
    """Comparison groups (see the module docstring)."""
    if mode not in GROUPINGS:
        raise bad_value("group", mode, f"expected one of {', '.join(GROUPINGS)}")
    seen = set()
    for s in specs:
        if s.name in seen:
            raise bad_value("spec", s.name, "given twice")
        seen.add(s.name)
    if mode == "first":
        return [Group(specs=list(specs))]
    groups: dict[str, Group] = {}
    for s in specs:
        key = trunk_key(s)
        g = groups.get(key)
        if g is None:
            if is_baseline(s):
                groups[key] = Group(specs=[s])
            else:
                preset = _preset_trunks().get(key)
                if preset is not None and preset not in seen:
                    base = dense_baseline(s, name=preset)
                    how = f"the shipped preset {preset}, whose trunk {s.name} shares (not given on the command line)"
                else:
                    base = dense_baseline(s)
                    how = (f"derived from {s.name}: the same trunk with its {s.family} block removed "
                           f"(not a preset)")
                groups[key] = Group(specs=[base, s], derived=how)
        elif is_baseline(s) and g.derived is not None:
            g.specs[0], g.derived = s, None  # the user's own baseline replaces a derived one
        else:
            g.specs.append(s)
    return list(groups.values())


def _phases_for(group: Group, phases: Sequence[str]) -> list[str]:
    from flopsim.errors import FlopsimError
    from flopsim.families import check_phase

    out: list[str] = []
    replaced: list[str] = []
    encoders: list[str] = []
    for p in phases:
        chosen = p
        for s in group.specs:
            try:
                check_phase(s, p)
            except FlopsimError:
                if p not in ("prefill", "decode"):
                    raise
                chosen = "forward"
                if s.name not in encoders:
                    encoders.append(s.name)
        if chosen != p:
            replaced.append(p)
        if chosen not in out:
            out.append(chosen)
    if replaced:
        group.notes.append(f"{', '.join(encoders)} {'is an encoder or has' if len(encoders) == 1 else 'are encoders or have'}"
                           f" a cls head: {' and '.join(replaced)} {'is' if len(replaced) == 1 else 'are'} replaced "
                           f"by forward (the whole sequence) for {'this group' if len(group.specs) > 1 else 'it'}")
    return out


def _clamp_shapes(group: Group, seq: int, context: Optional[int]) -> None:
    learned = [s.max_seq for s in group.specs if s.positions == "learned"]
    limit = min(learned) if learned else None
    group.seq, group.context = seq, context
    if limit is not None and seq > limit:
        group.seq = limit
        group.notes.append(f"--seq {seq} exceeds max_seq {limit} (learned positions): this group runs at S={limit}")
    if limit is not None and context is not None and context > limit:
        group.context = limit
        group.notes.append(f"--context {context} exceeds max_seq {limit}: this group uses T={limit}")
    if group.context is not None and group.context < group.seq and "prefill" in group.phases:
        raise bad_value("context", context, f"must be at least seq ({group.seq}) for prefill")


# -- knobs -----------------------------------------------------------------------------
def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, v = [], 1
    while v <= hi:
        if v >= lo:
            out.append(v)
        v *= 2
    return out


def keep_schedule(keep: Sequence[float], power: float) -> list:
    """The fractions keep[l] ** power (power 0: every token, 1: the spec's own)."""
    base = [float(k) / float(keep[0]) for k in keep]  # counts -> fractions of the first layer's tokens
    out = [1] + [min(1.0, max(1e-6, b ** power)) for b in base[1:]]
    for i in range(1, len(out)):  # keep non-increasing after rounding
        out[i] = min(out[i], out[i - 1])
    return out


KEEP_POWERS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def knob_plan(spec) -> list[tuple[str, str, list, float, bool]]:
    """(knob, x label, values, the spec's value, log x) for each knob of `spec`."""
    out = []
    if spec.mod is not None:
        c = spec.mod.capacity
        values = sorted({0.03125, 0.0625, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, c})
        out.append(("capacity", "MoD capacity (fraction of tokens a routed block runs)", values, c, False))
    if spec.moe is not None:
        m = spec.moe
        top = list(range(1, min(m.experts, max(8, 2 * m.top_k)) + 1))
        out.append(("top_k", "MoE top-k (experts per token)", sorted(set(top) | {m.top_k}), m.top_k, False))
        experts = _powers_of_two(max(2, m.top_k), max(64, 4 * m.experts))
        out.append(("experts", f"MoE experts (top-{m.top_k}, d_expert {m.d_expert or spec.d_ff})",
                    sorted(set(experts) | {m.experts}), m.experts, True))
    if spec.sparse_ff is not None:
        b = spec.sparse_ff.block_size
        values = [v for v in _powers_of_two(1, 256) if spec.d_ff % v == 0]
        out.append(("block_size", "sparse FF block size N (one active unit per N)", sorted(set(values) | {b}), b,
                    True))
    if spec.length_reduction is not None:
        keep = spec.length_reduction.keep
        xs = [sum(keep_schedule(keep, p)) / len(keep) for p in KEEP_POWERS]
        out.append(("keep", "mean fraction of tokens kept per layer (spec's schedule ** p)", xs,
                    sum(keep_schedule(keep, 1.0)) / len(keep), False))
    return out


def _run_knob(group: Group, spec, knob: str, label: str, values: list, preset: float, log_x: bool, hw, cal,
              optimizer: str) -> KnobSweep:
    from flopsim.predict import predict
    from flopsim.sweep import sweep

    ks = KnobSweep(spec=spec, knob=knob, label=label, x=list(values), preset_x=preset, log_x=log_x)
    for phase in group.phases:
        ctx = group.context_for(phase)
        if knob == "keep":
            times, flops = [], []
            for p in KEEP_POWERS:
                variant = spec.with_changes(length_reduction={"keep": keep_schedule(spec.length_reduction.keep, p)})
                r = predict(variant, hw, phase=phase, batch=group.batch, seq=group.seq, context=ctx,
                            calibration=cal, optimizer=optimizer)
                times.append(r.time_s)
                flops.append(r.flops)
        else:
            r = sweep(spec, hw, phase=phase, vary={knob: values}, batch=group.batch, seq=group.seq, context=ctx,
                      calibration=cal, optimizer=optimizer)
            times = [float(v) for v in r.grids["time_s"]]
            flops = [float(v) for v in r.grids["flops"]]
        ks.time_s[phase], ks.flops[phase] = times, flops
    return ks


# -- the report ------------------------------------------------------------------------
@dataclass
class Report:
    """Everything the markdown and the figures are made of."""

    hw: Any
    calibration: Any
    groups: list
    batch: int
    seq: int
    context: Optional[int]
    phases: list
    optimizer: str
    budgets: list
    formats: list
    command: str
    isoflop: list = field(default_factory=list)  # (law, IsoflopResult, relative path) tuples
    isoflop_notes: list = field(default_factory=list)
    isoflop_times: dict = field(default_factory=dict)  # law -> isoflop_times(...)
    styles: dict = field(default_factory=dict)  # spec name -> {"color", "marker"}
    path: Optional[Path] = None  # the markdown file, once written
    given: list = field(default_factory=list)  # the spec names as given
    parallel: dict = field(default_factory=dict)  # the layout of the headline and roofline (flopsim.parallel)

    def layout(self, spec, phase: str):
        """The flopsim.parallel.Layout `spec` runs `phase` on (None: one GPU): the training-only
        degrees (dp, zero, recompute) apply to train, context parallelism not to decode."""
        if not self.parallel:
            return None
        from flopsim.parallel.layout import make_layout

        keep = {k: v for k, v in self.parallel.items()
                if phase == "train" or k not in ("dp", "zero", "recompute") and not (k == "cp" and phase == "decode")}
        return make_layout(spec, phase, gpus_per_node=self.hw.scale_up_domain, torus_axis=self.hw.torus_axis, **keep)

    def rows(self) -> list[dict]:
        """The headline table: one row per group, phase and spec."""
        out = []
        for gi, g in enumerate(self.groups):
            for phase in g.phases:
                base = g.results[(phase, g.baseline.name)]
                for s in g.specs:
                    r = g.results[(phase, s.name)]
                    mem = g.memory.get(("train", s.name))
                    out.append({
                        "group": gi + 1, "baseline": g.baseline.name, "spec": s.name, "family": s.family,
                        "params": mem.params if mem is not None else None, "phase": phase,
                        "batch": r.batch, "seq": 1 if phase == "decode" else r.seq, "context": r.context,
                        "flops": r.flops, "flops_per_token": r.flops / r.tokens, "time_s": r.time_s,
                        "tokens_per_s": r.tokens_per_s,
                        "speedup": base.time_s / r.time_s if r.time_s > 0 else float("inf"),
                        "flop_speedup": base.flops / r.flops if r.flops else float("nan"),
                        "bound": r.bound, "mfu": r.mfu,
                        "memory_bound_share": r.memory_bound_s / r.time_s if r.time_s > 0 else 0.0,
                    })
        return out


def command_line(specs, hardware, *, phases, batch, seq, context, calibration, optimizer, budgets, group,
                 formats, out_dir, parallel: Optional[dict] = None) -> str:
    parts = ["flopsim", "report", *[str(s) for s in specs], "--hardware", str(hardware)]
    for key, value in (parallel or {}).items():
        if value not in (0, 1, "none", None):  # the defaults: one GPU
            parts += [f"--{key}", str(value)]
    if list(phases) != list(DEFAULT_PHASES):
        for p in phases:
            parts += ["--phase", p]
    parts += ["--batch", str(batch), "--seq", str(seq)]
    if context is not None:
        parts += ["--context", str(context)]
    if calibration not in (None, "auto"):
        parts += ["--calibration", str(calibration)]
    if optimizer != "adam":
        parts += ["--optimizer", optimizer]
    if list(budgets) != list(DEFAULT_BUDGETS):
        for b in budgets:
            parts += ["--budget", f"{b:g}"]
    if group != "auto":
        parts += ["--group", group]
    if list(formats) != ["png"]:
        parts += ["--figures", "both" if len(formats) == 2 else formats[0]]
    parts += ["--out", str(out_dir)]
    return " ".join(shlex.quote(p) for p in parts)


def default_out_dir(spec_names: Sequence[str], hw_name: str) -> Path:
    name = slug("-vs-".join(spec_names) + f"-{hw_name}")
    if len(name) > 80:
        import hashlib

        name = f"{slug(spec_names[0])}-and-{len(spec_names) - 1}-more-{slug(hw_name)}-" \
               f"{hashlib.sha1(name.encode()).hexdigest()[:6]}"
    return Path("reports") / name


def _check_out_dir(out_dir: Path) -> None:
    from flopsim.outputs import check_output_folder

    check_output_folder(out_dir, "out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER_FILE).exists():
        raise bad_value("out", str(out_dir), f"exists, is not empty and is not a flopsim report "
                                             f"(no {MARKER_FILE}); choose another --out")


def _formats(figures) -> list[str]:
    if isinstance(figures, str):
        figures = ["png", "svg"] if figures == "both" else [figures]
    figures = list(dict.fromkeys(figures))
    for f in figures:
        if f not in FIGURE_FORMATS:
            raise bad_value("figures", f, "expected png, svg or both")
    if not figures:
        raise bad_value("figures", figures, "expected png, svg or both")
    return figures


def build_report(specs: Sequence, hw, *, phases: Optional[Sequence[str]] = None, batch: int = DEFAULT_BATCH,
                 seq: int = DEFAULT_SEQ, context: Optional[int] = None, calibration=None, optimizer: str = "adam",
                 budgets: Optional[Sequence[float]] = None, group: str = "auto", figures="png",
                 out_dir=None, command: Optional[str] = None,
                 progress: Optional[Callable[[int, int, str], None]] = None, parallel: Optional[dict] = None) -> Path:
    """Write a report comparing `specs` (ModelSpecs, paths or preset names) on
    `hw` into `out_dir` (default reports/<specs>-<hardware>/) and return the
    markdown file's path. `figures`: png | svg | both (or a list);
    `progress(done, total, description)` is called before each step and at the end.
    `parallel`: a layout ({tp, pp, dp, ep, cp, zero, recompute}) for the headline and the
    roofline, whose collectives then appear as ops (flopsim.parallel)."""
    return make_report(specs, hw, phases=phases, batch=batch, seq=seq, context=context, calibration=calibration,
                       optimizer=optimizer, budgets=budgets, group=group, figures=figures, out_dir=out_dir,
                       command=command, progress=progress, parallel=parallel).path


def make_report(specs: Sequence, hw, *, phases: Optional[Sequence[str]] = None, batch: int = DEFAULT_BATCH,
                seq: int = DEFAULT_SEQ, context: Optional[int] = None, calibration=None, optimizer: str = "adam",
                budgets: Optional[Sequence[float]] = None, group: str = "auto", figures="png",
                out_dir=None, command: Optional[str] = None,
                progress: Optional[Callable[[int, int, str], None]] = None, parallel: Optional[dict] = None) -> "Report":
    """`build_report`, returning the Report (its `.rows()` and `.path`)."""
    from flopsim.calibration import load_calibration
    from flopsim.count import token_values
    from flopsim.hardware import load_hardware
    from flopsim.spec import load_model

    if not specs:
        raise InputError("report: give at least one spec")
    given = [str(s) if not hasattr(s, "name") else s.name for s in specs]
    models = [load_model(s) for s in specs]
    hw_spec = load_hardware(hw)
    cal = load_calibration(calibration, hw_spec)
    formats = _formats(figures)
    phases, budgets = _checked_args(phases, budgets, batch, seq, context)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir([m.name for m in models], hw_spec.name)
    _check_out_dir(out_dir)

    groups = group_specs(models, group)
    for i, g in enumerate(groups):
        g.batch = batch
        g.phases = _phases_for(g, phases)
        _clamp_shapes(g, seq, context)
        g.slug = f"{i + 1}-{slug(g.specs[-1].name)}"
        for p in g.phases:  # validate every shape before any work
            for s in g.specs:
                token_values(s, p, batch, g.seq, g.context_for(p))

    rep = Report(hw=hw_spec, calibration=cal, groups=groups, batch=batch, seq=seq, context=context,
                 phases=phases, optimizer=optimizer, budgets=budgets, formats=formats,
                 command=command or command_line(given, hw if isinstance(hw, str) else hw_spec.name, phases=phases,
                                                 batch=batch, seq=seq, context=context,
                                                 calibration=calibration, optimizer=optimizer, budgets=budgets,
                                                 group=group, formats=formats, out_dir=out_dir,
                                                 parallel=parallel),
                 parallel={k: v for k, v in (parallel or {}).items() if v not in (1, 0, "none", None)})
    for g in groups:  # every layout checked before any work
        for p in g.phases:
            for s in g.specs:
                rep.layout(s, p)
    rep.styles = _styles(groups)
    rep.given = [m.name for m in models]

    steps: list[tuple[str, Callable[[Path], None]]] = []
    for g in groups:
        steps.append((f"predict {g.title}", lambda tmp, g=g: _predict_group(rep, g)))
        steps.append((f"memory {g.title}", lambda tmp, g=g: _memory_group(rep, g)))
        steps.append((f"batch sweep {g.title}", lambda tmp, g=g: _batch_sweep(rep, g)))
        for s in g.specs[1:]:
            for knob in knob_plan(s):
                steps.append((f"sweep {s.name} {knob[0]}",
                              lambda tmp, g=g, s=s, knob=knob: g.knobs.append(
                                  _run_knob(g, s, *knob, hw_spec, cal, optimizer))))
        steps.append((f"figures {g.title}", lambda tmp, g=g: _group_figures(rep, g, tmp)))
    steps.append(("isoFLOP curves", lambda tmp: _isoflop(rep, models, tmp)))
    steps.append(("markdown and page", lambda tmp: _write_documents(rep, tmp)))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir), suffix=".tmp", dir=out_dir.parent))
    try:
        total = len(steps)
        for i, (description, step) in enumerate(steps):
            if progress is not None:
                progress(i, total, description)
            step(tmp)
        if progress is not None:
            progress(total, total, "done")
        (tmp / MARKER_FILE).write_text("written by flopsim report; this folder is replaced when regenerated\n")
        _make_readable(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rep.path = out_dir / REPORT_FILE
    return rep


def _checked_args(phases, budgets, batch, seq, context) -> tuple[list, list]:
    """The phases and budgets to use (defaults filled in), each argument checked: one error line if bad."""
    from flopsim.families import PHASES

    phases = list(phases or DEFAULT_PHASES)
    if not phases:
        raise InputError("phase: give at least one phase")
    for p in phases:
        if p not in PHASES:
            raise bad_value("phase", p, f"expected one of {', '.join(PHASES)}")
    budgets = [float(b) for b in (budgets or DEFAULT_BUDGETS)]
    for b in budgets:
        if not (math.isfinite(b) and b > 0):
            raise bad_value("budget", b, "must be a positive number of FLOPs")
    for name, value in (("batch", batch), ("seq", seq), ("context", context)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise bad_value(name, value, "must be a positive integer")
    return phases, budgets


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give it (and its files) the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _replace_dir(new: Path, out_dir: Path) -> None:
    """Put `new` at `out_dir`: a rename, with the old report moved aside first."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir), suffix=".old", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
    try:
        os.replace(new, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- steps -----------------------------------------------------------------------------
def _predict_group(rep: Report, g: Group) -> None:
    from flopsim.predict import predict

    for phase in g.phases:
        for s in g.specs:
            g.results[(phase, s.name)] = predict(s, rep.hw, phase=phase, batch=rep.batch, seq=g.seq,
                                                 context=g.context_for(phase), calibration=rep.calibration,
                                                 optimizer=rep.optimizer, layout=rep.layout(s, phase))


def serving_phase(g: Group) -> str:
    """decode when every spec of the group can decode (causal, LM head), else forward."""
    return "decode" if all(s.causal and s.head == "lm" for s in g.specs) else "forward"


def _memory_group(rep: Report, g: Group) -> None:
    from flopsim.memory import memory

    serve = serving_phase(g)
    for s in g.specs:
        g.memory[("train", s.name)] = memory(s, phase="train", batch=rep.batch, seq=g.seq, hw=rep.hw,
                                            optimizer=rep.optimizer)
        g.memory[("serve", s.name)] = memory(s, phase=serve, batch=rep.batch, seq=g.seq,
                                            context=g.context_for(serve), hw=rep.hw)


BATCH_SWEEP = tuple(2 ** i for i in range(11))  # the serving batch sweep: 1 to 1024 sequences


def _batch_sweep(rep: Report, g: Group) -> None:
    """Each spec's serving step (decode, or forward for encoders) at every batch of
    BATCH_SWEEP, at the group's context: time per step, tokens/s, and whether
    it fits the device (flopsim.memory's largest batch)."""
    from flopsim.sweep import sweep

    serve = serving_phase(g)
    for s in g.specs:
        r = sweep(s, rep.hw, phase=serve, vary={"batch": list(BATCH_SWEEP)}, seq=g.seq,
                  context=g.context_for(serve), calibration=rep.calibration, optimizer=rep.optimizer)
        largest = g.memory[("serve", s.name)].max_batch
        g.batch_sweep[s.name] = {
            "phase": serve, "batch": list(BATCH_SWEEP), "max_batch": largest,
            "time_s": [float(t) for t in r.grids["time_s"]],
            "tokens_per_s": [float(t) for t in r.grids["tokens_per_s"]],
            "fits": [largest is not None and b <= largest for b in BATCH_SWEEP]}


def _styles(groups: list[Group]) -> dict:
    from flopsim.plots import BASELINE_COLOR, SPEC_COLORS, SPEC_MARKERS

    styles: dict = {}
    n = 0
    for g in groups:
        for i, s in enumerate(g.specs):
            if s.name in styles:
                continue
            if i == 0:
                styles[s.name] = {"color": BASELINE_COLOR, "marker": "o", "hollow": True}
            else:
                styles[s.name] = {"color": SPEC_COLORS[n % len(SPEC_COLORS)],
                                  "marker": SPEC_MARKERS[(i - 1) % len(SPEC_MARKERS)]}
                n += 1
    return styles


def _hw_line(rep: Report, dtype: str) -> str:
    peak, quoted = rep.hw.peak_flops_per_s_for(dtype)
    return (f"{rep.hw.name}: {dtype} {fmt_si(peak, 'FLOP/s')}"
            + (f" (the {quoted} figure)" if quoted != dtype else "")
            + f", {fmt_si(rep.hw.memory_bandwidth_bytes_per_s, 'B/s')}, {fmt_gb(rep.hw.memory_capacity_bytes)}"
            + (f"; one GPU of {', '.join(f'{k} {v}' for k, v in rep.parallel.items())}" if rep.parallel else ""))


def roofline_panels(rep: Report, g: Group) -> list[dict]:
    """Per phase, each spec's op points (flopsim.figure_data.op_points): what both rooflines draw."""
    from flopsim.figure_data import op_points

    return [{"title": f"{phase}: {g.shape(phase)}",
             "specs": [{"name": s.name, "style": rep.styles[s.name],
                        "points": op_points(g.results[(phase, s.name)].ops)} for s in g.specs]}
            for phase in g.phases]


def roofline_args(rep: Report, g: Group) -> dict:
    """The roofs both rooflines draw: datasheet peaks, bandwidth and the calibrated efficiencies."""
    dtype = g.baseline.compute_dtype
    eff = rep.calibration.efficiency("matmul")
    return {"peak_flops_per_s": rep.hw.peak_flops_per_s_for(dtype)[0], "vector_flops_per_s": rep.hw.vector_flops_per_s,
            "bytes_per_s": rep.hw.memory_bandwidth_bytes_per_s, "dtype": dtype,
            "calibrated": None if rep.calibration.is_ideal else (float(eff[0]), float(eff[1])),
            "title": f"Roofline on {_hw_line(rep, dtype)}  |  {g.title}"}


def knob_rows(rep: Report, g: Group) -> list[dict]:
    """Per knob sweep: x values and, per phase, time and FLOP speedup over the baseline and tokens/s."""
    rows = []
    for ks in g.knobs:
        cols = []
        for phase in g.phases:
            base = g.results[(phase, g.baseline.name)]
            cols.append({"time_speedup": [base.time_s / t for t in ks.time_s[phase]],
                         "flop_speedup": [base.flops / f if f else float("nan") for f in ks.flops[phase]],
                         "tokens_per_s": [base.tokens / t for t in ks.time_s[phase]],
                         "baseline_tokens_per_s": base.tokens_per_s})
        rows.append({"spec": ks.spec.name, "knob": ks.knob, "label": ks.label, "x": ks.x, "preset_x": ks.preset_x,
                     "log_x": ks.log_x, "style": rep.styles[ks.spec.name], "phases": cols})
    return rows


def memory_settings(rep: Report, g: Group) -> list[dict]:
    """A training and a serving step: each spec's memory by component, and its largest batch."""
    from flopsim.plots import MEMORY_COMPONENTS

    serve = serving_phase(g)
    settings = []
    for key, title in (("train", f"training step: B={rep.batch} S={g.seq}, {rep.optimizer}, no recomputation"),
                       ("serve", f"serving ({serve}): " + (f"B={rep.batch}, KV cache of {g.context or g.seq} tokens"
                                                           if serve == "decode" else f"B={rep.batch} S={g.seq}"))):
        bars = []
        for s in g.specs:
            m = g.memory[(key, s.name)]
            bars.append({"name": s.name, "style": rep.styles[s.name],
                         "components": {c: float(m.components[c]) for c in MEMORY_COMPONENTS},
                         "max_batch": m.max_batch})
        settings.append({"title": title, "bars": bars})
    return settings


def _group_figures(rep: Report, g: Group, tmp: Path) -> None:
    """The static figures (flopsim.plots) and their interactive versions (flopsim.report_page)."""
    from flopsim import plots, report_page

    panels, roofs = roofline_panels(rep, g), roofline_args(rep, g)
    fig = plots.roofline_figure(panels, **roofs)
    g.figures["roofline"] = plots.save(fig, tmp / f"{g.slug}-roofline", rep.formats)
    rows = knob_rows(rep, g)
    if rows:
        fig = plots.knob_figure(
            rows, [f"{p}: {g.shape(p)}" for p in g.phases], baseline=g.baseline.name,
            title=f"Speedup over {g.baseline.name} as each knob varies, {rep.hw.name} "
                  f"(calibration: {rep.calibration.label})")
        g.figures["knobs"] = plots.save(fig, tmp / f"{g.slug}-knobs", rep.formats)
    settings = memory_settings(rep, g)
    memory_title = (f"Device memory per step on {rep.hw.name} ({fmt_gb(rep.hw.memory_capacity_bytes)}), "
                    f"{g.baseline.dtype}")
    fig = plots.memory_figure(settings, capacity_bytes=rep.hw.memory_capacity_bytes, device=rep.hw.name,
                              title=memory_title)
    g.figures["memory"] = plots.save(fig, tmp / f"{g.slug}-memory", rep.formats)
    g.pages.update(report_page.group_figures(rep, g, panels, roofs, rows, settings, memory_title))


def _isoflop(rep: Report, models: list, tmp: Path) -> None:
    """Chinchilla for dense (+ MoD, under a stated assumption); Krajewski for dense vs MoE."""
    from flopsim.errors import FlopsimError
    from flopsim.scaling import MoeOptions, ModOptions, isoflop
    from flopsim.scaling.plot import plot_isoflop

    families = {f for m in models for f in ISOFLOP_FAMILIES.get(m.family, ())}
    unsupported = sorted({m.family for m in models if m.family not in ("dense", *ISOFLOP_FAMILIES)})
    if unsupported:
        rep.isoflop_notes.append(f"no scaling law covers {', '.join(unsupported)}: isoFLOP curves show the "
                                 f"families that have one (dense, MoD, MoE)")
    mod_spec = next((m for m in models if m.mod is not None), None)
    moe_spec = next((m for m in models if m.moe is not None), None)
    causal = next((g for g in rep.groups if g.baseline.causal), None)
    seq = causal.seq if causal is not None else rep.seq
    runs = [("chinchilla", ["dense"] + (["mod"] if "mod" in families else []))]
    if "moe" in families:
        runs.append(("krajewski", ["dense", "moe"]))
    for law, fams in runs:
        kwargs: dict = {}
        if "mod" in fams:
            kwargs["mod"] = ModOptions(capacity=mod_spec.mod.capacity, every=mod_spec.mod.every)
            kwargs["mod_effective_params"] = 1.0
        if "moe" in fams:
            m = moe_spec.moe
            d_expert = m.d_expert or moe_spec.d_ff
            gran = max(1, moe_spec.d_ff // d_expert)
            kwargs["moe"] = MoeOptions(expansion=max(1, m.experts // gran), granularity=gran, every=m.every)
            if gran != m.top_k:
                rep.isoflop_notes.append(
                    f"krajewski's MoE variants run top_k = G = {gran} (G = d_ff / d_expert of {moe_spec.name}); "
                    f"{moe_spec.name}'s top-{m.top_k} is not in that parametrisation")
        try:
            result = isoflop(rep.budgets, law=law, families=fams, seq=seq, batch=rep.batch, hardware=rep.hw,
                             **kwargs)
        except FlopsimError as err:
            rep.isoflop_notes.append(f"{law}: not drawn: {err}")
            continue
        name = f"isoflop-{law}-{'-'.join(fams)}.png"
        plot_isoflop(result, tmp / name)
        from flopsim.plots import shrink_png

        shrink_png(tmp / name)
        rep.isoflop.append((law, result, name))
        rep.isoflop_times[law] = isoflop_times(rep, result)
    if "svg" in rep.formats and rep.isoflop:
        rep.isoflop_notes.append("isoFLOP figures are PNG only (flopsim.scaling.plot)")


ISOFLOP_TIMED_SHAPES = 9  # ladder shapes per family timed for the isoFLOP-against-time view


def isoflop_times(rep: Report, result) -> dict:
    """(family, budget) -> rows of the isoFLOP curve with each shape's training
    time on one device: steps (tokens / (batch x seq)) x the roofline's train
    step (flopsim.scaling.isoflop.step_time, the report's calibration). Only
    ISOFLOP_TIMED_SHAPES ladder shapes per family are timed, spread evenly
    over the sizes within 20x of any budget's optimum (what the static
    figure draws); every budget reuses their step times."""
    from flopsim.scaling.isoflop import step_time

    out: dict = {}
    for fam in result.families:
        near = set()
        for b in result.budgets:
            opt = result.optima[(fam, b)]
            near |= {r["shape"] for r in result.curves[(fam, b)]
                     if opt.params / 20 <= r["law_params"] <= opt.params * 20}
        ordered = [r["shape"] for r in result.curves[(fam, result.budgets[0])] if r["shape"] in near]
        n = min(ISOFLOP_TIMED_SHAPES, len(ordered))
        chosen = {ordered[round(i * (len(ordered) - 1) / max(1, n - 1))] for i in range(n)}
        steps = {name: step_time(result.shape_specs[fam][name], rep.hw, batch=result.batch, seq=result.seq,
                                 calibration=rep.calibration) for name in chosen}
        for b in result.budgets:
            out[(fam, b)] = [dict(r, step_time_s=steps[r["shape"]],
                                  train_time_s=r["tokens"] / (result.batch * result.seq) * steps[r["shape"]])
                             for r in result.curves[(fam, b)] if r["shape"] in chosen]
    return out


# -- markdown ---------------------------------------------------------------------------
def _md_table(columns: list[str], rows: list[list], align: Optional[str] = None) -> str:
    align = align or "l" + "r" * (len(columns) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_columns() -> list[str]:
    return ["spec", "params", "phase", "FLOPs/token", "time/step", "tokens/s", "time speedup", "FLOP speedup",
            "bound", "MFU"]


def headline_cells(row: dict) -> list[str]:
    """One markdown row of the headline table (tests compare these with predict's numbers)."""
    return [row["spec"], fmt_si(row["params"]), row["phase"], fmt_si(row["flops_per_token"], "FLOP"),
            fmt_time(row["time_s"]), fmt_si(row["tokens_per_s"]), fmt_ratio(row["speedup"]),
            fmt_ratio(row["flop_speedup"]), row["bound"], fmt_pct(row["mfu"])]


def _img(paths: list[str], alt: str) -> str:
    png = [p for p in paths if p.endswith(".png")]
    main = png[0] if png else paths[0]
    extra = [p for p in paths if p != main]
    line = f"![{alt}]({main})"
    if extra:
        line += "  \n" + ", ".join(f"[{Path(p).suffix[1:].upper()}]({p})" for p in extra)
    return line


def _observations(rep: Report, g: Group) -> list[str]:
    """Facts read off the numbers: where FLOP savings do or do not become time savings."""
    out = []
    for s in g.specs[1:]:
        for phase in g.phases:
            base, r = g.results[(phase, g.baseline.name)], g.results[(phase, s.name)]
            sp_t = base.time_s / r.time_s
            sp_f = base.flops / r.flops if r.flops else float("nan")
            share = r.memory_bound_s / r.time_s if r.time_s else 0.0
            speed = (f"{sp_t:.2f}x faster" if sp_t >= 1.005 else f"{1 / sp_t:.2f}x slower" if sp_t <= 0.995
                     else "as fast")
            flops = (f"{sp_f:.2f}x fewer FLOPs" if sp_f >= 1.005 else f"{1 / sp_f:.2f}x more FLOPs" if sp_f <= 0.995
                     else "the same FLOPs")
            gap = ""
            if sp_f >= 1.05:
                if sp_t <= 1.0:
                    gap = " -- none of the FLOP saving becomes time"
                elif sp_t < 0.95 * sp_f:
                    gap = f" -- {100 * (1 - (sp_t - 1) / (sp_f - 1)):.0f}% of the FLOP saving is lost"
            out.append(f"**{s.name}, {phase}**: {flops}, {speed} than {g.baseline.name}; {100 * share:.0f}% of its "
                       f"time is in memory-bound ops{gap}.")
    serve = serving_phase(g)
    for s in g.specs:
        for key, what, remedy in (("train", f"training at {g.shape('train')}",
                                   "sharding, recomputation or a smaller batch"),
                                  ("serve", f"serving ({serve}) at {g.shape(serve)}",
                                   "tensor parallelism, a smaller batch or context, or a narrower dtype")):
            m = g.memory[(key, s.name)]
            if not m.fits:
                out.append(f"**{s.name}** does not fit one {rep.hw.name} for {what} ({fmt_gb(m.total_bytes)} of "
                           f"{fmt_gb(rep.hw.memory_capacity_bytes)}): it needs {remedy}.")
    return out


@dataclass
class Figure:
    """A figure in the document: static files for the markdown, a plotly figure for the page."""

    name: str  # the page's element id (fig-NAME)
    alt: str
    static: list  # relative paths of the static figure ([] when the markdown shows `fallback` instead)
    interactive: Any  # plotly figure
    caption: str = ""  # markdown, under the figure in both
    fallback: str = ""  # markdown shown instead of a static figure


def document(rep: Report) -> list:
    """The report as blocks, in order: markdown strings and Figures; the
    markdown (README.md) and the page (index.html) both render these."""
    blocks = _intro_blocks(rep) + _headline_blocks(rep)
    for gi, g in enumerate(rep.groups):
        blocks += _group_blocks(rep, gi, g)
    return blocks + _isoflop_blocks(rep) + _assumption_blocks(rep)


def _intro_blocks(rep: Report) -> list:
    from flopsim import __version__

    out = [f"# flopsim report: {', '.join(rep.given)} on {rep.hw.name}",
           f"Generated by flopsim {__version__}: predictions from the op-by-op roofline (`flopsim.predict`), not "
           f"measurements. Interactive page: [{PAGE_FILE}]({PAGE_FILE}) (one self-contained file; hover for each "
           f"op's and point's numbers). Regenerate with:\n\n```sh\n{rep.command}\n```"]
    if len(rep.groups) > 1:
        out.append(f"The specs form {len(rep.groups)} comparison groups: each conditional model against its dense "
                   f"baseline (the same trunk with the routing removed), so every speedup compares like with like. "
                   f"`--group first` puts every spec in one group against the first.")
    n = len(rep.groups)
    out.append("## Contents\n" + "\n".join(f"{i + 1}. [{g.title}](#{i + 1}-{_anchor(g.title)})"
                                           for i, g in enumerate(rep.groups))
               + f"\n{n + 1}. [isoFLOP curves](#{n + 1}-isoflop-curves)\n{n + 2}. [Assumptions](#{n + 2}-assumptions)")
    return out


def _headline_blocks(rep: Report) -> list:
    dtype = rep.groups[0].baseline.dtype
    out = ["## Headline",
           f"Predicted on {_hw_line(rep, dtype)}; calibration {rep.calibration.label}. *time speedup* = the group "
           f"baseline's time / this spec's time; *FLOP speedup* = the baseline's FLOPs / this spec's FLOPs (what the "
           f"FLOPs alone promise); FLOPs counted as torch's FlopCounterMode does (matrix products; train = forward "
           f"+ backward); MFU = FLOPs / (time x {dtype} peak); bound = the roofline side most of the step's time is "
           f"on. Exact values: [{SUMMARY_FILE}]({SUMMARY_FILE})."
           + (" The layout's collectives (flopsim.parallel) are ops of each step, priced on the calibration's link "
              "levels; the roofline draws them in its lower row (message bytes and time). The sweeps, memory and "
              "isoFLOP figures are one device's." if rep.parallel else "")]
    rows = rep.rows()
    for gi, g in enumerate(rep.groups):
        grows = [r for r in rows if r["group"] == gi + 1]
        out.append(f"**{gi + 1}. {g.title}** (baseline {g.baseline.name}; "
                   + "; ".join(f"{p} {g.shape(p)}" for p in g.phases) + ")\n\n"
                   + _md_table(headline_columns(), [headline_cells(r) for r in grows], align="lrlrrrrrlr"))
    return out


def _group_blocks(rep: Report, gi: int, g: Group) -> list:
    out = [f"## {gi + 1}. {g.title}"]
    if g.derived:
        out.append(f"Baseline **{g.baseline.name}**: {g.derived}.")
    out += [f"> Note: {note}." for note in g.notes]
    obs = _observations(rep, g)
    if obs:
        out.append("What the numbers say:\n\n" + "\n".join(f"- {o}" for o in obs))
    out += ["### Roofline", Figure(
        f"{g.slug}-roofline", "roofline", g.figures["roofline"], g.pages["roofline"],
        f"Every op of one step, per phase. Upper panels: ops with FLOPs at their arithmetic intensity (all FLOPs, "
        f"elementwise included, over the bytes they move) and the FLOP/s they achieve (their FLOPs over their "
        f"predicted time, launch overhead included); solid lines: the datasheet roofs ({g.baseline.dtype} matrix "
        f"peak, fp32 vector peak, memory bandwidth), dotted: the calibrated roof; ops left of the ridge are "
        f"memory-bound. Lower panels: ops with no FLOPs (copies, gathers, the KV-cache append, launches), one op's "
        f"bytes against its time, with the time the bytes take at full bandwidth. Colour: op kind; marker: spec; "
        f"area: share of the step's time; the same op repeated in several layers is one marker (xN); the largest "
        f"are named.")]
    if g.knobs:
        knobs = ", ".join(f"{ks.spec.name}: {ks.knob}" for ks in g.knobs)
        out += ["### Speedup vs knob", Figure(
            f"{g.slug}-knobs", "speedup vs knob", g.figures["knobs"], g.pages["knobs"],
            f"Each conditional spec's knob ({knobs}) varied with everything else fixed, one column per phase: "
            f"solid, the predicted time speedup over {g.baseline.name}; dashed, the FLOP speedup (baseline FLOPs / "
            f"FLOPs); the gap is FLOP saving that does not turn into time (memory-bound weight and KV-cache reads, "
            f"routing, gathers, launches); the ringed point (dotted line) is the spec's own setting. Above 1: faster "
            f"than the baseline."),
            "### Throughput vs knob", Figure(
                f"{g.slug}-knob-throughput", "tokens/s vs knob", [], g.pages["knob_throughput"],
                f"The same sweeps in absolute terms: tokens per second of one step on one {rep.hw.name} (dotted: "
                f"{g.baseline.name}).", fallback=_knob_throughput_table(rep, g))]
    out += ["### Memory", Figure(
        f"{g.slug}-memory", "memory breakdown", g.figures["memory"], g.pages["memory"],
        "Device memory of one step by component (flopsim.memory: weights, gradients and Adam state in training; "
        "activations kept for the backward pass without recomputation; the KV cache when serving), against the "
        "device's capacity. Labels: the total, its share of the device and the largest batch that fits at this "
        "length.")]
    out += ["### Serving batch sweep", Figure(
        f"{g.slug}-batch", "serving batch sweep", [], g.pages["batch"],
        _batch_caption(rep, g), fallback=_batch_table(g))]
    return out


def _knob_throughput_table(rep: Report, g: Group) -> str:
    """The markdown's stand-in for the throughput-vs-knob figure: tokens/s at each knob value."""
    lines = []
    for row in knob_rows(rep, g):
        cols = [f"{row['knob']} ({row['spec']})"] + [f"{p} tokens/s" for p in g.phases]
        cells = [[f"{x:g}" + (" (own)" if x == row["preset_x"] else "")]
                 + [fmt_si(ph["tokens_per_s"][i]) for ph in row["phases"]] for i, x in enumerate(row["x"])]
        base = ["baseline " + g.baseline.name] + [fmt_si(ph["baseline_tokens_per_s"]) for ph in row["phases"]]
        lines.append(_md_table(cols, cells + [base]))
    return "Tokens/s of one step on one device at each knob value (the page draws it):\n\n" + "\n\n".join(lines)


def _batch_caption(rep: Report, g: Group) -> str:
    serve = serving_phase(g)
    what = (f"one new token per sequence against a KV cache of {g.context or g.seq} tokens" if serve == "decode"
            else f"{g.seq} tokens per sequence")
    return (f"The serving step ({serve}: {what}) at batch 1 to {BATCH_SWEEP[-1]} on one {rep.hw.name}: tokens/s "
            f"(left) and time per step (right). Hollow markers: the batch does not fit the device's memory "
            f"(flopsim.memory: weights, activations and the KV cache).")


def _batch_table(g: Group) -> str:
    names = list(g.batch_sweep)
    first = g.batch_sweep[names[0]]
    rows = []
    for i, b in enumerate(first["batch"]):
        cells = [str(b)]
        for n in names:
            sw = g.batch_sweep[n]
            cells.append(fmt_si(sw["tokens_per_s"][i]) + ("" if sw["fits"][i] else " (does not fit)"))
        rows.append(cells)
    return (f"Tokens/s of one {first['phase']} step against the batch (the page draws it with the time per step):"
            f"\n\n" + _md_table(["batch"] + [f"{n} tokens/s" for n in names], rows))


def _isoflop_blocks(rep: Report) -> list:
    out = [f"## {len(rep.groups) + 1}. isoFLOP curves"]
    if rep.isoflop:
        out.append("Predicted final loss against model size at fixed training budgets (flopsim.scaling: every ladder "
                   "shape trains on budget / exact training FLOPs per token); markers are each family's optimum. The "
                   "loss does not depend on the hardware; the training times do.")
    for law, result, path in rep.isoflop:
        from flopsim import report_page

        out += [f"### {law}", Figure(f"isoflop-{law}", f"isoFLOP {law}", [path], report_page.isoflop_figure(rep, law, result)),
                Figure(f"isoflop-{law}-time", f"isoFLOP {law} against time", [],
                       report_page.isoflop_time_figure(rep, law), _isoflop_time_caption(rep),
                       fallback=_isoflop_time_table(rep, law))]
        comp = result.comparison
        if comp:
            b = result.budgets[0]
            out.append(f"At {b:.3g} FLOPs (step = {result.batch} x {result.seq} tokens on {rep.hw.name}):\n\n" + _md_table(
                ["family", "role", "shape", "params", "loss", "FLOPs/step vs dense", "step time", "speedup/step"],
                [[r["family"], r["role"], r["shape"], fmt_si(r["params"]), f"{r['loss']:.4f}",
                  fmt_ratio(r["flops_per_step_vs_ref"]),
                  fmt_time(r["step_time_s"]) if r.get("step_time_s") else "-",
                  fmt_ratio(r["speedup_per_step"]) if r.get("speedup_per_step") else "-"] for r in comp],
                align="lllrrrrr"))
        notes = list(result.assumptions) + [f"warning: {w}" for w in result.warnings if "no --hardware" not in w]
        if notes:
            out.append("\n".join(f"- {n}" for n in notes))
    if rep.isoflop_notes:
        out.append("\n".join(f"- {n}" for n in rep.isoflop_notes))
    return out


def _isoflop_time_caption(rep: Report) -> str:
    return (f"The same curves against the time each shape takes to train on one {rep.hw.name} (training steps x the "
            f"roofline's train step, calibration {rep.calibration.label}): at equal FLOPs, shapes that use the device "
            f"better finish sooner. {ISOFLOP_TIMED_SHAPES} shapes per family are timed, spread over the sizes near "
            f"the optima.")


def _isoflop_time_table(rep: Report, law: str) -> str:
    rows = []
    for (fam, b), pts in rep.isoflop_times[law].items():
        best = min(pts, key=lambda r: r["loss"])
        fastest = min(pts, key=lambda r: r["train_time_s"])
        rows.append([fam, f"{b:.3g}", f"{best['shape']} ({fmt_si(best['params'])})", f"{best['loss']:.4f}",
                     fmt_time(best["train_time_s"]), f"{fastest['shape']}", fmt_time(fastest["train_time_s"])])
    return (f"Training time on one {rep.hw.name} of the timed shapes (the page draws every one):\n\n"
            + _md_table(["family", "budget (FLOPs)", "lowest loss: shape", "loss", "its time", "fastest shape",
                         "its time"], rows, align="lrlrrlr"))


def _assumption_blocks(rep: Report) -> list:
    hw = rep.hw
    out = [f"## {len(rep.groups) + 2}. Assumptions",
           f"**Hardware: {hw.name}** ({hw.description}). Figures not marked verified are flagged by "
           f"`flopsim hardware show {hw.name}`."]
    hw_rows = []
    for figure in ("peak_flops_per_s", "memory_bandwidth_bytes_per_s", "memory_capacity_bytes",
                   "last_level_cache_bytes", "launch_overhead_s"):
        value = getattr(hw, figure)
        if value is None:
            continue
        if figure == "peak_flops_per_s":
            shown = ", ".join(f"{d} {fmt_si(v, 'FLOP/s')}" for d, v in value.items())
        elif figure == "launch_overhead_s":
            shown = f"{value * 1e6:.3g} us per kernel"
        else:
            shown = fmt_si(value, "B/s" if "per_s" in figure else "B")
        source = " ".join(hw.sources.get(figure, "").split())
        hw_rows.append([figure, shown, "yes" if figure in hw.verified else "no", source])
    out.append(_md_table(["figure", "value", "verified", "source"], hw_rows, align="llll"))
    out.append(f"**Calibration:** {rep.calibration.label}. Source: {' '.join(rep.calibration.source.split())}")
    shapes = [[g.title, p, _phase_words(p, g)] for g in rep.groups for p in g.phases]
    out.append("**Shapes** (one step of each phase):\n\n" + _md_table(["group", "phase", "shape"], shapes, "lll"))
    out.append("**Model** (flopsim's docs/wallclock.md): each op is its own kernel (no fusion beyond what the "
               "spec's ops state) and the device runs them one after another; one op's device time = max(FLOPs / "
               "(peak x compute efficiency), bytes / (bandwidth x memory efficiency)) + its kernels' fixed cost, "
               "the efficiencies and fixed costs from the calibration; non-matrix ops run at the fp32 vector rate. "
               "Where the calibration measured the host's dispatch per kernel (a GPU run eagerly), the host queues "
               "kernels while the device runs earlier ones and a step is that two-stage pipeline. The train step "
               f"includes the {rep.optimizer} update. Conditional models' decode costs (distinct experts read, MoD "
               "blocks that run, sparse-FF units read) are expectations over uniform routing.")
    if any(ks.knob == "keep" for g in rep.groups for ks in g.knobs):
        out.append("**Length reduction knob:** schedules keep[l] ** p for p in "
                   f"{', '.join(f'{p:g}' for p in KEEP_POWERS)} (p = 0 keeps every token, p = 1 is the spec's "
                   "own schedule); the x axis is their mean kept fraction.")
    return out


def markdown_text(blocks: list) -> str:
    """README.md: each block's markdown; a figure as its static image, or its stand-in table."""
    parts = []
    for b in blocks:
        if isinstance(b, Figure):
            parts.append(_img(b.static, b.alt) if b.static else b.fallback)
            if b.caption:
                parts.append(b.caption)
        else:
            parts.append(b)
    return "\n\n".join(parts) + "\n"


def summary_csv(rows: list[dict]) -> str:
    """summary.csv: the headline rows, floats written exactly (repr)."""
    buf = io.StringIO()
    cols = list(rows[0].keys()) if rows else []
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _write_documents(rep: Report, tmp: Path) -> None:
    """README.md, summary.csv and index.html, from the same blocks and rows."""
    from flopsim import report_page

    blocks = document(rep)
    write_text(tmp / REPORT_FILE, markdown_text(blocks))
    write_text(tmp / SUMMARY_FILE, summary_csv(rep.rows()))
    report_page.page(rep, blocks).write(tmp / PAGE_FILE)


def _phase_words(phase: str, g: Group) -> str:
    b = g.batch
    if phase == "train":
        return f"{b} sequences x {g.seq} tokens, forward + backward + optimizer update"
    if phase == "forward":
        return f"{b} sequences x {g.seq} tokens, head on every position"
    if phase == "prefill":
        ctx = g.context or g.seq
        return f"{b} prompts x {g.seq} tokens attending to {ctx} keys, head on the last position, KV cache written"
    return f"{b} sequences x 1 new token attending to a KV cache of {g.context or g.seq} tokens"


def _anchor(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", text.lower()).replace(" ", "-")


def write_text(path: Path, text: str) -> None:
    from flopsim.outputs import write_atomic

    write_atomic(path, text)
