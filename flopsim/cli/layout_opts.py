"""The parallel-layout options `count` and `predict` share (flopsim.parallel.make_layout)."""

from __future__ import annotations

from typing import Optional

import typer

TpOpt = typer.Option(1, "--tp", help="Tensor-parallel degree: one GPU's ops and the collectives among them.")
PpOpt = typer.Option(1, "--pp", help="Pipeline stages (the ops shown are --stage's).")
DpOpt = typer.Option(1, "--dp", help="Data-parallel replicas (train: the gradient / ZeRO collectives).")
EpOpt = typer.Option(1, "--ep", help="Expert-parallel degree (MoE: all-to-alls around the routed experts).")
CpOpt = typer.Option(1, "--cp", help="Context-parallel degree (the sequence split; keys and values gathered).")
ZeroOpt = typer.Option(0, "--zero", help="ZeRO stage 0-3 over the data-parallel group (train).")
ZeroShardOpt = typer.Option(None, "--zero-shard", help="Train, hybrid sharding: ZeRO over this many data-parallel ranks, replicated over the rest (default all of dp).")
RecomputeOpt = typer.Option("none", "--recompute", help="Train: none | selective (attention cores) | cheap (norms and elementwise ops; products' outputs kept) | full (each block's forward).")
SequenceParallelOpt = typer.Option(None, "--sequence-parallel/--no-sequence-parallel", help="Split token-wise ops over tp (all-gather / reduce-scatter pairs); default on in train, off elsewhere.")
VocabParallelOpt = typer.Option(True, "--vocab-parallel/--no-vocab-parallel", help="With --tp: split the token embedding and LM head over the vocabulary (Megatron-LM, vLLM, TensorRT-LLM; inference all-gathers the logits); --no-vocab-parallel keeps both whole on every rank, as gpt-fast's tensor parallelism does.")
StageOpt = typer.Option(None, "--stage", help="The pipeline stage whose ops are shown (default: the last).")
GpusPerNodeOpt = typer.Option(None, "--gpus-per-node", help="GPUs sharing the scale-up link (default: the hardware's scale_up_domain, else 8).")


def layout_from_options(spec, phase: str, *, tp: int, pp: int, dp: int, ep: int, cp: int, zero: int, recompute: str,
                        sequence_parallel: Optional[bool], stage: Optional[int], gpus_per_node: Optional[int],
                        hardware=None, zero_shard: Optional[int] = None, vocab_parallel: bool = True):
    """A flopsim.parallel.Layout from the options, or None for one GPU with nothing to shard."""
    if (tp, pp, dp, ep, cp, zero, recompute, stage, zero_shard) == (1, 1, 1, 1, 1, 0, "none", None, None):
        return None
    from flopsim.parallel.layout import make_layout
    from flopsim.spec import load_model

    torus_axis = None
    if hardware is not None:
        from flopsim.hardware import load_hardware

        hw = load_hardware(hardware)
        gpus_per_node = hw.scale_up_domain if gpus_per_node is None else gpus_per_node
        torus_axis = hw.torus_axis
    return make_layout(load_model(spec), phase, tp=tp, pp=pp, dp=dp, ep=ep, cp=cp, zero=zero, recompute=recompute,
                       sequence_parallel=sequence_parallel, stage=stage, gpus_per_node=gpus_per_node,
                       torus_axis=torus_axis, zero_shard=zero_shard, vocab_parallel=vocab_parallel)
