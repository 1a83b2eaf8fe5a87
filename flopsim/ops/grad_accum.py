"""Gradient accumulation across micro-batches, and the dtype gradients are
reduced in over the data-parallel ranks: an elementwise op per micro-batch
over a GPU's parameters, and the bytes per parameter of the reduction.

A step of m micro-batches sums each micro-batch's weight gradients into one
accumulated gradient. The form (`grad_accumulation`) says how:
- `autograd` (default, plain PyTorch): autograd's AccumulateGrad writes the
  first micro-batch's gradient into `param.grad` and, for micro-batches
  2..m, adds the new one to it (`param.grad += new`): read 2 x g, write g
  bytes a parameter (g: the gradients' bytes), paid by m - 1 micro-batches.
- `main_grad` (Megatron-LM's local DDP with contiguous buffers,
  megatron/model/distributed.py @d898a89, `param.main_grad.add_(param.grad.data)`
  in a hook after every parameter's backward): every micro-batch adds the new
  gradient (g bytes) into the main_grad buffer of b bytes a value: read b + g,
  write b, paid by all m micro-batches. The buffer is the one Megatron
  all-reduces, so b is the reduction's dtype (`grad_reduce_dtype`; fp32 when
  Megatron accumulates and all-reduces in fp32, forced on for bf16:
  megatron/arguments.py @d898a89 ~line 161).
- `none`: no separate op -- accumulation fused into the weight-gradient GEMM
  (Megatron's --gradient-accumulation-fusion, on only with fp32 accumulation:
  megatron/arguments.py @d898a89 ~lines 176-185; Megatron-Core's default), or
  a step of one micro-batch without a buffer. The GEMM's extra fp32 output
  read is not counted.
One add (1 FLOP) a parameter. The op (kind `elementwise`, variant `add`,
tag `grad_accumulation`: its form) is one micro-batch's over the parameters
given; flopsim.parallel.shard scales it to one GPU's (`accumulation_share`),
and a step pays it `paying_microbatches` times.

The reduction's dtype (`grad_reduce_dtype`): None reduces the gradients as
they are stored (flopsim.memory's gradient bytes); fp32 / bf16 / fp16 set the
message's bytes a parameter (Megatron-Core with bf16: grad_reduce_in_fp32;
PyTorch FSDP's MixedPrecision with reduce_dtype fp32).
"""

from __future__ import annotations

from typing import Optional

import sympy as sp

from flopsim.errors import bad_value
from flopsim.ops.op import Op

FORMS = ("none", "autograd", "main_grad")
REDUCE_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def check_form(form: str) -> str:
    if form not in FORMS:
        raise bad_value("grad_accumulation", form, f"expected one of {', '.join(FORMS)}")
    return form


def reduce_bytes(grad_reduce_dtype: Optional[str], grad_bytes: float) -> float:
    """Bytes a parameter of the data-parallel gradient reduction's message (None: `grad_bytes`)."""
    if grad_reduce_dtype is None:
        return grad_bytes
    if grad_reduce_dtype not in REDUCE_DTYPE_BYTES:
        raise bad_value("grad_reduce_dtype", grad_reduce_dtype, f"expected one of {', '.join(REDUCE_DTYPE_BYTES)}")
    return REDUCE_DTYPE_BYTES[grad_reduce_dtype]


def bytes_per_param(form: str, grad_bytes: float, buffer_bytes: Optional[float] = None) -> float:
    """Bytes one micro-batch's accumulation moves a parameter (see the module docstring);
    `buffer_bytes`: main_grad's bytes a value (default `grad_bytes`)."""
    form = check_form(form)
    if form == "autograd":
        return 3 * grad_bytes
    if form == "main_grad":
        b = grad_bytes if buffer_bytes is None else buffer_bytes
        return 2 * b + grad_bytes
    return 0


def paying_microbatches(form: str, microbatches: int) -> int:
    """The micro-batches of a step that run the accumulation op: autograd's all but the first."""
    form = check_form(form)
    return {"none": 0, "autograd": microbatches - 1, "main_grad": microbatches}[form]


def grad_accumulation(params, form: str, *, grad_bytes: float, buffer_bytes: Optional[float] = None,
                      layer: int) -> list[Op]:
    """One micro-batch's accumulation over `params` parameters as one op (none: no op)."""
    per = bytes_per_param(form, grad_bytes, buffer_bytes)
    if not per:
        return []
    params = sp.sympify(params)
    return [Op(name=f"grad_accumulation.{form}", kind="elementwise", layer=layer, module="grad_accumulation",
               pass_="bwd", variant="add", other_flops=params, weight_bytes=sp.nsimplify(per) * params,
               tags={"grad_accumulation": form})]
