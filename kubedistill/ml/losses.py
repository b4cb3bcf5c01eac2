"""Student and teacher losses, one small function each.

CRSD, Contrastive Reasoning Self-Distillation (arXiv 2510.11056, "From Reasoning LLMs to BERT",
Figure 3): one shared encoder and classifier see each pair twice, as the standard input (query,
service) -> [CLS] vector `h`, logits `p_s`, and as the reasoning-augmented input (query, service,
reasoning) -> `r`, `p_t`. The augmented view plays the teacher.

    L = CE(p_s, y) + CE(p_t, y) + align_weight * L_align(h, r) + contrast_weight * L_batch(h, r)

Details the paper leaves open, chosen here and configurable through `spec.student.crsd`:
- L_align is the cosine distance 1 - cos(h_i, r_i) (scale-free, so it does not fight the classifier);
- L_batch is one-directional InfoNCE over cosine similarities {h} x {r} / temperature;
- the reasoning view is stop-gradient inside both alignment terms by default (a fixed teacher for
  them);
- by default the reasoning view is encoded forward-only and its CE trains the shared classifier
  alone (`teacherGrad: false`, see `kubedistill.stages.student`): a CRSD step then costs ~2.0x a CE step
  instead of ~2.9x, at similar measured quality (benchmarks/RESULTS.md).

`kd_loss` is the classic soft-target baseline (Hinton et al. 2015), not CRSD.

Teacher (kubedistill.stages.teacher): `causal_lm_loss` (DAPT and SFT, next-token cross-entropy over the
positions whose label is not IGNORE), `pairwise_reward_loss` (the reward model's Bradley-Terry
ranking loss, Ouyang et al. 2022, InstructGPT eq. 1) and `dpo_loss` (Rafailov et al. 2023, DPO eq. 7)
plus, optionally, the chosen response's per-token negative log-likelihood (the NLL term of
Pang et al. 2024, "Iterative Reasoning Preference Optimization"), which keeps DPO from lowering
the likelihood of good reasoning along with the bad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of logits (n, k) against integer labels (n,): L_sce / L_tce in the paper.

    With class weights w (k,): sum_i w[y_i] * CE_i / sum_i w[y_i] (PyTorch's weighted mean), so a batch's
    loss stays on the unweighted scale while a rare grade's examples count more."""
    return F.cross_entropy(logits, labels, weight=weight)


def align_loss(h: torch.Tensor, r: torch.Tensor, stop_gradient: bool = True) -> torch.Tensor:
    """L_align: mean cosine distance pulling each standard [CLS] vector toward its reasoning view."""
    target = r.detach() if stop_gradient else r
    return (1.0 - F.cosine_similarity(h, target, dim=-1)).mean()


def batch_contrastive_loss(
    h: torch.Tensor, r: torch.Tensor, temperature: float, stop_gradient: bool = True
) -> torch.Tensor:
    """L_batch-align: InfoNCE over the n x n cosine-similarity matrix of {h_i} against {r_j}.

    Row i's positive is r_i (the diagonal); the other pairs' reasoning views are in-batch negatives.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    target = r.detach() if stop_gradient else r
    sim = F.normalize(h, dim=-1) @ F.normalize(target, dim=-1).T / temperature
    return F.cross_entropy(sim, torch.arange(h.shape[0], device=h.device))


def kd_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft-target distillation: T^2 * KL(teacher || softmax(student / T)), batch mean.

    With class weights w and the rows' labels y: each row's KL weighted by w[y_i], divided by sum_i w[y_i]
    (the same weighted mean as `ce_loss`)."""
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    if weight is None:
        return F.kl_div(log_p, teacher_probs, reduction="batchmean") * temperature**2
    if labels is None:
        raise ValueError("kd_loss: class weights need the rows' labels")
    per_row = F.kl_div(log_p, teacher_probs, reduction="none").sum(-1)
    w = weight[labels]
    return (w * per_row).sum() / w.sum() * temperature**2


def crsd_loss(
    logits_s: torch.Tensor,
    logits_t: torch.Tensor,
    h: torch.Tensor,
    r: torch.Tensor,
    labels: torch.Tensor,
    align_weight: float,
    contrast_weight: float,
    temperature: float,
    stop_gradient: bool = True,
    weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The CRSD objective and its terms (for logging); class weights, if any, weigh both CE terms."""
    terms = {
        "sce": ce_loss(logits_s, labels, weight),
        "tce": ce_loss(logits_t, labels, weight),
        "align": align_loss(h, r, stop_gradient),
        "contrast": batch_contrastive_loss(h, r, temperature, stop_gradient),
    }
    terms["loss"] = terms["sce"] + terms["tce"] + align_weight * terms["align"] + contrast_weight * terms["contrast"]
    return terms


IGNORE = -100  # label of a position that is not trained (prompt tokens in SFT, padding)


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t+1: drop the last logit and the first label."""
    return logits[:, :-1, :], labels[:, 1:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (b, t, v), labels (b, t) with IGNORE where untrained."""
    lg, lb = _shifted(logits, labels)
    return F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=IGNORE)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over each sequence's trained positions: log pi(y | x) per row, shape (b,)."""
    lg, lb = _shifted(logits, labels)
    mask = lb != IGNORE
    picked = torch.gather(lg.log_softmax(-1), 2, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean negative log-likelihood of the trained positions, shape (b,)."""
    n = (_shifted(logits, labels)[1] != IGNORE).sum(-1).clamp(min=1)
    return -sequence_logprob(logits, labels) / n


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r(chosen) - r(rejected)), averaged: the better response must score higher."""
    return -F.logsigmoid(chosen - rejected).mean()


def dpo_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """DPO's implicit reward margin per pair (before beta): how much more the policy raised the chosen response's
    log-probability over the reference's than the rejected one's (Rafailov et al. 2023)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """-log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]), averaged.

    Inputs are sequence log-probabilities (`sequence_logprob`) of the chosen (y_w) and rejected
    (y_l) responses under the policy being trained and the frozen reference (the SFT teacher).
    """
    return -F.logsigmoid(beta * dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)).mean()
