"""JTT: train once to find the examples ERM gets wrong, then train again with those upsampled."""

from __future__ import annotations

import copy
import dataclasses

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams
from fedshift.core.tensors import eval_mode
from fedshift.nets.models import MultiBranchNet

from .base import CLIENT_STRATEGIES, ClientData, TrainContext
from .erm import ERM

INIT, IDENTIFIER = "jtt.init.", "jtt.id."


def error_set(model: MultiBranchNet, data: ClientData, branch: int, batch_size: int = 1024) -> torch.Tensor:
    """Bool mask of the labelled examples whose argmax prediction on ``branch`` is wrong (eval mode)."""
    with eval_mode(model):
        wrong = torch.cat([model(data.x[i:i + batch_size]).logits[:, branch].argmax(-1) != data.y[i:i + batch_size]
                           for i in range(0, len(data), batch_size)])
    return wrong & (data.y >= 0)


def upsample(data: ClientData, errors: torch.Tensor, up_weight: int) -> ClientData:
    """The client's data with ``up_weight`` extra copies of every error example (JTT's reference code)."""
    idx = torch.cat([torch.arange(len(data), device=data.y.device), errors.nonzero().flatten().repeat(up_weight)])
    return dataclasses.replace(data, x=data.x[idx], y=data.y[idx], domain=data.domain[idx])  # keeps data.augment


def snapshot(model: MultiBranchNet, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}


def unprefixed(arrays: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


class JTTParams(ComponentParams):
    id_rounds: int = Field(16, ge=1, description="rounds of stage 1 (ERM) before the error sets are taken")
    up_weight: int = Field(20, ge=0, description="extra copies of each error example in stage 2")


@CLIENT_STRATEGIES.register
class JTT(ERM):
    """JTT: ERM rounds, then training restarted with each client's error set upsampled.

    Liu et al., "Just Train Twice: Improving Group Robustness without Training Group Information", ICML 2021;
    federated with server-phased stages.

    Stage 1, rounds 0 .. id_rounds - 1: ERM. The identification model f_id is the model the clients receive
    in round ``id_rounds`` (the global model after stage 1). Stage 2, from round ``id_rounds``: every client
    trains ERM on its data with ``up_weight`` extra copies of its error set E = {labelled x: argmax f_id(x) != y}
    (each error example occurs 1 + up_weight times per epoch, as in the reference code), starting over
    from the initial model: the clients of round ``id_rounds`` load the round-0 model before training, so
    under plain FedAvg the stage-2 global model is a fresh run's.

    Each client computes E once (at its first stage-2 round) and keeps it in its state. A client first
    sampled after round ``id_rounds`` no longer receives f_id from the server strategy, so this trainer relays
    it: round-``id_rounds`` clients send the model they received (``ctx.stats``), the server keeps it and
    broadcasts it every stage-2 round (``ctx.server``), as it relays the round-0 model to round ``id_rounds``.
    Cost: one model-sized download per stage-2 client per round; stage-2 epochs hold N + up_weight * |E|
    examples. The aggregation weight stays the server strategy's (num_examples = N for FedAvg).

    Domains: none needed; works on any client. Group labels (used by the paper only for model selection)
    are not used.

    Parameters:
        id_rounds (16): rounds of stage 1 (the paper's T, here in rounds; one period of the default scenario).
        up_weight (20): extra copies of each error example (the reference sweeps 20, 50, 100).
    """

    name = "jtt"
    Params = JTTParams

    def __init__(self, params, settings):
        super().__init__(params, settings)
        self._relay: dict[str, torch.Tensor] = {}  # server side: the round-0 and the identification models

    def train(self, ctx: TrainContext) -> dict[str, float]:
        p = self.params
        if ctx.round == 0:
            ctx.stats.update(snapshot(ctx.model, INIT))
        if ctx.round < p.id_rounds:
            return super().train(ctx) | {"jtt.stage": 1.0}
        if ctx.round == p.id_rounds:
            ctx.stats.update(snapshot(ctx.model, IDENTIFIER))
        if "jtt.errors" not in ctx.state:
            ctx.state["jtt.errors"] = self.identify(ctx).to(torch.uint8).cpu()
        if ctx.round == p.id_rounds and any(k.startswith(INIT) for k in ctx.server):
            ctx.model.load_state_dict(unprefixed(ctx.server, INIT), strict=False)
        errors = ctx.state["jtt.errors"].to(ctx.device).bool()
        full = ctx.data
        ctx.data = upsample(full, errors, p.up_weight)
        try:
            metrics = super().train(ctx)
        finally:
            ctx.data = full
        return metrics | {"jtt.stage": 2.0, "jtt.errors": float(errors.sum())}

    def identify(self, ctx: TrainContext) -> torch.Tensor:
        """The error set under f_id: the received model in round ``id_rounds``, the relayed one later (or the
        received model if no round-``id_rounds`` client succeeded, so nothing was relayed)."""
        relayed = unprefixed(ctx.server, IDENTIFIER)
        if ctx.round == self.params.id_rounds or not relayed:
            return error_set(ctx.model, ctx.data, ctx.task.branch)
        model = copy.deepcopy(ctx.model)
        model.load_state_dict(relayed, strict=False)
        return error_set(model, ctx.data, ctx.task.branch)

    def aggregate_stats(self, server_round, stats):
        for prefix in (INIT, IDENTIFIER):
            # every client received the same model: keep the first reply's copy
            sent = next((s for _, _, s in stats if any(k.startswith(prefix) for k in s)), None)
            if sent is not None:
                self._relay.update({k: v for k, v in sent.items() if k.startswith(prefix)})
        out = {}
        if server_round == self.params.id_rounds - 1:
            out.update({k: v for k, v in self._relay.items() if k.startswith(INIT)})
        if server_round >= self.params.id_rounds:
            out.update({k: v for k, v in self._relay.items() if k.startswith(IDENTIFIER)})
        return out
