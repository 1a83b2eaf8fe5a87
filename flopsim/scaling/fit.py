"""Fit L(N, D) = E + A / N^alpha + B / D^beta to the user's own runs, as
Hoffmann et al. 2022 do for their approach 3 (section 3.3 and appendix D.2),
with the corrections of Besiroglu et al. 2024 (arXiv 2404.10102: a tight
optimizer tolerance, and every run weighted alike):

    minimise  sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )

over (a, b, e, alpha, beta), with A = exp(a), B = exp(b), E = exp(e) (the
log-sum-exp form keeps A, B, E positive and the objective smooth) and
delta = 1e-3. L-BFGS (scipy's L-BFGS-B, analytic gradient) starts from the
best points of Hoffmann et al.'s initialisation grid (alpha, beta in
{0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}): the
objective is evaluated at all 4,500 grid points at once (numpy) and the
optimiser is run from the `starts` best of them, which finds the same
minimum as running it from every point at a fraction of the time.

The CSV has one row per training run with columns `params` (N, counted as
flopsim's `params`: every parameter), `tokens` (D) and `loss` (final
validation loss, nats); other columns are kept in the per-run table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flopsim.errors import InputError
from flopsim.spec.paths import exists

HUBER_DELTA = 1e-3
REQUIRED = ("params", "tokens", "loss")
GRID = dict(
    alpha=np.arange(0.0, 2.01, 0.5),
    beta=np.arange(0.0, 2.01, 0.5),
    e=np.arange(-1.0, 1.01, 0.5),
    a=np.arange(0.0, 25.01, 5.0),
    b=np.arange(0.0, 25.01, 5.0),
)


@dataclass
class FitResult:
    """A fitted law with its residuals (loss units: predicted - observed)."""

    law: object
    runs: object  # pandas DataFrame: the runs with `predicted`, `residual`, `rel_residual`
    objective: float
    starts: int
    converged: bool
    source: str
    notes: list = field(default_factory=list)

    @property
    def rmse(self) -> float:
        return float(np.sqrt(np.mean(self.runs["residual"] ** 2)))

    @property
    def max_abs(self) -> float:
        return float(np.max(np.abs(self.runs["residual"])))

    def to_dict(self) -> dict:
        return {"source": self.source, "coefficients": self.law.coefficients(), "rmse": self.rmse,
                "max_abs_residual": self.max_abs, "huber_objective": self.objective,
                "huber_delta": HUBER_DELTA, "runs": self.runs.to_dict(orient="records"),
                "converged": self.converged, "starts": self.starts, "notes": list(self.notes)}


def _huber(r, delta=HUBER_DELTA):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _huber_grad(r, delta=HUBER_DELTA):
    return np.clip(r, -delta, delta)


def _terms(theta, logN, logD):
    a, b, e, alpha, beta = theta
    return np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])


def objective(theta, logN, logD, logL):
    """Huber loss of the LSE model in log space, and its gradient."""
    t = _terms(theta, logN, logD)
    m = t.max(axis=0)
    ex = np.exp(t - m)
    s = ex.sum(axis=0)
    lse = m + np.log(s)
    r = lse - logL
    w = ex / s  # d lse / d term
    g = _huber_grad(r)
    grad = np.array([
        np.sum(g * w[0]),
        np.sum(g * w[1]),
        np.sum(g * w[2]),
        np.sum(g * w[0] * -logN),
        np.sum(g * w[1] * -logD),
    ])
    return float(np.sum(_huber(r))), grad


def _grid_objective(logN, logD, logL):
    """The objective at every point of the initialisation grid: (points, 5), values."""
    mesh = np.meshgrid(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"], indexing="ij")
    pts = np.stack([m.ravel() for m in mesh], axis=1)  # a, b, e, alpha, beta
    a, b, e, alpha, beta = (pts[:, i:i + 1] for i in range(5))
    t0 = a - alpha * logN[None, :]
    t1 = b - beta * logD[None, :]
    t2 = np.broadcast_to(e, t0.shape)
    lse = np.logaddexp(np.logaddexp(t0, t1), t2)
    values = _huber(lse - logL[None, :]).sum(axis=1)
    return pts, values


def fit_arrays(params, tokens, loss, *, starts: int = 24, name: str = "fit", source: str = "user runs"):
    """Fit the Chinchilla form to arrays of runs; returns a FitResult."""
    import pandas as pd
    from scipy.optimize import minimize

    from flopsim.scaling.laws import ChinchillaLaw

    N = np.asarray(params, dtype=float)
    D = np.asarray(tokens, dtype=float)
    L = np.asarray(loss, dtype=float)
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    pts, values = _grid_objective(logN, logD, logL)
    order = np.argsort(values, kind="stable")[: max(1, starts)]
    best = None
    for x0 in pts[order]:
        res = minimize(objective, x0, args=(logN, logD, logL), jac=True, method="L-BFGS-B",
                       options=dict(maxiter=20000, ftol=1e-15, gtol=1e-12, maxcor=20))
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    law = ChinchillaLaw(name=name, source=source, params_kind="total",
                        E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)),
                        alpha=float(alpha), beta=float(beta),
                        notes=(f"fitted to {len(N)} runs (Huber delta {HUBER_DELTA} on log loss, L-BFGS)",))
    pred = law.loss(N, D)
    runs = pd.DataFrame({"params": N, "tokens": D, "loss": L, "predicted": pred,
                         "residual": pred - L, "rel_residual": (pred - L) / L})
    notes = []
    if alpha <= 1e-6 or beta <= 1e-6:
        notes.append("an exponent fitted to ~0: the runs do not vary N or D enough to identify it")
    return FitResult(law=law, runs=runs, objective=float(best.fun), starts=int(len(order)),
                     converged=bool(best.success), source=source, notes=notes)


def read_runs(path) -> "object":
    """The runs CSV as a DataFrame with float columns params, tokens, loss
    (checked: present, numeric, positive, finite; at least 5 runs)."""
    import pandas as pd

    path = Path(path)
    if not exists(path):
        raise InputError(f"law: {str(path)!r}: no such file (a CSV of runs with columns params, tokens, loss)")
    try:
        table = pd.read_csv(path)
    except Exception as err:  # pandas raises several types for unreadable files
        raise InputError(f"{path}: cannot read as CSV: {str(err).splitlines()[0]}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        found = ", ".join(table.columns) or "none"
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}: need params, tokens, loss "
                         f"(found {found})")
    for col in REQUIRED:
        values = pd.to_numeric(table[col], errors="coerce")
        bad = ~np.isfinite(values) | (values <= 0)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{path}: row {row + 2}: column {col}: value {table[col].iloc[row]!r}: "
                             f"must be a positive number")
        table[col] = values.astype(float)
    if len(table) < 5:
        raise InputError(f"{path}: {len(table)} run(s): the law has 5 coefficients; give at least 5 runs")
    if table["params"].nunique() < 2 or table["tokens"].nunique() < 2:
        raise InputError(f"{path}: the runs must vary both params and tokens to fit A/N^alpha and B/D^beta")
    return table


def fit_csv(path, *, starts: int = 24) -> FitResult:
    """Read a CSV of runs and fit the law; the per-run table keeps extra columns."""
    table = read_runs(path)
    result = fit_arrays(table["params"], table["tokens"], table["loss"], starts=starts,
                        name=Path(path).stem, source=f"fitted to {path}")
    extra = [c for c in table.columns if c not in REQUIRED]
    for c in extra:
        result.runs.insert(0, c, table[c].to_numpy())
    return result
