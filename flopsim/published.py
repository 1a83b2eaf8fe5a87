"""The published-measurements suite: flopsim's predictions against public,
measured, end-to-end results (`flopsim validate --published`).

The table (specs/published/measurements.yaml) is a TEST SET: no efficiency,
overhead or constant anywhere in flopsim is fitted to its rows; the
calibrations come from microbenchmarks only (flopsim.calibration). Each row
names its source, the table or figure, the quote, the hardware and model
presets, the shape, the parallel layout and what the software does.

How a row is predicted (task -> flopsim call), all on the row's hardware
with its shipped calibration (`cuda_graphs: true` -> Calibration.with_graphs):
- prefill (ttft_s): one prefill of `batch` prompts on a tp-way replica
  (flopsim.planning.tp_prefill_s: work / tp + Megatron's all-reduces, costed by
  message size on the scale-up link).
- decode (ms_per_token): one decode step at the mean KV length of the
  generation, prompt + gen / 2 (flopsim.planning.tp_decode_s).
- generate (tokens_per_s): a prefill that yields the first token, then
  gen - 1 decode steps at the mean KV length (or at the whole cache,
  prompt + gen, when `engine.static_cache` says attention runs over every
  slot of a preallocated cache, as gpt-fast's does); tokens = batch * gen,
  per GPU when `per_gpu`.
- train (tokens_per_s_per_gpu, tokens_per_s, tflops_per_gpu, step_time_s):
  flopsim.planning.plan_training of one step with the row's layout. A TFLOP/s
  figure is compared in the source's own FLOP convention: `flops_formula`
  (the source's formula, in symbols B global batch in sequences, s, l, h,
  V, N, a, d_head) gives the step's FLOPs F, and the prediction is reported
  as F / (predicted step time * GPUs).
- train_run (gpu_hours): plan_training over the row's tokens.
  A row that states its own network (`network`: a line rate a node or a GPU) is
  planned on it: each GPU's share, at the fraction of its NIC's line rate the
  calibration's inter-node figure reaches (`_row_network`); other rows use the
  calibration's network (one NIC a GPU).
- speedup: the baseline row's predicted time over this row's.
Error = predicted / published - 1 in the row's metric; the summary gives the
median and worst |error| and the worst ratio max(p/m, m/p).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from flopsim.errors import InputError

TASKS = ("prefill", "decode", "generate", "train", "train_run", "speedup")
METRICS = ("tokens_per_s", "tokens_per_s_per_gpu", "ms_per_token", "ttft_s", "tflops_per_gpu", "step_time_s",
           "gpu_hours", "speedup", "mfu")


class _Strict(BaseModel):
    """Unknown fields refused, types strict (no `true` for 1, no "0.5" for 0.5), numbers finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Source(_Strict):
    title: str
    url: str = ""
    accessed: str = ""


class Parallel(_Strict):
    gpus: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    dp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    cp: int = Field(1, ge=1)
    zero: int = Field(0, ge=0, le=3)
    zero_shard: Optional[int] = Field(None, ge=1)  # hybrid sharding: ZeRO over these ranks of dp, replicated
    recompute: Literal["none", "selective", "cheap", "full"] = "none"
    recompute_fraction: float = Field(1.0, gt=0, le=1)  # recompute full: the share of blocks checkpointed
    virtual_stages: int = Field(1, ge=1)  # the interleaved pipeline schedule's chunks a stage
    sequence_parallel: Optional[bool] = None  # token-wise ops split over tp (None: on when tp > 1)
    # embedding table and LM head split over tp by vocabulary (False: whole on each rank, as gpt-fast's tp.py)
    vocab_parallel: bool = True


class Engine(_Strict):
    compiled: bool = False
    cuda_graphs: bool = False
    flash_attention: bool = True
    static_cache: bool = False  # attention runs over every slot of a preallocated KV cache
    moe_kernel: Literal["grouped", "gather"] = "grouped"
    tp_comm_overlap: bool = False  # tensor-parallel collectives pipelined with the GEMMs (Megatron-Core)
    dp_comm_overlap: bool = True  # the data-parallel reduction overlaps the backward (False: after it, exposed)
    # gradient accumulation over micro-batches and the reduction's dtype (flopsim.ops.grad_accum)
    grad_accumulation: Literal["none", "autograd", "main_grad"] = "autograd"
    grad_reduce_dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None  # None: the gradients' dtype
    # the fused attention kernel when not the calibration's own (its `attention_kernels`): Triton's
    # FlashAttention (triton), FlashAttention-2 on an H100 whose own points are cuDNN's (fa2)
    attention_kernel: Optional[Literal["triton", "fa2"]] = None


class Network(_Strict):
    """The row's own inter-node network, as its source states it: a line rate (bits/s, one
    direction) per node or per GPU. flopsim prices it at the fraction of its NIC's line rate
    that the calibration's measured inter-node link reaches (nccl-tests busbw over the
    datasheet NIC), split evenly over a node's GPUs when given per node."""

    inter_node_bits_per_s: float = Field(gt=0)
    per: Literal["node", "gpu"]


class Row(_Strict):
    id: str
    source: str
    where: str
    quote: str
    verified: bool
    task: Literal["prefill", "decode", "generate", "train", "train_run", "speedup"]
    metric: Literal["tokens_per_s", "tokens_per_s_per_gpu", "ms_per_token", "ttft_s", "tflops_per_gpu",
                    "step_time_s", "gpu_hours", "speedup", "mfu"]
    value: float = Field(gt=0)
    hardware: str
    model: str
    changes: dict[str, Any] = {}
    shape: dict[str, float] = {}
    parallel: Parallel = Parallel()
    engine: Engine = Engine()
    network: Optional[Network] = None  # None: the calibration's network (one NIC a GPU)
    convention: str = ""
    flops_formula: Optional[str] = None
    per_gpu: Optional[bool] = None
    baseline: Optional[str] = None
    scored: bool = True  # False: shown and used as a speedup's baseline, not counted (e.g. hardware not stated)
    notes: str = ""


class Suite(_Strict):
    sources: dict[str, Source]
    rows: list[Row]


def suite_path(path: Optional[str] = None) -> Path:
    from flopsim.spec.paths import specs_dir

    return Path(path) if path else specs_dir() / "published" / "measurements.yaml"


def load_published(path: Optional[str] = None) -> Suite:
    """The published-measurements table, validated (unknown sources and baselines are errors)."""
    from flopsim.spec.loader import read_yaml, validate

    file = suite_path(path)
    suite = validate(Suite, read_yaml(file, "published suite", str(file)), str(file))
    ids = [r.id for r in suite.rows]
    for row in suite.rows:
        if row.source not in suite.sources:
            raise InputError(f"published suite: row {row.id!r}: source {row.source!r} is not in `sources`")
        if row.task == "speedup" and row.baseline not in ids:
            raise InputError(f"published suite: row {row.id!r}: baseline {row.baseline!r} is not a row")
        if row.metric == "tflops_per_gpu" and not row.flops_formula:
            raise InputError(f"published suite: row {row.id!r}: a tflops_per_gpu row needs the source's flops_formula")
        if not row.parallel.vocab_parallel and row.task not in ("prefill", "decode", "generate"):
            raise InputError(f"published suite: row {row.id!r}: parallel.vocab_parallel: false is modelled for "
                             f"inference rows (prefill, decode, generate), not task {row.task!r}")
    if len(set(ids)) != len(ids):
        raise InputError("published suite: row ids must be unique")
    return suite


@dataclass
class RowResult:
    row: Row
    predicted: float  # in the row's metric
    time_s: float  # the predicted time the metric comes from (a step, a token, a run)
    details: dict = field(default_factory=dict)
    calibration: str = ""  # the calibration the row was priced on (its provenance label)

    @property
    def ratio(self) -> float:
        return self.predicted / self.row.value

    @property
    def error(self) -> float:
        return self.ratio - 1

    @property
    def fold(self) -> float:
        """max(p / m, m / p): how many times off, either way."""
        return max(self.ratio, 1 / self.ratio)

    def to_dict(self) -> dict:
        r = self.row
        return {"id": r.id, "source": r.source, "task": r.task, "metric": r.metric, "hardware": r.hardware,
                "model": r.model, "gpus": r.parallel.gpus, "published": r.value, "predicted": self.predicted,
                "ratio": self.ratio, "error": self.error, "verified": r.verified, "scored": r.scored,
                "time_s": self.time_s, "calibration": self.calibration,
                **{f"detail_{k}": v for k, v in self.details.items()}}


@dataclass
class _Setup:
    spec: Any
    hw: Any
    cal: Any
    links: Any
    attention_kernel: str = ""  # the row's attention kernel as priced ('' when the calibration's own)


def _setup(row: Row) -> _Setup:
    """The row's model (with its changes and engine), hardware, calibration and links."""
    from flopsim.calibration import load_calibration
    from flopsim.hardware import load_hardware
    from flopsim.planning.links import resolve_links
    from flopsim.spec import load_model

    spec = load_model(row.model)
    changes = dict(row.changes)
    if row.engine.moe_kernel == "gather":  # compiled: the indexing fuses into the product (no copy)
        kernel = "gather_fused" if row.engine.compiled else "gather"
        changes["moe"] = {**spec.moe.model_dump(), **changes.get("moe", {}), "kernel": kernel}
    spec = spec.with_changes(**changes) if changes else spec
    hw = load_hardware(row.hardware)
    cal = load_calibration("auto", hw)
    if row.engine.cuda_graphs:
        cal = cal.with_graphs()
    kernel = row.engine.attention_kernel or ""
    if kernel in cal.attention_kernels:
        cal = cal.with_attention_kernel(kernel)
    elif kernel:  # no figures for it on this device: its own fused points, and the row says so
        kernel = f"{kernel} (no figures in the {cal.device} calibration: its fused attention points)"
    links = resolve_links(hw, cal, None, None, None, None, needed=row.parallel.gpus > 1)
    if row.network is not None:
        links = _row_network(row, hw, links)
    return _Setup(spec, hw, cal, links, kernel)


def _row_network(row: Row, hw, links):
    """`links` with the row's inter-node network (Network): each GPU's share of the stated line
    rate, at the efficiency the calibration's inter-node link reaches on the hardware's own NIC
    (its bus bandwidth over half the datasheet's two-way scale_out_bytes_per_s)."""
    import dataclasses

    base, nic = links.scale_out, getattr(hw, "scale_out_bytes_per_s", None)
    if base is None or not nic:
        raise InputError(f"published suite: row {row.id!r}: network: {hw.name} has no inter-node link to scale")
    efficiency = base.bus_bytes_per_s / (nic / 2)
    share = row.network.inter_node_bits_per_s / 8 / (links.gpus_per_node if row.network.per == "node" else 1)
    link = base.model_copy(update={
        "bus_bytes_per_s": share * efficiency,
        "source": f"the row's network, {row.network.inter_node_bits_per_s / 1e9:g} Gb/s a {row.network.per}, "
                  f"at the calibrated NIC's {efficiency:.2f} of its line rate"})
    return dataclasses.replace(links, scale_out=link)


def _shape(row: Row, name: str, default=None) -> int:
    if name not in row.shape:
        if default is None:
            raise InputError(f"published suite: row {row.id!r} ({row.task}) needs shape.{name}")
        return default
    return int(row.shape[name])


def _prefill(row: Row, s: _Setup) -> tuple[float, dict]:
    from flopsim.planning import tp_prefill_s

    t, _ = tp_prefill_s(s.spec, s.hw, s.cal, s.links, tp=row.parallel.tp, batch=_shape(row, "batch", 1),
                        prompt=_shape(row, "prompt"), encoder_seq=_encoder_seq(row),
                        vocab_parallel=row.parallel.vocab_parallel)
    return t, {"prefill_s": t}


def _encoder_seq(row: Row) -> Optional[int]:
    """An encoder-decoder row's encoder tokens per sequence (`shape.encoder_seq`), else None."""
    return _shape(row, "encoder_seq") if "encoder_seq" in row.shape else None


def _decode_context(row: Row) -> int:
    prompt, gen = _shape(row, "prompt"), _shape(row, "gen")
    return prompt + gen if row.engine.static_cache else prompt + (gen + 1) // 2


def _decode(row: Row, s: _Setup) -> tuple[float, dict]:
    from flopsim.planning import tp_decode_s

    t, _ = tp_decode_s(s.spec, s.hw, s.cal, s.links, tp=row.parallel.tp, batch=_shape(row, "batch", 1),
                       context=_decode_context(row), encoder_seq=_encoder_seq(row),
                       vocab_parallel=row.parallel.vocab_parallel)
    return t, {"decode_step_s": t, "context": _decode_context(row)}


def _generate(row: Row, s: _Setup) -> tuple[float, dict]:
    prefill, _ = _prefill(row, s)
    step, _ = _decode(row, s)
    gen = _shape(row, "gen")
    total = prefill + (gen - 1) * step
    return total, {"prefill_s": prefill, "decode_step_s": step, "context": _decode_context(row)}


def _train_plan(row: Row, s: _Setup, tokens: Optional[float] = None):
    from flopsim.planning import plan_training

    p = row.parallel
    seq = _shape(row, "seq")
    kwargs = dict(global_batch=_shape(row, "global_batch")) if "global_batch" in row.shape else dict(
        global_batch_tokens=_shape(row, "global_batch_tokens"))
    if row.network is not None:  # the row's own network (_row_network), both directions as plan_training takes it
        kwargs["inter_node_bytes_per_s"] = 2 * s.links.scale_out.bus_bytes_per_s
    return plan_training(s.spec, s.hw, gpus=p.gpus, tokens=tokens or seq * kwargs.get("global_batch", 1) or 1,
                         seq=seq, tp=p.tp, pp=p.pp, dp=p.dp, ep=p.ep, zero=p.zero, recompute=p.recompute,
                         micro_batch=_shape(row, "micro_batch", 1), calibration=s.cal,
                         tp_overlap=1.0 if row.engine.tp_comm_overlap else 0.0,
                         dp_overlap=1.0 if row.engine.dp_comm_overlap else 0.0,
                         virtual_stages=p.virtual_stages, sequence_parallel=p.sequence_parallel,
                         grad_accumulation=row.engine.grad_accumulation,
                         grad_reduce_dtype=row.engine.grad_reduce_dtype, zero_shard=p.zero_shard,
                         recompute_fraction=p.recompute_fraction, **kwargs)


def source_flops(row: Row, spec, params: int) -> float:
    """The step's FLOPs under the source's own formula (`flops_formula`)."""
    import sympy as sp

    names = dict(B=_shape(row, "global_batch"), s=_shape(row, "seq"), l=spec.layers, h=spec.d_model,
                 V=spec.vocab, N=params, a=spec.heads, d_head=spec.d_head, g=spec.kv_heads, f=spec.d_ff)
    try:
        expr = sp.sympify(row.flops_formula, locals={k: sp.Symbol(k) for k in names})
    except (sp.SympifyError, SyntaxError, TypeError) as err:
        raise InputError(f"published suite: row {row.id!r}: flops_formula {row.flops_formula!r} does not parse") from err
    unknown = expr.free_symbols - {sp.Symbol(k) for k in names}
    if unknown:
        raise InputError(f"published suite: row {row.id!r}: flops_formula uses unknown symbols {sorted(map(str, unknown))}")
    return float(expr.subs({sp.Symbol(k): v for k, v in names.items()}))


def _train(row: Row, s: _Setup) -> tuple[float, dict]:
    plan = _train_plan(row, s)
    step = plan.totals["step_time_s"]
    return step, {"step_time_s": step, "mfu": plan.totals["mfu"], "fits": plan.fits,
                  "params": plan.memory["params"]}


def _train_run(row: Row, s: _Setup) -> tuple[float, dict]:
    plan = _train_plan(row, s, tokens=float(row.shape["tokens"]))
    return plan.totals["train_time_s"], {"step_time_s": plan.totals["step_time_s"], "mfu": plan.totals["mfu"],
                                         "gpu_hours": plan.totals["gpu_hours"]}


TASK_TIME = {"prefill": _prefill, "decode": _decode, "generate": _generate, "train": _train,
             "train_run": _train_run}


def to_metric(row: Row, s: _Setup, time_s: float, details: dict) -> float:
    """The row's metric from a predicted time (see the module docstring)."""
    gpus, metric = row.parallel.gpus, row.metric
    if metric in ("ttft_s", "step_time_s"):
        return time_s
    if metric == "ms_per_token":
        return time_s * 1e3
    if metric == "gpu_hours":
        return gpus * time_s / 3600
    if row.task in ("train",):
        tokens = _shape(row, "global_batch") * _shape(row, "seq")
    else:
        tokens = _shape(row, "batch", 1) * (_shape(row, "gen") if row.task == "generate" else 1)
    if metric in ("tokens_per_s", "tokens_per_s_per_gpu"):
        per_gpu = metric == "tokens_per_s_per_gpu" or bool(row.per_gpu)
        return tokens / time_s / (gpus if per_gpu else 1)
    if metric in ("tflops_per_gpu", "mfu"):
        flops = source_flops(row, s.spec, int(details.get("params", 0)))
        value = flops / (time_s * gpus)
        return value / 1e12 if metric == "tflops_per_gpu" else value / s.hw.peak_flops_per_s_for(s.spec.compute_dtype)[0]
    raise InputError(f"published suite: row {row.id!r}: metric {metric!r} does not apply to task {row.task!r}")


def predict_row(row: Row, by_id: dict, cache: Optional[dict] = None) -> RowResult:
    """A row's prediction (speedup rows use their baseline row's predicted time)."""
    cache = {} if cache is None else cache
    if row.id in cache:
        return cache[row.id]
    if row.task == "speedup":
        base, this = by_id[row.baseline], dict(row)
        this.update(task=_time_task(row, by_id), metric="step_time_s", baseline=None)
        mine = predict_row(Row(**{**this, "id": f"{row.id}:time"}), by_id, cache)
        ref = predict_row(base, by_id, cache)
        result = RowResult(row, ref.time_s / mine.time_s, mine.time_s,
                           {"baseline_time_s": ref.time_s, **mine.details}, mine.calibration)
    else:
        s = _setup(row)
        time_s, details = TASK_TIME[row.task](row, s)
        if s.attention_kernel:
            details["attention_kernel"] = s.attention_kernel
        result = RowResult(row, to_metric(row, s, time_s, details), time_s, details, s.cal.provenance_label)
    cache[row.id] = result
    return result


def _time_task(row: Row, by_id: dict) -> str:
    """The task whose time a speedup row compares: its baseline's."""
    base = by_id[row.baseline]
    return base.task if base.task != "speedup" else _time_task(base, by_id)


@dataclass
class PublishedResult:
    results: list
    failures: list  # (row id, message) of rows that could not be predicted

    @property
    def scored(self) -> list:
        return [r for r in self.results if r.row.scored]

    def summary(self) -> dict:
        scored = self.scored
        errors = [abs(r.error) for r in scored]
        folds = [r.fold for r in scored]
        worst = max(scored, key=lambda r: r.fold) if scored else None
        by = {}
        for key in ("task", "source", "hardware"):
            groups: dict = {}
            for r in scored:
                groups.setdefault(getattr(r.row, key), []).append(abs(r.error))
            by[key] = {k: {"rows": len(v), "median_abs_error": statistics.median(v)} for k, v in sorted(groups.items())}
        return {
            "rows": len(scored), "unscored_rows": len(self.results) - len(scored),
            "sources": len({r.row.source for r in scored}),
            "median_abs_error": statistics.median(errors) if errors else float("nan"),
            "max_abs_error": max(errors) if errors else float("nan"),
            "worst_fold": max(folds) if folds else float("nan"), "worst_row": worst.row.id if worst else None,
            "within_1_5x": sum(f <= 1.5 for f in folds), "failures": len(self.failures),
            "median_signed_error": statistics.median(r.error for r in scored) if errors else float("nan"),
            "by": by,
        }


def run_published(path: Optional[str] = None, *, rows: Optional[list[str]] = None, progress=None) -> PublishedResult:
    """Predict every row (or the ids in `rows`) of the published suite."""
    suite = load_published(path)
    by_id = {r.id: r for r in suite.rows}
    missing = [i for i in rows or [] if i not in by_id]
    if missing:
        raise InputError(f"rows: {missing[0]!r}: no such row in the published suite")
    chosen = [by_id[i] for i in rows] if rows else suite.rows
    cache: dict = {}
    results, failures = [], []
    for i, row in enumerate(chosen):
        if progress:
            progress(row.id, i, len(chosen))
        try:
            results.append(predict_row(row, by_id, cache))
        except InputError as err:
            failures.append((row.id, str(err)))
    return PublishedResult(results, failures)


def write_published(result: PublishedResult, out_dir: Path) -> dict:
    """rows.csv, summary.json and summary.md into `out_dir` (each file atomically)."""
    import json

    import pandas as pd

    from flopsim.outputs import write_atomic

    out_dir = Path(out_dir)
    summary = result.summary()
    rows = [r.to_dict() for r in result.results]
    write_atomic(out_dir / "rows.csv", pd.DataFrame(rows).to_csv(index=False))
    write_atomic(out_dir / "summary.json", json.dumps({**summary, "rows_detail": rows, "failures": result.failures},
                                                      indent=2, default=float) + "\n")
    write_atomic(out_dir / "summary.md", summary_markdown(result, summary))
    return summary


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def summary_markdown(result: PublishedResult, summary: dict) -> str:
    lines = [
        "# flopsim against published measurements",
        "",
        f"{summary['rows']} rows from {summary['sources']} sources (specs/published/measurements.yaml). "
        f"Median |error| {100 * summary['median_abs_error']:.1f}%, worst |error| {100 * summary['max_abs_error']:.1f}% "
        f"(row `{summary['worst_row']}`, {summary['worst_fold']:.2f}x off), {summary['within_1_5x']} of "
        f"{summary['rows']} rows within 1.5x; median signed error {100 * summary['median_signed_error']:+.1f}%.",
        "",
        "Reproduce: `flopsim validate --published`. Calibrations: each row's hardware's shipped file "
        "(measured or published-seeded microbenchmarks; never these rows).",
        "",
        "| task | rows | median abs error |", "|---|---|---|",
    ]
    for task, v in summary["by"]["task"].items():
        lines.append(f"| {task} | {v['rows']} | {100 * v['median_abs_error']:.1f}% |")
    lines += ["", "| source | rows | median abs error |", "|---|---|---|"]
    for source, v in summary["by"]["source"].items():
        lines.append(f"| {source} | {v['rows']} | {100 * v['median_abs_error']:.1f}% |")
    lines += ["", "| row | task | metric | hardware | GPUs | published | predicted | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result.results:
        mark = "" if r.row.scored else " (not scored)"
        lines.append(f"| {r.row.id}{mark} | {r.row.task} | {r.row.metric} | {r.row.hardware} | {r.row.parallel.gpus} | "
                     f"{_fmt(r.row.value)} | {_fmt(r.predicted)} | {r.ratio:.3f} |")
    if result.failures:
        lines += ["", "Rows not predicted:", ""] + [f"- `{i}`: {why}" for i, why in result.failures]
    return "\n".join(lines) + "\n"
