"""Model shapes for isoFLOP sweeps and their exact training costs.

A `LadderRule` turns a depth into a shape: d_model = aspect * layers
(rounded to a multiple of the head size), heads = d_model / head_size,
d_ff = ff_ratio * d_model (rounded to a multiple of 64); everything else
(vocabulary, FFN kind, positions, norms, bias, tying, dtype) comes from the
`base` preset. The default aspect ratio 64 is Krajewski et al. 2024's
d_model = 64 n_blocks (section 6.1); Kaplan et al. 2020 (figure 5) find loss
flat within a few percent over aspect ratios 20-200.

`variant(spec, family, ...)` adds a family block to a dense shape:
- mod: Mixture-of-Depths (Raposo et al. 2024), default capacity 0.125 every
  2nd block (the paper's best setting);
- moe: fine-grained MoE in Krajewski et al.'s terms: expansion rate E and
  granularity G give E*G experts of width d_ff/G with top_k = G, so a token
  uses about as many FFN parameters as the dense shape (section 4).

`shape_cost(spec, seq)` counts one shape once (cached per spec and sequence;
blocks repeat, so a deep shape is counted exactly from three shallow ones,
see `by_depth`):
training FLOPs per token = count(spec, batch=1, seq=S, phase="train").flops / S,
and parameters split four ways: total, non-embedding (the blocks only:
layers 0..L-1), and their *active* parts (each op's parameters weighted by
the fraction of tokens that use them: flops / (2 params tokens), so a routed
MoD block counts `capacity`, an expert top_k/experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from flopsim.errors import InputError, bad_value

DEFAULT_BASE = "decoder-220m"


@dataclass(frozen=True)
class LadderRule:
    """How a depth becomes a shape (see the module docstring)."""

    base: str = DEFAULT_BASE
    aspect: float = 64.0
    head_size: int = 64
    ff_ratio: Optional[float] = None  # default: the base preset's d_ff / d_model
    min_layers: int = 2
    max_layers: int = 256

    def check(self) -> None:
        if not self.aspect > 0:
            raise bad_value("aspect", self.aspect, "must be positive (d_model / layers)")
        if self.head_size < 1:
            raise bad_value("head-size", self.head_size, "must be a positive integer")
        if self.ff_ratio is not None and not self.ff_ratio > 0:
            raise bad_value("ff-ratio", self.ff_ratio, "must be positive (d_ff / d_model)")
        if not 1 <= self.min_layers <= self.max_layers:
            raise bad_value("min-layers", self.min_layers, f"must be between 1 and max-layers ({self.max_layers})")

    def depths(self) -> list[int]:
        """Every depth to 48, then every 2nd to 96, every 4th to 192, every 8th beyond."""
        out, L = [], self.min_layers
        while L <= self.max_layers:
            out.append(L)
            L += 1 if L < 48 else 2 if L < 96 else 4 if L < 192 else 8
        return out

    def shape(self, base, layers: int, seq: int, d_model: Optional[int] = None):
        """The shape of this depth (`d_model` overrides the aspect rule; a multiple of head_size)."""
        hs = self.head_size
        if d_model is None:
            d_model = max(hs, int(round(self.aspect * layers / hs)) * hs)
        ratio = self.ff_ratio if self.ff_ratio is not None else base.d_ff / base.d_model
        d_ff = max(64, int(round(ratio * d_model / 64)) * 64)
        heads = d_model // hs
        group = max(1, base.heads // base.kv_heads)
        kv_heads = heads // group if heads % group == 0 else heads
        return base.with_changes(
            name=f"L{layers}-d{d_model}", layers=layers, d_model=d_model, heads=heads, kv_heads=kv_heads,
            d_head=hs, d_ff=d_ff, max_seq=max(base.max_seq, seq),
        )

    def shapes(self, seq: int) -> list:
        from flopsim.spec import load_model

        self.check()
        base = load_model(self.base)
        if base.family != "dense":
            raise InputError(f"ladder base {self.base!r} is family {base.family}; give a dense preset")
        return [self.shape(base, L, seq) for L in self.depths()]


@dataclass(frozen=True)
class ModOptions:
    capacity: float = 0.125
    every: int = 2


@dataclass(frozen=True)
class MoeOptions:
    expansion: int = 64  # Krajewski's E: MoE-layer parameters / dense-FFN parameters
    granularity: int = 1  # G = d_ff / d_expert; top_k = G
    every: int = 1


def variant(spec, family: str, mod: ModOptions = ModOptions(), moe: MoeOptions = MoeOptions()):
    """The `family` version of a dense shape (the shape itself for dense)."""
    if family == "dense" or spec.family == family:
        return spec
    if spec.family != "dense":
        raise InputError(f"shape {spec.name} is family {spec.family}; cannot make a {family} variant of it")
    if family == "mod":
        return spec.with_changes(name=f"{spec.name}-mod", family="mod",
                                 mod={"capacity": mod.capacity, "every": mod.every})
    if family == "moe":
        G, E = int(moe.granularity), int(moe.expansion)
        if G < 1 or E < 1:
            raise bad_value("moe-granularity" if G < 1 else "moe-expansion", G if G < 1 else E,
                            "must be a positive integer")
        d_expert = max(1, spec.d_ff // G)
        return spec.with_changes(name=f"{spec.name}-moe", family="moe",
                                 moe={"experts": E * G, "top_k": G, "d_expert": d_expert, "every": moe.every})
    raise bad_value("family", family, "expected dense, mod or moe")


@dataclass(frozen=True)
class ShapeCost:
    """One shape's exact training cost per token and its parameter counts."""

    name: str
    family: str
    layers: int
    d_model: int
    params: int  # every parameter (flopsim's `params`)
    params_non_embedding: int  # blocks only
    active: float  # parameters a token uses, on average
    active_non_embedding: float
    flops_per_token: float  # exact training FLOPs per token
    seq: int
    experts: Optional[float] = None  # Krajewski's expansion rate E (Clark's E at G = 1)
    granularity: Optional[float] = None  # G = d_ff / d_expert
    spec: object = field(default=None, compare=False, repr=False)

    def law_params(self, kind: str, active: bool = False) -> float:
        """The model size as a law counts it: every parameter (`total`), the blocks' (`non_embedding`),
        or DeepSeek's non-embedding FLOPs per token (`flops_per_token`: M = 6 N_non-embedding +
        6 n_layer d_model seq, DeepSeek-AI 2024 eq. 2 written for any block; 72 n_layer d_model^2
        for a block of 12 d_model^2 parameters)."""
        if kind == "flops_per_token":
            n = self.active_non_embedding if active else self.params_non_embedding
            return 6.0 * n + 6.0 * self.layers * self.d_model * self.seq
        if kind == "non_embedding":
            return self.active_non_embedding if active else self.params_non_embedding
        return self.active if active else self.params


_COSTS: dict = {}


def period(spec) -> int:
    """Blocks repeat with this period (docs/design.md: block i is routed when
    (i + 1) % every == 0), so every total is affine in the depth per period."""
    p = 1
    for block in (spec.mod, spec.moe):
        if block is not None:
            p = math.lcm(p, block.every)
    return p


def by_depth(spec, fn, *, rel_tol: float = 0.0):
    """fn(spec) -> tuple of numbers, computed for `spec` exactly but cheaply:
    blocks repeat with `period(spec)` after the first `moe.first_dense` (f), so fn is
    evaluated at three small depths f + r + P, f + r + 2P, f + r + 3P (r = (layers - f)
    mod P) and extrapolated linearly -- after
    checking that the three are affine (to `rel_tol`; 0: exactly), falling
    back to fn(spec) itself when they are not (a family whose blocks differ)."""
    P = period(spec)
    L = spec.layers
    first = spec.moe.first_dense if spec.moe is not None else 0  # dense blocks before the period starts
    r = (L - first) % P
    depths = [first + r + P * k for k in (1, 2, 3)]
    if L <= depths[-1] or spec.length_reduction is not None:
        return fn(spec)
    a, b, c = (fn(spec.with_changes(layers=d)) for d in depths)
    for x, y, z in zip(a, b, c):
        step, step2 = y - x, z - y
        if abs(step2 - step) > rel_tol * max(abs(step), abs(step2), 1e-300):
            return fn(spec)
    periods = (L - depths[0]) // P
    return tuple(x + periods * (y - x) for x, y in zip(a, b))


def _count_totals(spec, seq: int) -> tuple:
    """(flops, params, non-embedding params, active, active non-embedding) of one
    training step on one sequence."""
    from flopsim.count import count

    result = count(spec, batch=1, seq=seq, phase="train")
    L = spec.layers
    params = result.params
    ne = sum(op.params for op in result.ops if op.pass_ == "fwd" and 0 <= op.layer < L)
    return result.flops, params, ne, result.active_params(), result.active_params(blocks_only=True)


def shape_cost(spec, seq: int) -> ShapeCost:
    """Count `spec` once per sequence length (cached for the process)."""
    key = (spec.model_dump_json(), seq)
    if key in _COSTS:
        return _COSTS[key]
    try:
        flops, params, ne, active, active_ne = by_depth(spec, lambda s: _count_totals(s, seq), rel_tol=1e-12)
    except ModuleNotFoundError as err:
        raise InputError(f"family {spec.family!r} has no op list in this checkout yet ({err.name}); "
                         f"drop it from --family") from None
    if spec.family == "dense":  # every token uses every parameter
        active, active_ne = float(params), float(ne)
    E = G = None
    if spec.moe is not None:
        d_expert = spec.moe.d_expert or spec.d_ff
        G = spec.d_ff / d_expert
        E = spec.moe.experts * d_expert / spec.d_ff
    cost = ShapeCost(name=spec.name, family=spec.family, layers=spec.layers, d_model=spec.d_model,
                     params=int(params), params_non_embedding=int(ne), active=float(active),
                     active_non_embedding=float(active_ne), flops_per_token=flops / seq, seq=seq,
                     experts=E, granularity=G, spec=spec)
    _COSTS[key] = cost
    return cost
