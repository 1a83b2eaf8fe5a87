"""Link levels of a plan: the two levels' figures (user overrides, else the
calibration's, else the datasheet's) and where a group of ranks sits.

Links: two levels, each with a latency and a bus bandwidth
(flopsim.calibration.LinkLevel; nccl-tests' busbw, one way):

- intra-node (scale-up: NVLink, xGMI, ICI): the calibration's
  `links.scale_up` (published or measured nccl-tests figures), else the
  hardware's `interconnect_bytes_per_s` halved with one launch of latency
  (an ideal link, labelled so in the output); `interconnect_bytes_per_s=`
  (two-way) overrides the bandwidth;
- inter-node (scale-out: InfiniBand, RoCE): the calibration's
  `links.scale_out`, else the hardware's `scale_out_bytes_per_s` halved;
  `inter_node_bytes_per_s=` (two-way) overrides it;
- on a torus (the hardware's `torus_axis`, TPU ICI), groups of whole axes
  (flopsim.parallel.layout) use the calibration's `links.scale_up_torus`
  (bidirectional rings over the wraparound links), else the scale-up figure;
  a user's `interconnect_bytes_per_s` sets both;
- nodes of `gpus_per_node` GPUs (default: the hardware's `scale_up_domain`).
  Ranks are laid out Megatron-style (flopsim.parallel.layout): a group whose
  ranks span at most one node uses the intra-node level, any other group the
  inter-node one (its slowest link), whose figure is one GPU's NIC share: a
  ring collective (all-reduce, reduce-scatter, all-gather) of a group with r
  ranks on each node runs r rings, one per NIC, at r times it (at most the
  intra-node figure; flopsim.collectives.network_bus_bytes_per_s);
- a ring's steps (`hop_latency_s`, each level's own: flopsim.collectives) stay
  the calibration's when a bandwidth is given;
- `comm_latency_s=` overrides both levels' latency, steps included.

Which level a group uses is flopsim.parallel.layout's rule (`within_node`); a
collective op is priced on its level by flopsim.roofline.collective_time with
flopsim.collectives' formula (`Links.by_level` hands it these figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from flopsim.parallel.layout import closes_torus_rings, within_node
from flopsim.errors import InputError, bad_value
from flopsim.planning.common import DEFAULT_GPUS_PER_NODE, _non_negative, _positive, _positive_int


@dataclass(frozen=True)
class Links:
    """The two link levels a GPU's collectives use (flopsim.calibration.LinkLevel:
    latency and bus bandwidth, with where each figure comes from) and how many
    GPUs share the scale-up level."""

    scale_up: Any
    scale_out: Any  # None: no network figure (a group beyond one node is an error)
    gpus_per_node: int
    scale_up_torus: Any = None  # a torus' whole axes (None: no torus); see the module docstring
    torus_axis: Optional[int] = None  # the hardware's torus axis (None: no torus)

    @property
    def by_level(self) -> dict:
        """{level: LinkLevel} for flopsim.roofline.collective_time (scale_out left out when unknown)."""
        return {k: v for k, v in (("scale_up", self.scale_up), ("scale_up_torus", self.scale_up_torus),
                                  ("scale_out", self.scale_out)) if v is not None}

    def inside(self, span: int) -> bool:
        """Whether a group whose ranks span `span` consecutive ranks stays within one node."""
        return within_node(span, self.gpus_per_node)

    def where(self, span: int, size: int = 2) -> str:
        """'intra-node' (', torus rings' on a torus' whole axes) or 'inter-node' for a group
        of `size` ranks spanning `span` ('-' for one rank)."""
        if size <= 1:
            return "-"
        if not self.inside(span):
            return "inter-node"
        return "intra-node, torus rings" if closes_torus_rings(size, span, self.torus_axis) else "intra-node"

    def to_dict(self) -> dict:
        out = {"gpus_per_node": self.gpus_per_node}
        if self.torus_axis:
            out["torus_axis"] = self.torus_axis
        for name, link in (("intra_node", self.scale_up), ("intra_node_torus", self.scale_up_torus),
                           ("inter_node", self.scale_out)):
            if link is not None:
                out[f"{name}_bus_bytes_per_s"] = link.bus_bytes_per_s
                out[f"{name}_latency_s"] = link.latency_s
                out[f"{name}_hop_latency_s"] = link.hop_latency_s
                out[f"{name}_source"] = link.source
        return out



def resolve_links(hw, cal, interconnect_bytes_per_s, inter_node_bytes_per_s, gpus_per_node, comm_latency_s,
           needed: bool) -> Links:
    """Link levels from the user's figures, else the calibration's measured
    `links`, else the hardware's datasheet bandwidths (half their two-way
    figure, latency one launch: an ideal link, so labelled)."""
    from flopsim.calibration import LinkLevel

    latency = _non_negative("comm_latency_s", comm_latency_s)
    if latency is not None and latency > 1.0:
        raise bad_value("comm_latency_s", comm_latency_s, "expected at most 1 s per collective")

    def level(name: str, user_two_way, what: str):
        user = _positive(what, user_two_way)
        if user is not None:
            if not 2e3 <= user <= 2e15:
                raise bad_value(what, user_two_way, "expected 2e3 to 2e15 bytes/s (both directions)")
            base = cal.link(name, hw)
            return LinkLevel(latency_s=base.latency_s if base else cal.overhead_s(hw), bus_bytes_per_s=user / 2,
                             hop_latency_s=base.hop_latency_s if base else 0.0,
                             source=f"--{what.replace('_', '-')} (given: {user:.3g} B/s both ways)")
        return cal.link(name, hw)

    up = level("scale_up", interconnect_bytes_per_s, "interconnect_bytes_per_s")
    if up is None:
        if needed:
            raise InputError(f"hardware {hw.name} has no interconnect_bytes_per_s; give --interconnect "
                             f"(bytes/s per GPU, both directions)")
        up = LinkLevel(latency_s=0.0, bus_bytes_per_s=1e3, source="none (one GPU: no collectives)")
    out = level("scale_out", inter_node_bytes_per_s, "inter_node_bytes_per_s")
    torus_axis = getattr(hw, "torus_axis", None)
    torus = None
    if torus_axis:
        torus = up if interconnect_bytes_per_s is not None else cal.link("scale_up_torus", hw) or up
    if latency is not None:
        up, out, torus = (None if link is None else LinkLevel(latency_s=latency, bus_bytes_per_s=link.bus_bytes_per_s,
                                                              source=link.source) for link in (up, out, torus))
    node = gpus_per_node if gpus_per_node is not None else (hw.scale_up_domain or DEFAULT_GPUS_PER_NODE)
    return Links(scale_up=up, scale_out=out, gpus_per_node=_positive_int("gpus_per_node", node),
                 scale_up_torus=torus, torus_axis=torus_axis)
