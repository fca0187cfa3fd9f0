"""KTO refinement of a diffusion model (paper Eq. 2), read with the original KTO paper's signs.

Each sample is a (condition, video) pair marked desirable (a real boundary-case window) or
undesirable (a video the current generator made under the same conditions, with poor control).
The implicit reward of the policy is how much better it denoises the sample than the frozen
reference model it started from, at the same noise level and noise:

    r = e_ref − e_θ            (e: the per-sample *mean* flow-matching error over the video slots)
    z_ref = max(0, mean_batch(r)), detached      (KTO's reference point)
    L_KTO = λ_D·(1 − σ(β·(r − z_ref)))  for desirable samples
            λ_U·(1 − σ(β·(z_ref − r)))  for undesirable ones

so the loss falls when desirable samples are denoised better than the reference does and
undesirable ones worse. As printed, Eq. 2 lacks the sign flip for undesirable samples and would
reward them (DESIGN.md). The flow-matching term is added on desirable samples only (learning to
denoise a bad video would undo the preference): L = mean(L_KTO) + w_FM·mean_desirable(e_θ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KtoTerms:
    loss: torch.Tensor  # what the optimizer minimises
    kto: torch.Tensor  # mean KTO term
    flow: torch.Tensor  # mean flow-matching error of the desirable samples (0 when there are none)
    reward: torch.Tensor  # (B,) r = e_ref − e_θ, detached
    z_ref: torch.Tensor  # the reference point, detached


def kto_loss(policy_error: torch.Tensor, reference_error: torch.Tensor, desirable: torch.Tensor, beta: float,
             lambda_desirable: float = 1.0, lambda_undesirable: float = 1.0, flow_weight: float = 1.0) -> KtoTerms:
    """Eq. 2 on per-sample errors (B,); ``desirable`` (B,) bool."""
    d = desirable.to(policy_error.dtype)
    reward = reference_error.detach() - policy_error
    z_ref = reward.detach().mean().clamp_min(0.0)
    value = d * lambda_desirable * (1 - torch.sigmoid(beta * (reward - z_ref))) + \
        (1 - d) * lambda_undesirable * (1 - torch.sigmoid(beta * (z_ref - reward)))
    kto = value.mean()
    flow = (policy_error * d).sum() / d.sum().clamp_min(1.0)
    return KtoTerms(kto + flow_weight * flow, kto.detach(), flow.detach(), reward.detach(), z_ref)
