"""LP-FT: linear-probe rounds, then fine-tuning (Kumar et al., "Fine-Tuning can Distort Pretrained Features
and Underperform Out-of-Distribution", ICLR 2022; reference code AnanyaKumar/transfer_learning)."""

from __future__ import annotations

from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, TrainContext
from .erm import ERM


class LPFTParams(ComponentParams):
    probe_rounds: int = Field(16, ge=0, description="rounds 0 .. probe_rounds-1 train only the head (linear "
                                                    "probe); later rounds fine-tune everything")
    trunk_eval: bool = Field(True, description="keep the trunk in eval mode while fine-tuning too (dropout off, "
                                               "BatchNorm statistics frozen): the reference's use_net_val_mode")


@CLIENT_STRATEGIES.register
class LPFT(ERM):
    """LP-FT: while ``ctx.round < probe_rounds`` only the head of ``ctx.task.branch`` trains (the trunk in eval
    mode, bitwise unchanged), then every parameter trains; both stages take ERM steps on ``ctx.loss``.

    Parameters:
        probe_rounds (16: one default shift period, so the probe sees a whole day/night swing; the reference
            phases by epochs, not rounds), trunk_eval (True, as the reference's main LP-FT runs).

    Federated mapping (reference section 11 (d)): the server's round schedules the phases; the probe is SGD
    on the logistic loss (the federated analogue of the reference's full-batch L-BFGS) and the fine-tuning
    stage starts from the aggregated probe head. Meant to start from ``model.pretrained``; without it the
    probe trains on the random trunk's features. Every parameter still travels during the probe (the
    trunk's update is exactly zero), because what travels is fixed for the whole run.
    """

    name = "lpft"
    Params = LPFTParams

    def probing(self, ctx: TrainContext) -> bool:
        return ctx.round < self.params.probe_rounds

    def train(self, ctx: TrainContext) -> dict[str, float]:
        if not self.probing(ctx):
            return super().train(ctx) | {"lpft.probe": 0.0}
        head = f"heads.{ctx.task.branch}."
        # frozen for the probe only, so that backward stops at the head (a probe costs about one inference pass)
        frozen = [p for n, p in ctx.model.named_parameters() if p.requires_grad and not n.startswith(head)]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return super().train(ctx) | {"lpft.probe": 1.0}
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def train_mode(self, ctx: TrainContext) -> None:
        ctx.model.train()
        if self.params.trunk_eval or self.probing(ctx):
            ctx.model.trunk.eval()
