"""Knowledge distillation from the unpruned model while a pruned classifier retrains.

A pruned network retrained on the labels alone relearns from one-hot targets what the original
already knows as a full distribution over classes. Hinton et al.'s soft-target loss hands that
distribution over: the student matches the teacher's temperature-softened probabilities,
``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross_entropy``. The ``T^2`` keeps the
soft term's gradient on the same scale as the hard term's whatever the temperature.

The teacher is frozen and runs in eval mode (its BatchNorm uses its running statistics) on the
very normalised batch the student sees, augmentation included. Classifiers only: a detector's
multibox loss has no single logit tensor to match, and :func:`prunekit.train.train` refuses the
combination by name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_settings(alpha: float, temperature: float) -> None:
    """The one validation of the two knobs (PruneConfig checks them at parse time, the loss again)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")


@dataclass
class Distillation:
    """Soft targets from ``teacher`` (a private frozen copy is kept; the caller's model is untouched)."""

    teacher: nn.Module
    alpha: float = 0.9
    temperature: float = 4.0

    def __post_init__(self) -> None:
        check_settings(self.alpha, self.temperature)
        self.teacher = copy.deepcopy(self.teacher).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def to(self, device: torch.device | str) -> Distillation:
        self.teacher.to(device)
        return self

    def soft_loss(self, student_logits: Tensor, x: Tensor) -> Tensor:
        """``T^2 * KL(teacher || student)`` at temperature T, averaged over the batch."""
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                f"{tuple(student_logits.shape)}: distillation needs the same classes"
            )
        t = self.temperature
        log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
        return kl * (t * t)

    def losses(self, student_logits: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The weighted hard and soft terms, logged separately (their sum is the loss)."""
        hard = F.cross_entropy(student_logits, y)
        out = {"classification": (1.0 - self.alpha) * hard}
        if self.alpha > 0:
            out["distillation"] = self.alpha * self.soft_loss(student_logits, x)
        return out
