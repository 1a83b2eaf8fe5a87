"""A parallel layout: how one step's work is spread over GPUs, and which link
level each communication group uses.

Degrees (Megatron-LM's names): `tp` tensor parallel (heads and FFN columns
split; with `sequence_parallel` the token-wise ops between them too), `cp`
context parallel (the sequence split, keys and values gathered for
attention), `pp` pipeline stages (contiguous blocks), `dp` data parallel
(replicas; gradients reduced over dp * cp), `ep` expert parallel (each GPU
holds experts / ep of every MoE layer's routed experts, within the
data-parallel group). GPUs = tp * cp * dp * pp. `virtual_stages` v > 1: the
interleaved 1F1B schedule (Narayanan et al. 2021), each stage holding v chunks
of blocks / (pp v) blocks, chunk c on stage c mod pp. `zero` (0-3) shards the
optimizer state, gradients and weights over the data-parallel group
(Rajbhandari et al. 2020), or with `zero_shard` s over s consecutive ranks of
it, each shard group replicated dp * cp / s times (hybrid sharding: PyTorch
FSDP's HYBRID_SHARD, DeepSpeed's ZeRO++ hpZ; the gradients are
reduce-scattered in the shard group, then each shard all-reduced over the
replicas); `recompute` none / selective (the attention core,
Korthikanti et al. 2022) / cheap (the norms, activations and other
elementwise ops, the products' and attention's outputs kept: LLaMA's
checkpointing, flopsim.ops.op `Op.cheap`) / full (every block's forward,
once more before its backward; with `recompute_fraction` p < 1 only round(p L) evenly spaced
blocks, `checkpointed_blocks`, as fms-fsdp and torchtitan checkpoint every
k-th block). `vocab_parallel` (default on): the token embedding's table and
the LM head split over tp by vocabulary (Megatron-LM's VocabParallelEmbedding
and column-parallel head, the loss after it vocabulary-parallel); off, both
whole on every tensor-parallel rank, as gpt-fast's tp.py leaves them (it
shards only the attention and FFN products): each rank then reads the whole
head every step and the embedding needs no all-reduce.

Pipeline stages (`stage_blocks`, `stage_places`): one stack's blocks split
into pp contiguous stages as evenly as they go (the earlier stages take the
extra block), or into the interleaved schedule's chunks. An encoder-decoder
is split as Megatron-LM split T5 (`pipeline_model_parallel_split_rank`,
2021-2025; megatron/model/transformer.py `_get_num_layers`): stages 0 ..
E - 1 hold the encoder's blocks, stages E .. pp - 1 the decoder's, each stack
split as evenly as it goes over its own stages; E = `encoder_stages`, by
default floor(pp x encoder_layers / blocks) within [1, pp - 1] (the decoder,
whose blocks add cross-attention, takes an odd stage of two equal stacks).
Megatron runs an encoder-decoder with plain 1F1B only ("Interleaving is not
supported with an encoder and decoder model", schedules.py): so does this.
Ops that are no block are placed by a key (`place`): the embeddings on the
first stage (an encoder-decoder's decoder embeddings and their gradient sum
on its first decoder stage E), a stack's relative position bias (T5's one
table per stack) on every stage holding that stack's blocks (Megatron-Core's
T5Model computes it on each stage), the final norm and head on the last.

Rank order (Megatron's): tp fastest, then cp, then dp (ep inside dp), then
pp. A group whose ranks span at most one node of `gpus_per_node` GPUs (and
a whole number of groups fits a node) uses the scale-up link (NVLink, ICI),
any other group the scale-out link (its slowest). Its ranks lie span / ranks
apart, so a node holds gpus_per_node // (span / ranks) of them (`node_ranks`,
at least one): over the network a ring collective runs one ring per NIC of
those ranks (flopsim.collectives):

    group   ranks              span (consecutive ranks)
    tp      tp                 tp
    cp      cp                 tp * cp
    ep      ep                 tp * cp * ep
    dp      dp * cp            tp * cp * dp        (dense parameters' gradients)
    dp_shard  s                tp * s              (hybrid sharding: ZeRO's group)
    dp_replica  dp * cp / s    tp * cp * dp        (hybrid sharding: a shard's replicas)
    edp     dp * cp / ep       tp * cp * dp        (routed experts' gradients)
    pp      2 (a send)         tp * cp * dp * pp

On a torus (`torus_axis`, TPU ICI: the hardware's figure) a scale-up group
whose ranks are whole axes (a multiple of the axis length, each a row or a
column: stride span / ranks of 1 or a multiple of the axis) closes its rings
with the wraparound links and runs them both ways: level `scale_up_torus`.
A smaller group (a line of chips without wraparound) uses `scale_up`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from flopsim.errors import InputError, bad_value
from flopsim.ops.fields import RECOMPUTE_MODES

RECOMPUTE = RECOMPUTE_MODES
MAX_DEGREE = 2 ** 20


def within_node(span: int, gpus_per_node: int) -> bool:
    """Whether a group of `span` consecutive ranks stays within one node (and a whole number
    of such groups fills a node): it then uses the scale-up link."""
    return span <= gpus_per_node and gpus_per_node % span == 0


def closes_torus_rings(ranks: int, span: int, torus_axis: Optional[int]) -> bool:
    """Whether a group of `ranks` ranks spanning `span` consecutive ranks is whole
    axes of a torus of axis `torus_axis` (rows: stride 1; columns: a stride that is
    a multiple of the axis), so its rings wrap around (see the module docstring)."""
    if not torus_axis or ranks < torus_axis or ranks % torus_axis:
        return False
    stride = span // ranks
    return stride == 1 or stride % torus_axis == 0


def _degree(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DEGREE:
        raise bad_value(name, value, f"must be a positive integer (at most {MAX_DEGREE:,})")
    return value


@dataclass(frozen=True)
class Layout:
    """One parallel layout (see the module docstring). `expert_load`: the busiest
    expert-parallel rank's routed (token, expert) pairs over the mean rank's (1:
    balanced); `stage`: the pipeline stage whose ops a sharded list holds (None: the last)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    cp: int = 1
    zero: int = 0
    recompute: str = "none"
    sequence_parallel: bool = False
    gpus_per_node: int = 8
    expert_load: float = 1.0
    stage: Optional[int] = None
    virtual_stages: int = 1  # the interleaved schedule's chunks a stage (Narayanan et al. 2021); 1: plain 1F1B
    encoder_stages: Optional[int] = None  # an encoder-decoder's encoder stages under pp > 1 (else None)
    torus_axis: Optional[int] = None  # the scale-up torus' axis length (see the module docstring); None: no torus
    zero_shard: Optional[int] = None  # ranks ZeRO shards over (hybrid sharding); None: the data-parallel group
    # recompute full: the blocks checkpointed (recompute_fraction < 1: `checkpointed_blocks`); None: every block
    recompute_blocks: Optional[frozenset] = None
    recompute_fraction: float = 1.0
    vocab_parallel: bool = True  # embedding table and LM head split over tp by vocabulary (False: whole on each rank)

    def recomputes(self, layer: int) -> bool:
        """Whether full recomputation reruns block `layer`'s forward (a checkpointed block)."""
        return self.recompute == "full" and (self.recompute_blocks is None or layer in self.recompute_blocks)

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def trivial(self) -> bool:
        """One GPU doing everything: sharding changes nothing."""
        return self.gpus == 1 and self.recompute == "none" and self.expert_load == 1.0

    @property
    def token_split(self) -> int:
        """The ways token-wise ops (norms, residual adds) split over tp: tp with sequence parallelism, else 1."""
        return self.tp if self.sequence_parallel else 1

    @property
    def last_stage(self) -> int:
        return self.pp - 1 if self.stage is None else self.stage

    @property
    def shard_ranks(self) -> int:
        """The ranks ZeRO shards the dense parameters' state over: `zero_shard`, else the
        data-parallel group's dp * cp."""
        return self.zero_shard or self.dp * self.cp

    @property
    def hybrid(self) -> bool:
        """Hybrid sharding: ZeRO over a part of the data-parallel group, replicated."""
        return self.shard_ranks < self.dp * self.cp

    def group(self, name: str) -> tuple[int, int]:
        """(ranks, span) of a communication group (see the module docstring)."""
        tp, cp, dp, ep, pp, s = self.tp, self.cp, self.dp, self.ep, self.pp, self.shard_ranks
        return {"tp": (tp, tp), "cp": (cp, tp * cp), "ep": (ep, tp * cp * ep), "dp": (dp * cp, tp * cp * dp),
                "edp": (dp * cp // ep, tp * cp * dp), "pp": (2 if pp > 1 else 1, tp * cp * dp * pp),
                "dp_shard": (s, tp * s), "dp_replica": (dp * cp // s, tp * cp * dp)}[name]

    def node_ranks(self, name: str) -> int:
        """The ranks of group `name` on one node: its ranks lie `span / ranks` apart, so a
        node of gpus_per_node holds gpus_per_node // that stride of them (at least one)."""
        ranks, span = self.group(name)
        stride = max(1, span // max(ranks, 1))
        return max(1, min(ranks, self.gpus_per_node // stride))

    def inside_node(self, span: int) -> bool:
        return within_node(span, self.gpus_per_node)

    def level(self, name: str) -> str:
        """'scale_up', 'scale_up_torus' or 'scale_out': the link level group `name` uses."""
        ranks, span = self.group(name)
        if not self.inside_node(span):
            return "scale_out"
        return "scale_up_torus" if closes_torus_rings(ranks, span, self.torus_axis) else "scale_up"

    def describe(self) -> str:
        parts = [f"{k}{getattr(self, k)}" for k in ("tp", "cp", "pp", "dp", "ep") if getattr(self, k) > 1]
        if self.zero:
            parts.append(f"zero{self.zero}" + (f" over {self.shard_ranks} (hybrid)" if self.hybrid else ""))
        if self.recompute != "none":
            parts.append(f"recompute {self.recompute}" + (f" ({self.recompute_fraction:g} of the blocks)"
                                                          if self.recompute_blocks is not None else ""))
        if self.sequence_parallel and self.tp > 1:
            parts.append("sequence parallel")
        if self.encoder_stages is not None:
            parts.append(f"encoder on stages 0-{self.encoder_stages - 1}")
        return ", ".join(parts) or "one GPU"


def make_layout(spec, phase: str, *, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1, cp: int = 1,
                zero: int = 0, recompute="none", sequence_parallel: Optional[bool] = None,
                gpus_per_node: Optional[int] = None, expert_load: float = 1.0,
                stage: Optional[int] = None, virtual_stages: int = 1,
                encoder_stages: Optional[int] = None, torus_axis: Optional[int] = None,
                zero_shard: Optional[int] = None, recompute_fraction: float = 1.0,
                vocab_parallel: bool = True) -> Layout:
    """A validated Layout of `spec` for `phase` (one-line errors naming the field).
    `sequence_parallel` defaults to on in train with tp > 1 (Megatron's setting), off
    elsewhere (inference engines all-reduce); `gpus_per_node` to the hardware's domain
    (and `torus_axis` to its torus, flopsim.hardware);
    `encoder_stages` (an encoder-decoder under pp > 1) to `default_encoder_stages`;
    `recompute_fraction` (recompute full) the share of blocks checkpointed (`checkpointed_blocks`);
    `vocab_parallel` whether the embedding table and LM head are split over tp (module docstring)."""
    tp, pp, dp, ep, cp = (_degree(n, v) for n, v in (("tp", tp), ("pp", pp), ("dp", dp), ("ep", ep), ("cp", cp)))
    if isinstance(zero, bool) or zero not in (0, 1, 2, 3):
        raise bad_value("zero", zero, "expected a ZeRO stage 0, 1, 2 or 3")
    if recompute is True or recompute is False:
        recompute = "full" if recompute else "none"
    if recompute not in RECOMPUTE:
        raise bad_value("recompute", recompute, "expected none, selective, cheap or full")
    if phase != "train" and (recompute != "none" or zero or dp > 1):
        field, value = ("recompute", recompute) if recompute != "none" else ("zero", zero) if zero else ("dp", dp)
        raise bad_value(field, value, f"applies to training; phase {phase} runs no backward pass")
    if spec.heads % tp:
        raise bad_value("tp", tp, f"does not divide the {spec.heads} attention heads of {spec.name}")
    if pp > spec.blocks:
        raise bad_value("pp", pp, f"exceeds the {spec.blocks} blocks of {spec.name}")
    if ep > 1:
        if spec.moe is None:
            raise bad_value("ep", ep, f"{spec.name} ({spec.family}) has no routed experts")
        if spec.moe.experts % ep:
            raise bad_value("ep", ep, f"does not divide the {spec.moe.experts} experts of {spec.name}")
        if phase == "train" and dp % ep:
            raise bad_value("ep", ep, f"does not divide dp {dp} (experts are sharded within the data-parallel group)")
    if cp > 1:
        _check_context_parallel(spec, phase, cp)
    zero_shard = checked_zero_shard(zero_shard, zero=zero, dp=dp * cp, ep=ep)
    if isinstance(expert_load, bool) or not isinstance(expert_load, (int, float)) or not 1 <= expert_load <= 1e6:
        raise bad_value("expert_load", expert_load, "must be a number >= 1 (busiest rank / mean rank)")
    if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < pp):
        raise bad_value("stage", stage, f"must be a pipeline stage 0 to {pp - 1}")
    virtual_stages = _degree("virtual_stages", virtual_stages)
    encoder_stages = checked_encoder_stages(spec, pp, virtual_stages, encoder_stages)
    if virtual_stages > 1 and (pp == 1 or spec.blocks % (pp * virtual_stages)):
        raise bad_value("virtual_stages", virtual_stages, f"interleaving needs pp > 1 and pp * virtual_stages "
                                                          f"dividing the {spec.blocks} blocks (pp {pp})")
    node = _degree("gpus_per_node", gpus_per_node if gpus_per_node is not None else 8)
    torus_axis = None if torus_axis is None else _degree("torus_axis", torus_axis)
    sp = (phase == "train" and tp > 1) if sequence_parallel is None else bool(sequence_parallel)
    blocks = checked_recompute_blocks(spec, recompute, recompute_fraction)
    if not isinstance(vocab_parallel, bool):
        raise bad_value("vocab_parallel", vocab_parallel, "expected true or false")
    return Layout(tp=tp, pp=pp, dp=dp, ep=ep, cp=cp, zero=zero, recompute=recompute, sequence_parallel=sp,
                  gpus_per_node=node, expert_load=float(expert_load), stage=stage, virtual_stages=virtual_stages,
                  encoder_stages=encoder_stages, torus_axis=torus_axis, zero_shard=zero_shard,
                  recompute_blocks=blocks, recompute_fraction=float(recompute_fraction),
                  vocab_parallel=vocab_parallel)


def checkpointed_blocks(blocks: int, fraction: float) -> frozenset:
    """The blocks (0-based) full recomputation checkpoints when only `fraction` of them are,
    evenly spaced as IBM fms-fsdp's apply_selective_ac places them: walking the blocks 1..L, a
    block is checkpointed when its index times the fraction reaches the next half-integer
    cut-off (0.5, 1.5, ...), so round(fraction * L) blocks, the first near 0.5 / fraction."""
    out, cut = [], 0.5
    for i in range(1, blocks + 1):
        if i * fraction >= cut:
            cut += 1
            out.append(i - 1)
    return frozenset(out)


def checked_recompute_blocks(spec, recompute: str, fraction) -> Optional[frozenset]:
    """`recompute_fraction` checked (one-line errors): a number in (0, 1], below 1 only with
    recompute full; the checkpointed blocks, or None for every block (or no recomputation)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise bad_value("recompute_fraction", fraction, "must be a number above 0 and at most 1")
    if fraction == 1:
        return None
    if recompute != "full":
        raise bad_value("recompute_fraction", fraction, f"needs recompute full (recompute is {recompute})")
    return checkpointed_blocks(spec.blocks, fraction)


def checked_zero_shard(zero_shard, *, zero: int, dp: int, ep: int) -> Optional[int]:
    """`zero_shard` checked against the layout (one-line errors): None, or ranks dividing the
    data-parallel group's `dp` (dp * cp) under a ZeRO stage, with no expert parallelism
    (routed experts' hybrid sharding is not modelled). The whole group is plain ZeRO: None."""
    if zero_shard is None:
        return None
    zero_shard = _degree("zero_shard", zero_shard)
    if not zero:
        raise bad_value("zero_shard", zero_shard, "shards ZeRO's state: it needs zero 1, 2 or 3")
    if dp % zero_shard:
        raise bad_value("zero_shard", zero_shard, f"does not divide the {dp} data-parallel ranks")
    if ep > 1:
        raise bad_value("zero_shard", zero_shard, "hybrid sharding with expert parallelism is not modelled")
    return None if zero_shard == dp else zero_shard


def _check_context_parallel(spec, phase: str, cp: int) -> None:
    """Context parallelism gathers plain keys and values: refuse what it does not cover."""
    if phase == "decode":
        raise bad_value("cp", cp, "context parallelism splits a sequence's tokens; decode has one per sequence")
    for what, present in (("multi-head latent attention", spec.mla is not None),
                          ("sparse QKV", getattr(spec, "sparse_qkv", None) is not None),
                          ("an encoder-decoder", spec.is_encoder_decoder)):
        if present:
            raise InputError(f"cp {cp}: context parallelism of {what} ({spec.name}) is not modelled; use cp 1")


# -- pipeline stages -------------------------------------------------------------------------

# Placement keys of the ops that are no block (a block's ops are keyed by its layer, the final
# norm and head by `spec.blocks`; see the module docstring)
MODEL_INPUT = -1  # the embeddings (an encoder-decoder's encoder's): the first stage
DECODER_INPUT = -2  # an encoder-decoder's decoder embeddings and their gradient sum: its first decoder stage
STACK_BIAS = -3  # a decoder-only model's or an encoder's relative position bias: every stage of its stack
DECODER_BIAS = -4  # an encoder-decoder's decoder's relative position bias: every decoder stage
# not an op's key: the encoder's output a decoder stage receives and keeps for its cross-attention
# (memory only; flopsim.memory.MemoryModel.stage_activations)
RECEIVED_ENCODER_OUTPUT = -5


def place(op, spec) -> int:
    """The key that places `op` on a pipeline stage (see MODEL_INPUT ... DECODER_BIAS; a
    collective of flopsim.parallel.shard may carry its key as the tag `place`)."""
    if "place" in op.tags:
        return op.tags["place"]
    if op.layer != -1:
        return op.layer
    decoder = spec.is_encoder_decoder and op.name.startswith("decoder.")
    local = op.name.split(".", 1)[1] if op.name.startswith(("encoder.", "decoder.")) else op.name
    if local.startswith("position_bias"):
        return DECODER_BIAS if decoder else STACK_BIAS
    return DECODER_INPUT if decoder else MODEL_INPUT


def stage_of_layers(blocks: int, pp: int, virtual: int = 1) -> list[list]:
    """The blocks each pipeline stage holds. One chunk a stage (`virtual` 1): contiguous, as
    even as they go, the earlier stages taking the extra block. Interleaved (Narayanan et al.
    2021, `virtual` v chunks a stage): blocks / (pp v) blocks a chunk, chunk c on stage c mod pp."""
    if virtual > 1:
        size = blocks // (pp * virtual)
        return [[b for c in range(s, pp * virtual, pp) for b in range(c * size, (c + 1) * size)] for s in range(pp)]
    base, extra = divmod(blocks, pp)
    out, start = [], 0
    for s in range(pp):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def default_encoder_stages(spec, pp: int) -> int:
    """An encoder-decoder's encoder stages under pp > 1 (module docstring): floor(pp x
    encoder_layers / blocks), at least 1 and pp - layers, at most pp - 1 and encoder_layers."""
    share = pp * spec.encoder_layers // spec.blocks
    return max(1, pp - spec.layers, min(share, pp - 1, spec.encoder_layers))


def checked_encoder_stages(spec, pp: int, virtual_stages: int, encoder_stages) -> Optional[int]:
    """The encoder stages of a layout (None unless an encoder-decoder under pp > 1); one-line
    errors naming the field for what is not modelled."""
    if not spec.is_encoder_decoder or pp == 1:
        if encoder_stages is not None:
            raise bad_value("encoder_stages", encoder_stages, "applies to an encoder-decoder split over pp > 1 "
                                                              f"stages ({spec.name}, pp {pp})")
        return None
    if virtual_stages > 1:
        raise bad_value("virtual_stages", virtual_stages, f"the interleaved schedule of an encoder-decoder "
                                                          f"({spec.name}) is not modelled (Megatron-LM runs T5 with "
                                                          f"plain 1F1B); use 1")
    if encoder_stages is None:
        return default_encoder_stages(spec, pp)
    e = _degree("encoder_stages", encoder_stages)
    if e >= pp or e > spec.encoder_layers or pp - e > spec.layers:
        raise bad_value("encoder_stages", encoder_stages, f"must leave each stack 1 to its blocks' number of the "
                                                          f"{pp} stages ({spec.encoder_layers} encoder, "
                                                          f"{spec.layers} decoder blocks)")
    return e


def stage_blocks(spec, pp: int, virtual: int = 1, encoder_stages: Optional[int] = None) -> list[list]:
    """The blocks each stage holds (module docstring): `stage_of_layers` of the model's blocks,
    or of an encoder-decoder's two stacks over their `encoder_stages` and pp - encoder_stages stages."""
    if encoder_stages is None or not spec.is_encoder_decoder or pp == 1:
        return stage_of_layers(spec.blocks, pp, virtual)
    enc = stage_of_layers(spec.encoder_layers, encoder_stages)
    dec = stage_of_layers(spec.layers, pp - encoder_stages)
    return enc + [[spec.encoder_layers + b for b in stage] for stage in dec]


def stage_places(spec, pp: int, stage: int, virtual: int = 1, encoder_stages: Optional[int] = None) -> set:
    """The placement keys (`place`) stage `stage` runs: its blocks, the non-block keys of the
    module docstring, and for a decoder stage of a pipelined encoder-decoder
    RECEIVED_ENCODER_OUTPUT (the encoder's output it receives and keeps)."""
    held = set(stage_blocks(spec, pp, virtual, encoder_stages)[stage])
    decoder_from = encoder_stages if spec.is_encoder_decoder and pp > 1 else 0
    if stage == 0:
        held.add(MODEL_INPUT)
    if stage == pp - 1:
        held.add(spec.blocks)
    if not spec.is_encoder_decoder:
        held.add(STACK_BIAS)
        return held
    if pp == 1:
        return held | {DECODER_INPUT, STACK_BIAS, DECODER_BIAS}
    if stage < decoder_from:
        return held | {STACK_BIAS}
    held |= {DECODER_BIAS, RECEIVED_ENCODER_OUTPUT}
    if stage == decoder_from:
        held.add(DECODER_INPUT)
    return held
