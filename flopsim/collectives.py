"""Collective communication: the one formula every consumer uses.

A collective over n ranks of a buffer of `nbytes` on a link level with a
bus bandwidth b (nccl-tests' busbw: the per-rank bandwidth a ring or tree
algorithm sustains on large messages) and a latency a (the time of a
small message on that level) takes

    a + steps(op, n) * h + factor(op, n) * nbytes / b

    all_reduce       factor 2 (n - 1) / n   (nbytes: the buffer each rank holds)
    reduce_scatter   factor (n - 1) / n     (nbytes: the whole buffer; each rank keeps 1/n)
    all_gather       factor (n - 1) / n     (nbytes: the gathered result)
    all_to_all       factor (n - 1) / n     (uniform: 1/n of the data stays)
    send_recv        factor 1               (point to point)

with h the latency of one step of the ring (0 unless measured): steps are
2 (n - 1) for an all-reduce, n - 1 for the others, 1 for a send (NCCL's own
latency model has this form). Small messages (decode all-reduces of a few
kB) are latency-bound and large ones (gradients) bandwidth-bound. One rank, or nothing to move,
costs nothing. Where a and b come from: flopsim.calibration (`links`).

Over the network (the scale-out level) the calibration's b is one GPU's NIC
share. A ring collective (all-reduce, reduce-scatter, all-gather) whose group
has r ranks on each node runs one ring per NIC, each crossing the nodes
through its own NIC and carrying 1/r of the buffer, the rest of each ring on
the node's scale-up link: its bus bandwidth is r x b, at most the scale-up
level's (`network_bus_bytes_per_s`). An all-to-all or a send moves each
GPU's own bytes through its own NIC share: b. This is what nccl-tests
report: 2 nodes x 4 H100 over 4 NICs, NCCL_ALGO=RING, 95 GB/s busbw, "~24GB/s
per NIC" (NVIDIA/nccl-tests #252); 3 nodes x 8 A100 over 4 HDR NICs, 85-96
GB/s of 4 x 25 (#119); 4 x 8 B200 over 8 x 400G EFA, 381.8 GB/s = 8 x 47.7
(ml-engineering, the b200 calibration's source).

Over the network a reduce-scatter or an all-gather runs as a ring, the only
algorithm NCCL has for them beside NVLS and PAT (PAT, NCCL 2.23+, serves
one GPU a node), so its latency grows with its ranks: of its steps(op, n)
steps, steps(op, nodes) cross the network at the scale-out level's
hop_latency_s and the rest stay on a node at the scale-up level's

    a + steps(op, nodes) * h_out + (steps(op, n) - steps(op, nodes)) * h_up

(NCCL's own latency model: baseLat + nInterSteps * interLat + the rest *
intraLat, src/graph/tuning.cc). At 1,024 ranks on 128 nodes that is
milliseconds a collective, the reason NCCL wrote PAT and that FSDP over a
thousand GPUs is bound by its all-gathers (NVIDIA/nccl #1123). An
all-reduce over the network keeps the level's measured small-message
latency a: NCCL runs it as a tree, log2(nodes) deep, wherever the ring's
latency would dominate.
"""

from __future__ import annotations

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "send_recv")
RING = ("all_reduce", "reduce_scatter", "all_gather")  # one ring per NIC over the network
RING_ONLY = ("reduce_scatter", "all_gather")  # no tree: their latency grows with the ranks over the network


def factor(op: str, ranks: int) -> float:
    """Bytes over the busiest link per byte of the buffer, for `op` over `ranks`."""
    if op not in COLLECTIVES:
        raise ValueError(f"unknown collective {op!r} (collectives: {', '.join(COLLECTIVES)})")
    if ranks <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (ranks - 1) / ranks
    if op == "send_recv":
        return 1.0
    return (ranks - 1) / ranks


def steps(op: str, ranks: int) -> int:
    """Sequential communication steps of the ring algorithm: 2 (n - 1) for an
    all-reduce (reduce-scatter then all-gather), n - 1 for the others, 1 for a send."""
    if ranks <= 1:
        return 0
    if op == "all_reduce":
        return 2 * (ranks - 1)
    if op == "send_recv":
        return 1
    return ranks - 1


def collective_s(op: str, nbytes: float, ranks: int, bus_bytes_per_s: float, latency_s: float = 0.0,
                 hop_latency_s: float = 0.0) -> float:
    """Seconds for `op` on `nbytes` over `ranks` ranks (see the module docstring);
    the latency is latency_s + steps(op, ranks) * hop_latency_s."""
    f = factor(op, ranks)
    if f == 0 or nbytes <= 0:
        return 0.0
    return latency_s + steps(op, ranks) * hop_latency_s + f * nbytes / bus_bytes_per_s


def network_collective_s(op: str, nbytes: float, ranks: int, node_ranks: int, bus_bytes_per_s: float,
                         latency_s: float, net_hop_latency_s: float = 0.0, node_hop_latency_s: float = 0.0) -> float:
    """Seconds for `op` on `nbytes` over `ranks` ranks spread over nodes with `node_ranks`
    of them on each, at the network's bus bandwidth (network_bus_bytes_per_s): a
    reduce-scatter's or an all-gather's ring pays net_hop_latency_s on each step that
    crosses the network and node_hop_latency_s on the others; any other collective, the
    level's latency_s alone (see the module docstring)."""
    if op not in RING_ONLY or ranks <= 1:
        return collective_s(op, nbytes, ranks, bus_bytes_per_s, latency_s)
    nodes = max(1, -(-ranks // max(1, node_ranks)))
    crossing = steps(op, nodes)
    hops_s = crossing * net_hop_latency_s + (steps(op, ranks) - crossing) * node_hop_latency_s
    return collective_s(op, nbytes, ranks, bus_bytes_per_s, latency_s + hops_s)


def network_bus_bytes_per_s(op: str, nic_bytes_per_s: float, node_ranks: int,
                            scale_up_bytes_per_s: float | None = None) -> float:
    """The bus bandwidth of `op` over the network for a group with `node_ranks` ranks on
    each node, from one GPU's NIC share `nic_bytes_per_s` (see the module docstring): a
    ring collective's r rings, one per NIC, at most the scale-up level's bandwidth; an
    all-to-all or a send, the GPU's own share."""
    if op not in RING or node_ranks <= 1:
        return nic_bytes_per_s
    bus = node_ranks * nic_bytes_per_s
    return min(bus, scale_up_bytes_per_s) if scale_up_bytes_per_s else bus
