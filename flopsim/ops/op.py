"""The Op record: one kernel's cost as sympy expressions.

Conventions (docs/design.md, "Counting conventions" -- a contract):
- `flops`: 2 per multiply-accumulate of every matrix product the kernel runs
  (mm, addmm, bmm, baddbmm, fused attention, convolution), exactly as
  torch.utils.flop_counter.FlopCounterMode counts them. Bias adds,
  elementwise ops, softmax, norms, top-k, sort, gather and scatter are 0.
- `causal_flops`: `flops` with attention restricted to the causal triangle.
- `other_flops`: the arithmetic `flops` leaves out (elementwise, softmax,
  norms, bias adds); `all_flops = flops + other_flops` feeds the roofline.
- bytes are split by source: `weight_bytes` (parameters read, and in the
  backward pass their gradients written), `act_read_bytes` /
  `act_write_bytes` (activations), `kv_read_bytes` / `kv_write_bytes` (the
  KV cache). Each op is costed as its own kernel: what it reads comes from
  memory, what it writes goes to memory.
- `params`: parameters this op owns (a tied head owns none).
- `comm_bytes`: a collective's message (kind `collective`, added by
  flopsim.parallel when a layout shards the list): the bytes each rank holds
  (all-reduce, all-to-all, a send) or the whole buffer (all-gather,
  reduce-scatter), as flopsim.collectives takes them; `variant` names the
  collective and `tags` its group (`group`, `ranks`, `level`). Not memory
  traffic: `bytes` leaves it out. 0 for every other op.
- `gemm`: (batch, m, n, k) of the op's main matrix product, for shape-aware
  calibration; None for ops that are not matrix products.
- `variant`: which kernel of its kind the op runs (the elementwise function,
  the norm, fused or explicit attention), so a calibration measured on that
  kernel applies; "" when the kind says it all.
- `pass_`: "fwd" or "bwd"; a backward op keeps its forward op's name.
- `layer`: -1 for embeddings, 0..L-1 for blocks, L for the final norm and head.
- `module`: the path of the torch reference module that runs the op (the
  key FlopCounterMode's per-module counts are joined on).
- `kernels`: the expected number of times the op's kernel is launched in
  one step: 1 for an op that runs; a probability for a branch taken only
  sometimes (a Mixture-of-Depths block at decode runs when any token of the
  batch chose it, so its kernels launch 1 - (1 - c)^B times in
  expectation). The roofline charges one fixed per-kernel cost (launch and
  dispatch) per launch; an op with no work launches nothing.
- `host_sync`: the host waits here for the device to finish what it has
  queued, because an eager implementation reads a device value back to
  decide what to launch next: a dropless MoE's token counts per expert
  (`counts`, read back to split the tokens), a MoD block's running tokens at
  decode (its router's decisions). On a device that queues kernels the
  host-device pipeline drains there (flopsim.roofline.overlap_times).
- `attention_core` (property): the attention kernel and, with an explicit
  attention, its probabilities' dropout (tag `attention_core`): what selective
  recomputation (Korthikanti et al. 2022, section 4.2: "attention softmax,
  dropout, and attention over V") runs again in backward instead of keeping.
- `cheap` (property): a norm, an elementwise op (activation, RoPE, dropout,
  scaling) or a softmax outside the attention core, but not an add: what
  cheap recomputation runs again in backward instead of keeping, the
  matrix products' and attention kernels' outputs kept (LLaMA, Touvron et
  al. 2023, section 2.4: "we save the activations that are expensive to
  compute, such as the outputs of linear layers"). An add is not run again:
  no backward reads its output but the next op's, which keeps it (a norm
  keeps its input, the residual stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

import sympy as sp

from flopsim.ops.fields import BYTE_FIELDS, CHEAP_KINDS, COST_FIELDS, KINDS  # noqa: F401 - re-exported

ZERO = sp.Integer(0)


def _sym(value: Any) -> sp.Expr:
    return value if isinstance(value, sp.Basic) else sp.sympify(value)


@dataclass(frozen=True)
class Op:
    name: str
    kind: str
    layer: int
    module: str
    pass_: str = "fwd"
    flops: sp.Expr = ZERO
    causal_flops: Optional[sp.Expr] = None
    other_flops: sp.Expr = ZERO
    weight_bytes: sp.Expr = ZERO
    act_read_bytes: sp.Expr = ZERO
    act_write_bytes: sp.Expr = ZERO
    kv_read_bytes: sp.Expr = ZERO
    kv_write_bytes: sp.Expr = ZERO
    params: sp.Expr = ZERO
    comm_bytes: sp.Expr = ZERO
    gemm: Optional[tuple] = None
    tags: dict = field(default_factory=dict, compare=False, hash=False)
    variant: str = ""  # the kernel that runs (gelu, rmsnorm, explicit attention, ...), for calibration
    kernels: sp.Expr = sp.Integer(1)  # expected launches per step (see the module docstring)
    param_bytes: Optional[sp.Expr] = None  # the params' bytes as stored (None: params x the dtype's bytes)
    host_sync: bool = False  # an eager implementation reads a device value back here (see the module docstring)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}")
        for name in COST_FIELDS:
            value = getattr(self, name)
            if name == "causal_flops" and value is None:
                value = self.flops
            object.__setattr__(self, name, _sym(value))
        object.__setattr__(self, "kernels", _sym(self.kernels))
        if self.param_bytes is not None:
            object.__setattr__(self, "param_bytes", _sym(self.param_bytes))
        if self.gemm is not None:
            object.__setattr__(self, "gemm", tuple(_sym(v) for v in self.gemm))

    @property
    def bytes(self) -> sp.Expr:
        return sum((getattr(self, f) for f in BYTE_FIELDS), ZERO)

    @property
    def all_flops(self) -> sp.Expr:
        return self.flops + self.other_flops

    @property
    def attention_core(self) -> bool:
        """Recomputed by selective recomputation (module docstring)."""
        return self.kind == "attention" or bool(self.tags.get("attention_core"))

    @property
    def cheap(self) -> bool:
        """Recomputed by cheap recomputation (module docstring)."""
        return self.kind in CHEAP_KINDS and self.variant != "add" and not self.attention_core

    @property
    def key(self) -> str:
        """Unique within a model's op list: the name, with ':bwd' for backward ops."""
        return self.name if self.pass_ == "fwd" else f"{self.name}:bwd"

    def renamed(self, name: str, module: str, layer: int) -> "Op":
        return replace(self, name=name, module=module, layer=layer)

    def scaled(self, factor) -> "Op":
        """The op with every cost (not params) multiplied by `factor` (e.g. an expectation)."""
        factor = _sym(factor)
        changes = {f: getattr(self, f) * factor for f in COST_FIELDS if f != "params"}
        return replace(self, **changes)

    def expressions(self) -> dict[str, sp.Expr]:
        out = {f: getattr(self, f) for f in COST_FIELDS}
        out["kernels"] = self.kernels
        if self.gemm is not None:
            for axis, value in zip(("gemm_batch", "gemm_m", "gemm_n", "gemm_k"), self.gemm):
                out[axis] = value
        return out


OP_FIELDS = tuple(f.name for f in fields(Op))
