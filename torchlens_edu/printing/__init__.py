"""Printing tensors: print-option presets, one-line summaries, tables and attention maps."""

from torchlens_edu.printing.attention import AttentionView, show_attention
from torchlens_edu.printing.options import (
    PRESETS,
    apply_env_preset,
    get_printoptions,
    install,
    installed,
    printoptions,
    set_printoptions,
    uninstall,
)
from torchlens_edu.printing.stats import TensorStats, tensor_stats
from torchlens_edu.printing.summary_line import describe, format_stats, sparkline
from torchlens_edu.printing.table import TensorView, show

__all__ = [
    "PRESETS",
    "AttentionView",
    "TensorStats",
    "TensorView",
    "apply_env_preset",
    "describe",
    "format_stats",
    "get_printoptions",
    "install",
    "installed",
    "printoptions",
    "set_printoptions",
    "show",
    "show_attention",
    "sparkline",
    "tensor_stats",
    "uninstall",
]
