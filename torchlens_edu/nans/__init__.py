"""The NaN/Inf watch: a cheap check on every step, a replay that names the producer."""

from torchlens_edu.nans.report import NonFiniteReport
from torchlens_edu.nans.watch import NanWatch, NonFiniteError, watch_nans

__all__ = ["NanWatch", "NonFiniteError", "NonFiniteReport", "watch_nans"]
