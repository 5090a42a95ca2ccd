"""PAINT: patching by weight interpolation (Ilharco et al., "Patching open-vocabulary models by interpolating
weights", NeurIPS 2022; reference code mlfoundations/patching, src/patch.py)."""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, TrainContext
from .erm import ERM

Arrays = dict[str, torch.Tensor]


class PAINTParams(ComponentParams):
    alpha: float = Field(0.5, ge=0, le=1, description="0 returns the received weights, 1 the fine-tuned ones")
    freeze_head: bool = Field(True, description="fine-tune with the heads frozen, as the reference does")


def interpolate(before: Arrays, after: Arrays, alpha: float) -> Arrays:
    """``(1 - alpha) * before + alpha * after`` per entry, written so that alpha 0 and 1 give the endpoints
    bit for bit. Integer entries (counters such as BatchNorm's num_batches_tracked) are not interpolated:
    they take the nearer endpoint's value."""
    out = {}
    for k, a in before.items():
        b = after[k]
        if a.is_floating_point():
            out[k] = (1 - alpha) * a + alpha * b
        else:
            out[k] = (b if alpha >= 0.5 else a).clone()
    return out


@CLIENT_STRATEGIES.register
class PAINT(ERM):
    """PAINT: fine-tune locally (ERM steps on ``ctx.loss``, heads frozen), then return
    ``theta_alpha = (1 - alpha) * theta_received + alpha * theta_finetuned`` for every trained entry.

    Parameters:
        alpha (0.5, the reference's default grid [0.5]), freeze_head (True: the reference patches CLIP with
            its zero-shot head frozen).

    Federated mapping: client-side patching each round, with the received global model as theta_zs (the
    reference's "zero-shot" endpoint); under FedAvg this damps every client update by alpha. Only the
    parameters that trained and the floating buffers are interpolated; frozen parameters (the heads) stay
    bitwise as received. The reference chooses alpha on held-out data; here it is a fixed hyperparameter.
    """

    name = "paint"
    Params = PAINTParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        if self.params.freeze_head:
            keep = {id(p) for p in ctx.trainable_parameters()}
            ctx.task = replace(ctx.task, trainable=[n for n, p in ctx.model.named_parameters()
                                                    if id(p) in keep and not n.startswith("heads.")])
        trained = {id(p) for p in ctx.trainable_parameters()}
        params = dict(ctx.model.named_parameters())
        state = ctx.model.state_dict()
        names = [n for n in state if n not in params or id(params[n]) in trained]  # trained + buffers
        before = {n: state[n].detach().clone() for n in names}
        metrics = super().train(ctx)
        state = ctx.model.state_dict()
        with torch.no_grad():
            for n, v in interpolate(before, {n: state[n] for n in names}, self.params.alpha).items():
                state[n].copy_(v)
        return metrics
