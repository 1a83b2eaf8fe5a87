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
"""

from __future__ import annotations

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "send_recv")


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
