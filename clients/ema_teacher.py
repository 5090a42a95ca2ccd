"""Semi-ViT's EMA teacher with probabilistic pseudo-mixup, for clients holding unlabelled examples (Cai et al.,
"Semi-supervised Vision Transformers at Scale", NeurIPS 2022; reference code amazon-science/semi-vit,
engine_semi.py and util/mixup.py ProbPseudoMixup)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import device_generator

STATE = "ema_teacher/"  # prefix of the teacher's tensors in ctx.state


class EMATeacherParams(ComponentParams):
    decay: float = Field(0.9999, ge=0, le=1, description="m in teacher <- m * teacher + (1 - m) * student, per step")
    threshold: float = Field(0.7, ge=0, le=1, description="tau: pseudo-labels count when the mixed confidence >= tau")
    lambda_u: float = Field(5.0, ge=0, description="weight of the unlabelled loss")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="smoothing of the one-hot pseudo-labels")
    teacher: Literal["ema", "received"] = Field(
        "ema", description="ema: a per-client EMA of the student kept in ctx.state; received: the model the "
                           "client received this round, frozen (the reference document's option ii)")


def ema_update_(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], decay: float) -> None:
    """``teacher <- decay * teacher + (1 - decay) * student`` in place, per entry (floating tensors): decay 1
    leaves the teacher as it is and decay 0 copies the student, bit for bit."""
    for k, t in teacher.items():
        t.mul_(decay).add_(student[k].detach(), alpha=1 - decay)


def prob_pseudo_mixup(x: torch.Tensor, probs: torch.Tensor, perm: torch.Tensor, smoothing: float):
    """Semi-ViT's probabilistic pseudo-mixup of unlabelled examples ``x`` with the teacher's ``probs`` [N, C]:
    example i is mixed with example ``perm[i]`` with ratio ``lam_i = c_i / (c_i + c_j)`` (c = confidence, the
    top probability); the target mixes the label-smoothed one-hot pseudo-labels the same way and the mixed
    confidence is ``max(c_i, c_j)``. Returns (mixed x, soft targets [N, C], mixed confidence [N], lam [N])."""
    conf, label = probs.max(dim=1)
    num_classes = probs.shape[1]
    smooth = F.one_hot(label, num_classes).to(probs.dtype) * (1 - smoothing) + smoothing / num_classes
    lam = conf / (conf + conf[perm])
    lam_x = lam.view(-1, *[1] * (x.dim() - 1))
    x_mix = lam_x * x + (1 - lam_x) * x[perm]
    target = lam[:, None] * smooth + (1 - lam[:, None]) * smooth[perm]
    return x_mix, target, torch.maximum(conf, conf[perm]), lam


def unlabelled_loss(logits: torch.Tensor, target: torch.Tensor, conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """``L_u = mean_i 1[conf_i >= threshold] * soft-CE(logits_i, target_i)``."""
    per_example = -(target * F.log_softmax(logits, dim=1)).sum(1)
    return (per_example * (conf >= threshold)).mean()


@CLIENT_STRATEGIES.register
class EMATeacher(ClientTrainer):
    """Semi-ViT: each step minimises ``ctx.loss`` on the labelled examples plus ``lambda_u * L_u`` on the
    unlabelled ones (label -1): the teacher's softmax on each unlabelled example gives a pseudo-label and a
    confidence, pairs are mixed by probabilistic pseudo-mixup, and the student's soft cross-entropy on the mixed
    examples counts where the mixed confidence reaches the threshold. After each step the teacher moves
    towards the student (EMA).

    Parameters (the reference's defaults): decay (0.9999), threshold (0.7), lambda_u (5.0), label_smoothing
    (0.1), teacher ("ema"; or "received").

    Federated mapping and deviations: the teacher is per client, kept in ``ctx.state`` as tensors and started
    from the first model the client received; it predicts with ``ctx.task.branch``. With decay 0.9999 and a
    few local steps per round it moves slowly (the reference trains 100 epochs): lower ``decay`` or use
    ``teacher: received`` (the round's global model, frozen) when clients train rarely. The unlabelled examples
    are those of each batch (the reference draws mu = 5 times as many in a separate batch), both views are the
    raw input (fedshift has no augmentation pipeline yet) and the mixing is pixel mixup only (the reference
    switches between mixup and CutMix). Needs ``data.unlabelled > 0``.
    """

    name = "ema_teacher"
    Params = EMATeacherParams

    @classmethod
    def check_scenario(cls, params, scenario):
        if scenario.data.unlabelled > 0:
            return []
        return [("data.unlabelled", "is 0, but client strategy 'ema_teacher' learns from unlabelled examples; "
                                    "set a share of hidden labels, e.g. data.unlabelled: 0.5")]

    def teacher_entries(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        return {k: v for k, v in ctx.model.state_dict().items() if v.is_floating_point()}

    def train(self, ctx: TrainContext) -> dict[str, float]:
        student = self.teacher_entries(ctx)
        if self.params.teacher == "ema" and all(STATE + k in ctx.state for k in student):
            self.teacher = {k: ctx.state[STATE + k].to(ctx.device) for k in student}
        else:
            self.teacher = {k: v.detach().clone() for k, v in student.items()}
        self.mix_generator = device_generator(ctx)
        metrics = super().train(ctx)
        if self.params.teacher == "ema":
            ctx.state.update({STATE + k: v for k, v in self.teacher.items()})
        return metrics

    def loss(self, batch: Batch, ctx: TrainContext):
        model, p = ctx.model, self.params
        loss_x = ctx.loss(model(batch.x), batch)
        unlabelled = batch.y < 0
        xu = batch.x[unlabelled]
        loss_u = torch.zeros((), device=batch.x.device)
        if len(xu):
            model.eval()
            with torch.no_grad():
                probs = functional_call(model, self.teacher, (xu,)).logits[:, ctx.task.branch].softmax(1)
            self.train_mode(ctx)
            perm = torch.randperm(len(xu), generator=self.mix_generator, device=xu.device)
            x_mix, target, conf, _ = prob_pseudo_mixup(xu, probs, perm, p.label_smoothing)
            loss_u = unlabelled_loss(model(x_mix).logits[:, ctx.task.branch], target, conf, p.threshold)
        return loss_x + p.lambda_u * loss_u, {"loss": loss_x, "ema_teacher.loss_u": loss_u}

    def update(self, batch: Batch, ctx: TrainContext):
        metrics = super().update(batch, ctx)  # the step on loss()
        if self.params.teacher == "ema":
            with torch.no_grad():
                ema_update_(self.teacher, ctx.model.state_dict(), self.params.decay)
        return metrics
