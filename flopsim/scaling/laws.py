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

- chinchilla-1, chinchilla-2: Hoffmann et al. 2022, "Training Compute-Optimal
  Large Language Models", approaches 1 (minimum over training curves) and 2
  (IsoFLOP profiles). Each is a power law N_opt = k C^a (D_opt = C / 6 N_opt)
  with no loss function. The paper prints the exponent (Table 2: a = 0.50
  (0.488, 0.502) and 0.49 (0.462, 0.534)) and the law's projections (Table 3
  for approach 1, Table A3 for approach 2), not k: flopsim takes the power law
  through those projections (least squares in log C - log N over the nine
  rows), a = 0.4981 and 0.4899. It lands on the approach-1 point the paper
  states elsewhere (sec. D.4: 2.86B parameters at 1e21 FLOPs) to 0.01%.
  Both tables' 67B rows lie 1-3% off the line their other rows share (Table
  3's tokens for it are 5.6% above 5.76e23 / (6 x 67B)): kept as printed.
- chinchilla-3 (alias chinchilla): approach 3, the parametric fit
  L = E + A/N^alpha + B/D^beta, as estimated before rounding (the comment
  after eq. 10 in the paper's arXiv TeX source, as used by Besiroglu et al.
  2024's analysis code, epoch-research/analyzing-chinchilla
  data_analysis.ipynb): E = exp(0.5267228), A = exp(6.0073404),
  B = exp(6.0179186), alpha = 0.33917084, beta = 0.2849083. These reproduce
  the paper's own projections (40B at the Gopher budget, Figure 4; 67B at
  1.71e24 FLOPs, Table A3), which the printed values do not (32B: rounding
  alpha and beta moves the frontier by 20%).
- chinchilla-3-printed: the same as printed in eq. 10 (sec. D.2):
  E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28.
- kaplan: Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
  arXiv 2001.08361, the compute-efficient frontier (sec. 6.1, Figure 14,
  Table 6): N_opt = 1.3e9 (C_min / PF-day)^0.73 non-embedding parameters,
  with C_min the compute at the critical batch size, C = 2 C_min (sec. 6.3),
  one PF-day = 8.64e19 FLOPs, and C = 6 N D in non-embedding FLOPs (sec. 2.1).
  No loss function; Hoffmann et al. sec. D.4 quote it as 4.68B at 1e21 FLOPs.
- deepseek: DeepSeek-AI 2024, "DeepSeek LLM", arXiv 2401.02954, sec. 3.2
  eq. 4: M_opt = 0.1715 C^0.5243, D_opt = 5.8316 C^0.4757, with the model
  size M the non-embedding FLOPs per token including attention over the
  sequence (eq. 2: 72 n_layer d_model^2 + 6 n_layer d_model l_seq) and
  C = M D; IsoFLOP profiles at budgets of 1e17 to 3e20 FLOPs.
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
HOFFMANN_TEX = ("Hoffmann et al. 2022, Training Compute-Optimal Large Language Models, approach 3 (sec. 3.3), "
                "the fit before rounding (arXiv TeX source, after eq. 10; as used by Besiroglu et al. 2024's "
                "epoch-research/analyzing-chinchilla)")
HOFFMANN_1 = ("Hoffmann et al. 2022, Training Compute-Optimal Large Language Models, approach 1 (sec. 3.1): "
              "the power law through Table 3's projections (exponent: Table 2)")
HOFFMANN_2 = ("Hoffmann et al. 2022, Training Compute-Optimal Large Language Models, approach 2 (sec. 3.2): "
              "the power law through Table A3's projections (exponent: Table 2)")
DEEPSEEK = ("DeepSeek-AI 2024, DeepSeek LLM: Scaling Open-Source Language Models with Longtermism, "
            "arXiv 2401.02954, sec. 3.2 eq. 4: M_opt = 0.1715 C^0.5243, D_opt = 5.8316 C^0.4757")
KAPLAN = ("Kaplan et al. 2020, Scaling Laws for Neural Language Models, arXiv 2001.08361, sec. 6.1 "
          "(Figure 14, Table 6): N_opt = 1.3e9 (C_min / PF-day)^0.73, C = 2 C_min")
BESIROGLU = ("Besiroglu et al. 2024, Chinchilla Scaling: A Replication Attempt, arXiv 2404.10102 "
             "(re-fit of approach 3)")
KRAJEWSKI = ("Krajewski et al. 2024, Scaling Laws for Fine-Grained Mixture of Experts, arXiv 2402.07871, "
             "sec. 5.4 Table 1, eq. 9")
CLARK = ("Clark et al. 2022, Unified Scaling Laws for Routed Language Models, arXiv 2202.01169, "
         "eq. 1 with saturating E^ (fitted eq. 1 solutions)")

# name -> coefficients; the one place published numbers are written
PUBLISHED = {
    # (parameters, FLOPs, tokens): Hoffmann et al. 2022 Table 3 (approach 1) and Table A3 (approach 2)
    "chinchilla-1": ((4e8, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (1e10, 1.23e22, 205.1e9),
                     (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
                     (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (1e13, 1.30e28, 216.2e12)),
    "chinchilla-2": ((4e8, 1.84e19, 7.7e9), (1e9, 1.20e20, 20.0e9), (1e10, 1.32e22, 219.5e9),
                     (67e9, 6.88e23, 1.7e12), (175e9, 4.54e24, 4.3e12), (280e9, 1.18e25, 7.1e12),
                     (520e9, 4.19e25, 13.4e12), (1e12, 1.59e26, 26.5e12), (1e13, 1.75e28, 292.0e12)),
    "chinchilla-3": dict(E=math.exp(0.5267228), A=math.exp(6.0073404), B=math.exp(6.0179186),
                         alpha=0.33917084, beta=0.2849083),
    "chinchilla-3-printed": dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "kaplan": dict(coefficient=1.3e9, exponent=0.73, unit_flops=8.64e19, compute_fraction=0.5),
    "deepseek": dict(coefficient=0.1715, exponent=0.5243, tokens_coefficient=5.8316, tokens_exponent=0.4757),
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
    # the compute the law was fitted in: C = 6 N D, N as `params_kind` counts it
    flops_convention: str = "C = 6 N D"
    fitted_flops: Optional[tuple] = None  # (lowest, highest) training FLOPs of the runs it was fitted on
    fitted_note: str = ""  # where that range comes from

    def supports(self, family: str) -> bool:
        return family in self.families

    def loss(self, N, D, *, family: str = "dense", E=None, G=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def optimum(self, budget: float) -> Optional[tuple[float, float]]:
        """(N_opt, D_opt) of a dense model in the law's own convention (C = 6 N D, N as the
        law counts it), where the law has one; None otherwise."""
        return None

    def flops_per_token(self, size):
        """Training FLOPs per token in the law's convention for a model of `size` (its N):
        6 N, or N itself where the law's model size is FLOPs per token (DeepSeek's M)."""
        return size if self.params_kind == "flops_per_token" else 6.0 * size

    def coefficients(self) -> dict:
        return {}

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "params_kind": self.params_kind,
                "families": list(self.families), "coefficients": self.coefficients(),
                "flops_convention": self.flops_convention,
                "fitted_flops": list(self.fitted_flops) if self.fitted_flops else None,
                "fitted_note": self.fitted_note, "gives": "allocation" if isinstance(self, AllocationLaw) else "loss",
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

    def optimum(self, budget: float) -> tuple[float, float]:
        return self.optimum_6n(budget)


@dataclass(frozen=True)
class AllocationLaw(Law):
    """A compute-optimal allocation with no loss function: N_opt = k x^a with
    x = C * compute_fraction / unit_flops (the law's own compute variable),
    D_opt = C / (6 N_opt) (Hoffmann et al. 2022 approaches 1 and 2; Kaplan et al. 2020)."""

    coefficient: float = 1.0
    exponent: float = 0.5
    unit_flops: float = 1.0
    compute_fraction: float = 1.0

    def loss(self, N, D, *, family: str = "dense", E=None, G=None):
        raise InputError(f"law {self.name}: gives the compute-optimal allocation only, no loss: use it with "
                         f"the dense family and no --gpu-hours or --plot (chinchilla-3, besiroglu, krajewski "
                         f"and clark have a loss)")

    def optimum(self, budget: float) -> tuple[float, float]:
        n = self.coefficient * (budget * self.compute_fraction / self.unit_flops) ** self.exponent
        return n, budget / self.flops_per_token(n)

    def coefficients(self) -> dict:
        return {"coefficient": self.coefficient, "exponent": self.exponent, "unit_flops": self.unit_flops,
                "compute_fraction": self.compute_fraction}


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

    def optimum(self, budget: float) -> tuple[float, float]:
        return self.dense_law().optimum_6n(budget)

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


# the runs Hoffmann et al. fitted (abstract: over 400 models of 70M to over 16B parameters on 5 to
# 500B tokens; sec. 3.2: IsoFLOP profiles at 6e18 to 3e21 FLOPs), as training FLOPs under C = 6 N D
HOFFMANN_RUNS = ((6 * 70e6 * 5e9, 6 * 16e9 * 500e9),
                 "6 x 70M x 5B to 6 x 16B x 500B: the paper's runs (abstract), C = 6 N D")
HOFFMANN_CONVENTION = "C = 6 N D, N every parameter (embeddings included; sec. 3, appendix F)"


def chinchilla_3() -> ChinchillaLaw:
    return ChinchillaLaw(name="chinchilla-3", source=HOFFMANN_TEX, params_kind="total",
                         flops_convention=HOFFMANN_CONVENTION, fitted_flops=HOFFMANN_RUNS[0],
                         fitted_note=HOFFMANN_RUNS[1], **PUBLISHED["chinchilla-3"])


def chinchilla_3_printed() -> ChinchillaLaw:
    return ChinchillaLaw(name="chinchilla-3-printed", source=HOFFMANN, params_kind="total",
                         flops_convention=HOFFMANN_CONVENTION, fitted_flops=HOFFMANN_RUNS[0],
                         fitted_note=HOFFMANN_RUNS[1], notes=(
                             "the coefficients as printed (rounded): the frontier lies up to 20% below the "
                             "paper's own projections; chinchilla-3 is the fit before rounding",),
                         **PUBLISHED["chinchilla-3-printed"])


def through_projections(rows) -> tuple[float, float]:
    """(k, a) of the power law N = k C^a through (parameters, FLOPs, tokens) rows:
    least squares of log N on log C."""
    n = np.log([r[0] for r in rows])
    c = np.log([r[1] for r in rows])
    a, log_k = np.polyfit(c, n, 1)
    return float(math.exp(log_k)), float(a)


def chinchilla_allocation(approach: int) -> AllocationLaw:
    k, a = through_projections(PUBLISHED[f"chinchilla-{approach}"])
    ranges = {1: HOFFMANN_RUNS, 2: ((6e18, 3e21), "6e18 to 3e21 FLOPs: the IsoFLOP profiles (sec. 3.2)")}
    return AllocationLaw(name=f"chinchilla-{approach}", source=HOFFMANN_1 if approach == 1 else HOFFMANN_2,
                         params_kind="total", flops_convention=HOFFMANN_CONVENTION,
                         fitted_flops=ranges[approach][0], fitted_note=ranges[approach][1],
                         coefficient=k, exponent=a, notes=(
                             f"N_opt = {k:.4g} C^{a:.4f} (parameters, FLOPs), D_opt = C / (6 N_opt): the power law "
                             f"through the paper's {'Table 3' if approach == 1 else 'Table A3'} projections",))


def kaplan() -> AllocationLaw:
    p = PUBLISHED["kaplan"]
    return AllocationLaw(
        name="kaplan", source=KAPLAN, params_kind="non_embedding",
        flops_convention="C = 6 N D, N non-embedding parameters (sec. 2.1: embeddings and the context's "
                         "attention FLOPs left out); C_min = C / 2 (training at the critical batch size, sec. 6.3)",
        fitted_flops=(1.2e13, 1.2e21),
        fitted_note=("eight orders of magnitude of C_min (sec. 1.2) up to its largest runs: 1.5B non-embedding "
                     "parameters for 2.5e5 steps of 2^19 tokens (sec. 2.2), 6 N D = 1.2e21 FLOPs"),
        notes=("D_opt = C / (6 N_opt) in the law's convention (its own fits of the data, e.g. D = 2e10 "
               "C_min^0.27 tokens in Table 6, are looser)",),
        **p)


def deepseek() -> AllocationLaw:
    p = PUBLISHED["deepseek"]
    return AllocationLaw(
        name="deepseek", source=DEEPSEEK, params_kind="flops_per_token",
        flops_convention="C = M D, M the non-embedding training FLOPs per token with attention over the "
                         "sequence (eq. 2: 72 n_layer d_model^2 + 6 n_layer d_model l_seq)",
        fitted_flops=(1e17, 3e20), fitted_note="the IsoFLOP profiles at 8 budgets of 1e17 to 3e20 FLOPs (sec. 3.2)",
        notes=("the model size is M, FLOPs per token, not a parameter count; D_opt = C / M_opt "
               f"(eq. 4's own D_opt = {p['tokens_coefficient']} C^{p['tokens_exponent']} is the same to 0.01%)",
               "fitted on DeepSeek's own data (its OpenWebText2 fit differs: the exponents move with data quality)"),
        coefficient=p["coefficient"], exponent=p["exponent"])


def besiroglu() -> ChinchillaLaw:
    return ChinchillaLaw(name="besiroglu", source=BESIROGLU, params_kind="total",
                         flops_convention=HOFFMANN_CONVENTION, fitted_flops=HOFFMANN_RUNS[0],
                         fitted_note="the runs of Hoffmann et al., reconstructed from its Figure 4",
                         **PUBLISHED["besiroglu"])


def krajewski() -> KrajewskiLaw:
    p = PUBLISHED["krajewski"]
    return KrajewskiLaw(
        name="krajewski", source=KRAJEWSKI, params_kind="non_embedding",
        flops_convention="C = 6 N D, N non-embedding parameters (active for an MoE's FLOPs; sec. 5)",
        fitted_note="not stated in flopsim's sources",
        moe=dict(p["moe"]), dense=dict(p["dense"]), expansion=p["expansion"],
        notes=("loss is C4 validation loss (GPT-2 tokenizer); not comparable with chinchilla/besiroglu",
               "N = non-embedding parameters (all experts of an MoE); G = d_ff / d_expert",
               "the MoE fit used expansion rate E = 64 only; other E are extrapolation"),
    )


def clark(routing: str = "s-base", base: str = "chinchilla-3") -> ClarkLaw:
    table = PUBLISHED["clark"]
    if routing not in table:
        raise InputError(f"law clark: routing {routing!r}: expected one of {', '.join(table)}")
    base_law = load_law(base)
    if not isinstance(base_law, ChinchillaLaw):
        raise InputError(f"law clark: base law {base!r} must be a dense law with a loss (chinchilla-3, "
                         f"besiroglu or a CSV fit)")
    name = "clark" if (routing, base_law.name) == ("s-base", "chinchilla-3") else f"clark:{routing}:{base}"
    return ClarkLaw(
        name=name, source=CLARK, params_kind=base_law.params_kind, routing=routing, base=base_law,
        flops_convention=base_law.flops_convention + "; N the routed model's active parameters",
        fitted_note="every model at D = 130B tokens (sec. 2); the base law's range for D",
        notes=(f"Clark et al. fitted every model at D = 130B tokens; flopsim turns the fit into an "
               f"effective parameter count N_eff(N, E) and applies the {base_law.name} law: "
               f"loss = {base_law.name}(N_eff, D) (flopsim's composition, not the paper's)",
               "N = the routed model's active (dense base) parameters; E = experts per routed layer"),
        **table[routing],
    )


BUILTIN = {"chinchilla-1": lambda: chinchilla_allocation(1), "chinchilla-2": lambda: chinchilla_allocation(2),
           "chinchilla-3": chinchilla_3, "chinchilla-3-printed": chinchilla_3_printed, "kaplan": kaplan,
           "deepseek": deepseek,
           "besiroglu": besiroglu, "krajewski": krajewski, "clark": clark}
ALIASES = {"chinchilla": "chinchilla-3"}


def law_names() -> list[str]:
    return list(BUILTIN)


def load_law(name_or_path) -> Law:
    """A Law from a name (chinchilla-1/-2/-3 (alias chinchilla), chinchilla-3-printed, kaplan,
    besiroglu, krajewski, clark[:routing[:base]]),
    a Law, or a CSV of the user's runs (columns params, tokens, loss), fitted
    with `flopsim.scaling.fit.fit_law`."""
    from pathlib import Path

    if isinstance(name_or_path, Law):
        return name_or_path
    text = str(name_or_path).strip()
    key = ALIASES.get(text.lower(), text.lower())
    if key in BUILTIN and key != "clark":
        return BUILTIN[key]()
    if key == "clark" or key.startswith("clark:"):
        parts = key.split(":")
        return clark(*(p for p in parts[1:3] if p))
    path = Path(text)
    if path.suffix.lower() == ".csv" or exists(path):
        from flopsim.scaling.fit import fit_csv

        return fit_csv(path).law
    raise InputError(f"law: {text!r}: unknown law; expected one of {', '.join([*BUILTIN, *ALIASES])} "
                     f"or a path to a CSV of runs (params, tokens, loss)")
