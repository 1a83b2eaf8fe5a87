"""Scaling laws and isoFLOP / iso-time optima (issue 6).

    import flopsim
    r = flopsim.isoflop(5.76e23, law="besiroglu", flops_rule="6N")
    r.params, r.tokens, r.loss, r.curve

- `laws`: the published laws (chinchilla-1/-2/-3, kaplan, besiroglu, krajewski, clark) with
  their sources and coefficients in one table; `load_law(name_or_csv)`.
- `fit`: fit L = E + A/N^alpha + B/D^beta to the user's runs (Hoffmann et
  al. 2022 approach 3: Huber on log loss, L-BFGS from a grid of starts).
- `ladder`: model shapes for a sweep and their exact training FLOPs per token.
- `isoflop`: the optima, the curves, and the dense vs MoD/MoE comparison.
- `plot`: isoFLOP curves as a PNG (matplotlib, imported lazily).
"""

from __future__ import annotations

from flopsim.scaling.isoflop import IsoflopResult, Optimum, isoflop
from flopsim.scaling.ladder import LadderRule, ModOptions, MoeOptions
from flopsim.scaling.laws import (
    PUBLISHED,
    ChinchillaLaw,
    ClarkLaw,
    KrajewskiLaw,
    Law,
    law_names,
    load_law,
)

__all__ = [
    "ChinchillaLaw", "ClarkLaw", "IsoflopResult", "KrajewskiLaw", "LadderRule", "Law", "ModOptions",
    "MoeOptions", "Optimum", "PUBLISHED", "fit_law", "isoflop", "law_names", "load_law",
]


def fit_law(path_or_runs, **kwargs):
    """Fit the Chinchilla form to a CSV path or a DataFrame of runs (params, tokens, loss)."""
    from flopsim.scaling.fit import fit_arrays, fit_csv

    if hasattr(path_or_runs, "columns"):
        t = path_or_runs
        return fit_arrays(t["params"], t["tokens"], t["loss"], **kwargs)
    return fit_csv(path_or_runs, **kwargs)
