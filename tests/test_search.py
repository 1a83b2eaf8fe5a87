"""flopsim.planning.search (`plan train --search`): the candidates, the costing (the
same as plan_training's for each layout), the memory filter and the Pareto front."""

from __future__ import annotations

import json

import pytest
from conftest import one_error_line
from conftest import run_cli as run

import flopsim
from flopsim.planning import plan_training
from flopsim.planning.common import parse_gpu_counts
from flopsim.planning.search import candidate_layouts, pareto_front, search_training

H100 = "h100-sxm"


@pytest.fixture(scope="module")
def small():
    return search_training("llama-2-7b", H100, gpus=[8, 16], tokens=1e10, seq=1024, micro_batches=(1, 2),
                           zero=(1, 3), recompute=("none", "full"), price_per_gpu_hour=2.0)


def test_candidates_cover_every_layout_of_the_gpus():
    spec = flopsim.load_model("llama-2-7b")  # 32 heads, 32 blocks
    got = candidate_layouts(spec, 16, 8, [1], [0], ["none"])
    # tp: powers of two up to the node (1, 2, 4, 8); pp: divisors of 32 with tp * pp | 16
    expected = {(tp, pp, 16 // (tp * pp)) for tp in (1, 2, 4, 8) for pp in (1, 2, 4, 8, 16) if 16 % (tp * pp) == 0}
    assert {(c["tp"], c["pp"], c["dp"]) for c in got} == expected
    # interleaving: 2, 3 or 4 chunks a stage where pp * v divides the 32 blocks (3 never does)
    assert {(c["pp"], c["virtual_stages"]) for c in got if c["pp"] == 4} == {(4, 1), (4, 2), (4, 4)}
    moe = candidate_layouts(flopsim.load_model("mixtral-8x7b"), 16, 8, [1], [0], ["none"])
    assert {c["ep"] for c in moe if c["dp"] == 16} == {1, 2, 4, 8}  # divisors of 8 experts and of dp
    assert all(c["dp"] % c["ep"] == 0 for c in moe)


def test_zero_is_also_tried_sharded_over_one_node():
    # hybrid sharding (HSDP): ZeRO over the dp ranks of one node (8 / tp), replicated over the nodes,
    # tried wherever dp spans nodes; never without ZeRO, with expert parallelism or inside one node
    spec = flopsim.load_model("llama-2-7b")
    got = candidate_layouts(spec, 32, 8, [1], [0, 3], ["none"])
    hybrid = {(c["tp"], c["pp"], c["dp"], c["zero_shard"]) for c in got if c["zero_shard"]}
    assert hybrid == {(tp, pp, 32 // (tp * pp), 8 // tp) for tp in (1, 2, 4) for pp in (1, 2)
                      if 32 // (tp * pp) > 8 // tp}
    assert all(c["zero"] == 3 for c in got if c["zero_shard"])
    moe = candidate_layouts(flopsim.load_model("mixtral-8x7b"), 32, 8, [1], [3], ["none"])
    assert not any(c["zero_shard"] for c in moe if c["ep"] > 1)


def test_over_a_thousand_gpus_the_search_finds_hybrid_sharding():
    # FSDP over 1,024 A100s gathers each block over a ring of 1,024 ranks (127 steps between nodes at
    # 14 us, flopsim.collectives); sharding over a node's 8 GPUs keeps the gathers on NVLink and pays one
    # all-reduce of the gradient shards over the 128 nodes: the faster of the two
    r = search_training("llama-2-7b", "a100-80gb", gpus=1024, tokens=2e12, seq=2048, micro_batches=(1,),
                        zero=(3,), recompute=("selective",), global_batch=2048)
    by_shard = {row["zero_shard"]: row for row in r.fastest if row["tp"] == 1 and row["pp"] == 1}
    assert set(by_shard) == {None, 8}
    assert by_shard[8]["step_time_s"] < by_shard[None]["step_time_s"]
    assert r.best["zero_shard"] == 8


def test_each_row_is_what_plan_train_gives_for_its_layout(small):
    rows = small.fastest
    picks = [rows[0], rows[len(rows) // 2], next(r for r in rows if r["pp"] > 1),
             next(r for r in rows if r["virtual_stages"] > 1), next(r for r in rows if r["zero_shard"])]
    for r in picks:
        p = plan_training("llama-2-7b", H100, gpus=r["gpus"], tokens=1e10, seq=1024, tp=r["tp"], pp=r["pp"],
                          virtual_stages=r["virtual_stages"], zero_shard=r["zero_shard"],
                          micro_batch=r["micro_batch"], zero=r["zero"], recompute=r["recompute"],
                          global_batch=r["global_batch"], price_per_gpu_hour=2.0)
        assert p.step_time_s == pytest.approx(r["step_time_s"], rel=1e-9)
        assert p.memory["total_bytes"] / 1e9 == pytest.approx(r["memory_gb"], rel=1e-12)
        assert p.totals["mfu"] == pytest.approx(r["mfu"], rel=1e-9) and p.cost == pytest.approx(r["cost"])


def test_the_global_batch_is_one_for_every_layout_and_fitting_rows_come_fastest_first(small):
    # ~4M tokens at seq 1024: ceil(4 Mi / 1024) = 4096 sequences, whatever the layout
    assert {r["global_batch"] for r in small.rows} == {4096}
    assert all(not r["fits"] for r in small.rows if r not in small.fastest)
    days = [r["days"] for r in small.fastest]
    assert days == sorted(days) and small.best is small.fastest[0]


def test_pareto_front_is_exactly_the_undominated_layouts(small):
    def key(r):
        return r["gpus"], r["days"], r["cost"]

    def dominated(r):
        return any(all(a <= b for a, b in zip(key(o), key(r))) and key(o) != key(r) for o in small.fastest)

    front = small.pareto
    assert front and all(not dominated(r) for r in front)
    assert {key(r) for r in small.fastest if not dominated(r)} == {key(r) for r in front}
    assert pareto_front([]) == []


def test_nothing_fits_is_said(tmp_path):
    r = search_training("llama-2-70b", H100, gpus=1, tokens=1e9, seq=1024, micro_batches=(1,), zero=(0,),
                        recompute=("none",))
    assert not r.fastest and r.best is None and "fits" in r.notes[0]


@pytest.mark.parametrize("text, expected", [("1024", [1024]), ("8,16", [8, 16]), ("64:256", [64, 128, 256]),
                                            ("3:9", [4, 8])])
def test_gpu_counts(text, expected):
    assert parse_gpu_counts(text) == expected


def test_cli_search_json_and_bad_counts():
    out = run("plan", "train", "llama-2-7b", "-H", H100, "--gpus", "8:16", "--tokens", "1e10", "--seq", "1024",
              "--search", "--micro-batches", "1", "--zero", "1", "--recompute", "none", "--format", "json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["kind"] == "training_search" and data["fitting"] == len(data["fastest"]) > 0
    out = run("plan", "train", "llama-2-7b", "-H", H100, "--gpus", "8:16", "--tokens", "1e10", "--search",
              "--micro-batches", "1", "--zero", "1", "--recompute", "none", "--top", "3")
    assert out.exit_code == 0 and "Pareto front" in out.output and "fastest 3" in out.output
    # the best layout's command line carries the attention kernel the search priced, so that it reproduces
    out = run("plan", "train", "llama-2-7b", "-H", H100, "--gpus", "8", "--tokens", "1e10", "--search",
              "--micro-batches", "1", "--zero", "1", "--recompute", "none", "--attention-kernel", "fa2")
    assert out.exit_code == 0 and "attention kernel fa2" in out.output
    assert " ".join(out.output.split()).split("best: ")[1].endswith("--attention-kernel fa2 ...")
    for args, needle in ((["--gpus", "8,x", "--search"], "gpus"), (["--gpus", "8,16"], "gpus"),
                         (["--gpus", "8", "--search", "--top", "0"], "top")):
        line = one_error_line(run("plan", "train", "llama-2-7b", "-H", H100, "--tokens", "1e10", *args))
        assert needle in line
