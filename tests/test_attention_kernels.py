"""A calibration's other fused attention kernels (`attention_kernels`, e.g. Triton's
FlashAttention, which llm-foundry's MPT runs): `with_attention_kernel` prices the fused
attention with that kernel's points; the published suite's rows name theirs
(`engine.attention_kernel`)."""

from __future__ import annotations

import pytest

from flopsim.calibration import Calibration, GemmPoint, load_calibration
from flopsim.errors import InputError
from flopsim.hardware import load_hardware


def _a100():
    return load_calibration("auto", load_hardware("a100-80gb"))


def test_the_kernels_points_replace_the_fused_ones():
    cal = _a100()
    triton = cal.with_attention_kernel("triton")
    fused = [g for g in triton.gemm if g.kind == "attention" and g.variant in (None, "fused")]
    assert fused == cal.attention_kernels["triton"]
    assert [g for g in triton.gemm if g.kind != "attention"] == [g for g in cal.gemm if g.kind != "attention"]
    # at a measured shape the efficiency is the point's: the FlashAttention-2 paper's Fig. 4 Triton bar,
    # head dim 128, seq 2048 (batch 16k / 2048 x 16 heads), 90 TF/s fwd+bwd, forward share 0.73 / 204.6
    shape = (8 * 16, 2048, 2048, 128)
    assert triton.efficiency("attention", shape, variant="fused")[0] == pytest.approx(0.73 * 90 / 204.6, abs=5e-4)
    assert triton.efficiency("attention", shape, variant="fused", backward=True)[0] == pytest.approx(
        0.63 * 90 / 204.6, abs=5e-4)
    # FlashAttention-2's own bar at the same shape is 187 TF/s: the calibration's fused point
    assert cal.efficiency("attention", shape, variant="fused")[0] == pytest.approx(0.73 * 187 / 204.6, abs=5e-4)


def test_the_h100_points_are_the_a100_ratio_times_flashattention2_on_the_h100():
    # derived (the calibration's attention_kernels.triton source): Triton / FlashAttention-2 on the A100
    # (FlashAttention-2 paper Fig. 4, fwd+bwd, seq 2048: 90 / 187) x FlashAttention-2 on the H100
    # (FlashAttention-3 paper Figs. 5-6, seq 2048: forward 362, backward 291 TF/s) / 989.4 TF/s
    h100 = load_calibration("auto", load_hardware("h100-sxm"))
    triton = h100.with_attention_kernel("triton")
    shape = (8 * 16, 2048, 2048, 128)
    assert triton.efficiency("attention", shape, variant="fused")[0] == pytest.approx(90 / 187 * 362 / 989.4, abs=5e-4)
    assert triton.efficiency("attention", shape, variant="fused", backward=True)[0] == pytest.approx(
        90 / 187 * 291 / 989.4, abs=5e-4)
    # the pre-MLIR Triton kernel runs at under a third of the calibration's own (cuDNN) attention there
    assert triton.efficiency("attention", shape, variant="fused")[0] < h100.efficiency(
        "attention", shape, variant="fused")[0] / 3


def test_a_kernel_without_figures_is_one_line_and_points_must_be_attention():
    with pytest.raises(InputError, match="attention kernel 'triton': calibration b200 has no figures"):
        load_calibration("auto", load_hardware("b200")).with_attention_kernel("triton")
    with pytest.raises(ValueError, match="attention_kernels.x: needs points of kind attention"):
        Calibration(attention_kernels={"x": [GemmPoint(kind="matmul", m=1, n=1, k=1, compute=0.5)]})


def test_published_rows_price_their_attention_kernel():
    from flopsim.published import load_published, predict_row

    rows = {r.id: r for r in load_published().rows}
    a100 = predict_row(rows["foundry-mpt125m-a100-80-8gpu-seq2048"], rows)
    assert a100.details["attention_kernel"] == "triton"
    h100 = predict_row(rows["foundry-mpt7b-h100-8gpu-seq8192"], rows)
    assert h100.details["attention_kernel"] == "triton"
    # a device whose calibration has no figures for the row's kernel keeps its own fused points and says so
    elsewhere = rows["foundry-mpt7b-h100-8gpu-seq8192"].model_copy(update={"hardware": "b200"})
    b200 = predict_row(elsewhere, rows)
    assert b200.details["attention_kernel"].startswith("triton (no figures in the b200 calibration")
    # and the kernel's points are what the row's step time moved by: the H100 row with its own points is faster
    own = rows["foundry-mpt7b-h100-8gpu-seq8192"].model_copy(
        update={"engine": rows["foundry-mpt7b-h100-8gpu-seq8192"].engine.model_copy(update={"attention_kernel": None})})
    assert predict_row(own, rows).time_s < h100.time_s


def test_the_h100_fa2_points_are_the_flashattention3_papers_flashattention2_bars():
    # FlashAttention-3 paper Fig. 5 (c) forward, non-causal, head dim 128, FlashAttention-2 bars (read in
    # assets/flash3_fp16_fwd.png), and Fig. 6's backward bars, / the H100's 989.4 TF/s; batch x heads = 16k / seq x 16
    h100 = load_calibration("auto", load_hardware("h100-sxm"))
    fa2 = h100.with_attention_kernel("fa2")
    for seq, forward_tflops, backward_tflops in [(512, 309, 214), (4096, 368, 310), (16384, 370, 322)]:
        shape = (16384 // seq * 16, seq, seq, 128)
        assert fa2.efficiency("attention", shape, variant="fused")[0] == pytest.approx(forward_tflops / 989.4, abs=5e-4)
        assert fa2.efficiency("attention", shape, variant="fused", backward=True)[0] == pytest.approx(
            backward_tflops / 989.4, abs=5e-4)
        # the calibration's own points (cuDNN, SDPA's kernel on sm90 from torch 2.11) run 1.6-1.7x faster forward
        assert h100.efficiency("attention", shape, variant="fused")[0] > 1.5 * forward_tflops / 989.4
    # head dim 64: Fig. 5 (a)'s bar forward; backward from the FlashAttention-2 README's H100 fwd+bwd figure,
    # whose 3.5 units of work take the forward's 1 at its speed and the backward's 2.5 at its own
    shape = (16384 // 4096 * 32, 4096, 4096, 64)
    assert fa2.efficiency("attention", shape, variant="fused")[0] == pytest.approx(321 / 989.4, abs=5e-4)
    assert fa2.efficiency("attention", shape, variant="fused", backward=True)[0] == pytest.approx(
        2.5 / (3.5 / 288 - 1 / 321) / 989.4, abs=5e-4)


def test_the_kernel_is_named_wherever_the_calibration_is():
    h100 = load_calibration("auto", load_hardware("h100-sxm"))
    assert "attention kernel" not in h100.provenance_label
    fa2 = load_calibration("auto", load_hardware("h100-sxm"), attention_kernel="fa2")
    assert fa2.attention_kernel == "fa2" and fa2.provenance_label.endswith(", attention kernel fa2")
    assert fa2.label.startswith(fa2.provenance_label)
    assert fa2.gemm == h100.with_attention_kernel("fa2").gemm
    # a file naming a kernel it does not carry is refused, not printed as if applied
    with pytest.raises(ValueError, match="attention_kernel: 'fa2' is not among attention_kernels"):
        Calibration(attention_kernel="fa2")


def test_the_fsdp_h100_rows_run_flashattention2():
    # the IBM / PyTorch FSDP post (March 2024, PyTorch 2.2-2.4 nightlies) runs 'SDPA Flash attention':
    # FlashAttention-2 on the H100, slower there than the calibration's own cuDNN points
    from flopsim.published import load_published, predict_row

    rows = {r.id: r for r in load_published().rows}
    for name in ("fsdp-llama2-7b-h100-96gpu", "fsdp-llama2-70b-h100-96gpu"):
        row = rows[name]
        assert row.engine.attention_kernel == "fa2"
        priced = predict_row(row, rows)
        assert priced.details["attention_kernel"] == "fa2"
        cudnn = row.model_copy(update={"engine": row.engine.model_copy(update={"attention_kernel": None})})
        assert predict_row(cudnn, rows).time_s < priced.time_s


def test_the_cli_takes_an_attention_kernel_and_names_it():
    import json

    from typer.testing import CliRunner

    from flopsim.cli import app

    runner = CliRunner()
    args = ["predict", "llama-2-7b", "-H", "h100-sxm", "-p", "train", "-b", "1", "-s", "4096", "-f", "json"]
    own = json.loads(runner.invoke(app, args).stdout)
    fa2 = json.loads(runner.invoke(app, args + ["--attention-kernel", "fa2"]).stdout)
    assert fa2["calibration_label"].endswith("attention kernel fa2")
    assert "attention kernel" not in own["calibration_label"]
    assert fa2["time_s"] > own["time_s"]
    serve = runner.invoke(app, ["plan", "serve", "llama-2-7b", "-H", "h100-sxm", "--prompt", "2048", "--gen", "128",
                                "--gpus", "1", "--attention-kernel", "fa2", "-f", "json"])
    assert serve.exit_code == 0, serve.output
    assert json.loads(serve.stdout)["calibration_label"].endswith("attention kernel fa2")
    bad = runner.invoke(app, args + ["--attention-kernel", "fa9"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        "flopsim: error: attention kernel 'fa9': calibration h100-sxm has no figures for it (attention_kernels: triton, fa2)"]
