"""`flopsim count` and `flopsim formula`."""

from __future__ import annotations

from typing import Optional

import typer

from flopsim.cli.app import app
from flopsim.cli.layout_opts import (CpOpt, DpOpt, EpOpt, GpusPerNodeOpt, PpOpt, RecomputeOpt, SequenceParallelOpt,
                                     StageOpt, TpOpt, VocabParallelOpt, ZeroOpt, ZeroShardOpt,
                                     layout_from_options)
from flopsim.cli.output import Format, console, human, print_csv, print_json, rich_table
from flopsim.cli.spec_opts import ActImplOpt, LossOpt, NormImplOpt, RopeImplOpt, impl_label, with_impls

PhaseOpt = typer.Option("forward", "--phase", "-p", help="forward | train | prefill | decode")
FormatOpt = typer.Option(Format.table, "--format", "-f", help="table | json | csv")


@app.command()
def count(
    spec: str = typer.Argument(..., help="Model spec: a YAML path, an HF config.json or a preset name."),
    batch: int = typer.Option(1, "--batch", "-b", help="Sequences per batch (B)."),
    seq: int = typer.Option(1024, "--seq", "-s", help="Tokens per sequence (S); decode: the context if --context is omitted."),
    context: Optional[int] = typer.Option(None, "--context", "-t", help="Keys each query attends to (T): decode's KV-cache length, or prefill with a cached prefix."),
    phase: str = PhaseOpt,
    encoder_seq: Optional[int] = typer.Option(None, "--encoder-seq", help="An encoder-decoder's encoder tokens per sequence (S_enc; default: --seq). Decode: the cross-attention cache's length."),
    ops: bool = typer.Option(False, "--ops", help="Table format: one row per op instead of per layer."),
    attention: Optional[str] = typer.Option(None, "--attention", help="Attention kernel: fused or explicit (or transformers' names: sdpa, eager, ...); default: the spec's (an HF config's attn_implementation, else fused)."),
    norm_impl: Optional[str] = NormImplOpt, rope_impl: Optional[str] = RopeImplOpt,
    act_impl: Optional[str] = ActImplOpt, loss: Optional[str] = LossOpt,
    tp: int = TpOpt, pp: int = PpOpt, dp: int = DpOpt, ep: int = EpOpt, cp: int = CpOpt, zero: int = ZeroOpt,
    zero_shard: Optional[int] = ZeroShardOpt,
    vocab_parallel: bool = VocabParallelOpt,
    recompute: str = RecomputeOpt, sequence_parallel: Optional[bool] = SequenceParallelOpt,
    stage: Optional[int] = StageOpt, gpus_per_node: Optional[int] = GpusPerNodeOpt,
    fmt: Format = FormatOpt,
):
    """Exact FLOPs, bytes and parameters, per layer and per op; with a layout (--tp, --pp,
    ...) one GPU's share and the collectives among the GPUs."""
    from flopsim import opcache

    opcache.use()  # a repeated (spec, phase) skips sympy (flopsim.opcache)
    from flopsim.count import count as count_api

    if attention is not None:
        from flopsim.spec import load_model
        from flopsim.spec.hf import attention_impl

        spec = load_model(spec).with_changes(attention_impl=attention_impl(attention, "--attention"))
    spec = with_impls(spec, loss_impl=loss, norm_impl=norm_impl, rope_impl=rope_impl, act_impl=act_impl)
    layout = layout_from_options(spec, phase, tp=tp, pp=pp, dp=dp, ep=ep, cp=cp, zero=zero, recompute=recompute,
                                 sequence_parallel=sequence_parallel, stage=stage, gpus_per_node=gpus_per_node,
                                 zero_shard=zero_shard, vocab_parallel=vocab_parallel)
    result = count_api(spec, batch=batch, seq=seq, phase=phase, context=context, encoder_seq=encoder_seq,
                       layout=layout)
    if fmt == Format.json:
        return print_json(result.to_dict())
    if fmt == Format.csv:
        return print_csv(op.to_dict() for op in result.ops)
    out = console()
    s = result.spec
    out.print(f"[bold]{s.name}[/] ({s.family}) {result.phase}: B={result.batch} "
              f"S={1 if result.phase == 'decode' else result.seq} T={result.context}"
              + (f" S_enc={result.encoder_seq}" if result.encoder_seq else "")
              + (f"; one GPU of {layout.describe()}, stage {layout.last_stage}" if layout else "") + impl_label(s))
    out.print(f"  FLOPs        {result.flops:,}  ({human(result.flops, 'FLOP')}; causal {human(result.causal_flops, 'FLOP')}, "
              f"with elementwise {human(result.all_flops, 'FLOP')})")
    out.print(f"  parameters   {result.params:,.0f}  ({human(result.params)})")
    active = result.active_params() if s.moe is not None else None
    if active is not None:
        out.print(f"  activated    {active:,.0f} per token  ({human(active)}; without the embedding lookup "
                  f"{human(result.active_params(lookups=False))})")
    out.print(f"  bytes        {human(result.bytes, 'B')}  (weights {human(result.total('weight_bytes'), 'B')}, "
              f"activations {human(result.total('act_read_bytes') + result.total('act_write_bytes'), 'B')}, "
              f"KV cache {human(result.total('kv_read_bytes') + result.total('kv_write_bytes'), 'B')})")
    collectives = [op for op in result.ops if op.kind == "collective"]
    if collectives:
        out.print(f"  collectives  {len(collectives)} moving {human(result.total('comm_bytes'), 'B')} "
                  f"(messages; flopsim predict prices them on the link levels)")
    total = result.flops or 1
    if ops:
        rows = [[op.name, op.pass_, op.kind + (f" {op.variant} {op.tags['group']}x{op.tags['ranks']}"
                                                 if op.kind == "collective" else ""),
                 f"{op.flops:,.0f}", f"{100 * op.flops / total:.2f}", human(op.bytes, "B"),
                 human(op.kv_read_bytes + op.kv_write_bytes, "B"), human(op.comm_bytes, "B"), f"{op.params:,.0f}"]
                for op in result.ops]
        out.print(rich_table(None, ["op", "pass", "kind", "FLOPs", "%", "bytes", "KV-cache bytes", "message",
                                    "params"], rows))
        return
    layers = result.per_layer_rows()
    tag_cols = [c for c in layers[0] if c not in ("layer", "part", "flops", "causal_flops", "all_flops", "bytes", "params")]
    rows = []
    for r in layers:
        tags = [("" if v is None or v != v else str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
                for v in (r[c] for c in tag_cols)]
        rows.append([r["part"], f"{int(r['flops']):,}", f"{100 * r['flops'] / total:.2f}", human(r["bytes"], "B"),
                     f"{int(r['params']):,}", *tags])
    out.print(rich_table(None, ["layer", "FLOPs", "%", "bytes", "params", *tag_cols], rows))


@app.command()
def formula(
    spec: str = typer.Argument(..., help="Model spec: a YAML path, an HF config.json or a preset name."),
    phase: str = PhaseOpt,
    field: str = typer.Option("flops", "--field", help="flops | causal_flops | all_flops | bytes | weight_bytes | ... | params"),
    symbolic: bool = typer.Option(False, "--symbolic", help="Keep the model dimensions as symbols (d_model, d_ff, H, ...)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="One expression per layer."),
    latex: bool = typer.Option(False, "--latex", help="Print LaTeX."),
    fmt: Format = FormatOpt,
):
    """The total cost as a formula in B, S, T (and the dimensions with --symbolic)."""
    import sympy as sp

    from flopsim.count import formula as formula_api

    expr = formula_api(spec, phase=phase, field=field, symbolic=symbolic, per_layer=per_layer)
    render = sp.latex if latex else sp.sstr
    if fmt == Format.table:
        if per_layer:
            for part, e in expr.items():
                typer.echo(f"{part}: {render(e)}")
        else:
            typer.echo(render(expr))
        return
    rows = expr.items() if per_layer else [("total", expr)]
    data = [{"part": part, "field": field, "phase": phase, "formula": sp.sstr(e), "latex": sp.latex(e)}
            for part, e in rows]
    if fmt == Format.json:
        return print_json(data if per_layer else data[0])
    print_csv(data)
