"""Layout search time: `flopsim plan train --search` on 1024 GPUs.

For each model (a 70B dense model, llama-2-70b, and an 8x22B MoE,
mixtral-8x22b) on h100-sxm at seq 4096: every tp x pp x dp (x ep) layout of
1024 GPUs, micro-batches 1, 2, 4, 8, ZeRO 0-3 and recomputation none /
selective / cheap / full (flopsim.planning.search.search_training, in-process, after
the imports). Target: under 5 s per model on a 2-core machine. Medians of
several runs; prints the layouts tried, how many fit and the fastest.

Last line: search_s_<model>=<median seconds> for each model.

`--serve`: the serving search instead, `flopsim plan serve`'s (plan_serving, in-process,
after the imports and a first search that loads the presets): every tp x pp x ep replica of
--serve-gpus GPUs (default 8) and its batch, for prompt 1024 + gen 256 with TTFT <= 1 s and
TPOT <= 50 ms, for mixtral-8x7b and llama-3.1-70b on h100-sxm. Target: a few seconds per
model. Last line: serve_s_<model>=<median seconds>.

    python benchmarks/plan_search.py [--runs 3] [--gpus 1024]
    python benchmarks/plan_search.py --serve [--runs 3] [--serve-gpus 8]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gpus", type=int, default=1024)
    parser.add_argument("--hardware", default="h100-sxm")
    parser.add_argument("--models", default=None, help="default llama-2-70b,mixtral-8x22b (serving: "
                                                           "mixtral-8x7b,llama-3.1-70b)")
    parser.add_argument("--serve", action="store_true", help="time the serving search instead")
    parser.add_argument("--serve-gpus", type=int, default=8)
    args = parser.parse_args()
    if args.serve:
        return serve(args)
    args.models = args.models or "llama-2-70b,mixtral-8x22b"

    from flopsim.planning.search import search_training

    medians = {}
    for model in args.models.split(","):
        times, result = [], None
        for _ in range(args.runs):
            start = time.perf_counter()
            result = search_training(model, args.hardware, gpus=args.gpus, tokens=1e12, seq=4096)
            times.append(time.perf_counter() - start)
        medians[model] = statistics.median(times)
        best = result.best
        print(f"{model} on {args.gpus} x {args.hardware}: {len(result.rows)} layouts, {len(result.fastest)} fit; "
              f"median {medians[model]:.2f} s of {args.runs} runs (target < 5 s)")
        if best is not None:
            shard = f" over {best['zero_shard']}" if best["zero_shard"] else ""
            print(f"  fastest: tp {best['tp']} pp {best['pp']} dp {best['dp']} ep {best['ep']} micro-batch "
                  f"{best['micro_batch']} ZeRO-{best['zero']}{shard} recompute {best['recompute']}: {best['days']:.2f} days, "
                  f"MFU {100 * best['mfu']:.1f}%, {best['memory_gb']:.1f} GB per GPU")
    print(" ".join(f"search_s_{m}={t:.3f}" for m, t in medians.items()))


def serve(args) -> None:
    from flopsim.planning import plan_serving

    def one(model):
        return plan_serving(model, args.hardware, prompt=1024, gen=256, gpus=args.serve_gpus, ttft_s=1.0,
                            tpot_s=0.05)

    medians = {}
    for model in (args.models or "mixtral-8x7b,llama-3.1-70b").split(","):
        one(model)  # the preset's op lists built once, as a command builds them
        times, plan = [], None
        for _ in range(args.runs):
            start = time.perf_counter()
            plan = one(model)
            times.append(time.perf_counter() - start)
        medians[model] = statistics.median(times)
        print(f"{model} on {args.serve_gpus} x {args.hardware}: {len(plan.candidates)} replicas, median "
              f"{medians[model]:.2f} s of {args.runs} runs; chosen: {plan.message}")
    print(" ".join(f"serve_s_{m}={t:.3f}" for m, t in medians.items()))


if __name__ == "__main__":
    main()
