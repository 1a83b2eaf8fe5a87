"""Exactness check: flopsim's counts against FlopCounterMode on the reference.

`compare_with_torch(spec, phase, batch, seq, context, encoder_seq=)` runs the reference
under FlopCounterMode and returns a `Comparison` with torch's and flopsim's
totals, parameters, and every module whose count differs. A module's
flopsim count is the sum over ops whose `module` is that path or lies below
it (FlopCounterMode's counts are hierarchical).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Comparison:
    spec_name: str
    phase: str
    torch_flops: int
    flopsim_flops: int
    torch_params: int
    flopsim_params: int
    modules_checked: int
    mismatches: list = field(default_factory=list)  # (module, torch, flopsim)

    @property
    def exact(self) -> bool:
        return (self.torch_flops == self.flopsim_flops and self.torch_params == self.flopsim_params
                and not self.mismatches)

    def describe(self) -> str:
        return (f"{self.spec_name} {self.phase}: torch {self.torch_flops} vs flopsim {self.flopsim_flops} FLOPs, "
                f"params {self.torch_params} vs {self.flopsim_params}, "
                f"{len(self.mismatches)} of {self.modules_checked} modules differ: {self.mismatches[:4]}")


def module_flops(costs, path: str) -> int:
    return sum(op.flops for op in costs if path == "" or op.module == path or op.module.startswith(path + "."))


def compare_with_torch(spec, phase: str, batch: int, seq: int, context: Optional[int] = None,
                       seed: int = 0, encoder_seq: Optional[int] = None) -> Comparison:
    from flopsim.count import count
    from flopsim.torchref.counting import count_with_torch
    from flopsim.torchref.model import build_reference, run_phase

    model = build_reference(spec, seed=seed)
    measured = count_with_torch(lambda: run_phase(model, spec, phase, batch, seq, context, seed=seed,
                                                  encoder_seq=encoder_seq))
    result = count(spec, batch=batch, seq=seq, phase=phase, context=context, encoder_seq=encoder_seq)
    mismatches = [(path, flops, module_flops(result.ops, path))
                  for path, flops in sorted(measured.items())
                  if module_flops(result.ops, path) != flops]
    return Comparison(
        spec_name=spec.name, phase=phase,
        torch_flops=measured[""], flopsim_flops=result.flops,
        torch_params=sum(p.numel() for p in model.parameters()), flopsim_params=result.params,
        modules_checked=len(measured), mismatches=mismatches,
    )
