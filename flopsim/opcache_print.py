"""Op lists -> the source of a sympy-free module (flopsim.opcache): `values(B, S, T, S_enc)`
(and any further symbols named, e.g. flopsim.parallel.shard's expert load) returns each distinct expression's exact value, `OPS` says which ones each op's fields
are. Printing: integers as literals, rationals as `F(p, q)` (fractions.Fraction), a
negative power as a Fraction's, `ceiling` / `floor` as math's, `Min` / `Max` as min / max,
floats as their repr. Anything else makes `module_source` return None (not cached)."""

from __future__ import annotations

from typing import Optional

import sympy as sp

from flopsim.ops.fields import COST_FIELDS

SYMBOLS = {"B": "B", "S": "S", "T": "T", "S_enc": "S_enc"}


class Unprintable(Exception):
    """An expression the cache does not print exactly."""


def expr_source(e: sp.Expr, extra: tuple = ()) -> str:
    """`e` as exact Python arithmetic over the token symbols (and the symbols named in `extra`)."""
    if e.is_Integer:
        return str(int(e))
    if e.is_Rational:
        return f"F({int(e.p)}, {int(e.q)})"
    if e.is_Float:
        return repr(float(e))
    if e.is_Symbol:
        if e.name in extra:
            return e.name
        if e.name not in SYMBOLS:
            raise Unprintable(e.name)
        return SYMBOLS[e.name]
    args = [expr_source(a, extra) for a in e.args]
    if e.is_Add:
        return "(" + " + ".join(args) + ")"
    if e.is_Mul:
        return "(" + " * ".join(args) + ")"
    if e.is_Pow:
        exp = e.args[1]
        if exp.is_Integer and exp >= 0:
            return f"({args[0]} ** {args[1]})"
        if exp.is_integer:  # exact: a Fraction's power (an int's negative power is a float)
            return f"(F({args[0]}) ** {args[1]})"
        return f"(float({args[0]}) ** float({args[1]}))"
    if isinstance(e, sp.ceiling):
        return f"ceil({args[0]})"
    if isinstance(e, sp.floor):
        return f"floor({args[0]})"
    if isinstance(e, sp.Min):
        return "min(" + ", ".join(args) + ")"
    if isinstance(e, sp.Max):
        return "max(" + ", ".join(args) + ")"
    raise Unprintable(type(e).__name__)


def module_source(ops: list, extra: tuple = ()) -> Optional[str]:
    """The module's source, or None when an expression is not printable; `extra`: names of
    further symbols, arguments of `values` after S_enc (identifiers, in order)."""
    index: dict = {}
    exprs: list = []

    def ref(e) -> int:
        e = sp.sympify(e)
        if e not in index:
            index[e] = len(exprs)
            exprs.append(e)
        return index[e]

    table = []
    for op in ops:
        static = (op.name, op.kind, op.layer, op.module, op.pass_, op.variant, op.host_sync)
        fields = tuple(ref(getattr(op, f)) for f in COST_FIELDS)
        tags = tuple((k, True, ref(v)) if isinstance(v, sp.Basic) else (k, False, v) for k, v in op.tags.items())
        gemm = tuple(ref(g) for g in op.gemm) if op.gemm is not None else None
        table.append((static, fields, tags, gemm, ref(op.kernels)))
    try:
        body = ",\n        ".join(expr_source(e, extra) for e in exprs)
    except Unprintable:
        return None
    literal = repr(table)
    try:  # the static parts must read back as written (plain literals)
        if eval(literal, {"__builtins__": {}}) != table:
            return None
    except Exception:  # noqa: BLE001 - a tag that is no literal: not cached
        return None
    args = ", ".join(("B", "S", "T", "S_enc", *extra))
    return f"OPS = {literal}\n\n\ndef values({args}):\n    return [\n        {body},\n    ]\n"
