"""Symbols shared by every formula.

B (sequences in the batch), S (query tokens per sequence), T (context
tokens each query attends to; T = S outside decode) are always symbols;
S_enc (an encoder-decoder's encoder tokens per sequence) appears only in
encoder-decoder ops.
Model dimensions come from a `Dims`: sympy integers for a concrete spec, or
symbols named as in the papers for readable, fully symbolic formulas.
"""

from __future__ import annotations

from typing import Any

import sympy as sp

B = sp.Symbol("B", positive=True, integer=True)
S = sp.Symbol("S", positive=True, integer=True)
T = sp.Symbol("T", positive=True, integer=True)
S_enc = sp.Symbol("S_enc", positive=True, integer=True)

# spec field -> symbol name in formulas (papers' notation)
SYMBOL_NAMES = {
    "d_model": "d_model",
    "heads": "H",
    "kv_heads": "H_kv",
    "d_head": "d_head",
    "d_ff": "d_ff",
    "vocab": "V",
    "max_seq": "S_max",
    "classes": "n_cls",
    "token_types": "n_types",
    "dtype_bytes": "w",
    # MoD
    "mod_capacity": "c",
    "mod_predictor_hidden": "h_mod",
    # MoE
    "experts": "E",
    "top_k": "k",
    "d_expert": "d_expert",
    "shared_experts": "E_shared",
    "capacity_factor": "C_f",
    # Sparse FF
    "block_size": "N",
    "d_lowrank": "d_lowrank",
    # sliding-window attention (its size)
    "window": "W_win",
    # Sparse QKV (any family)
    "sparse_qkv": "S_qkv",
    "conv_kernel": "K_conv",
    # multi-head latent attention (DeepSeek-V2's notation: d_c, d_c', d_h^R)
    "kv_rank": "d_c",
    "q_rank": "d_cq",
    "d_nope": "d_nope",
    "d_rope": "d_rope",
    "d_v": "d_v",
    # length reduction
    "lr_predictor_hidden": "h_lr",
    # T5's relative position bias
    "relative_buckets": "n_buckets",
}
# fields that are not integers when symbolic
_REAL = {"mod_capacity", "capacity_factor"}


def exact(value: Any) -> sp.Expr:
    """A sympy number; floats become exact rationals (0.125 -> 1/8)."""
    if isinstance(value, float):
        return sp.Rational(str(value)) if not value.is_integer() else sp.Integer(int(value))
    return sp.sympify(value)


def symbol(name: str) -> sp.Symbol:
    real = name in _REAL
    return sp.Symbol(SYMBOL_NAMES.get(name, name), positive=True, integer=not real)


class Dims:
    """Model dimensions: `dims.d_model` is an Integer, or a Symbol when symbolic."""

    def __init__(self, values: dict[str, Any], symbolic: bool = False):
        self._values = {k: v for k, v in values.items() if v is not None}
        self.symbolic = symbolic

    def __getattr__(self, name: str) -> sp.Expr:
        values = self.__dict__.get("_values", {})
        if name not in values:
            raise AttributeError(f"no dimension {name!r}")
        return symbol(name) if self.symbolic else exact(values[name])

    def value(self, name: str) -> Any:
        """The concrete value, also in symbolic mode (for structural decisions)."""
        return self._values[name]

    def substitutions(self) -> dict[sp.Symbol, sp.Expr]:
        """Symbol -> value, to turn a symbolic expression into the concrete one."""
        return {symbol(k): exact(v) for k, v in self._values.items()}

    @classmethod
    def of(cls, spec, symbolic: bool = False) -> "Dims":
        values: dict[str, Any] = {
            "d_model": spec.d_model,
            "heads": spec.heads,
            "kv_heads": spec.kv_heads,
            "d_head": spec.d_head,
            "d_ff": spec.d_ff,
            "vocab": spec.vocab,
            "max_seq": spec.max_seq,
            "classes": spec.classes,
            "token_types": spec.token_types,
            "dtype_bytes": spec.dtype_bytes,
        }
        if spec.mod is not None:
            values["mod_capacity"] = spec.mod.capacity
            values["mod_predictor_hidden"] = spec.mod.predictor_hidden
        if spec.moe is not None:
            values["experts"] = spec.moe.experts
            values["top_k"] = spec.moe.top_k
            values["d_expert"] = spec.moe.d_expert or spec.d_ff
            values["shared_experts"] = spec.moe.shared_experts
            values["capacity_factor"] = spec.moe.capacity_factor
        if spec.sparse_ff is not None:
            values["block_size"] = spec.sparse_ff.block_size
            values["d_lowrank"] = spec.sparse_ff.d_lowrank
        if spec.sliding_window is not None:
            values["window"] = spec.sliding_window.size
        if spec.sparse_qkv is not None:
            values["sparse_qkv"] = spec.sparse_qkv.modules
            values["conv_kernel"] = spec.sparse_qkv.conv_kernel
        if spec.mla is not None:
            values.update(kv_rank=spec.mla.kv_rank, q_rank=spec.mla.q_rank, d_nope=spec.mla.d_nope,
                          d_rope=spec.mla.d_rope, d_v=spec.mla.d_v)
        if spec.length_reduction is not None:
            values["lr_predictor_hidden"] = spec.length_reduction.predictor_hidden
        if spec.positions == "relative":
            values["relative_buckets"] = spec.relative_buckets
        return cls(values, symbolic)
