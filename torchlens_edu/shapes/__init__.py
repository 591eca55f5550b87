"""Shape traces: module and op events with named dims and source lines, meta runs, and
explanations of a failed forward."""

from torchlens_edu.shapes.events import ShapeEvent
from torchlens_edu.shapes.trace import ShapeTrace
from torchlens_edu.shapes.tracer import ShapeTracer, trace_shapes

__all__ = ["ShapeEvent", "ShapeTrace", "ShapeTracer", "trace_shapes"]
