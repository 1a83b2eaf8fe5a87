"""A serving plan's inputs, checked (flopsim.planning.serve).

Conventions:
- Bad input is one line naming the field and the value (flopsim.errors.bad_value).
- `kv_dtype` sets `precision.kv_cache` of the target and of a draft (one cache dtype
  per engine, as vLLM's --kv-cache-dtype): the op lists then read and write the cache
  in it, and memory holds it in it.
- A draft model shares the target's vocabulary (speculative sampling compares their
  distributions token by token); it runs at the target's tp.
- Chunked prefill and speculative decoding together are not modelled (one or the other).
- An encoder-decoder (T5, Switch) is served with its prompt as the encoder's input
  (flopsim.planning.serve_model), without chunked prefill (its encoder runs over the
  whole prompt at once) or speculative decoding; a draft is a decoder-only model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from flopsim.errors import FlopsimError, InputError, bad_value
from flopsim.planning.common import _positive_int
from flopsim.planning.serve_lengths import Lengths, parse_lengths
from flopsim.planning.serve_model import Draft

KV_DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8")  # flopsim.spec.model.Precision.kv_cache


def _fraction(name: str, value) -> float:
    """A number in (0, 1], else the one-line error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise bad_value(name, value, "must be a fraction in (0, 1]")
    return value


@dataclass(frozen=True)
class ServingInputs:
    spec: Any
    prompt: Lengths
    gen: Lengths
    chunk: Optional[int]
    draft: Optional[Draft]

    def config(self, model) -> dict:
        """The plan's `config` figures these inputs set (the rest is the search's)."""
        d = self.draft
        return {"prompt": self.prompt.max if self.prompt.fixed else self.prompt.label,
                "gen": self.gen.max if self.gen.fixed else self.gen.label,
                "prompt_mean": self.prompt.mean, "gen_mean": self.gen.mean, "prompt_p99": model.p_worst,
                "decode_context_mean": model.t_mean, "kv_context_max": model.kv_tokens_max,
                "encoder_tokens_mean": model.enc_mean, "kv_dtype": self.spec.kv_dtype,
                "chunk": self.chunk, "draft": d and d.spec.name, "draft_len": d and d.k,
                "acceptance": d and d.acceptance, "expected_tokens_per_step": d and d.expected_tokens}


def _with_kv_dtype(spec, kv_dtype: Optional[str]):
    if kv_dtype is None:
        return spec
    if kv_dtype not in KV_DTYPES:
        raise bad_value("kv_dtype", kv_dtype, f"expected one of {', '.join(KV_DTYPES)}")
    return spec.with_changes(precision={"kv_cache": kv_dtype})


def _draft(spec, draft, draft_len, acceptance, kv_dtype) -> Optional[Draft]:
    from flopsim.spec import load_model

    if draft is None:
        for name, value in (("draft_len", draft_len), ("acceptance", acceptance)):
            if value is not None:
                raise bad_value(name, value, "needs a draft model (--draft)")
        return None
    try:
        d = _with_kv_dtype(load_model(draft), kv_dtype)
    except FlopsimError as err:
        raise InputError(f"draft: {err}") from None
    if d.is_encoder_decoder:
        raise bad_value("draft", d.name, "a draft is a decoder-only model (an encoder-decoder drafts no tokens "
                                         "that a target can verify in one forward here)")
    if spec.is_encoder_decoder:
        raise bad_value("draft", d.name, f"speculative decoding of an encoder-decoder ({spec.name}) is not modelled")
    if d.vocab != spec.vocab:
        raise bad_value("draft", d.name, f"its vocab {d.vocab} differs from {spec.name}'s {spec.vocab} (speculative "
                                         f"sampling compares both models' probabilities of each token)")
    if draft_len is None or acceptance is None:
        raise bad_value("draft_len" if draft_len is None else "acceptance", None, "required with a draft model")
    return Draft(d, _positive_int("draft_len", draft_len), _fraction("acceptance", acceptance))


def serving_inputs(spec, prompt, gen, chunk, draft, draft_len, acceptance, kv_dtype) -> ServingInputs:
    """The checked inputs: the spec (with its KV dtype), the length distributions, the chunk
    and the draft; each model supports prefill and decode at the longest request."""
    from flopsim.count import token_values
    from flopsim.spec import load_model

    spec = _with_kv_dtype(load_model(spec), kv_dtype)
    prompt, gen = parse_lengths("prompt", prompt), parse_lengths("gen", gen)
    chunk = None if chunk is None else _positive_int("chunk", chunk)
    if chunk is not None and spec.is_encoder_decoder:
        raise bad_value("chunk", chunk, f"chunked prefill of an encoder-decoder ({spec.name}) is not modelled: its "
                                        f"encoder runs over the whole prompt")
    d = _draft(spec, draft, draft_len, acceptance, kv_dtype)
    if chunk is not None and d is not None:
        raise bad_value("chunk", chunk, "chunked prefill with speculative decoding is not modelled: give --chunk "
                                        "or --draft")
    if spec.is_encoder_decoder:  # the encoder over the prompt, the decoder over the start token and gen
        token_values(spec, "prefill", 1, 1, encoder_seq=prompt.max)
        token_values(spec, "decode", 1, 1, 1 + gen.max, encoder_seq=prompt.max)
        return ServingInputs(spec, prompt, gen, chunk, d)
    longest = prompt.max + gen.max + (d.k if d else 0)
    for m in [spec] + ([d.spec] if d else []):
        if m.positions == "learned" and longest > m.max_seq:
            raise bad_value("prompt + gen", longest, f"the longest request exceeds max_seq {m.max_seq} of {m.name} "
                                                     f"(learned positions)")
        token_values(m, "prefill", 1, prompt.max)
        token_values(m, "decode", 1, 1, longest)
    return ServingInputs(spec, prompt, gen, chunk, d)
