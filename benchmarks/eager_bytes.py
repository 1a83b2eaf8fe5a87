"""What eager (unfused) implementations of a Llama block's memory-bound ops move,
against the fused ops flopsim's op lists assume: the bytes each aten op reads and
writes (flopsim.torchref.bytes_counter, the bytes oracle's counter), forward and
backward, for one block, and what the difference adds to a training step.

    python benchmarks/eager_bytes.py                                  # llama-2-7b, 8,192 tokens a GPU
    python benchmarks/eager_bytes.py --model llama-2-70b --tokens 8192 --hardware a100-80gb,h100-sxm

Why: flopsim prices a norm, RoPE and the gated activation as one kernel each
(read the input, write the output; backward likewise), which is what fused
kernels (Transformer Engine, Liger, torch.compile, Megatron's) move. Eager
PyTorch code runs them as several aten kernels, some in fp32:
- `rmsnorm hf`: transformers' LlamaRMSNorm (x.to(fp32), pow, mean, x * rsqrt(var +
  eps), .to(dtype), weight *), as most eager Llama code (Meta's reference, IBM's
  fms with use_high_precision_pow) writes it;
- `rope complex`: Meta's reference apply_rotary_emb (q.float() viewed as
  complex, times the complex frequencies, back to real, .type_as(q));
- `rope rotate_half`: transformers' apply_rotary_pos_emb (q * cos +
  rotate_half(q) * sin in the model's dtype);
- `rope fms`: IBM's fms RotaryEmbedding.adjusted_qk (foundation-model-stack
  @0317045a, Jan 2024): q.float() as pairs, times a 2 x 2 rotation matrix per
  pair (a broadcast product in fp32), summed, .type_as(q);
- `swiglu`: transformers' LlamaMLP's act_fn(gate) * up.
The counts are aten-level bytes (each eager aten op a kernel on a GPU); at a
training step's sizes (a [tokens, d_model] tensor of tens of MB, beyond a GPU's
L2) each is HBM traffic. The extra time is priced at the calibration's default
memory efficiency. This prints figures; it fits nothing. The spec options
`norm_impl: fp32_unfused`, `rope_impl` (complex_fp32, rotate_half,
pairs_fp32) and `act_impl: unfused` model these kernel by kernel: the
'option GB' column is flopsim's op list with each (fms's RoPE there also
counts its per-layer gather of the matrices, which this count takes as an
input); the other columns compare with the model's own op list (a preset's:
fused).
"""

from __future__ import annotations

import argparse
import sys

CHUNK = 512  # tokens the counter runs; bytes are linear in the tokens
# the spec option that models each eager form kernel by kernel (its 'option GB' column; fms's RoPE
# there also counts the per-layer gather of its matrices, which the counted form here takes as input)
OPTIONS = {"rmsnorm hf": ("norm_impl", "fp32_unfused"), "rope complex": ("rope_impl", "complex_fp32"),
           "rope rotate_half": ("rope_impl", "rotate_half"), "rope fms": ("rope_impl", "pairs_fp32"),
           "swiglu": ("act_impl", "unfused")}


def _eager_kernels(torch, d: int, heads: int, d_head: int, d_ff: int) -> dict:
    """name -> (make arguments (width), function, the flopsim ops it stands in for, the widths a
    block runs it at: the two norms' d_model; RoPE's query heads and key heads)."""
    bf16 = torch.bfloat16

    def rms_hf(x, w, eps=1e-6):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    def rope_complex(q, freqs):
        z = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
        return torch.view_as_real(z * freqs).flatten(-2).type_as(q)

    def rope_half(q, cos, sin):
        q1, q2 = q[..., : d_head // 2], q[..., d_head // 2:]
        return q * cos + torch.cat((-q2, q1), -1) * sin

    def rope_fms(q, freqs):  # IBM fms (Jan 2024): a 2 x 2 rotation per pair, in fp32
        q2 = q.float().reshape(*q.shape[:-1], -1, 2)
        return freqs.mul(q2.unsqueeze(-2)).sum(-1).flatten(-2).type_as(q).contiguous()

    def swiglu(g, u):
        return torch.nn.functional.silu(g) * u

    t = CHUNK
    grad = dict(dtype=bf16, requires_grad=True)
    rope_q = lambda h: torch.randn(t, h, d_head, **grad)  # noqa: E731
    return {
        "rmsnorm hf": (lambda _: (torch.randn(t, d, **grad), torch.ones(d, **grad)), rms_hf, ("norm1", "norm2"),
                       (d, d)),
        "rope complex": (lambda h: (rope_q(h), torch.polar(torch.ones(t, 1, d_head // 2),
                                                           torch.randn(t, 1, d_head // 2))),
                         rope_complex, ("attn.rope",), "qk"),
        "rope rotate_half": (lambda h: (rope_q(h), torch.randn(t, 1, d_head, dtype=bf16),
                                        torch.randn(t, 1, d_head, dtype=bf16)), rope_half, ("attn.rope",), "qk"),
        "rope fms": (lambda h: (rope_q(h), torch.randn(t, 1, d_head // 2, 2, 2)), rope_fms, ("attn.rope",), "qk"),
        "swiglu": (lambda _: (torch.randn(t, d_ff, **grad), torch.randn(t, d_ff, **grad)), swiglu, ("mlp.act",),
                   (d_ff,)),
    }


def _counted(torch, make, fn) -> tuple[float, float, int, int]:
    """(forward bytes, backward bytes, forward kernels, backward kernels) of fn on CHUNK tokens."""
    from flopsim.torchref.bytes_counter import count_bytes

    args = make()

    def run():
        y = fn(*args)
        y.backward(torch.ones_like(y))
        return y

    events = [e for e in count_bytes(run).events if e.op != "ones_like"]  # the backward's seed is not the op's
    moved = {p: [sum(a.nbytes for a in e.reads + e.writes) for e in events if e.pass_ == p] for p in ("fwd", "bwd")}
    return sum(moved["fwd"]), sum(moved["bwd"]), sum(map(bool, moved["fwd"])), sum(map(bool, moved["bwd"]))


def _memory_s(nbytes: float, hw) -> float:
    """Seconds to move `nbytes` on `hw` by flopsim's roofline at its calibration's default
    memory efficiency (no arithmetic, no launch cost)."""
    from flopsim.calibration import load_calibration
    from flopsim.roofline import roofline_time

    memory = load_calibration("auto", hw).default.memory
    return roofline_time(0.0, nbytes, hw.peak_flops_per_s_for("bf16")[0], hw.memory_bandwidth_bytes_per_s,
                         memory_eff=memory)[2]


def _flopsim_bytes(spec) -> dict:
    """op name in block 0 -> (forward bytes, backward bytes) of flopsim's op list at CHUNK tokens."""
    import flopsim

    out: dict = {}
    for op in flopsim.count(spec, batch=1, seq=CHUNK, phase="train").ops:
        if op.layer == 0:
            local = op.name.split(".", 2)[-1]
            fwd, bwd = out.get(local, (0.0, 0.0))
            moved = float(op.bytes)
            out[local] = (fwd + moved, bwd) if op.pass_ == "fwd" else (fwd, bwd + moved)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens a GPU a micro-batch (default 8192)")
    parser.add_argument("--hardware", default="a100-80gb,h100-sxm")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        print(f"benchmarks/eager_bytes.py: error: tokens: {args.tokens}: must be a positive integer", file=sys.stderr)
        return 2
    import torch

    from flopsim.errors import FlopsimError
    from flopsim.hardware import load_hardware
    from flopsim.spec import load_model

    try:
        spec = load_model(args.model)
        devices = [(h, load_hardware(h)) for h in args.hardware.split(",")]
    except FlopsimError as err:
        print(f"benchmarks/eager_bytes.py: error: {err}", file=sys.stderr)
        return 2
    ours = _flopsim_bytes(spec)
    scale = args.tokens / CHUNK
    print(f"{spec.name}, one block at {args.tokens:,} tokens (bytes forward + backward, GB; 'option GB': "
          f"flopsim's op list with the spec option that models the eager form)")
    print(f"{'eager kernel':18s} {'kernels':>9s} {'eager GB':>9s} {'flopsim GB':>11s} {'x':>6s} {'option GB':>10s}"
          f"   flopsim op (option)")
    extra_per_block = {}
    for name, (make, fn, ops, widths) in _eager_kernels(torch, spec.d_model, spec.heads, spec.d_head,
                                                         spec.d_ff).items():
        widths = (spec.heads, spec.kv_heads) if widths == "qk" else widths
        counted = [_counted(torch, lambda: make(w), fn) for w in widths]
        eager = sum(f + b for f, b, _, _ in counted) * scale
        flop = sum(sum(ours.get(op, (0.0, 0.0))) for op in ops) * scale
        extra_per_block[name] = eager - flop
        kf, kb = counted[0][2], counted[0][3]
        field, value = OPTIONS[name]
        modelled = _flopsim_bytes(spec.with_changes(**{field: value}))
        option = sum(sum(modelled.get(op, (0.0, 0.0))) for op in ops) * scale
        print(f"{name:18s} {kf:>4d}+{kb:<4d} {eager / 1e9:9.3f} {flop / 1e9:11.3f} {eager / flop:6.1f} "
              f"{option / 1e9:10.3f}   {' + '.join(ops)} ({field}: {value})")
    layers = spec.layers
    for impl in (("rmsnorm hf", "rope complex", "swiglu"), ("rmsnorm hf", "rope rotate_half", "swiglu"),
                 ("rmsnorm hf", "rope fms", "swiglu")):
        extra = layers * sum(extra_per_block[k] for k in impl)
        times = ", ".join(f"{h} {_memory_s(extra, hw) * 1e3:.0f} ms" for h, hw in devices)
        print(f"a step of {layers} blocks with {' + '.join(impl)}: {extra / 1e9:.0f} GB more than flopsim's op list "
              f"({times} at each calibration's default memory efficiency)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
