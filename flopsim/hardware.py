"""Hardware specs: one YAML file per device under specs/hardware/, loaded
into a validated, immutable `HardwareSpec`.

Conventions:
- Every figure carries its unit in its name: `peak_flops_per_s` (per dtype),
  `memory_bandwidth_bytes_per_s`, `memory_capacity_bytes`,
  `last_level_cache_bytes`, `interconnect_bytes_per_s`, `launch_overhead_s`.
- Link levels: `interconnect_bytes_per_s` is the scale-up link (NVLink,
  xGMI, ICI) per device, quoted as datasheets quote it (both directions
  summed); `scale_up_domain` is how many devices share it (a node's 8 GPUs,
  an NVL72 rack, a TPU slice); `scale_out_bytes_per_s` is the network
  bandwidth per device between domains (its NICs, both directions summed).
  `torus_axis`: the scale-up domain is a torus (TPU ICI) whose rings close
  with wraparound links only over whole axes of this many devices (a TPU
  v5e pod: 16x16, so 16); a group of whole axes then runs bidirectional
  rings (flopsim.parallel.layout, level `scale_up_torus`), a smaller one the
  line without wraparound (`scale_up`). None: no torus.
  The calibration's `links` give the measured latency and bus bandwidth
  of collectives on each level.
- Peaks are dense (no 2:4 structured sparsity). For `int8` the figure is
  operations per second. `fp32` is the non-tensor (vector) rate on GPUs.
- Every figure that is given has an entry in `sources` (datasheet title/URL,
  or the measurement it comes from); `verified` lists the figures checked
  against a primary source, and the rest are flagged as unverified by
  `flopsim hardware show`.
- Hardware numbers live only in specs/hardware/*.yaml; code never hard-codes
  one.
- A dtype the device publishes no peak for falls back along DTYPE_FALLBACK
  (e.g. fp8 on an A100 runs at the fp16 rate, bf16 on the CPU at fp32):
  `peak_flops_per_s_for(dtype)` returns the rate and the dtype it came from.
- Matrix-unit kinds (matmul, attention, router, conv) run at the model dtype's
  peak; every other op runs at `vector_flops_per_s` (the fp32 rate, or its
  fallback), see flopsim.roofline.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flopsim.errors import InputError

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4")
# where to look when a device publishes no peak for a dtype, nearest first
DTYPE_FALLBACK: dict[str, tuple[str, ...]] = {
    "fp32": ("tf32", "bf16", "fp16"),  # a TPU runs fp32 products as bf16 MXU passes
    "tf32": ("fp32", "bf16"),
    "bf16": ("fp16", "fp32"),
    "fp16": ("bf16", "fp32"),
    "fp8": ("fp16", "bf16", "fp32"),
    "int8": ("fp8", "fp16", "bf16", "fp32"),
    "fp4": ("fp8", "int8", "fp16", "bf16", "fp32"),  # a device without fp4 tensor cores upcasts
}
FIGURES = (
    "peak_flops_per_s",
    "memory_bandwidth_bytes_per_s",
    "memory_capacity_bytes",
    "last_level_cache_bytes",
    "interconnect_bytes_per_s",
    "scale_up_domain",
    "scale_out_bytes_per_s",
    "torus_axis",
    "launch_overhead_s",
)


# Ranges far wider than any device's (a kB/s link, a 10 EFLOP/s chip), yet finite and
# positive: 1e-300 or .inf would make every time 0 or null.
FlopsPerS = Annotated[float, Field(ge=1e6, le=1e19)]
BytesPerS = Annotated[float, Field(ge=1e3, le=1e16)]
Bytes = Annotated[float, Field(ge=1e3, le=1e16)]


class HardwareSpec(BaseModel):
    """One device. See the module docstring for units and conventions."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    name: str = Field(min_length=1)
    description: str = ""
    kind: Literal["gpu", "tpu", "cpu", "other"] = "gpu"
    peak_flops_per_s: dict[Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4"], FlopsPerS]
    memory_bandwidth_bytes_per_s: BytesPerS
    memory_capacity_bytes: Bytes
    last_level_cache_bytes: Optional[Bytes] = None
    interconnect_bytes_per_s: Optional[BytesPerS] = None
    scale_up_domain: Optional[int] = Field(None, ge=1, le=100_000)
    scale_out_bytes_per_s: Optional[BytesPerS] = None
    torus_axis: Optional[int] = Field(None, ge=2, le=1024)
    launch_overhead_s: float = Field(0.0, ge=0, le=1.0)
    sources: dict[str, str]
    verified: list[str] = []

    @model_validator(mode="after")
    def _figures_have_sources(self):
        if not self.peak_flops_per_s:
            raise ValueError("peak_flops_per_s must list at least one dtype")
        for dtype, value in self.peak_flops_per_s.items():
            if not value > 0:
                raise ValueError(f"peak_flops_per_s.{dtype} must be positive, got {value}")
        for key in self.sources:
            if key not in FIGURES:
                raise ValueError(f"sources has an entry for unknown figure '{key}' (figures: {', '.join(FIGURES)})")
        for figure in FIGURES:
            if getattr(self, figure) is not None and not self.sources.get(figure, "").strip():
                raise ValueError(f"figure '{figure}' has no source (add sources.{figure})")
        for figure in self.verified:
            if figure not in FIGURES:
                raise ValueError(f"verified lists unknown figure '{figure}'")
        return self

    # -- derived ---------------------------------------------------------
    def peak_flops_per_s_for(self, dtype: str) -> tuple[float, str]:
        """(peak FLOP/s, the dtype it is quoted for) for `dtype`, with fallback."""
        if dtype not in DTYPE_FALLBACK:
            raise InputError(f"dtype: {dtype!r}: expected one of {', '.join(DTYPES)}")
        for candidate in (dtype, *DTYPE_FALLBACK[dtype]):
            if candidate in self.peak_flops_per_s:
                return self.peak_flops_per_s[candidate], candidate
        # every device has at least one figure; take the slowest as a last resort
        candidate = min(self.peak_flops_per_s, key=self.peak_flops_per_s.get)
        return self.peak_flops_per_s[candidate], candidate

    @property
    def vector_flops_per_s(self) -> float:
        """The rate non-matrix ops (elementwise, norms, softmax, ...) run at."""
        return self.peak_flops_per_s_for("fp32")[0]

    @property
    def unverified(self) -> list[str]:
        return [f for f in FIGURES if getattr(self, f) is not None and f not in self.verified]

    def ridge_flops_per_byte(self, dtype: str) -> float:
        """Arithmetic intensity at which the roofline turns from memory- to compute-bound."""
        return self.peak_flops_per_s_for(dtype)[0] / self.memory_bandwidth_bytes_per_s

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump()
        out["unverified"] = self.unverified
        return out


def load_hardware(path_or_name: Any) -> HardwareSpec:
    """A HardwareSpec from a HardwareSpec, a dict, a YAML path or a preset name
    (`flopsim hardware list`)."""
    from flopsim.spec.loader import read_yaml, validate
    from flopsim.spec.paths import resolve

    if isinstance(path_or_name, HardwareSpec):
        return path_or_name
    if isinstance(path_or_name, dict):
        return validate(HardwareSpec, path_or_name, "hardware spec")
    path = resolve("hardware", str(path_or_name))
    return validate(HardwareSpec, read_yaml(path, "hardware", str(path_or_name)), str(path_or_name))


def hardware_names() -> list[str]:
    from flopsim.spec.paths import preset_names

    return preset_names("hardware")
