"""A cost model of long-context inference: hardware and model presets, FLOP and byte formulas per
strategy (the bytes exactly as seqpar's counted collectives record them), layouts of TP inside a
node x CP across nodes, and predictions of prefill time, decode time and memory (`seqpar plan`)."""

from seqpar.costmodel.hardware import PRESETS as HARDWARE_PRESETS
from seqpar.costmodel.hardware import Hardware, resolve_hardware
from seqpar.costmodel.layouts import Layout, PlanError, check_layout, enumerate_layouts, strategies_for
from seqpar.costmodel.models import PRESETS as MODEL_PRESETS
from seqpar.costmodel.models import preset_config, resolve_model_config
from seqpar.costmodel.predict import LayoutChoice, Prediction, choose_layout, decode_s, max_context, predict, prefill

__all__ = [
    "HARDWARE_PRESETS",
    "MODEL_PRESETS",
    "Hardware",
    "Layout",
    "LayoutChoice",
    "PlanError",
    "Prediction",
    "check_layout",
    "choose_layout",
    "decode_s",
    "enumerate_layouts",
    "max_context",
    "predict",
    "prefill",
    "preset_config",
    "resolve_hardware",
    "resolve_model_config",
    "strategies_for",
]
