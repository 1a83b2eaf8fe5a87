"""isoFLOP curves as a PNG: predicted loss against parameters, one curve per
budget (colour) and family (line style), each optimum marked. matplotlib is
imported here only, with the Agg backend; the file is written atomically
(flopsim.cli.output.write_atomic)."""

from __future__ import annotations

import io
from pathlib import Path

from flopsim.errors import InputError

STYLES = {"dense": "-", "mod": "--", "moe": ":"}
MARKERS = {"dense": "o", "mod": "s", "moe": "D"}


def budget_label(c: float) -> str:
    exp = int(f"{c:e}".split("e")[1])
    mant = c / 10 ** exp
    return f"$10^{{{exp}}}$" if abs(mant - 1) < 1e-9 else f"${mant:.3g}\\times10^{{{exp}}}$"


def plot_isoflop(result, path, *, title: str | None = None) -> Path:
    """Write `result`'s curves (an IsoflopResult) to `path` (PNG)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"plot: {str(path)!r}: expected a .png path")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    from flopsim.units import human

    budgets = sorted(result.budgets)
    cmap = plt.get_cmap("viridis")
    colors = {b: cmap(0.05 + 0.8 * i / max(1, len(budgets) - 1)) for i, b in enumerate(budgets)}
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    lo, hi = float("inf"), float("-inf")
    for (fam, b), rows in sorted(result.curves.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        opt = result.optima[(fam, b)]
        # the curve around its optimum: model sizes within 20x either side
        pts = [r for r in rows if opt.params / 20 <= r["law_params"] <= opt.params * 20] or rows
        xs = [r["law_params"] for r in pts]
        ys = [r["loss"] for r in pts]
        lo, hi = min(lo, min(ys), opt.loss), max(hi, max(ys))
        ax.plot(xs, ys, STYLES.get(fam, "-"), color=colors[b], lw=2)
        ax.plot([opt.params], [opt.loss], MARKERS.get(fam, "o"), color=colors[b], ms=9, mec="black", mew=1.2,
                zorder=5)
        above = fam == result.families[0] and len(result.families) > 1  # reference above-left, others below-right
        ax.annotate(f"{human(opt.params)}, {opt.tokens_per_param:.2g} tok/param", (opt.params, opt.loss),
                    textcoords="offset points", xytext=(-8, 7) if above else (6, -13),
                    ha="right" if above else "left", fontsize=8,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75), zorder=6)
    ax.set_xscale("log")
    kind = {"total": "all parameters, embeddings included",
            "non_embedding": "non-embedding parameters; an MoE's count all experts"}.get(result.law.params_kind, result.law.params_kind)
    ax.set_xlabel(f"model size N (parameters; {kind})", fontsize=11)
    ax.set_ylabel(f"predicted final loss (nats/token, {result.law.name} law)", fontsize=11)
    rule = "exact flopsim training FLOPs/token" if result.flops_rule == "exact" else "C = 6ND"
    ax.set_title(title or f"isoFLOP curves: {result.law.name} law, {rule}, seq {result.seq}", fontsize=12)
    assumed = [a for a in result.assumptions if a.startswith("ASSUMPTION")]
    if assumed:
        fig.text(0.01, 0.005, "MoD loss ASSUMED: " + assumed[0].split(": ", 1)[1].split(".")[0],
                 fontsize=7.5, color="darkred", ha="left", va="bottom")
    pad = 0.04 * (hi - lo if hi > lo else 1.0)
    ax.set_ylim(lo - 2 * pad, hi + pad)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    handles = [Line2D([], [], color=colors[b], lw=3, label=f"C = {budget_label(b)} FLOPs") for b in budgets]
    if len(result.families) > 1:
        handles += [Line2D([], [], color="black", ls=STYLES.get(f, "-"), marker=MARKERS.get(f, "o"), lw=1.5,
                           label=f) for f in result.families]
    handles.append(Line2D([], [], ls="", marker="o", color="grey", mec="black", label="optimum"))
    ax.legend(handles=handles, fontsize=9, loc="upper right", framealpha=0.9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from flopsim.outputs import write_atomic

    write_atomic(path, buf.getvalue())
    return path
