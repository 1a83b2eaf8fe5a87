"""The published-measurements suite: the table's schema and coverage, and the
runner's arithmetic (each task's time, the conversion into the source's own
metric, speedups). No assertion on how close a prediction is: the suite's
figures are printed by benchmarks/published_suite.py."""

from __future__ import annotations

import math

import pytest
import yaml

from conftest import one_error_line, run_cli
from flopsim.errors import InputError
from flopsim.hardware import load_hardware
from flopsim.published import _setup, load_published, predict_row, run_published, source_flops, suite_path
from flopsim.spec import load_model

SUITE = load_published()
BY_ID = {r.id: r for r in SUITE.rows}


def test_table_covers_training_inference_and_conditional_speedups():
    scored = [r for r in SUITE.rows if r.scored]
    assert len(scored) >= 30
    assert len({r.source for r in scored}) >= 8
    tasks = {r.task for r in scored}
    assert {"train", "train_run", "prefill", "generate", "speedup"} <= tasks
    assert any(r.parallel.gpus > 1 and r.task == "train" for r in scored)  # many GPUs
    assert any(r.parallel.gpus == 1 and r.task == "generate" and r.shape.get("batch") == 1 for r in scored)
    assert any(r.parallel.tp > 1 and r.task == "generate" for r in scored)  # tensor-parallel decode
    assert any(r.engine.moe_kernel == "gather" for r in scored)  # an MoE indexing its experts per token
    assert any(r.task == "speedup" and "sparse" in r.model for r in scored)  # Scaling Transformers


@pytest.mark.parametrize("row", SUITE.rows, ids=[r.id for r in SUITE.rows])
def test_every_row_names_a_loadable_model_and_device_and_its_quote(row):
    load_model(row.model)
    load_hardware(row.hardware)
    assert row.quote and row.where and row.source in SUITE.sources
    p = row.parallel
    if row.task in ("train", "train_run"):
        assert p.tp * p.pp * p.dp == p.gpus


TRAINING = [r for r in SUITE.rows if r.task in ("train", "train_run") and r.scored]


@pytest.mark.parametrize("row", TRAINING, ids=[r.id for r in TRAINING])
def test_every_scored_training_layout_fits_its_device(row):
    """A row is a run that happened: the layout it is priced on, published or assumed, must
    fit the device by flopsim's own memory model (weights, gradients, optimizer state and the
    micro-batch's activations), or the time it is compared with belongs to no real run."""
    from flopsim.published import _train_plan

    plan = _train_plan(row, _setup(row), tokens=float(row.shape["tokens"]) if row.task == "train_run" else None)
    assert plan.fits, f"{row.id}: {plan.message}"


def test_generate_is_a_prefill_then_gen_minus_one_decode_steps():
    row = BY_ID["gptfast-llama2-7b-a100-bs1-bf16"]
    r = predict_row(row, BY_ID)
    d = r.details
    assert r.time_s == pytest.approx(d["prefill_s"] + (row.shape["gen"] - 1) * d["decode_step_s"])
    assert r.predicted == pytest.approx(row.shape["batch"] * row.shape["gen"] / r.time_s)
    # gpt-fast attends over every slot of its preallocated cache: prompt + gen keys
    assert d["context"] == row.shape["prompt"] + row.shape["gen"]


def test_tflops_rows_use_the_sources_own_formula():
    """Megatron's eq. 3: F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)); predicted
    TFLOP/s = F / (predicted step time * GPUs)."""
    row = BY_ID["megatron-2021-gpt3-175b-a100-1024gpu"]
    spec = _setup(row).spec
    B, s, l, h, V = row.shape["global_batch"], row.shape["seq"], spec.layers, spec.d_model, spec.vocab
    F = 96 * B * s * l * h ** 2 * (1 + s / (6 * h) + V / (16 * l * h))
    assert source_flops(row, spec, 0) == pytest.approx(F)
    r = predict_row(row, BY_ID)
    assert r.predicted == pytest.approx(F / (r.time_s * row.parallel.gpus) / 1e12)


def test_a_rows_network_is_its_per_gpu_share_at_the_calibrated_nic_efficiency():
    """IBM's H100 row states 800 Gb/s a node: each of 8 GPUs gets 100 Gb/s = 12.5 GB/s, at the
    0.94 of its line rate the h100-sxm calibration's inter-node figure reaches (47 GB/s busbw
    over a 400 Gb/s = 50 GB/s NIC); the step is planned on that link, slower than on one NIC a
    GPU, and a row stated per GPU takes the whole rate."""
    row = BY_ID["fsdp-llama2-7b-h100-96gpu"]
    assert row.network.per == "node" and row.network.inter_node_bits_per_s == 800e9
    calibrated = _setup(row.model_copy(update={"network": None})).links.scale_out.bus_bytes_per_s
    efficiency = calibrated / (100e9 / 2)  # specs/hardware/h100-sxm.yaml: scale_out 100e9 both ways
    assert efficiency == pytest.approx(47 / 50)
    link = _setup(row).links.scale_out
    assert link.bus_bytes_per_s == pytest.approx(800e9 / 8 / 8 * efficiency)
    per_gpu = row.model_copy(update={"network": row.network.model_copy(update={"per": "gpu"})})
    assert _setup(per_gpu).links.scale_out.bus_bytes_per_s == pytest.approx(800e9 / 8 * efficiency)
    plain = predict_row(row.model_copy(update={"network": None, "id": "plain"}), BY_ID)
    ours = predict_row(row, BY_ID)
    assert ours.time_s > plain.time_s


def test_gpt_fast_tensor_parallel_rows_read_the_whole_head_on_every_rank():
    """gpt-fast's tp.py leaves the LM head whole on each rank (vocab_parallel: false): a
    decode step is slower than with the vocabulary-parallel head by about the (1 - 1/tp) x
    V x d_model head bytes it reads in addition, at the calibration's GEMV bandwidth."""
    row = BY_ID["gptfast-llama31-8b-a100-tp8"]
    assert row.parallel.tp == 8 and row.parallel.vocab_parallel is False
    split = row.model_copy(update={"id": "split", "parallel": row.parallel.model_copy(update={"vocab_parallel": True})})
    whole, parallel = predict_row(row, BY_ID), predict_row(split, BY_ID)
    spec = _setup(row).spec
    extra_bytes = (1 - 1 / 8) * spec.vocab * spec.d_model * 2  # bf16 head read by every rank
    added = whole.details["decode_step_s"] - parallel.details["decode_step_s"]
    bandwidth = load_hardware(row.hardware).memory_bandwidth_bytes_per_s
    assert extra_bytes / bandwidth < added < extra_bytes / (0.5 * bandwidth)


def test_a_whole_head_is_refused_on_a_training_row(tmp_path):
    data = yaml.safe_load(suite_path().read_text())
    row = next(r for r in data["rows"] if r["task"] == "train")
    row["parallel"]["vocab_parallel"] = False
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="vocab_parallel: false is modelled for inference rows"):
        load_published(str(path))


def test_speedup_rows_are_the_baselines_time_over_the_rows():
    row = next(r for r in SUITE.rows if r.task == "speedup")
    r = predict_row(row, BY_ID)
    base = predict_row(BY_ID[row.baseline], BY_ID)
    assert r.predicted == pytest.approx(base.time_s / r.time_s)


def test_summary_counts_only_scored_rows():
    result = run_published(rows=["gptfast-llama2-7b-a100-bs1-bf16", "scaling-transformers-800m-baseline-decode"])
    s = result.summary()
    assert s["rows"] == 1 and s["unscored_rows"] == 1
    only = result.scored[0]
    assert s["median_abs_error"] == pytest.approx(abs(only.error))
    assert s["worst_fold"] == pytest.approx(max(only.ratio, 1 / only.ratio))


def test_bad_tables_are_one_line_errors(tmp_path):
    data = yaml.safe_load(suite_path().read_text())
    data["rows"][0]["source"] = "nowhere"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="source 'nowhere'"):
        load_published(str(path))
    result = run_cli("validate", "--published", "--table", str(path))
    assert "nowhere" in one_error_line(result)
    result = run_cli("validate", "--published", "--rows", "no-such-row")
    assert "no-such-row" in one_error_line(result)


def test_cli_prints_rows_and_writes_the_report(tmp_path):
    result = run_cli("validate", "--published", "--rows", "gptfast-llama2-7b-a100-bs1-bf16,llama2-7b-gpu-hours",
                     "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "gptfast-llama2-7b-a100-bs1-bf16" in result.output and "median |error|" in result.output
    assert {p.name for p in tmp_path.iterdir()} == {"rows.csv", "summary.json", "summary.md"}
    assert math.isfinite(yaml.safe_load((tmp_path / "summary.json").read_text())["median_abs_error"])
