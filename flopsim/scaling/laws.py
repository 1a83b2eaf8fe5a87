"""Published scaling laws: loss as a function of parameters N, training
tokens D and, for routed models, the number of experts E and granularity G.

Conventions
-----------
- Loss is the paper's own validation loss in nats per token on the paper's own
  data and tokenizer. Losses from different papers are NOT comparable (MassiveText
  vs C4, different tokenizers); compare models only under one law.
- `N` is counted as the law's paper counts it; each law states `params_kind`:
  `total` (every parameter, embeddings included: Hoffmann et al. 2022, Pearce
  & Song 2024 "Reconciling Kaplan and Chinchilla") or `non_embedding`
  (parameters of the transformer blocks only: Krajewski et al. 2024, section 5
  and eq. 10-11). For an MoE, `non_embedding` counts every expert (total, not
  active); Clark et al.'s N is the dense model the router is built on, i.e. the
  active parameters.
- Logarithms in Clark et al.'s law are base 10 (its eq. 1, restated by
  Krajewski et al. 2024 eq. 2 as (10^(d/a)/N)^a (1/E)^(b + c log N)).

Coefficients live in one place, `PUBLISHED` below, next to the formula that
reads them (each law has its own functional form and variables, so a table
of numbers without the form would be a second place to keep in step):

- chinchilla: Hoffmann et al. 2022, "Training Compute-Optimal Large Language
  Models", section 3.3 / eq. 10 (approach 3, parametric fit):
  E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28.
- besiroglu: Besiroglu et al. 2024, "Chinchilla Scaling: A Replication
  Attempt", arXiv 2404.10102, re-fit of approach 3 on the data extracted from
  Hoffmann et al.'s figure 4: E=1.8172, A=482.01, B=2085.43, alpha=0.3478,
  beta=0.3658.
- krajewski: Krajewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of
  Experts", arXiv 2402.07871, section 5.4, Table 1 ("Values of the fitted
  coefficients"), eq. 9: L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta;
  MoE: a=18.1, alpha=0.115, b=30.8, beta=0.147, g=2.1, gamma=0.58, c=0.47;
  dense (eq. 1 form): a=16.3, alpha=0.126, b=26.7, beta=0.127, c=0.47.
  N = non-embedding parameters, N = d_model^2 (8E + 4) n_blocks (section 6.1);
  G = d_ff / d_expert; fitted at expansion rate E = 64 only (section 5).
- clark: Clark et al. 2022, "Unified Scaling Laws for Routed Language
  Models", arXiv 2202.01169, eq. 1 with the saturating transform of E:
  log10 L(N, E) = a log10 N + b log10 E^ + c log10 N log10 E^ + d,
  1/E^ = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max; fitted values for
  S-BASE a=-0.082, b=-0.108, c=0.009, d=1.104, E_start=1.847, E_max=314.478;
  RL-R -0.083, -0.126, 0.012, 1.111, 1.880, 469.982; HASH -0.087, -0.136,
  0.012, 1.157, 4.175, 477.741 (the paper's table of eq. 1 solutions).
  Every model there saw D = 130B tokens, so the law has no D term. flopsim
  uses it the way the paper's section 5 does: as an Effective Parameter Count
  N_eff(N, E), the dense size whose loss under the same fit equals the routed
  model's, and feeds N_eff to a base dense law with a D term (default
  chinchilla): loss = base(N_eff, D). That composition is flopsim's, not the
  paper's; it is printed with every result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from flopsim.errors import InputError
from flopsim.spec.paths import exists

HOFFMANN = ("Hoffmann et al. 2022, Training Compute-Optimal Large Language Models, "
            "sec. 3.3 eq. 10 (approach 3)")
BESIROGLU = ("Besiroglu et al. 2024, Chinchilla Scaling: A Replication Attempt, arXiv 2404.10102 "
             "(re-fit of approach 3)")
KRAJEWSKI = ("Krajewski et al. 2024, Scaling Laws for Fine-Grained Mixture of Experts, arXiv 2402.07871, "
             "sec. 5.4 Table 1, eq. 9")
CLARK = ("Clark et al. 2022, Unified Scaling Laws for Routed Language Models, arXiv 2202.01169, "
         "eq. 1 with saturating E^ (fitted eq. 1 solutions)")

# name -> coefficients; the one place published numbers are written
PUBLISHED = {
    "chinchilla": dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "besiroglu": dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
    "krajewski": dict(
        moe=dict(a=18.1, alpha=0.115, b=30.8, beta=0.147, g=2.1, gamma=0.58, c=0.47),
        dense=dict(a=16.3, alpha=0.126, b=26.7, beta=0.127, c=0.47),
        expansion=64,  # the expansion rate E every MoE fit point used
    ),
    "clark": {  # routing technique -> eq. 1 solution
        "s-base": dict(a=-0.082, b=-0.108, c=0.009, d=1.104, E_start=1.847, E_max=314.478),
        "rl-r": dict(a=-0.083, b=-0.126, c=0.012, d=1.111, E_start=1.880, E_max=469.982),
        "hash": dict(a=-0.087, b=-0.136, c=0.012, d=1.157, E_start=4.175, E_max=477.741),
    },
}


@dataclass(frozen=True)
class Law:
    """A loss law L(N, D, ...). Subclasses implement `loss`; `supports`
    says which model families the law has variables for."""

    name: str
    source: str
    params_kind: str = "total"  # total | non_embedding | active
    notes: tuple = ()

    families: tuple = ("dense",)

    def supports(self, family: str) -> bool:
        return family in self.families

    def loss(self, N, D, *, family: str = "dense", E=None, G=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def coefficients(self) -> dict:
        return {}

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "params_kind": self.params_kind,
                "families": list(self.families), "coefficients": self.coefficients(),
                "notes": list(self.notes)}


@dataclass(frozen=True)
class ChinchillaLaw(Law):
    """L = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""

    E: float = 0.0
    A: float = 0.0
    B: float = 0.0
    alpha: float = 0.0
    beta: float = 0.0

    def loss(self, N, D, *, family: str = "dense", E=None, G=None):
        N = np.asarray(N, dtype=float)
        D = np.asarray(D, dtype=float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def coefficients(self) -> dict:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta}

    # -- closed form under C = 6 N D (Hoffmann et al. 2022, eq. 4) -------
    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1 / (alpha + beta))."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimum_6n(self, budget: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising the law subject to 6 N D = budget:
        N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta))."""
        s = self.alpha + self.beta
        n = self.G * (budget / 6.0) ** (self.beta / s)
        d = (budget / 6.0) ** (self.alpha / s) / self.G
        return n, d


@dataclass(frozen=True)
class KrajewskiLaw(Law):
    """Fine-grained MoE (Krajewski et al. 2024, eq. 9); dense models use the
    paper's dense row (eq. 1 form, same c)."""

    moe: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)
    expansion: float = 64
    families: tuple = ("dense", "moe")

    def dense_law(self) -> ChinchillaLaw:
        d = self.dense
        return ChinchillaLaw(name=f"{self.name}-dense", source=self.source, params_kind=self.params_kind,
                             E=d["c"], A=d["a"], B=d["b"], alpha=d["alpha"], beta=d["beta"])

    def loss(self, N, D, *, family: str = "dense", E=None, G=None):
        if family != "moe":
            return self.dense_law().loss(N, D)
        if G is None:
            raise InputError("law krajewski: an MoE needs its granularity G = d_ff / d_expert")
        m = self.moe
        N = np.asarray(N, dtype=float)
        D = np.asarray(D, dtype=float)
        return m["c"] + (m["g"] / float(G) ** m["gamma"] + m["a"]) / N ** m["alpha"] + m["b"] / D ** m["beta"]

    def coefficients(self) -> dict:
        return {"moe": dict(self.moe), "dense": dict(self.dense), "fitted_expansion_rate": self.expansion}


def saturate_experts(E, E_start: float, E_max: float):
    """Clark et al.'s E^: 1/E^ = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max."""
    E = np.asarray(E, dtype=float)
    return 1.0 / (1.0 / (E - 1.0 + 1.0 / (1.0 / E_start - 1.0 / E_max)) + 1.0 / E_max)


@dataclass(frozen=True)
class ClarkLaw(Law):
    """Routed LMs (Clark et al. 2022, eq. 1) as an Effective Parameter Count
    feeding a base dense law: loss = base(N_eff(N, E), D)."""

    routing: str = "s-base"
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0
    E_start: float = 1.0
    E_max: float = 1.0
    base: Optional[Law] = None
    families: tuple = ("dense", "moe")

    def log10_loss_fixed_data(self, N, E):
        """Clark et al.'s own prediction (log10 of the loss) at their D = 130B tokens."""
        lN = np.log10(np.asarray(N, dtype=float))
        lE = np.log10(saturate_experts(E, self.E_start, self.E_max))
        return self.a * lN + self.b * lE + self.c * lN * lE + self.d

    def effective_params(self, N, E):
        """N_eff such that the fit's dense model (E = 1) of N_eff parameters
        has the routed model's loss: solve a x + b l1 + c x l1 = rhs for
        x = log10 N_eff, l1 = log10 E^(1)."""
        l1 = math.log10(float(saturate_experts(1.0, self.E_start, self.E_max)))
        rhs = self.log10_loss_fixed_data(N, E) - self.d - self.b * l1
        return 10.0 ** (rhs / (self.a + self.c * l1))

    def loss(self, N, D, *, family: str = "dense", E=None, G=None):
        if family == "moe":
            if E is None:
                raise InputError("law clark: an MoE needs its number of experts E")
            N = self.effective_params(N, E)
        return self.base.loss(N, D)

    def coefficients(self) -> dict:
        return {"routing": self.routing, "a": self.a, "b": self.b, "c": self.c, "d": self.d,
                "E_start": self.E_start, "E_max": self.E_max, "base_law": self.base.name}


def chinchilla() -> ChinchillaLaw:
    return ChinchillaLaw(name="chinchilla", source=HOFFMANN, params_kind="total", **PUBLISHED["chinchilla"])


def besiroglu() -> ChinchillaLaw:
    return ChinchillaLaw(name="besiroglu", source=BESIROGLU, params_kind="total", **PUBLISHED["besiroglu"])


def krajewski() -> KrajewskiLaw:
    p = PUBLISHED["krajewski"]
    return KrajewskiLaw(
        name="krajewski", source=KRAJEWSKI, params_kind="non_embedding",
        moe=dict(p["moe"]), dense=dict(p["dense"]), expansion=p["expansion"],
        notes=("loss is C4 validation loss (GPT-2 tokenizer); not comparable with chinchilla/besiroglu",
               "N = non-embedding parameters (all experts of an MoE); G = d_ff / d_expert",
               "the MoE fit used expansion rate E = 64 only; other E are extrapolation"),
    )


def clark(routing: str = "s-base", base: str = "chinchilla") -> ClarkLaw:
    table = PUBLISHED["clark"]
    if routing not in table:
        raise InputError(f"law clark: routing {routing!r}: expected one of {', '.join(table)}")
    base_law = load_law(base)
    if not isinstance(base_law, ChinchillaLaw):
        raise InputError(f"law clark: base law {base!r} must be a dense law (chinchilla, besiroglu or a CSV fit)")
    name = "clark" if (routing, base) == ("s-base", "chinchilla") else f"clark:{routing}:{base}"
    return ClarkLaw(
        name=name, source=CLARK, params_kind=base_law.params_kind, routing=routing, base=base_law,
        notes=(f"Clark et al. fitted every model at D = 130B tokens; flopsim turns the fit into an "
               f"effective parameter count N_eff(N, E) and applies the {base_law.name} law: "
               f"loss = {base_law.name}(N_eff, D) (flopsim's composition, not the paper's)",
               "N = the routed model's active (dense base) parameters; E = experts per routed layer"),
        **table[routing],
    )


BUILTIN = {"chinchilla": chinchilla, "besiroglu": besiroglu, "krajewski": krajewski, "clark": clark}


def law_names() -> list[str]:
    return list(BUILTIN)


def load_law(name_or_path) -> Law:
    """A Law from a name (chinchilla, besiroglu, krajewski, clark[:routing[:base]]),
    a Law, or a CSV of the user's runs (columns params, tokens, loss), fitted
    with `flopsim.scaling.fit.fit_law`."""
    from pathlib import Path

    if isinstance(name_or_path, Law):
        return name_or_path
    text = str(name_or_path).strip()
    key = text.lower()
    if key in BUILTIN and key != "clark":
        return BUILTIN[key]()
    if key == "clark" or key.startswith("clark:"):
        parts = key.split(":")
        return clark(*(p for p in parts[1:3] if p))
    path = Path(text)
    if path.suffix.lower() == ".csv" or exists(path):
        from flopsim.scaling.fit import fit_csv

        return fit_csv(path).law
    raise InputError(f"law: {text!r}: unknown law; expected one of {', '.join(BUILTIN)} "
                     f"or a path to a CSV of runs (params, tokens, loss)")
