"""Where does my transformer differ? The first divergence between two models, down to the op
and the line (:func:`compare`), and the weight copy every from-scratch GPT-2 needs
(:func:`copy_weights`)."""

from torchlens_edu.divergence.result import Comparison, Divergence, Drift
from torchlens_edu.divergence.run import compare

__all__ = ["Comparison", "Divergence", "Drift", "compare"]
