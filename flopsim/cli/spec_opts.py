"""The spec options that say how code runs a model's memory-bound ops (`--norm-impl`,
`--rope-impl`, `--act-impl`, `--loss`): typer options shared by `count`, `predict` and
`plan train`, and `with_impls`, the spec with those given."""

from __future__ import annotations

import typer

# each spec field and its option (`with_impls`; a search's best command repeats those not fused)
IMPL_FLAGS = {"loss_impl": "--loss", "norm_impl": "--norm-impl", "rope_impl": "--rope-impl", "act_impl": "--act-impl"}

NormImplOpt = typer.Option(None, "--norm-impl", help="RMSNorm's kernels: fused (one a pass) | fp32_unfused (eager code's fp32 RMSNorm: transformers' LlamaRMSNorm, Meta's reference, IBM fms; 8 + 16 kernels in bf16); default: the spec's norm_impl (fused).")
RopeImplOpt = typer.Option(None, "--rope-impl", help="RoPE's kernels: fused (one a pass) | rotate_half (transformers' apply_rotary_pos_emb) | complex_fp32 (Meta's reference, torchtitan) | pairs_fp32 (IBM fms, 2024): eager forms, each aten op a kernel, on q and k apart; default: the spec's rope_impl (fused).")
ActImplOpt = typer.Option(None, "--act-impl", help="A gated FFN's activation: fused (act(gate) * up, one kernel) | unfused (eager act_fn(gate) * up: 2 + 3 kernels); default: the spec's act_impl (fused).")
LossOpt = typer.Option(None, "--loss", help="The loss's kernels: fused (one a pass) | fp32_unfused (Megatron-LM's and Megatron-DeepSpeed's fp32 cross-entropy, a kernel a step); default: the spec's loss_impl (fused).")


def with_impls(spec: str, **given):
    """The spec (a name or path) with the given `*_impl` fields (IMPL_FLAGS' keys; None: not
    given), each checked against its choices (one line naming the field)."""
    changes = {field: value for field, value in given.items() if value is not None}
    if not changes:
        return spec
    from typing import get_args

    from flopsim.errors import bad_value
    from flopsim.spec import load_model
    from flopsim.spec.model import ModelSpec

    for field, value in changes.items():
        choices = get_args(ModelSpec.model_fields[field].annotation)
        if value not in choices:
            raise bad_value(field, value, f"one of {', '.join(choices)}")
    return load_model(spec).with_changes(**changes)


def impl_label(spec) -> str:
    """'; norm fp32_unfused, rope rotate_half' for a spec whose ops run other than fused
    (the loss, norm, RoPE or activation), else ''."""
    shown = [f"{what} {impl}" for what, impl in spec.kernel_impls.items() if impl != "fused"]
    return f"; {', '.join(shown)}" if shown else ""
