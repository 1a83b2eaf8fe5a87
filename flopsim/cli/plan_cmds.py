"""`flopsim plan train` and `flopsim plan serve`: capacity planning (flopsim.planning)."""

from __future__ import annotations

import functools
from typing import Optional

import typer

from flopsim.cli.app import app
from flopsim.cli.calibration_opts import AttentionKernelOpt, CalibrationOpt, calibration_choice
from flopsim.cli.layout_opts import VocabParallelOpt
from flopsim.cli.output import Format, console, human, human_time, print_csv, print_json, rich_table
from flopsim.cli.spec_opts import ActImplOpt, LossOpt, NormImplOpt, RopeImplOpt, with_impls

plan_app = typer.Typer(help="Capacity planning: GPUs, days and cost to train; GPUs, batch and cost per token to serve.",
                       no_args_is_help=True)
app.add_typer(plan_app, name="plan")

SpecArg = typer.Argument(..., help="Model spec: a YAML path, an HF config.json or a preset name.")
HardwareOpt = typer.Option(..., "--hardware", "-H", help="Device: a preset (`flopsim hardware list`) or a YAML path.")
PriceOpt = typer.Option(None, "--price", help="Price per GPU-hour (any currency; costs are in the same unit).")
InterconnectOpt = typer.Option(None, "--interconnect", help="Intra-node bandwidth per GPU, both directions, bytes/s (e.g. 900G; default the hardware's interconnect_bytes_per_s).")
InterNodeOpt = typer.Option(None, "--inter-node", help="Inter-node bandwidth per GPU, both directions, bytes/s (default: the calibration's measured link, else the hardware's scale_out_bytes_per_s).")
GpusPerNodeOpt = typer.Option(None, "--gpus-per-node", help="GPUs per node (default: the hardware's scale_up_domain; groups within a node use the scale-up link).")
LatencyOpt = typer.Option(None, "--comm-latency", help="Seconds per collective on top of bytes/bandwidth (default: one kernel launch).")
FormatOpt = typer.Option(Format.table, "--format", "-f", help="table | json | csv")
HtmlOpt = typer.Option(None, "--html", help="Also write the plan as one self-contained interactive page (an .html file).")


def _check_html(html: Optional[str]) -> None:
    if html is not None:
        from flopsim.outputs import check_output_file

        check_output_file(html, "html")


def _write_html(page_of, plan, html: Optional[str]) -> None:
    """Write the plan's page (flopsim.result_pages) when --html was given; say where on stderr."""
    if html is None:
        return
    path = page_of(plan).write(html)
    console(stderr=True).print(f"wrote {path}")


def _quantity(text: Optional[str], name: str) -> Optional[float]:
    from flopsim.planning import parse_quantity

    return None if text is None else parse_quantity(text, name)


def _duration(text: Optional[str], name: str) -> Optional[float]:
    from flopsim.planning import parse_duration

    return None if text is None else parse_duration(text, name)


def _money(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"${value:,.0f}"
    return f"${value:,.4g}"


def _table(title, columns, rows):
    """rich_table with the last (explanatory) column left-aligned."""
    table = rich_table(title, columns, rows)
    table.columns[-1].justify = "left"
    return table


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _refuse_in_search(**given) -> None:
    """One line for a `plan train` option that --search does not vary (it tries each pp's
    default encoder stages, and ZeRO over all of dp and over one node's dp ranks): give it
    without --search."""
    from flopsim.errors import bad_value

    why = {"encoder_stages": "--search tries each pp's default encoder stages",
           "zero_shard": "--search shards ZeRO over all of dp and over one node's dp ranks",
           "recompute_fraction": "--search recomputes every block or none"}
    for name, value in given.items():
        if value is not None:
            raise bad_value(name, value, f"{why[name]}; give it without --search")


@plan_app.command("train")
def train(
    spec: str = SpecArg,
    hardware: str = HardwareOpt,
    gpus: str = typer.Option(..., "--gpus", "-g", help="GPUs in the run (= dp * tp * pp); with --search also N,M,... or A:B (its powers of two)."),
    tokens: str = typer.Option(..., "--tokens", help="Tokens to train on (e.g. 1T, 300B, 2.5e11)."),
    seq: Optional[int] = typer.Option(None, "--seq", "-s", help="Sequence length (default min(4096, max_seq)); an encoder-decoder's decoder tokens."),
    encoder_seq: Optional[int] = typer.Option(None, "--encoder-seq", help="An encoder-decoder's encoder tokens per sequence (default --seq); a sequence trains --encoder-seq + --seq tokens."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Global batch in sequences (default ~4M tokens)."),
    global_batch_tokens: Optional[str] = typer.Option(None, "--global-batch-tokens", help="Global batch in tokens (e.g. 4M; a multiple of a sequence's tokens)."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree (Megatron, with sequence parallelism)."),
    sequence_parallel: Optional[bool] = typer.Option(None, "--sequence-parallel/--no-sequence-parallel", help="Split the token-wise ops over tp with reduce-scatter / all-gather pairs (default on when tp > 1); off: all-reduces, as Megatron-LM before 2022."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel stages (1F1B)."),
    virtual_stages: int = typer.Option(1, "--virtual-stages", help="Interleaved 1F1B: chunks of blocks per pipeline stage (Megatron's virtual pipeline; 1: plain 1F1B)."),
    encoder_stages: Optional[int] = typer.Option(None, "--encoder-stages", help="An encoder-decoder under --pp > 1: the stages holding the encoder, the rest the decoder (Megatron's --pipeline-model-parallel-split-rank; default by the stacks' blocks)."),
    dp: Optional[int] = typer.Option(None, "--dp", help="Data-parallel degree (default gpus / (tp * pp))."),
    ep: int = typer.Option(1, "--ep", help="Expert-parallel degree (MoE; divides dp and the experts)."),
    micro_batch: int = typer.Option(1, "--micro-batch", "-m", help="Sequences per micro-batch."),
    recompute: Optional[str] = typer.Option(None, "--recompute", help="Activation recomputation: none (default) | selective (attention cores) | cheap (norms and elementwise ops; products' outputs kept) | full (each block's forward); with --search, limits the search to it."),
    optimizer: str = typer.Option("adam", "--optimizer", help="adam | adamw | sgd | none."),
    zero: Optional[int] = typer.Option(None, "--zero", help="ZeRO stage over dp: 0 none, 1 optimizer state (default), 2 + gradients, 3 + weights; with --search, limits the search to it."),
    recompute_fraction: Optional[float] = typer.Option(None, "--recompute-fraction", help="With --recompute full: the share of the blocks checkpointed, evenly spaced (IBM fms-fsdp's selective_checkpointing, torchtitan's every k-th layer: 1/k); the others keep their activations. Default 1 (every block)."),
    zero_shard: Optional[int] = typer.Option(None, "--zero-shard", help="Hybrid sharding (FSDP's HYBRID_SHARD): ZeRO over this many data-parallel ranks (e.g. 8: one node), each shard group replicated, its gradient shards all-reduced over the replicas; default all of dp."),
    search: bool = typer.Option(False, "--search", help="Search every tp x pp x dp (x ep) layout, micro-batch, ZeRO stage and recomputation of --gpus: the fastest that fit, and the Pareto front of GPUs, days and cost."),
    micro_batches: str = typer.Option("1,2,4,8", "--micro-batches", help="--search: the micro-batches to try."),
    top: int = typer.Option(10, "--top", help="--search: the fastest layouts shown."),
    interconnect: Optional[str] = InterconnectOpt,
    inter_node: Optional[str] = InterNodeOpt,
    gpus_per_node: Optional[int] = GpusPerNodeOpt,
    grad_accumulation: str = typer.Option("autograd", "--grad-accumulation", help="Gradient accumulation over micro-batches: autograd (default: .grad += on micro-batches 2..m) | main_grad (Megatron's add into its reduction buffer every micro-batch) | none (fused into the weight-gradient GEMM)."),
    grad_reduce_dtype: Optional[str] = typer.Option(None, "--grad-reduce-dtype", help="Dtype of the data-parallel gradient reduction (and of main_grad): fp32 | bf16 | fp16 (default the gradients' dtype; fp32 for Megatron-Core bf16, FSDP mixed precision)."),
    norm_impl: Optional[str] = NormImplOpt,
    rope_impl: Optional[str] = RopeImplOpt,
    act_impl: Optional[str] = ActImplOpt,
    loss: Optional[str] = LossOpt,
    dp_overlap: float = typer.Option(1.0, "--dp-overlap", help="Fraction of the forward/backward pass that data-parallel traffic can hide behind (0: none)."),
    comm_latency: Optional[str] = LatencyOpt,
    price: Optional[float] = PriceOpt,
    calibration: str = CalibrationOpt,
    attention_kernel: Optional[str] = AttentionKernelOpt,
    fmt: Format = FormatOpt,
    html: Optional[str] = HtmlOpt,
):
    """Plan a training run: step time (compute, TP/EP/PP/DP traffic), memory per GPU, days, GPU-hours, cost, MFU;
    with --search, the fastest layouts and the Pareto front."""
    from flopsim.planning import plan_training
    from flopsim.planning.common import parse_gpu_counts
    from flopsim.result_pages import training_plan_page

    counts = parse_gpu_counts(gpus)
    spec = with_impls(spec, loss_impl=loss, norm_impl=norm_impl, rope_impl=rope_impl, act_impl=act_impl)
    calibration = calibration_choice(calibration, hardware, attention_kernel)
    links = dict(interconnect_bytes_per_s=_quantity(interconnect, "interconnect"),
                 inter_node_bytes_per_s=_quantity(inter_node, "inter_node"), gpus_per_node=gpus_per_node,
                 comm_latency_s=_duration(comm_latency, "comm_latency"))
    if search:
        from flopsim.cli.plan_search_view import run_search

        _refuse_in_search(encoder_stages=encoder_stages, zero_shard=zero_shard, recompute_fraction=recompute_fraction)
        return run_search(spec, hardware, counts, tokens=_quantity(tokens, "tokens"), seq=seq, global_batch=global_batch,
                          global_batch_tokens=_quantity(global_batch_tokens, "global_batch_tokens"),
                          micro_batches=parse_gpu_counts(micro_batches, "micro_batches"), zero=zero,
                          recompute=recompute, optimizer=optimizer, dp_overlap=dp_overlap, price=price,
                          calibration=calibration, fmt=fmt, top=top, links=links, encoder_seq=encoder_seq,
                          grad_accumulation=grad_accumulation, grad_reduce_dtype=grad_reduce_dtype)
    if len(counts) > 1:
        from flopsim.errors import bad_value

        raise bad_value("gpus", gpus, "a plan takes one GPU count; give --search to compare several")
    _check_html(html)

    p = plan_training(
        spec, hardware, gpus=counts[0], tokens=_quantity(tokens, "tokens"), seq=seq, global_batch=global_batch,
        global_batch_tokens=_quantity(global_batch_tokens, "global_batch_tokens"), tp=tp, pp=pp, dp=dp, ep=ep,
        micro_batch=micro_batch, recompute=recompute or "none", optimizer=optimizer, zero=1 if zero is None else zero,
        dp_overlap=dp_overlap, price_per_gpu_hour=price, calibration=calibration, progress=fmt == Format.table,
        virtual_stages=virtual_stages, encoder_seq=encoder_seq, encoder_stages=encoder_stages,
        sequence_parallel=sequence_parallel, grad_accumulation=grad_accumulation,
        grad_reduce_dtype=grad_reduce_dtype, zero_shard=zero_shard,
        recompute_fraction=1.0 if recompute_fraction is None else recompute_fraction, **links)
    _write_html(training_plan_page, p, html)
    if fmt == Format.json:
        return print_json(p.to_dict())
    if fmt == Format.csv:
        return print_csv(p.table().to_dict("records"))
    _print_training(p)


def _print_training(p) -> None:
    from flopsim.planning.train import recompute_name

    out = console()
    c, k, m, t, cm, ln = p.config, p.compute, p.memory, p.totals, p.communication, p.links
    seqs = f"encoder {c['encoder_seq']} + decoder {c['seq']} tokens a sequence" if "encoder_seq" in c \
        else f"seq {c['seq']}"
    out.print(f"[bold]{p.spec.name}[/] ({p.spec.family}, {p.spec.precision_label}) training on [bold]{c['gpus']} x {p.hw.name}[/]: "
              f"{human(t['tokens'])} tokens at {seqs}")
    ep = f" x ep {c['ep']} (expert dp {c['expert_dp']})" if c["ep"] > 1 else ""
    if c["tp"] > 1:
        ep += " (sequence parallel)" if c.get("sequence_parallel") else " (no sequence parallelism: all-reduces)"
    if c.get("encoder_stages"):
        ep += f" (encoder on stages 0-{c['encoder_stages'] - 1}, decoder on {c['encoder_stages']}-{c['pp'] - 1})"
    out.print(f"  layout       dp {c['dp']} x tp {c['tp']} x pp {c['pp']}{ep}; global batch {c['global_batch']:,} "
              f"sequences = {human(t['tokens_per_step'])} tokens; {c['microbatches']} micro-batches of "
              f"{c['micro_batch']} per replica")
    zero_what = {0: "no sharding", 1: "optimizer state sharded", 2: "optimizer state + gradients sharded",
                 3: "optimizer state + gradients + weights sharded"}[c["zero"]]
    rc = recompute_name(c["recompute"])
    rc += f" ({c['recompute_fraction']:g} of the blocks)" if c.get("recompute_fraction", 1.0) < 1 else ""
    over = f"{c['zero_shard']} of dp, replicated (hybrid)" if c["zero"] and c["zero_shard"] < c["dp"] else "dp"
    out.print(f"  options      {c['optimizer']}, ZeRO-{c['zero']} ({zero_what} over {over}), recompute "
              f"{rc}, DP traffic hidden behind up to {_pct(cm['dp_overlap'])} "
              f"of a forward/backward pass; gradient accumulation {c['grad_accumulation']}, reduced in "
              f"{c['grad_reduce_dtype'] or p.spec.dtype}; "
              + ", ".join(f"{what} {impl}" for what, impl in p.spec.kernel_impls.items()))
    out.print(f"  links        {_link_text(ln)}")
    out.print(f"  calibration {p.calibration.label}")
    rows = [[x["part"], "-" if x["per_microbatch_s"] is None else human_time(x["per_microbatch_s"]),
             human_time(x["per_step_s"]), _pct(x["per_step_s"] / t["step_time_s"]) if t["step_time_s"] else "-",
             x["how"]] for x in p.time_parts()]
    rows.append(["[bold]step[/]", human_time(k["stage_s_per_microbatch"]), f"[bold]{human_time(t['step_time_s'])}[/]",
                 "100%", "per micro-batch: one pipeline stage"])
    out.print(_table("time per step, per GPU", ["part", "per micro-batch", "per step", "%", "how"], rows))
    cap = m["capacity_bytes"]
    mrows = [[x["component"], human(x["bytes"], "B"), _pct(x["bytes"] / cap), x["how"]] for x in p.memory_parts()]
    out.print(_table("memory per GPU", ["component", "bytes", "% of device", "how"], mrows))
    color = "green" if p.fits else "red"
    out.print(f"  [{color}]{p.message}[/]")
    cost = "" if t["cost"] is None else f"; cost {_money(t['cost'])} at {_money(t['price_per_gpu_hour'])}/GPU-hour"
    out.print(f"  [bold]total[/]        {t['steps']:,} steps x {human_time(t['step_time_s'])} = "
              f"[bold]{t['days']:.3g} days[/]; {t['gpu_hours']:,.0f} GPU-hours{cost}")
    out.print(f"  throughput   {human(t['tokens_per_s'])} tokens/s ({human(t['tokens_per_s_per_gpu'])} tokens/s "
              f"per GPU); [bold]MFU {_pct(t['mfu'])}[/] ({t['model_flops_total']:.3g} model FLOPs in all)")
    for note in p.notes:
        out.print(f"  note: {note}")


@plan_app.command("serve")
def serve(
    spec: str = SpecArg,
    hardware: str = HardwareOpt,
    prompt: str = typer.Option(..., "--prompt", help="Prompt tokens per request: N, uniform:A:B, lognormal:MEDIAN:SIGMA or a CSV file of length,count rows."),
    gen: str = typer.Option(..., "--gen", help="Generated tokens per request (the same forms as --prompt)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", "-g", help="GPUs available: the throughput they give."),
    target: Optional[str] = typer.Option(None, "--target-tokens-per-s", "--throughput", help="Output tokens/s to sustain: the GPUs needed (e.g. 50k)."),
    ttft: Optional[str] = typer.Option(None, "--ttft", help="Time-to-first-token target (e.g. 500ms, 1s)."),
    tpot: Optional[str] = typer.Option(None, "--tpot", help="Time-per-output-token target (decode step; e.g. 50ms)."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Tensor-parallel degree of a replica (default: searched, powers of two up to --gpus-per-node)."),
    pp: Optional[int] = typer.Option(None, "--pp", help="Pipeline stages of a replica, pp batches in flight (vLLM's virtual engines; default: searched, powers of two up to the blocks)."),
    ep: Optional[int] = typer.Option(None, "--ep", help="Expert-parallel degree (MoE): ep attention groups of tp GPUs, each with its own batch, sharing the routed experts (default: searched; 1 for a dense model)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Largest batch of one engine (a pipeline stage's, an expert group's) the server may run."),
    memory_utilization: float = typer.Option(0.9, "--memory-utilization", help="Share of device memory for weights, KV cache and activations."),
    chunk: Optional[int] = typer.Option(None, "--chunk", help="Chunked prefill: prompt tokens per step beside the batch's decode tokens, one forward (vLLM --enable-chunked-prefill; max_num_batched_tokens = batch + chunk)."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Speculative decoding: the draft model (a spec, same vocabulary), run at the target's tp."),
    draft_len: Optional[int] = typer.Option(None, "--draft-len", help="Tokens the draft proposes per step (k)."),
    acceptance: Optional[float] = typer.Option(None, "--acceptance", help="Per-token acceptance rate of the draft's tokens, in (0, 1]."),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype", help="KV cache dtype: fp32 | bf16 | fp16 | fp8 | int8 (default: the spec's precision.kv_cache, else its dtype)."),
    interconnect: Optional[str] = InterconnectOpt,
    inter_node: Optional[str] = InterNodeOpt,
    gpus_per_node: Optional[int] = GpusPerNodeOpt,
    comm_latency: Optional[str] = LatencyOpt,
    vocab_parallel: bool = VocabParallelOpt,
    price: Optional[float] = PriceOpt,
    calibration: str = CalibrationOpt,
    attention_kernel: Optional[str] = AttentionKernelOpt,
    fmt: Format = FormatOpt,
    html: Optional[str] = HtmlOpt,
):
    """Plan serving: replica (tp x pp x ep), batch, GPUs, TTFT, TPOT, tokens/s and cost per million tokens."""
    from flopsim.planning import plan_serving
    from flopsim.result_pages import serving_plan_page

    _check_html(html)

    p = plan_serving(
        spec, hardware, prompt=prompt, gen=gen, gpus=gpus, target_tokens_per_s=_quantity(target, "target_tokens_per_s"),
        ttft_s=_duration(ttft, "ttft"), tpot_s=_duration(tpot, "tpot"), tp=tp, pp=pp, ep=ep, max_batch=max_batch,
        memory_utilization=memory_utilization, price_per_gpu_hour=price,
        interconnect_bytes_per_s=_quantity(interconnect, "interconnect"),
        inter_node_bytes_per_s=_quantity(inter_node, "inter_node"), gpus_per_node=gpus_per_node,
        comm_latency_s=_duration(comm_latency, "comm_latency"), chunk=chunk, draft=draft, draft_len=draft_len,
        acceptance=acceptance, kv_dtype=kv_dtype, vocab_parallel=vocab_parallel,
        calibration=calibration_choice(calibration, hardware, attention_kernel),
        progress=fmt == Format.table)
    _write_html(serving_plan_page, p, html)
    if fmt == Format.json:
        return print_json(p.to_dict())
    if fmt == Format.csv:
        return print_csv(p.table().to_dict("records"))
    _print_serving(p)


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _ms(x) -> str:
    return "-" if x is None else human_time(x)


def _lengths_text(c) -> str:
    """'prompt 512 + gen 128' or, for a distribution, its form and mean."""
    from rich.markup import escape

    def one(key):
        v = c[key]
        return f"{v:,}" if isinstance(v, int) else f"{escape(v)} (mean {c[key + '_mean']:,.0f})"
    return f"prompt {one('prompt')} + gen {one('gen')} tokens per request"


def _serving_lines(p) -> list:
    """The mode, TTFT and TPOT lines of a plan that fits."""
    c, lat = p.config, p.latency
    which = f"the p99 prompt, {c['prompt_p99']:,} tokens (mean over prompts {_ms(lat['ttft_mean_s'])})" \
        if not isinstance(c["prompt"], int) else f"one {c['prompt']:,}-token prompt"
    if c["encoder_tokens_mean"] is not None:
        which = f"the encoder over {which} and the decoder's first token"
    comm = _comm_text(p, "ttft")
    between = f"{_ms(lat['tpot_with_prefills_s'])} between tokens on average with other requests' prefills"
    if c["chunk"]:
        steps = -(-c["prompt_p99"] // c["chunk"])
        return [f"  mode         chunked prefill: {c['chunk']:,} prompt tokens per step beside the batch's decode tokens",
                f"  TTFT         [bold]{_ms(lat['ttft_s'])}[/]  ({_n(steps, 'mixed step')} for {which}; {comm})",
                f"  TPOT         [bold]{_ms(lat['tpot_s'])}[/]  (decode step of {c['batch']:,} sequences at the mean "
                f"KV length {c['decode_context_mean']:,} carrying a chunk; {_ms(lat['decode_step_s'])} without); "
                f"{between}"]
    if c["draft"]:
        return [f"  mode         speculative decoding: draft {c['draft']}, k {c['draft_len']}, acceptance "
                f"{c['acceptance']:g} -> {c['expected_tokens_per_step']:.3g} tokens per step",
                f"  TTFT         [bold]{_ms(lat['ttft_s'])}[/]  (prefill of {which} alone, target and draft; {comm})",
                f"  TPOT         [bold]{_ms(lat['tpot_s'])}[/]  (a step of {c['draft_len']} draft decodes of "
                f"{_ms(lat['draft_decode_s'])} and a {c['draft_len'] + 1}-token verification of {_ms(lat['verify_s'])} "
                f"at batch {c['batch']:,}, / {c['expected_tokens_per_step']:.3g} tokens; the target's decode step "
                f"{_ms(lat['decode_step_s'])}); {between}"]
    stages = f" through {c['pp']} stages" if c["pp"] > 1 else ""
    period = f", every {c['pp']} x the busiest stage" if c["pp"] > 1 else ""
    keys = f"the mean KV length {c['decode_context_mean']:,}" if c["encoder_tokens_mean"] is None else \
        f"the mean decoder length {c['decode_context_mean']:,}, cross-attending to {c['encoder_tokens_mean']:,} " \
        f"cached encoder outputs"
    return [f"  TTFT         [bold]{_ms(lat['ttft_s'])}[/]  (prefill of {which} alone{stages}; {comm})",
            f"  TPOT         [bold]{_ms(lat['tpot_s'])}[/]  (decode step of {c['batch']:,} sequences at {keys}"
            f"{period}; {_comm_text(p, 'tpot')}); {between}"]


def _comm_text(p, figure: str) -> str:
    """'TP collectives 1.2 ms, EP all-to-alls 0.3 ms, PP sends 0.1 ms' within a latency figure."""
    c, lat, what = p.config, p.latency, {"tp": "TP collectives", "ep": "EP all-to-alls", "pp": "PP sends"}
    return ", ".join(f"{what[g]} {_ms(lat[f'{figure}_{g}_comm_s'])}" for g in what if c[g] > 1) or "no collectives"


def _print_serving(p) -> None:
    from rich.console import Console
    from rich.markup import escape

    out = console()
    out.print = functools.partial(Console.print, out, emoji=False)  # a length form such as uniform:100:300 is text
    c, th, m, cost = p.config, p.throughput, p.memory, p.cost
    out.print(f"[bold]{p.spec.name}[/] ({p.spec.family}, {p.spec.precision_label}) serving on [bold]{p.hw.name}[/]: "
              f"{_lengths_text(c)}")
    targets = [f"TTFT <= {_ms(c['ttft_target_s'])}" if c["ttft_target_s"] else None,
               f"TPOT <= {_ms(c['tpot_target_s'])}" if c["tpot_target_s"] else None,
               f"{human(c['target_tokens_per_s'])} output tokens/s" if c["target_tokens_per_s"] else None,
               f"{c['gpus_available']} GPUs available" if c["gpus_available"] else None]
    out.print(f"  targets      {', '.join(x for x in targets if x) or 'none (largest batch that fits)'}; "
              f"calibration {p.calibration.label}")
    if not p.fits:
        out.print(f"  [red]{p.message}[/]")
        _print_candidates(out, p)
        return
    keeps_up = " whose prompts the chunks keep up with" if c["max_batch_prefill"] is not None else ""
    why = "the largest that fits memory" + keeps_up + (" and meets the targets" if c["tpot_target_s"] or
                                                       c["ttft_target_s"] else "") \
        if p.feasible else "it misses the targets, see below"
    label = ", ".join(f"{k} {c[k]}" for k in ("tp", "pp", "ep") if k == "tp" or c[k] > 1)
    label += " (LM head and embedding whole on each rank)" if c["tp"] > 1 and not c["vocab_parallel"] else ""
    engines = f"; {c['engines']} batches in flight a replica ({c['concurrent_sequences']:,} sequences)" \
        if c["engines"] > 1 else ""
    out.print(f"  chosen       [bold]{label}, batch {c['batch']:,}[/] ({why}; memory alone "
              f"allows {c['max_batch_memory']:,}{engines}) -> [bold]{_n(th['replicas'], 'replica')} of "
              f"{_n(c['replica_gpus'], 'GPU')} = {_n(th['gpus'], 'GPU')}[/]")
    if c["replica_gpus"] > 1 and p.links is not None:
        out.print(f"  links        {_link_text(p.links)}")
    for line in _serving_lines(p):
        out.print(line)
    out.print(f"  throughput   [bold]{human(th['output_tokens_per_s_per_gpu'])} output tokens/s per GPU[/], "
              f"{human(th['output_tokens_per_s_per_replica'])} per replica, {human(th['output_tokens_per_s'])} on "
              f"{_n(th['gpus'], 'GPU')} ({human(th['input_tokens_per_s_per_replica'])} input tokens/s and "
              f"{th['requests_per_s_per_replica']:.3g} requests/s per replica)")
    if "active_experts_per_layer" in c:
        out.print(f"  MoE          {c['active_experts_per_layer']:.3g} of {p.spec.moe.experts} experts read per MoE "
                  f"layer per decode step by its {c['batch'] * c['ep']:,} tokens (expected distinct under uniform "
                  f"routing, from the op list)")
    if cost.get("price_per_gpu_hour") is not None:
        out.print(f"  cost         [bold]{_money(cost['per_million_output_tokens'])} per M output tokens[/] (decode time), "
                  f"{_money(cost['per_million_input_tokens'])} per M input tokens (prefill time); "
                  f"{_money(cost['per_million_output_tokens_blended'])} per M output tokens all-in; "
                  f"{_money(cost['per_hour'])}/hour for {_n(th['gpus'], 'GPU')}")
    cap = m["capacity_bytes"]
    parts = (("weights", "weights_bytes"), ("KV cache", "kv_cache_bytes"), ("draft weights", "draft_weights_bytes"),
             ("draft KV cache", "draft_kv_cache_bytes"), ("activations", "activations_bytes"), ("total", "total_bytes"))
    rows = [[name, human(m[key], "B"), f"{100 * m[key] / cap:.1f}%"] for name, key in parts if key in m]
    where = f"stage {m['stage']} of {c['pp']} (its layers' weights, the KV cache of its layers for " \
        f"{c['pp'] * c['batch']:,} sequences), " if "stage" in m else ""
    out.print(f"  memory/GPU   {where}at batch {c['batch']:,}, every sequence's KV cache ({c['kv_dtype']}) at "
              f"{c['kv_context_max']:,} tokens; {human(m['usable_bytes'], 'B')} usable of {human(cap, 'B')} "
              f"(memory utilization {m['memory_utilization']:g})")
    out.print(rich_table(None, ["component", "bytes", "% of device"], rows))
    color = "green" if p.feasible else "yellow"
    out.print(f"  [{color}]{p.message}[/]")
    _print_candidates(out, p)
    for note in p.notes:
        out.print(f"  note: {escape(note)}")


CANDIDATES_SHOWN = 12


def _print_candidates(out, p) -> None:
    """The replicas tried, best first: those meeting the targets, then those that fit, by output tokens/s per GPU."""
    order = sorted(p.candidates, key=lambda r: (not r.get("meets"), not r.get("fits"),
                                                -(r.get("output_tokens_per_s_per_gpu") or 0), r["gpus"]))
    rows = []
    for r in order[:CANDIDATES_SHOWN]:
        verdict = "yes" if r.get("meets") else ("misses targets" if r.get("fits") else "does not fit")
        why = f"batch 1 needs {human(r['needs_bytes'], 'B')}/GPU" if "needs_bytes" in r else r.get("reasons") or ""
        rows.append([r["tp"], r["pp"], r["ep"], r["gpus"], "-" if r.get("batch") is None else f"{r['batch']:,}",
                     _ms(r.get("ttft_s")), _ms(r.get("tpot_s")), human(r.get("output_tokens_per_s_per_gpu")), verdict,
                     why])
    more = f"; {len(order) - CANDIDATES_SHOWN} more in --format json" if len(order) > CANDIDATES_SHOWN else ""
    out.print(_table(f"replicas tried (tp x pp x ep GPUs; batch: one engine's){more}",
                     ["tp", "pp", "ep", "GPUs", "batch", "TTFT", "TPOT", "out tok/s/GPU", "meets targets", "why not"],
                     rows))


def _link_text(links) -> str:
    """'intra-node 370 GB/s bus, 9 us latency + 600 ns a ring step; inter-node ...; 8 GPUs per node'
    for the plan's links."""
    parts = []
    torus = f"torus rings (whole {links.torus_axis}-device axes)" if links.torus_axis else None
    for name, link in (("intra-node", links.scale_up), (torus, links.scale_up_torus), ("inter-node", links.scale_out)):
        if link is not None and name is not None:
            per = " per GPU's NIC (a ring collective: x its ranks on a node)" if name == "inter-node" else ""
            step = "a reduce-scatter's or all-gather's ring step between nodes" if name == "inter-node" else "a ring step"
            hop = f" + {human_time(link.hop_latency_s)} {step}" if link.hop_latency_s else ""
            ideal = " [bold](datasheet bandwidth: an ideal link, no measured figure)[/]" \
                if "(ideal link)" in (link.source or "") else ""
            parts.append(f"{name} {human(link.bus_bytes_per_s, 'B/s')} bus{per}, {human_time(link.latency_s)} "
                         f"latency{hop}{ideal}")
    return "; ".join(parts) + f"; {links.gpus_per_node} GPUs per node"
