"""Where does my transformer differ? The first divergence between two models, down to the op
and the line (:func:`compare`), and the weight copy every from-scratch GPT-2 needs
(:func:`copy_weights`).

>>> import torchlens_edu as tle
>>> import torch.nn as nn
>>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
>>> _ = tle.copy_weights(a, b)
>>> tle.compare(a, b, torch.ones(1, 2)).agree
True
"""

from torchlens_edu.divergence.result import Comparison, Divergence, Drift
from torchlens_edu.divergence.run import compare
from torchlens_edu.divergence.weights import WeightReport, WeightsMismatchError, copy_weights

__all__ = ["Comparison", "Divergence", "Drift", "WeightReport", "WeightsMismatchError", "compare",
           "copy_weights"]
