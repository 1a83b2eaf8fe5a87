"""isoFLOP (and iso-time) optima of dense, MoD and MoE models under a loss law.

For a training budget C (FLOPs) every shape on the ladder trains on
D = C / (training FLOPs per token) tokens, where the FLOPs per token are
- `exact` (default): flopsim's own count, count(spec, batch=1, seq=S,
  phase="train").flops / S -- every matrix product forward and backward,
  attention scores over the full S x S square, the LM head on every
  position, embedding lookups free; or
- `6N`: 6 x the parameters a token uses, in the law's own count (Kaplan
  et al. 2020; Hoffmann et al. 2022 use C = 6ND): all parameters for a dense
  model, the active ones for MoD/MoE.
The law then gives the loss of every shape (the isoFLOP curve), and the
optimum is found
- in closed form for a Chinchilla-type law under 6N on dense models
  (Hoffmann et al. 2022 eq. 4: N_opt = G (C/6)^(beta/(alpha+beta)),
  D_opt = C / (6 N_opt), G = (alpha A / (beta B))^(1/(alpha+beta))); and
- numerically otherwise: FLOPs per token is interpolated between ladder
  shapes (monotone PCHIP in log N - log FLOPs/token), and Brent's bounded
  method minimises loss over log N around the best ladder shape.
`params` / `tokens` / `loss` are that continuous optimum, in the law's
parameter count; `shape` is the ladder shape nearest to it (by log N), with
its exact counts.

iso-time: with a hardware spec and a GPU-hours budget H, each shape trains
on D = H * 3600 / (seconds per token), the seconds coming from flopsim's
roofline (`flopsim.predict(spec, hw, phase="train", batch=B, seq=S)`), not
from FLOPs -- which is where MoD's gathers and MoE's routing show up.

Conditional families use the law's own variables where it has them
(krajewski: N non-embedding incl. all experts, G; clark: active N, E). MoD has
no published law: the loss of a MoD model needs either a law fitted to the
user's MoD runs (`mod_law`) or an explicit assumption `mod_effective_params=f`,
loss_MoD(N, D) = law(f N, D), which every output states.

The comparison at a fixed budget follows Raposo et al. 2024 (MoD, figure 3
and section 4.1): next to the isoFLOP-optimal dense model it lists, per
conditional family, the variant at its own optimum and the variant whose
FLOPs per step match the dense optimum's, with step time on the hardware
and the speedup per step relative to the dense optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from flopsim.errors import InputError, bad_value
from flopsim.scaling.ladder import LadderRule, ModOptions, MoeOptions, by_depth, shape_cost, variant
from flopsim.scaling.laws import AllocationLaw, ChinchillaLaw, Law, load_law
from flopsim.spec.paths import exists

FAMILIES = ("dense", "mod", "moe")
RULES = ("exact", "6N")
# tokens per parameter kept on the ladder (by a 6N estimate) around each budget
WINDOW = (0.2, 5000.0)


def _positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise bad_value(name, value, "must be a positive number") from None
    if not (math.isfinite(v) and v > 0):
        raise bad_value(name, value, "must be a positive, finite number")
    return v


def _rule(rule: str) -> str:
    r = str(rule).strip()
    if r.lower() == "6n":
        return "6N"
    if r.lower() == "exact":
        return "exact"
    raise bad_value("flops-rule", rule, "expected exact or 6N")


@dataclass
class Optimum:
    """A continuous optimum and the ladder shape nearest to it."""

    family: str
    budget: float  # FLOPs (iso-FLOP) or GPU-hours (iso-time)
    params: float  # in the law's parameter count
    tokens: float
    loss: Optional[float]  # None under a law that gives the allocation only
    method: str
    shape: object  # ShapeCost nearest to `params`
    shape_tokens: float
    shape_loss: Optional[float]
    flops_per_token: float  # interpolated at the optimum
    at_edge: bool = False
    kind: str = "flops"  # flops | gpu_hours
    law_optimum: Optional[tuple] = None  # (N, D) in the law's own convention (C = 6 N D), where it has one
    convention_flops_per_token: Optional[float] = None  # the shape's FLOPs per token in the law's convention

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def convention_gap(self) -> Optional[float]:
        """The law's convention against the shape's exact training FLOPs per token, minus 1
        (negative: the convention understates them)."""
        if self.convention_flops_per_token is None:
            return None
        return self.convention_flops_per_token / self.shape.flops_per_token - 1.0

    def to_dict(self) -> dict:
        s = self.shape
        law = self.law_optimum
        return {
            "family": self.family, ("budget_flops" if self.kind == "flops" else "budget_gpu_hours"): self.budget,
            "params": self.params, "tokens": self.tokens, "loss": self.loss,
            "tokens_per_param": self.tokens_per_param, "flops_per_token": self.flops_per_token,
            "training_flops": self.tokens * self.flops_per_token, "method": self.method,
            "at_ladder_edge": self.at_edge,
            "law_optimum": None if law is None else {"params": law[0], "tokens": law[1]},
            "shape": {"name": s.name, "layers": s.layers, "d_model": s.d_model, "params": s.params,
                      "active_params": s.active, "flops_per_token": s.flops_per_token,
                      "tokens": self.shape_tokens, "loss": self.shape_loss,
                      "convention_flops_per_token": self.convention_flops_per_token,
                      "convention_gap": self.convention_gap},
        }


@dataclass
class IsoflopResult:
    law: Law
    flops_rule: str
    budgets: list
    families: list
    seq: int
    batch: int
    optima: dict  # (family, budget) -> Optimum
    curves: dict  # (family, budget) -> list of rows
    comparison: list  # rows at the first budget
    iso_time: Optional[dict] = None
    hardware: Optional[str] = None
    fit: object = None
    assumptions: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    shape_specs: dict = field(default_factory=dict)  # family -> {ladder shape name: its ModelSpec}

    # the contract's keys: the first family at the first budget
    @property
    def primary(self) -> Optimum:
        if self.budgets:
            return self.optima[(self.families[0], self.budgets[0])]
        return self.iso_time["optima"][self.families[0]]

    @property
    def params(self) -> float:
        return self.primary.params

    @property
    def tokens(self) -> float:
        return self.primary.tokens

    @property
    def loss(self) -> float:
        return self.primary.loss

    @property
    def curve(self) -> list:
        if self.budgets:
            return self.curves[(self.families[0], self.budgets[0])]
        return self.iso_time["curves"][self.families[0]]

    def to_dict(self) -> dict:
        p = self.primary
        out = {
            "law": self.law.name, "law_source": self.law.source, "params_kind": self.law.params_kind,
            "flops_rule": self.flops_rule, "seq": self.seq, "batch": self.batch,
            "budget": self.budgets[0] if self.budgets else None, "budgets": self.budgets,
            "family": self.families[0], "families": self.families,
            "params": p.params, "tokens": p.tokens, "loss": p.loss,
            "tokens_per_param": p.tokens_per_param, "shape": p.to_dict()["shape"],
            "curve": self.curve,
            "optima": [o.to_dict() for o in self.optima.values()],
            "curves": [{"family": f, "budget": b, "rows": rows} for (f, b), rows in self.curves.items()],
            "comparison": self.comparison, "hardware": self.hardware,
            "assumptions": self.assumptions, "warnings": self.warnings,
            "law_coefficients": self.law.coefficients(), "law_notes": list(self.law.notes),
        }
        if self.iso_time is not None:
            it = self.iso_time
            out["iso_time"] = {"gpu_hours": it["gpu_hours"], "hardware": it["hardware"],
                               "optima": [o.to_dict() for o in it["optima"].values()],
                               "curves": [{"family": f, "rows": r} for f, r in it["curves"].items()]}
        if self.fit is not None:
            out["fit"] = self.fit.to_dict()
        return out


# -- the law's view of a shape ---------------------------------------------


@dataclass
class LawView:
    """How one family's shapes enter the law: N, extra variables, and which law."""

    law: Law
    family: str
    mod_factor: Optional[float] = None  # MoD effective-parameter factor

    def n(self, cost) -> float:
        kind = self.law.params_kind
        if self.family == "moe" and _is_clark(self.law):
            return cost.law_params(kind, active=True)
        n = cost.law_params(kind)
        return n * self.mod_factor if self.mod_factor is not None else n

    def loss(self, cost, N, D):
        fam = "moe" if self.family == "moe" else "dense"
        return self.law.loss(N, D, family=fam, E=cost.experts, G=cost.granularity)

    def cost_per_token_6n(self, cost) -> float:
        """Training FLOPs per token in the law's convention: 6 N (or M itself, for a law whose
        model size is FLOPs per token)."""
        return self.law.flops_per_token(cost.law_params(self.law.params_kind, active=self.family != "dense"))


def _is_clark(law) -> bool:
    from flopsim.scaling.laws import ClarkLaw

    return isinstance(law, ClarkLaw)


# -- the core: optimum over a ladder ----------------------------------------


def _sweep(view: LawView, costs: list, per_token: np.ndarray, budget: float, kind: str,
           closed_ok: bool = False) -> tuple[Optimum, list]:
    """Curve rows and the optimum for one family at one budget. `per_token`
    is FLOPs per token (iso-FLOP) or seconds per token (iso-time)."""
    from scipy.interpolate import PchipInterpolator
    from scipy.optimize import minimize_scalar

    N = np.array([view.n(c) for c in costs], dtype=float)
    fpt = np.array([c.flops_per_token for c in costs], dtype=float)
    order = np.argsort(N, kind="stable")
    N, per_token, fpt = N[order], per_token[order], fpt[order]
    costs = [costs[i] for i in order]
    D = budget / per_token
    loss = np.array([float(view.loss(c, n, d)) for c, n, d in zip(costs, N, D)])
    rows = [{"shape": c.name, "layers": c.layers, "d_model": c.d_model, "params": c.params,
             "law_params": float(n), "active_params": c.active, "flops_per_token": c.flops_per_token,
             "tokens": float(d), "tokens_per_param": float(d / n), "loss": float(l)}
            for c, n, d, l in zip(costs, N, D, loss)]

    # monotone interpolation of log(cost per token) over log N (unique N)
    x = np.log(N)
    keep = np.concatenate([[True], np.diff(x) > 1e-12])
    xs, ys, fs = x[keep], np.log(per_token[keep]), np.log(fpt[keep])
    i = int(np.argmin(loss))
    at_edge = i in (0, len(costs) - 1)
    closed = (closed_ok and isinstance(view.law, ChinchillaLaw) and view.family == "dense"
              and kind == "flops" and view.mod_factor is None)
    if closed:
        n_opt, d_opt = view.law.optimum_6n(budget)
        l_opt = float(view.law.loss(n_opt, d_opt))
        fpt_opt = view.law.flops_per_token(n_opt)
        how = "closed form (Hoffmann et al. 2022 eq. 4, C = 6ND)"
        at_edge = not (xs[0] <= math.log(n_opt) <= xs[-1])
    elif len(xs) < 2:
        n_opt, d_opt, l_opt, fpt_opt = N[i], D[i], loss[i], fpt[i]
        how = "single shape"
    else:
        interp = PchipInterpolator(xs, ys, extrapolate=False)
        finterp = PchipInterpolator(xs, fs, extrapolate=False)
        j = int(np.searchsorted(xs, x[i]))
        lo, hi = xs[max(0, j - 1)], xs[min(len(xs) - 1, j + 1)]

        def f(t):
            d = budget / math.exp(float(interp(t)))
            return float(view.loss(costs[i], math.exp(t), d))

        res = minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
        t = float(res.x)
        n_opt = math.exp(t)
        d_opt = budget / math.exp(float(interp(t)))
        l_opt = float(res.fun)
        fpt_opt = math.exp(float(finterp(t)))
        how = "numeric (PCHIP in log N, bounded Brent)"
    k = int(np.argmin(np.abs(np.log(N) - math.log(n_opt))))
    opt = Optimum(family=view.family, budget=budget, params=float(n_opt), tokens=float(d_opt), loss=float(l_opt),
                  method=how, shape=costs[k], shape_tokens=float(D[k]), shape_loss=float(loss[k]),
                  flops_per_token=float(fpt_opt), at_edge=bool(at_edge), kind=kind,
                  law_optimum=_law_optimum(view, budget, kind),
                  convention_flops_per_token=view.cost_per_token_6n(costs[k]))
    for r, c in zip(rows, costs):
        r["optimal_shape"] = c is costs[k]
    return opt, rows


def _law_optimum(view: LawView, budget: float, kind: str) -> Optional[tuple]:
    """The dense optimum in the law's own convention (C = 6 N D), where the law has one."""
    if kind != "flops" or view.family != "dense" or view.mod_factor is not None:
        return None
    return view.law.optimum(budget)


def _allocate(view: LawView, costs: list, per_token: np.ndarray, budget: float) -> tuple[Optimum, list]:
    """The optimum of a law that gives the allocation only (AllocationLaw): N_opt(C) and
    D_opt = C / (6 N_opt) in its convention, and the ladder shape nearest N_opt with the
    tokens the budget buys it (no loss, no curve of losses)."""
    n_opt, d_opt = view.law.optimum(budget)
    N = np.array([view.n(c) for c in costs], dtype=float)
    k = int(np.argmin(np.abs(np.log(N) - math.log(n_opt))))
    rows = [{"shape": c.name, "layers": c.layers, "d_model": c.d_model, "params": c.params,
             "law_params": float(n), "active_params": c.active, "flops_per_token": c.flops_per_token,
             "tokens": float(budget / t), "tokens_per_param": float(budget / t / n), "loss": None,
             "optimal_shape": i == k} for i, (c, n, t) in enumerate(zip(costs, N, per_token))]
    opt = Optimum(family=view.family, budget=budget, params=float(n_opt), tokens=float(d_opt), loss=None,
                  method=f"the law's allocation (N_opt = {view.law.coefficient:.4g} x^{view.law.exponent:.4f})",
                  shape=costs[k], shape_tokens=float(budget / per_token[k]), shape_loss=None,
                  flops_per_token=budget / d_opt, at_edge=not (N.min() <= n_opt <= N.max()),
                  law_optimum=(n_opt, d_opt), convention_flops_per_token=view.cost_per_token_6n(costs[k]))
    return opt, rows


# -- hardware ------------------------------------------------------------------


_TIMES: dict = {}


def step_time(spec, hw, *, batch: int, seq: int, calibration=None) -> float:
    """Seconds per training step from flopsim's roofline (cached), with
    `calibration` as `predict` takes it (None: the device's own). The roofline
    sums per-op times, so a deep shape is timed from three shallow ones
    (`ladder.by_depth`, checked to be affine, else timed in full)."""
    from flopsim.scaling.ladder import by_depth

    cal_key = calibration.model_dump_json() if hasattr(calibration, "model_dump_json") else calibration
    key = (spec.model_dump_json(), getattr(hw, "name", str(hw)), batch, seq, cal_key)
    if key not in _TIMES:
        import flopsim

        def timed(s):
            r = flopsim.predict(s, hw, phase="train", batch=batch, seq=seq, calibration=calibration)
            t = getattr(r, "time_s", None)
            if t is None and isinstance(r, dict):
                t = r.get("time_s")
            return (float(t),)

        _TIMES[key] = by_depth(spec, timed, rel_tol=1e-6)[0]
    return _TIMES[key]


def load_hw(hardware):
    if hardware is None:
        return None
    try:
        import flopsim

        return flopsim.load_hardware(hardware)
    except ModuleNotFoundError as err:
        raise InputError(f"hardware: {hardware!r}: the roofline ({err.name}) is not in this checkout yet; "
                         f"omit --hardware / --gpu-hours") from None


# -- the analysis --------------------------------------------------------------


def _resolve_law(law):
    """(Law, FitResult or None)."""
    from pathlib import Path

    if isinstance(law, Law):
        return law, None
    text = str(law)
    if text.lower().endswith(".csv") or ("/" in text and exists(Path(text))):
        from flopsim.scaling.fit import fit_csv

        fit = fit_csv(text)
        return fit.law, fit
    return load_law(text), None


def _families(families) -> list[str]:
    if isinstance(families, str):
        families = [families]
    out = []
    for item in families or ["dense"]:
        for f in str(item).split(","):
            f = f.strip().lower()
            if not f:
                continue
            if f not in FAMILIES:
                raise bad_value("family", f, f"expected one of {', '.join(FAMILIES)}")
            if f not in out:
                out.append(f)
    if "dense" in out:  # dense first: the reference row
        out.remove("dense")
        out.insert(0, "dense")
    return out or ["dense"]


def _views(law, families, mod_effective_params, mod_law, assumptions) -> dict:
    views = {}
    for fam in families:
        if fam == "dense":
            views[fam] = LawView(law, "dense")
        elif fam == "moe":
            if not law.supports("moe"):
                raise InputError(f"law {law.name} has no MoE variables; use --law krajewski (granularity G) "
                                 f"or --law clark (experts E) for --family moe")
            views[fam] = LawView(law, "moe")
        elif fam == "mod":
            if mod_law is not None:
                mlaw, _ = _resolve_law(mod_law)
                views[fam] = LawView(mlaw, "mod")
                assumptions.append(f"MoD loss from the law {mlaw.name!r} ({mlaw.source}); its losses are "
                                   f"comparable with {law.name}'s only if both were fitted on the same data")
            elif mod_effective_params is not None:
                f = _positive("mod-effective-params", mod_effective_params)
                views[fam] = LawView(law, "mod", mod_factor=f)
                assumptions.append(
                    f"ASSUMPTION (no published MoD law): a MoD model with N parameters trained on D tokens "
                    f"has the loss of a dense model with {f:g} x N parameters under {law.name} "
                    f"(--mod-effective-params {f:g}). The MoD paper (Raposo et al. 2024) finds isoFLOP-optimal "
                    f"MoD models match the baseline with more parameters, so f = 1 is optimistic; "
                    f"fit your own MoD runs with --mod-law RUNS.csv")
            else:
                raise InputError("family mod has no published scaling law: give --mod-effective-params F "
                                 "(e.g. 1.0: loss as a dense model with the same parameters) or "
                                 "--mod-law RUNS.csv (a law fitted to your MoD runs)")
    return views


def _ladder_costs(shapes, family, seq, mod, moe, tick=None) -> list:
    """The family's variants of the ladder shapes. Routed blocks repeat every
    `every` blocks, so a depth that is not a multiple of it has an extra
    unrouted block (its curve would zig-zag): such depths are skipped when
    enough others remain."""
    from flopsim.scaling.ladder import period

    specs = [variant(s, family, mod, moe) for s in shapes]
    if specs:
        P = period(specs[0])
        whole = [s for s in specs if s.layers % P == 0]
        if P > 1 and len(whole) >= 3:
            specs = whole
    costs = []
    for s in specs:
        costs.append(shape_cost(s, seq))
        if tick is not None:
            tick()
    return costs


def _params(spec) -> tuple:
    """(parameters,) of `spec` from its op list (no B, S needed); by_depth keeps it cheap."""
    from flopsim.families import build_ops

    return (int(sum(op.params for op in build_ops(spec, "forward") if op.pass_ == "fwd")),)


def _window(shapes, budgets, seq) -> list:
    """Ladder shapes whose tokens per parameter under the 6N rule (exact
    parameter counts) fall in WINDOW for some budget (plus one neighbour each
    side), so that big ladders are not costed for budgets that never reach them."""
    if not budgets:
        return list(shapes)

    n = np.array([by_depth(s, _params)[0] for s in shapes], dtype=float)
    keep = np.zeros(len(shapes), dtype=bool)
    for c in budgets:
        tpp = c / (6 * n) / n
        keep |= (tpp >= WINDOW[0]) & (tpp <= WINDOW[1])
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise InputError(f"budget(s) {', '.join(f'{b:.3g}' for b in budgets)} FLOPs fall outside the ladder "
                         f"({n[0]:.3g} to {n[-1]:.3g} parameters); change --min-layers / --max-layers")
    lo, hi = max(0, idx[0] - 1), min(len(shapes) - 1, idx[-1] + 1)
    return list(shapes[lo:hi + 1])


def _match(candidates, target_fpt):
    """The shape whose FLOPs per token is nearest `target_fpt` (in log)."""
    diffs = [abs(math.log(c.flops_per_token / target_fpt)) for c in candidates]
    return candidates[int(np.argmin(diffs))]


def _flop_matched(family, target_fpt, shapes, seq, mod, moe, rule: Optional[LadderRule], widths: int = 3):
    """The `family` variant whose training FLOPs per token is nearest `target_fpt`:
    every depth of the ladder (not only whole routing periods) and, with a
    ladder rule, widths up to `widths` heads either side of the rule's."""
    from flopsim.spec import load_model

    costs = [shape_cost(variant(s, family, mod, moe), seq) for s in shapes]
    best = _match(costs, target_fpt)
    if rule is None:
        return best
    base = load_model(rule.base)
    near = [s for s, c in zip(shapes, costs) if 0.8 <= c.flops_per_token / target_fpt <= 1.25]
    cands = [best]
    for s in near:
        for k in range(-widths, widths + 1):
            d = s.d_model + k * rule.head_size
            if k and d >= rule.head_size:
                cands.append(shape_cost(variant(rule.shape(base, s.layers, seq, d_model=d), family, mod, moe), seq))
    return _match(cands, target_fpt)


def _check_inputs(budget, gpu_hours, hardware, seq, batch, method) -> tuple:
    """(budgets as a list of positive numbers, gpu_hours), or the one-line error."""
    if method not in ("auto", "numeric"):
        raise bad_value("method", method, "expected auto or numeric")
    budgets = [] if budget is None else [budget] if np.isscalar(budget) else list(budget)
    budgets = [_positive("budget", b) for b in budgets]
    if gpu_hours is not None:
        gpu_hours = _positive("gpu-hours", gpu_hours)
    if not budgets and gpu_hours is None:
        raise InputError("give --budget FLOPS (isoFLOP) and/or --gpu-hours H with --hardware (iso-time)")
    if gpu_hours is not None and hardware is None:
        raise InputError("--gpu-hours needs --hardware (time comes from the roofline)")
    for name, v in (("seq", seq), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad_value(name, v, "must be a positive integer")
    return budgets, gpu_hours


def _variant_notes(the_law, fams, mod, moe, assumptions: list, warnings: list) -> None:
    """The MoE and MoD variants' settings, as assumptions (and a warning where a law is extrapolated)."""
    if "moe" in fams:
        G, E = moe.granularity, moe.expansion
        if the_law.name == "krajewski" and E != 64:
            warnings.append(f"krajewski's MoE fit used expansion rate E = 64; E = {E} is extrapolation")
        assumptions.append(f"MoE variants: expansion E = {E}, granularity G = {G} ({E * G} experts of width "
                           f"d_ff/{G}, top-{G}), every {moe.every} block(s)")
    if "mod" in fams:
        assumptions.append(f"MoD variants: capacity {mod.capacity:g}, routing every {mod.every} block(s)")


def _optima(fams, budgets, views, costs, per_token, allocation: bool, closed_ok: bool, warnings: list) -> tuple:
    """({(family, budget): optimum}, {(family, budget): curve rows}): the law's allocation, or
    the sweep of the ladder at each budget; an optimum at the ladder's edge is warned of."""
    optima, curves = {}, {}
    for f in fams:
        pt = per_token(f)
        for b in budgets:
            if allocation:
                opt, rows = _allocate(views[f], costs[f], pt, b)
            else:
                opt, rows = _sweep(views[f], costs[f], pt, b, "flops", closed_ok)
            optima[(f, b)], curves[(f, b)] = opt, rows
            if opt.at_edge:
                warnings.append(f"{f} optimum at {b:.3g} FLOPs is at the edge of the ladder "
                                f"({opt.shape.name}); widen --min-layers / --max-layers")
    return optima, curves


def isoflop(budget=None, law="chinchilla-3", *, families: Sequence[str] = ("dense",), flops_rule: str = "exact",
            seq: int = 2048, batch: int = 8, ladder=None, shapes=None, hardware=None,
            gpu_hours: Optional[float] = None, mod: ModOptions = ModOptions(), moe: MoeOptions = MoeOptions(),
            mod_effective_params: Optional[float] = None, mod_law=None, method: str = "auto",
            progress=None) -> IsoflopResult:
    """isoFLOP optima (and, with `hardware` and `gpu_hours`, iso-time optima).

    budget: training FLOPs, a number or a list; law: a name, a Law, or a CSV
    of runs to fit; families: dense, mod, moe; ladder: a LadderRule; shapes:
    explicit specs (presets, paths or ModelSpecs) instead of the ladder;
    method: auto | numeric (numeric even where the closed form applies);
    progress: called as progress(done, total) as the ladder's shapes are
    costed (and, for iso-time, timed).
    """
    rule = _rule(flops_rule)
    budgets, gpu_hours = _check_inputs(budget, gpu_hours, hardware, seq, batch, method)
    fams = _families(families)
    the_law, fit = _resolve_law(law)
    _check_allocation_law(the_law, fams, gpu_hours)
    assumptions, warnings = [], []
    warnings += _range_warnings(the_law, budgets)
    views = _views(the_law, fams, mod_effective_params, mod_law, assumptions)
    closed_ok = rule == "6N" and method != "numeric"
    _variant_notes(the_law, fams, mod, moe, assumptions, warnings)

    hw = load_hw(hardware)
    chosen = _chosen_shapes(shapes, fams, ladder, seq, budgets, gpu_hours, hw)

    total = len(chosen) * len(fams) * (2 if gpu_hours is not None else 1)  # shapes costed (and timed)
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    costs = {f: _ladder_costs(chosen, f, seq, mod, moe, tick) for f in fams}

    def per_token(f):
        if rule == "6N":
            return np.array([views[f].cost_per_token_6n(c) for c in costs[f]], dtype=float)
        return np.array([c.flops_per_token for c in costs[f]], dtype=float)

    allocation = isinstance(the_law, AllocationLaw)
    optima, curves = _optima(fams, budgets, views, costs, per_token, allocation, closed_ok, warnings)

    if hw is not None:
        from flopsim.calibration import load_calibration

        assumptions.append(f"step time: flopsim.predict (train phase) of the whole model on one "
                           f"{getattr(hw, 'name', hardware)}, batch {batch} x seq {seq}: forward, backward and "
                           f"the optimizer update (which, for an MoE, reads and writes every expert); "
                           f"calibration {load_calibration('auto', hw).provenance_label}")
    if hw is None and len(fams) > 1:
        warnings.append("no --hardware: step time and speedup per step are not computed")
    matched = {}
    if budgets:
        ref_fpt = optima[(fams[0], budgets[0])].shape.flops_per_token
        the_rule = None if shapes else (ladder or LadderRule())
        matched = {f: _flop_matched(f, ref_fpt, chosen, seq, mod, moe, the_rule) for f in fams[1:]}
    comparison = (_compare(fams, views, matched, optima, budgets[0], hw, batch, seq, rule)
                  if budgets and not allocation else [])

    iso_time = (_iso_time(fams, views, costs, hw, hardware, gpu_hours, batch, seq, tick, warnings)
                if gpu_hours is not None else None)

    if fit is not None:
        assumptions.append(f"law fitted to {len(fit.runs)} runs: RMSE {fit.rmse:.4g}, max |residual| {fit.max_abs:.4g}")
    assumptions.extend(f"{the_law.name}: {n}" for n in the_law.notes)
    return IsoflopResult(law=the_law, flops_rule=rule, budgets=budgets, families=fams, seq=seq, batch=batch,
                         optima=optima, curves=curves, comparison=comparison, iso_time=iso_time,
                         hardware=getattr(hw, "name", None) if hw is not None else None, fit=fit,
                         assumptions=assumptions, warnings=warnings,
                         shape_specs={f: {c.name: c.spec for c in costs[f]} for f in fams})


def _chosen_shapes(shapes, fams, ladder, seq, budgets, gpu_hours, hw) -> list:
    """The dense shapes to cost: the explicit ones, else the ladder's within reach of the budgets."""
    from flopsim.spec import load_model

    if shapes:
        dense_shapes = [load_model(s) for s in shapes]
        for s in dense_shapes:
            if s.family not in ("dense", *fams):
                raise InputError(f"shape {s.name}: family {s.family} is not among --family {', '.join(fams)}")
        return [s for s in dense_shapes if s.family == "dense"] or dense_shapes
    rule_obj = ladder or LadderRule()
    spans = list(budgets)
    if gpu_hours is not None:  # the FLOPs H GPU-hours can buy: 1% to 100% of the dtype's peak
        peak = hw.peak_flops_per_s_for(load_model(rule_obj.base).dtype)[0]
        spans += [gpu_hours * 3600.0 * peak * f for f in (0.01, 1.0)]
    return _window(rule_obj.shapes(seq), spans, seq)


def _iso_time(fams, views, costs, hw, hardware, gpu_hours, batch, seq, tick, warnings) -> dict:
    """Optima and curves when every shape trains for `gpu_hours` on `hw` (time from the roofline)."""
    it_optima, it_curves = {}, {}
    for f in fams:
        per_token_s = []
        for c in costs[f]:
            per_token_s.append(step_time(c.spec, hw, batch=batch, seq=seq) / (batch * seq))
            tick()
        opt, rows = _sweep(views[f], costs[f], np.array(per_token_s), gpu_hours * 3600.0, "time")
        opt.budget, opt.kind = gpu_hours, "gpu_hours"
        it_optima[f], it_curves[f] = opt, rows
        if opt.at_edge:
            warnings.append(f"{f} iso-time optimum is at the edge of the ladder ({opt.shape.name})")
    return {"gpu_hours": gpu_hours, "hardware": getattr(hw, "name", str(hardware)),
            "optima": it_optima, "curves": it_curves}


def _check_allocation_law(law, families: list, gpu_hours) -> None:
    """A law with no loss (AllocationLaw) prices only the dense isoFLOP optimum."""
    if not isinstance(law, AllocationLaw):
        return
    if families != ["dense"]:
        raise InputError(f"law {law.name}: gives the dense compute-optimal allocation only, no loss to compare "
                         f"--family {','.join(families)} with; use chinchilla-3, besiroglu, krajewski or clark")
    if gpu_hours is not None:
        raise InputError(f"law {law.name}: iso-time needs a loss to minimise; use chinchilla-3 or besiroglu "
                         f"for --gpu-hours")


FAR_OUTSIDE = 10.0  # a budget this far beyond the fitted range of a law is flagged


def _range_warnings(law, budgets: list) -> list:
    """One warning per budget more than FAR_OUTSIDE times beyond the budgets the law was fitted on."""
    if not law.fitted_flops:
        return []
    low, high = law.fitted_flops
    out = []
    for b in budgets:
        if b > FAR_OUTSIDE * high or b < low / FAR_OUTSIDE:
            side = f"{b / high:.3g}x above the largest" if b > high else f"{low / b:.3g}x below the smallest"
            out.append(f"budget {b:.3g} FLOPs is {side} budget {law.name} was fitted on ({low:.2g} to {high:.2g} "
                       f"FLOPs: {law.fitted_note}): an extrapolation")
    return out


def _compare(fams, views, matched, optima, budget, hw, batch, seq, rule) -> list:
    """Rows at one budget: the dense optimum, then per conditional family its
    own optimum and the variant with the dense optimum's FLOPs per step."""
    ref_fam = fams[0]
    ref = optima[(ref_fam, budget)].shape
    rows = []

    def row(role, fam, c):
        view = views[fam]
        n = view.n(c)
        fpt = view.cost_per_token_6n(c) if rule == "6N" else c.flops_per_token
        d = budget / fpt
        r = {"family": fam, "role": role, "shape": c.name, "layers": c.layers, "d_model": c.d_model,
             "params": c.params, "active_params": c.active, "law_params": n, "flops_per_token": c.flops_per_token,
             "flops_per_step": c.flops_per_token * batch * seq,
             "flops_per_step_vs_ref": c.flops_per_token / ref.flops_per_token,
             "tokens": d, "loss": float(view.loss(c, n, d)), "step_time_s": None, "tokens_per_s": None,
             "speedup_per_step": None}
        if hw is not None:
            t = step_time(c.spec, hw, batch=batch, seq=seq)
            r["step_time_s"], r["tokens_per_s"] = t, batch * seq / t
        return r

    rows.append(row("optimum", ref_fam, ref))
    for fam in fams[1:]:
        rows.append(row("optimum", fam, optima[(fam, budget)].shape))
        rows.append(row("same FLOPs/step", fam, matched[fam]))
    if hw is not None:
        t0 = rows[0]["step_time_s"]
        for r in rows:
            r["speedup_per_step"] = t0 / r["step_time_s"]
    return rows
