"""DINO self-distillation loss with teacher centering and sharpening (official formulation).

    student_out: (num_crops*B, K) crop-major; teacher_out: (2*B, K) for the 2 global crops.
    q_t = softmax((teacher - center) / tau_t)   (detached),   log p_s = log_softmax(student / tau_s)
    loss = mean over pairs (t, s), s != t, of  mean_b  sum_k -q_t[b,k] log p_s[b,k]
    (2 x (num_crops - 1) pairs: 2 with the global crops alone, 2 + 2N with N local crops)
    center <- m * center + (1 - m) * mean over ALL ranks' teacher outputs of this step

The center is a registered buffer, so it travels with ``state_dict()`` into checkpoints. The cross-rank mean
is passed in as ``reduce_sum`` (``accelerator.reduce(t, "sum")``) so this file does not depend on Accelerate.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

ReduceSum = Callable[[torch.Tensor], torch.Tensor]  # accelerator.reduce(t, "sum") in a distributed run


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, num_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        # num_crops == 2 is the no-multi-crop setting (crops.local_crops_number 0): official DINO then sums the 2
        # cross-view pairs (teacher 0 -> student 1, teacher 1 -> student 0).
        if num_crops < 2:
            raise ValueError(f"num_crops ({num_crops}) must be at least the teacher's 2 global crops (a loss term "
                             "pairs two different views)")
        self.num_crops = num_crops
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # (1, K)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float,
                reduce_sum: Optional[ReduceSum] = None, world_size: int = 1) -> torch.Tensor:
        student_log_probs = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        student_chunks = student_log_probs.chunk(self.num_crops)  # num_crops x (B, K)
        teacher_probs = F.softmax((teacher_output.float() - self.center) / teacher_temp, dim=-1).detach()
        teacher_chunks = teacher_probs.chunk(2)  # 2 x (B, K)

        total = student_output.new_zeros((), dtype=torch.float32)
        num_terms = 0
        for t, q in enumerate(teacher_chunks):
            for s, log_p in enumerate(student_chunks):
                if s == t:  # the same view seen by student and teacher carries no signal
                    continue
                total = total + torch.sum(-q * log_p, dim=-1).mean()
                num_terms += 1
        self.update_center(teacher_output, reduce_sum, world_size)
        return total / num_terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor, reduce_sum: Optional[ReduceSum] = None,
                      world_size: int = 1) -> None:
        """EMA of the teacher's mean output over the global batch of every rank."""
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)  # (1, K)
        if reduce_sum is not None:
            batch_center = reduce_sum(batch_center)
        batch_center = batch_center / (len(teacher_output) * world_size)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))

