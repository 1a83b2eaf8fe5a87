"""FSDP against hybrid sharding as the data-parallel group grows: where the rings' steps bite.

A reduce-scatter's or all-gather's ring over n ranks on N nodes has n - 1 steps, N - 1 of
them between nodes (flopsim.collectives.network_collective_s, NCCL's latency model). FSDP
gathers every block's weights over all its ranks, so its latency grows with the GPUs; hybrid
sharding (ZeRO over one node's 8 GPUs, replicated over the nodes) keeps the gathers on
NVLink and all-reduces the gradient shards over the nodes. For each GPU count this prints
both plans (`flopsim plan train --zero 3 [--zero-shard 8]`, one sequence a GPU), the
data-parallel seconds a step, and FSDP's with the calibration's ring steps set to zero,
which is the part the steps add. Everything is read off plan_training: no formula here.

    python benchmarks/fsdp_scaling.py [--model llama-2-7b] [--hardware a100-80gb] [--seq 4096]
"""

from __future__ import annotations

import argparse


def _no_ring_steps(cal):
    """The calibration with every link level's ring step at zero (bandwidth and latency kept)."""
    return cal.model_copy(update={"links": {name: link.model_copy(update={"hop_latency_s": 0.0})
                                            for name, link in cal.links.items()}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--hardware", default="a100-80gb")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--gpus", default="8,64,256,1024,2048,4096", help="comma-separated GPU counts")
    args = parser.parse_args()

    import flopsim
    from flopsim.planning import plan_training

    cal = flopsim.load_calibration("auto", flopsim.load_hardware(args.hardware))
    flat = _no_ring_steps(cal)
    out, up = cal.link("scale_out"), cal.link("scale_up")
    print(f"{args.model} on {args.hardware}, seq {args.seq}, one sequence a GPU, ZeRO-3, selective recompute; "
          f"calibration {cal.provenance_label}")
    print(f"ring steps: {out.hop_latency_s * 1e6:.3g} us between nodes, {up.hop_latency_s * 1e6:.3g} us on a node")
    print(f"{'GPUs':>6} {'FSDP step':>10} {'tok/s/GPU':>10} {'MFU':>6} {'DP s':>7} {'DP s, no steps':>15} "
          f"{'HSDP step':>10} {'tok/s/GPU':>10} {'MFU':>6} {'DP s':>7}")
    for gpus in (int(g) for g in args.gpus.split(",")):
        def plan(shard=None, calibration=cal):
            return plan_training(args.model, args.hardware, gpus=gpus, tokens=float(gpus * args.seq), seq=args.seq,
                                 dp=gpus, zero=3, zero_shard=shard, micro_batch=1, global_batch=gpus,
                                 recompute="selective", calibration=calibration)

        fsdp, bare = plan(), plan(calibration=flat)
        hsdp = plan(8) if gpus > 8 else fsdp
        print(" ".join([f"{gpus:>6}", *_cells(fsdp), f"{bare.communication['dp_s_per_step']:>15.3f}",
                        *_cells(hsdp)]))


def _cells(plan) -> list:
    """A plan's step, tokens/s per GPU, MFU and data-parallel seconds a step, as table cells."""
    return [f"{plan.step_time_s * 1e3:>8.1f}ms", f"{plan.totals['tokens_per_s_per_gpu']:>10.0f}",
            f"{100 * plan.totals['mfu']:>5.1f}%", f"{plan.communication['dp_s_per_step']:>7.3f}"]


if __name__ == "__main__":
    main()
