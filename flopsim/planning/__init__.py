"""Capacity planning: how many GPUs, how long and at what cost to train a model
(`train`), and how many GPUs, which batch and at what cost per token to serve it
(`serve`).

Both plans are built on the same Op lists as everything else: compute times
come from `flopsim.predict` (roofline per op, the device's calibration),
memory from `flopsim.memory`; the layout, the collectives and the arithmetic
of steps, days and money are added here. Link levels: `links`; shared input
checks: `common`. Serving's pieces: request lengths and their steady state
(`serve_lengths`), replicas of tp x pp x ep GPUs and the degrees searched
(`serve_layouts`), steps composed from op lists per pipeline stage, chunked
prefill's mixed step and speculative verification (`serve_steps`), one
replica's times and memory (`serve_model`), checked inputs (`serve_inputs`)
and notes (`serve_notes`).
"""

from __future__ import annotations

from flopsim.planning.common import largest_true, parse_duration, parse_quantity
from flopsim.planning.serve import ServingPlan, plan_serving, tp_decode_s, tp_prefill_s
from flopsim.planning.train import TrainingPlan, bubble_fraction, plan_training

__all__ = ["ServingPlan", "TrainingPlan", "bubble_fraction", "largest_true", "parse_duration",
           "parse_quantity", "plan_serving", "plan_training", "tp_decode_s", "tp_prefill_s"]
