"""The spec options that say how code runs a model's memory-bound ops (`--norm-impl`,
`--rope-impl`, `--act-impl`, `--loss`): typer options shared by `count`, `predict` and
`plan train`, and `with_impls`, the spec with those given."""

from __future__ import annotations

import typer

NormImplOpt = typer.Option(None, "--norm-impl", help="RMSNorm's kernels: fused (one a pass) | fp32_unfused (eager code's fp32 RMSNorm: transformers' LlamaRMSNorm, Meta's reference, IBM fms; 8 + 16 kernels in bf16); default: the spec's norm_impl (fused).")
RopeImplOpt = typer.Option(None, "--rope-impl", help="RoPE's kernels: fused (one a pass) | rotate_half (transformers' apply_rotary_pos_emb) | complex_fp32 (Meta's reference, torchtitan) | pairs_fp32 (IBM fms, 2024): eager forms, each aten op a kernel, on q and k apart; default: the spec's rope_impl (fused).")
ActImplOpt = typer.Option(None, "--act-impl", help="A gated FFN's activation: fused (act(gate) * up, one kernel) | unfused (eager act_fn(gate) * up: 2 + 3 kernels); default: the spec's act_impl (fused).")
LossOpt = typer.Option(None, "--loss", help="The loss's kernels: fused (one a pass) | fp32_unfused (Megatron-LM's and Megatron-DeepSpeed's fp32 cross-entropy, a kernel a step); default: the spec's loss_impl (fused).")


def with_impls(spec: str, **given):
    """The spec (a name or path) with `--loss` / `--norm-impl` / `--rope-impl` / `--act-impl` as
    its loss_impl / norm_impl / rope_impl / act_impl, when given."""
    fields = {name: name if name.endswith("_impl") else f"{name}_impl" for name in given}
    changes = {fields[name]: value for name, value in given.items() if value is not None}
    if not changes:
        return spec
    from typing import get_args

    from flopsim.errors import bad_value
    from flopsim.spec import load_model
    from flopsim.spec.model import ModelSpec

    for name, field in fields.items():
        choices = get_args(ModelSpec.model_fields[field].annotation)
        if field in changes and changes[field] not in choices:
            raise bad_value(name, changes[field], f"one of {', '.join(choices)}")
    return load_model(spec).with_changes(**changes)


def impl_label(spec) -> str:
    """'; norm fp32_unfused, rope rotate_half' for a spec whose ops run other than fused
    (the loss, norm, RoPE or activation), else ''."""
    shown = [f"{what} {impl}" for what, impl in spec.kernel_impls.items() if impl != "fused"]
    return f"; {', '.join(shown)}" if shown else ""
