"""Lesson 04: hunting NaN and Inf, in the forward and in the backward pass.

What to look at:
1. Forward: a hand-written cross-entropy ``-(target * log(softmax(logits)))``. A confident
   model drives some probabilities to exactly 0.0 in float32; ``log(0) = -inf`` and
   ``0 * -inf = NaN``. ``watch_nans`` stops at the first op that *made* a non-finite value
   (``log``), not at the loss where you noticed it, and names the module and your source line.
2. Backward: a distance ``sqrt(sum((a - b)**2))``. When ``a == b`` the forward is a clean 0.0,
   but d sqrt(u)/du = 1 / (2 sqrt(u)) is inf at u = 0, and inf * 0 = NaN in the gradient. The
   report says ``phase backward`` and which forward op's backward made it.
3. ``err.report.to_dict()``: the same facts as data (phase, module, op, kind, source, hint), for
   logging or a test.

Run:  python demos/04_nan_hunt.py
"""

import torch
import torch.nn as nn
from rich.console import Console
from rich.rule import Rule

import torchlens_edu as tle

console = Console(highlight=False)
torch.manual_seed(0)


class Classifier(nn.Module):
    """Linear layer + a hand-written cross-entropy (the bug is in ``loss``)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 10)
        self.loss = HandWrittenCrossEntropy()

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(self.head(x), target)


class HandWrittenCrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)  # (B, 10): underflows to 0.0 for confident rows
        log_probs = torch.log(probs)  # (B, 10): log(0) = -inf   <- the producer
        onehot = nn.functional.one_hot(target, 10).float()  # (B, 10)
        return -(onehot * log_probs).sum(-1).mean()  # 0 * -inf = NaN: where you notice it


console.print(Rule("1. forward: -inf from log(0), then NaN"))
model = Classifier()
x = torch.randn(4, 16) * 40  # large inputs: a very confident model
target = torch.tensor([1, 2, 3, 4])
try:
    with tle.watch_nans(model, mode="raise"):
        model(x, target)
except tle.NonFiniteError as err:
    console.print(err.report)
    forward_report = err.report.to_dict()
console.print("the fix: torch.log_softmax(logits, -1) (or F.cross_entropy), which never "
              "takes log(0)")
fixed = nn.functional.cross_entropy(model.head(x), target)
console.print("F.cross_entropy on the same logits:", tle.describe(fixed))


console.print(Rule("2. backward: a clean forward, a NaN gradient"))


class Matcher(nn.Module):
    """Distance between a projection of ``a`` and ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = self.proj(a) - b  # (B, 4)
        return torch.sqrt((diff**2).sum(-1)).mean()  # sqrt(0) is fine; its gradient is not


matcher = Matcher()
a = torch.randn(3, 4)
with torch.no_grad():
    b = matcher.proj(a)  # a perfect match: every distance is exactly 0
try:
    with tle.watch_nans(matcher, mode="raise"):
        loss = matcher(a, b)
        console.print("forward loss:", tle.describe(loss))
        loss.backward()
except tle.NonFiniteError as err:
    console.print(err.report)
    backward_report = err.report.to_dict()
console.print("the fix: torch.sqrt(sq + 1e-12), or torch.linalg.vector_norm, whose gradient "
              "at 0 is defined")

console.print(Rule("3. the reports as data"))
for report in (forward_report, backward_report):
    console.print({k: report[k] for k in ("phase", "module", "op", "kind", "source")})
