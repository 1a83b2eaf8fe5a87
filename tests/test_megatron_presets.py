"""The Megatron-LM GPT presets of the published suite (Narayanan et al. 2021 Table 1,
Korthikanti et al. 2022 Table 3, GPT-3 175B) against their published parameter
counts, and against Narayanan et al.'s own parameter formula (eq. 2)."""

from __future__ import annotations

import pytest

from flopsim.count import count
from flopsim.spec import load_model

# preset -> (published parameters in billions, digits after the point it is printed with, where)
PUBLISHED = {
    "megatron-gpt-1.7b": (1.7, 1, "Narayanan et al. 2021 Table 1 / Megatron-LM README cases_april2021.png"),
    "megatron-gpt-3.6b": (3.6, 1, "Narayanan et al. 2021 Table 1 / Megatron-LM README cases_april2021.png"),
    "megatron-gpt-7.5b": (7.5, 1, "Narayanan et al. 2021 Table 1 / Megatron-LM README cases_april2021.png"),
    "megatron-gpt-18.4b": (18.4, 1, "Narayanan et al. 2021 Table 1 / Megatron-LM README cases_april2021.png"),
    "megatron-gpt-39.1b": (39.1, 1, "Narayanan et al. 2021 Table 1 / Megatron-LM README cases_april2021.png"),
    "megatron-gpt-76.1b": (76.1, 1, "Narayanan et al. 2021 Table 1 / Megatron-LM README cases_april2021.png"),
    "megatron-gpt-145.6b": (145.6, 1, "Narayanan et al. 2021 Table 1 / Megatron-LM README cases_april2021.png"),
    "megatron-gpt-310.1b": (310.1, 1, "Narayanan et al. 2021 Table 1 / Megatron-LM README cases_april2021.png"),
    "megatron-gpt-529.6b": (529.6, 1, "Narayanan et al. 2021 Table 1 / Megatron-LM README cases_april2021.png"),
    "megatron-gpt-1008b": (1008.0, 1, "Narayanan et al. 2021 Table 1 / Megatron-LM README cases_april2021.png"),
    "gpt3-175b": (174.6, 1, "Narayanan et al. 2021 Table 2: 174.6 billion parameters"),
    "megatron-gpt-22b": (22, 0, "Korthikanti et al. 2022 Table 3: Model Size 22B"),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameters_round_to_the_published_figure(name):
    published, digits, where = PUBLISHED[name]
    assert round(count(name, seq=8).params / 1e9, digits) == published, where


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameters_are_narayanan_eq2_plus_the_final_layernorm(name):
    """Narayanan et al. 2021 eq. 2: P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h)), i.e.
    12 h^2 + 13 h per layer, tied word embeddings and learned positions; it leaves
    out the final LayerNorm's 2h."""
    spec = load_model(name)
    l, h, V, s = spec.layers, spec.d_model, spec.vocab, spec.max_seq
    assert count(name, seq=8).params == 12 * l * h ** 2 + 13 * l * h + (V + s) * h + 2 * h
