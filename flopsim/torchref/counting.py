"""FlopCounterMode, made complete for CPU and for grouped GEMMs, and per-module totals.

torch 2.13 registers no FLOP formula for the CPU fused-attention kernels
(`aten::_scaled_dot_product_flash_attention_for_cpu` and its backward), so
FlopCounterMode counts them as 0. `register_cpu_attention_formulas` registers
torch's own `sdpa_flop_count` / `sdpa_backward_flop_count` for them -- the
same formulas torch uses for the CUDA flash and efficient kernels -- so the
reference runs the real fused kernel and is counted as it is on GPU.

Nor has torch 2.13 a formula for `aten::_grouped_mm` (`F.grouped_mm`, the
default expert path of transformers 5's MoE models: without it a
FlopCounterMode count of Mixtral or Qwen-MoE misses the experts, about two
thirds of the FLOPs, with no warning). `register_grouped_mm_formula` counts
2 FLOPs per multiply-accumulate of the groups the kernel runs
(`grouped_mm_flops`). Both are registered by `register_formulas`, which
`count_with_torch` calls; where a later torch already has a formula, nothing
is registered.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional


def register_cpu_attention_formulas() -> None:
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args,
                               out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def grouped_mm_flops(a_shape, b_shape, groups_end: Optional[int]) -> int:
    """FLOPs of `aten._grouped_mm(a, b, offs)`, 2 per multiply-accumulate. `offs` holds
    the cumulative ends of the groups along the dimension it splits; the kernel runs rows
    (or columns, or the reduction) up to its last entry, `groups_end` (None: no offs, or
    its values unreadable, as on the meta device: the whole dimension, which is what a
    dropless MoE layer routes). The four layouts:
    - 2D a [M, K] x 3D b [G, K, N] (forward, grad of the input): rows split, 2 * end * K * N;
    - 3D a [G, M, K] x 2D b [K, N]: columns of b split, 2 * M * K * end;
    - 2D a [M, K] x 2D b [K, N], out [G, M, N] (grad of the weights): K split, 2 * M * N * end;
    - 3D x 3D: a batched product, 2 * G * M * K * N.
    """
    if len(a_shape) == 3 and len(b_shape) == 3:
        g, m, k = a_shape
        return 2 * g * m * k * b_shape[-1]
    if len(a_shape) == 2 and len(b_shape) == 3:
        m, k = a_shape
        return 2 * (m if groups_end is None else groups_end) * k * b_shape[-1]
    if len(a_shape) == 3 and len(b_shape) == 2:
        _, m, k = a_shape
        n = b_shape[-1]
        return 2 * m * k * (n if groups_end is None else groups_end)
    if len(a_shape) == 2 and len(b_shape) == 2:
        m, k = a_shape
        return 2 * m * b_shape[-1] * (k if groups_end is None else groups_end)
    raise ValueError(f"aten._grouped_mm: operands of shapes {tuple(a_shape)} and {tuple(b_shape)} "
                     f"(expected 2-D or 3-D)")


def _groups_end(offs) -> Optional[int]:
    """The last entry of `offs` (where the groups end), None when absent or unreadable."""
    if offs is None or offs.numel() == 0 or offs.device.type == "meta":
        return None
    try:
        return int(offs[-1].item())
    except (RuntimeError, NotImplementedError):  # a fake tensor (torch.compile tracing)
        return None


def register_grouped_mm_formula() -> None:
    import torch
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is None or op in fc.flop_registry:
        return

    @fc.register_flop_formula(op, get_raw=True)
    def _grouped_mm(a, b, offs=None, *args, out_val=None, **kwargs) -> int:
        return grouped_mm_flops(tuple(a.shape), tuple(b.shape), _groups_end(offs))


def register_formulas() -> None:
    """The formulas torch 2.13 lacks: the CPU fused attention and the grouped GEMM."""
    register_cpu_attention_formulas()
    register_grouped_mm_formula()


def count_with_torch(fn) -> dict[str, int]:
    """Run `fn()` under FlopCounterMode; {module path: FLOPs}, '' for the total.
    Paths drop the root module's class name (`block.0.attn.qkv`)."""
    from torch.utils.flop_counter import FlopCounterMode

    register_formulas()
    with FlopCounterMode(display=False) as counter:
        fn()
    totals: dict[str, int] = defaultdict(int)
    for module, by_op in counter.get_flop_counts().items():
        flops = int(sum(by_op.values()))
        if module == "Global":
            totals[""] = flops
            continue
        _, _, path = module.partition(".")
        if path:
            totals[path] = flops
    totals.setdefault("", 0)
    return dict(totals)
