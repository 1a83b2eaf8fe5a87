"""Reference torch implementations built from a ModelSpec (torch is imported
only here and in the profiling/validation code, never by the core).

`build_reference(spec)` returns an `nn.Module` whose module paths equal the
`module` of flopsim's ops (`block.3.attn.qkv`), so FlopCounterMode's
per-module counts join flopsim's per-op counts by name. `run_phase` runs a
phase (forward, train, prefill, decode) on random tokens.
"""

from flopsim.torchref.bytes_check import compare_bytes
from flopsim.torchref.bytes_counter import count_bytes
from flopsim.torchref.counting import count_with_torch
from flopsim.torchref.model import RunState, build_reference, prepare_phase, run_phase

__all__ = ["RunState", "build_reference", "compare_bytes", "count_bytes", "count_with_torch", "prepare_phase",
           "run_phase"]
