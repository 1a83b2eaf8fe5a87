"""Serving replicas: the tensor, pipeline and expert-parallel degrees of one replica,
the layout of its GPUs, and the degrees a serving plan searches (flopsim.planning.serve).

A replica is tp x pp x ep GPUs, laid out as flopsim.parallel lays out any step (a GPU's
ops are flopsim.parallel.shard's transformation of the op list; nothing here prices
anything):
- tp: tensor parallel within an attention group: heads and FFN columns split, an
  all-reduce per sub-layer (inference engines all-reduce: no sequence parallelism).
- ep (MoE models; 1 for a dense model): ep attention groups of tp GPUs, each running its
  own batch -- data-parallel attention, as vLLM's data-parallel deployment with
  --enable-expert-parallel ("data parallel for the attention layers and expert ...
  parallel for the expert layers"; docs.vllm.ai serving/data_parallel_deployment),
  SGLang's --enable-dp-attention and TensorRT-LLM's enable_attention_dp -- with the routed
  experts split over the groups (E / ep each) and tensor-parallel tp-way within a group
  (Megatron-Core's expert-tensor-parallel = tp, what shard models): per GPU the expert
  weights / (tp ep), the busiest rank's routed pairs, an all-to-all after the dispatch
  and one after the last expert product. Dense weights are replicated in every group.
  The groups step together (each MoE layer's all-to-all joins them; vLLM runs dummy
  batches on idle ranks), so a GPU's ops are those of its group's batch, the other groups
  doing the same. The layout's dp is ep (Megatron's rank order: tp, then the groups, then
  the stages), which puts every group on its link level; no data-parallel collective runs
  at inference. Expert load: with dropless token choice the busiest rank's pairs over the
  mean rank's = flopsim.ops.popularity.imbalance(pi, ep n, ep) for n tokens a group (the
  ep groups route their tokens together), as the training plan's `expert_imbalance`;
  padded slots and expert choice: 1.
- pp: pipeline stages of contiguous blocks (shard.stage_of_layers: as even as they go, the
  earlier stages taking the extra block; the embeddings on the first stage, the final norm
  and head on the last); each stage but the last sends its output activations on (the
  send op shard adds, its last residual's bytes / tp). Serving keeps pp batches in flight,
  each of `batch` sequences a group: vLLM's pipeline parallelism creates "multiple
  virtual engines to match the number of pipeline stages, and each virtual engine has its
  own scheduler, block manager and cache engine, so that they can schedule multiple
  batches simultaneously" (vllm-project/vllm issue #11945, the V1 pipeline RFC, describing
  V0). With stage_s the roofline of stage s's ops for one step (its send included):
      a pass alone (one prompt's prefill, no queueing)  = sum_s stage_s
      an engine's step in steady state (its period)     = pp * max_s stage_s
  (the busiest stage serves the pp engines in turn; the period is at least the sum, so a
  token also has time to pass every stage). The sampled token's return to the first stage
  is not costed. An encoder-decoder, and speculative decoding (vLLM V0's draft worker runs
  no pipeline), are served with pp 1.
- Engines: pp x ep batches of `batch` sequences step at once in a replica (sequences in
  flight: batch x pp x ep).
- Memory per GPU: its stage's weights, the KV cache of its stage's layers for the pp x
  batch sequences of the engines that pass through it, and the largest working set of a
  step of one engine among its layers' ops (flopsim.memory.MemoryModel on the sharded
  list, `evaluate_layers`); a plan reports the fullest stage.

Search: a degree given is fixed, the others are tried over powers of two: tp up to
gpus_per_node dividing the heads (and a draft's heads), pp up to the blocks, ep dividing
the routed experts; a replica of at most `gpus` GPUs dividing them when given, else of at
most one node (gpus_per_node GPUs). A replica whose groups would span nodes is left out
when the hardware gives no inter-node link figure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from flopsim.errors import InputError, bad_value


@dataclass(frozen=True)
class Replica:
    """One replica's degrees: tp (tensor), pp (pipeline stages), ep (expert-parallel groups)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.ep

    @property
    def engines(self) -> int:
        """Batches stepping at once: one per pipeline stage and attention group."""
        return self.pp * self.ep

    @property
    def label(self) -> str:
        return f"tp {self.tp}" + (f", pp {self.pp}" if self.pp > 1 else "") + (f", ep {self.ep}" if self.ep > 1 else "")

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "replica_gpus": self.gpus}


def replica_layout(spec, phase: str, replica: Replica, gpus_per_node: int, *, stage: Optional[int] = None,
                   expert_load=1.0, torus_axis: Optional[int] = None, vocab_parallel: bool = True):
    """The flopsim.parallel Layout of one GPU of `replica` (stage `stage`, None: the last),
    or None for one GPU; `expert_load` may be shard.EXPERT_LOAD (set at evaluation);
    `torus_axis`: the hardware's torus, `vocab_parallel` whether the embedding and LM head
    are split over tp (flopsim.parallel.layout)."""
    if replica.gpus == 1:
        return None
    from flopsim.parallel.layout import make_layout

    layout = make_layout(spec, phase, tp=replica.tp, pp=replica.pp, ep=replica.ep, gpus_per_node=gpus_per_node,
                         sequence_parallel=False, stage=stage, torus_axis=torus_axis,
                         vocab_parallel=vocab_parallel)
    return replace(layout, dp=replica.ep, expert_load=expert_load if replica.ep > 1 else 1.0)


def stage_layers(spec, replica: Replica) -> list:
    """The op layers each pipeline stage runs (flopsim.parallel.shard's split)."""
    from flopsim.parallel.layout import Layout
    from flopsim.parallel.shard import _stage_layers

    if replica.pp == 1:
        return [set(range(-1, spec.blocks + 1))]
    return [_stage_layers(spec, Layout(pp=replica.pp, stage=s)) for s in range(replica.pp)]


def expert_load(spec, ep: int, tokens: int) -> float:
    """The busiest expert-parallel rank's routed pairs over the mean rank's, for `tokens`
    tokens a group (see the module docstring)."""
    moe = spec.moe
    if ep <= 1 or moe is None or moe.capacity_factor is not None or moe.routing != "token_choice":
        return 1.0
    from flopsim.ops import popularity

    return popularity.imbalance(popularity.spec_inclusion(spec), ep * tokens, ep)


def spans_nodes(replica: Replica, gpus_per_node: int) -> bool:
    """Whether a group of the replica (tp, the ep groups, the stages) spans nodes."""
    from flopsim.parallel.layout import within_node

    spans = [replica.tp] + ([replica.tp * replica.ep] if replica.ep > 1 else []) + \
        ([replica.gpus] if replica.pp > 1 else [])
    return not all(within_node(s, gpus_per_node) for s in spans if s > 1)


def _powers(limit: int, ok) -> list:
    out, n = [], 1
    while n <= limit:
        if ok(n):
            out.append(n)
        n *= 2
    return out


def _given_tp(tp: int, models: list, gpus: Optional[int]) -> int:
    from flopsim.planning.common import _positive_int

    tp = _positive_int("tp", tp)
    for m in models:
        if m.heads % tp:
            raise InputError(f"tp {tp} does not divide the {m.heads} attention heads of "
                             f"{'draft ' if m is not models[0] else ''}{m.name}")
    if gpus is not None and gpus % tp:
        raise InputError(f"tp {tp} does not divide gpus {gpus}")
    return tp


def _check_given(spec, draft, pp, ep, gpus_per_node: int) -> None:
    """pp and ep as given: valid degrees of the spec (flopsim.parallel's one-line errors)."""
    from flopsim.parallel.layout import make_layout
    from flopsim.planning.common import _positive_int

    for name, value in (("pp", pp), ("ep", ep)):
        if value is not None:
            _positive_int(name, value)
    if pp is not None and pp > 1:
        if spec.is_encoder_decoder:
            raise bad_value("pp", pp, f"pipeline stages of an encoder-decoder ({spec.name}) are not modelled for "
                                      f"serving (its encoder's output feeds every decoder stage); use pp 1")
        if draft is not None:
            raise bad_value("pp", pp, "speculative decoding is served with pp 1 (vLLM V0's draft worker runs no "
                                      "pipeline)")
    make_layout(spec, "decode", pp=pp or 1, ep=ep or 1, gpus_per_node=gpus_per_node)


def replica_candidates(spec, draft, *, tp=None, pp=None, ep=None, gpus: Optional[int] = None, gpus_per_node: int,
                       one_gpu: bool = False) -> list[Replica]:
    """The replicas to try (see the module docstring): given degrees fixed, the rest searched;
    `one_gpu` (no interconnect figure): only one-GPU replicas, unless degrees are given."""
    models = [spec] + ([draft.spec] if draft is not None else [])
    _check_given(spec, draft, pp, ep, gpus_per_node)
    tps = [_given_tp(tp, models, gpus)] if tp is not None else \
        _powers(gpus_per_node, lambda t: all(m.heads % t == 0 for m in models))
    single = spec.is_encoder_decoder or draft is not None
    pps = [pp] if pp is not None else ([1] if single else _powers(spec.blocks, lambda p: True))
    experts = spec.moe.experts if spec.moe is not None else 1
    eps = [ep] if ep is not None else _powers(experts, lambda e: experts % e == 0)
    fixed = (tp or 1) * (pp or 1) * (ep or 1)
    limit = fixed if one_gpu else max(fixed, gpus if gpus is not None else gpus_per_node)
    out = [Replica(t, p, e) for t in tps for p in pps for e in eps
           if t * p * e <= limit and (gpus is None or gpus % (t * p * e) == 0)]
    if not out:
        given = ", ".join(f"{n} {v}" for n, v in (("tp", tp), ("pp", pp), ("ep", ep)) if v is not None)
        raise InputError(f"no replica of {given or 'the degrees tried'} divides gpus {gpus}: tp * pp * ep must "
                         f"divide the GPUs available")
    return sorted(out, key=lambda r: (r.gpus, r.tp, r.pp, r.ep))
