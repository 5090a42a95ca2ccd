"""FedIIR: federated invariant learning through the consistency of clients' classifier gradients."""

from __future__ import annotations

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext

PREFIX = "fediir."


def mean_key(branch: int, i: int) -> str:
    return f"{PREFIX}mean.{branch}.{i}"


def classifier_parameters(ctx: TrainContext) -> list[torch.nn.Parameter]:
    """The classifier FedIIR regularises: the head of the branch the task trains (weight, bias)."""
    params = list(ctx.model.heads[ctx.task.branch].parameters())
    if not all(p.requires_grad for p in params):
        raise ValueError("client strategy 'fediir' regularises the gradient of the task branch's head, but the head "
                         "is frozen in this scenario")
    return params


def gradient_penalty(grads: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """sum over the classifier's tensors of ||g - target||^2."""
    return sum((g - t).pow(2).sum() for g, t in zip(grads, target))


class FedIIRParams(ComponentParams):
    penalty: float = Field(1e-3, ge=0, description="weight of the gradient-inconsistency penalty "
                                                   "sum ||grad_w L_client - g_mean||^2 over the classifier")
    ema: float = Field(0.95, ge=0, le=1, description="the global mean gradient is an exponential moving average: "
                                                     "g <- ema * g + (1 - ema) * this round's mean")


@CLIENT_STRATEGIES.register
class FedIIR(ClientTrainer):
    """FedIIR: penalise the distance of each batch's classifier gradient to the clients' mean classifier gradient.

    Guo, Guo, Cao, Wu, Chang, "Out-of-Distribution Generalization of Federated Learning via Implicit Invariant
    Relationships", ICML 2023; as the authors' code (YamingGuo98/FedIIR) and FL-bench's ``FedIIR``.

    Per batch (w = the task branch's head, its weight and bias):

        loss = task + penalty * sum_w || grad_w task(batch) - g_mean ||^2

    with the gradient taken with create_graph, so the penalty trains the trunk (and the head) to make the
    classifier's gradient the same on every client: an implicit invariant relationship across domains.

    Mean gradient through the server (D3): at the start of its round each client computes grad_w task on every
    batch of its data (at most client.max_steps batches) at the model it received (no step: one extra pass of
    forward and backward per round), and sends the sum and the number of batches
    (``fediir.sum.<branch>.<i>``, ``fediir.batches.<branch>``) with the g_mean it used (``fediir.prev...``, so
    the server keeps no state of its own and a resumed run continues the average);
    ``aggregate_stats`` forms the mean over all batches of all clients and g_mean <- ema * g_mean + (1 - ema) *
    mean, broadcast as ``fediir.mean.<branch>.<i>`` to the next round's clients. g_mean starts at 0 (as the
    authors' code); under server algorithms that train several branches there is one g_mean per branch. Uplink
    and downlink: the head's size (C D + C floats; twice on the uplink) per branch.

    Domains: each client is one environment, whatever modes it holds: FedIIR's invariance is across clients, so it
    runs on mixed and single-mode clients alike (the paper: one domain per client).

    Parameters (the authors' defaults): penalty (1e-3; their per-dataset choices range 5e-4 to 1e-2), ema (0.95).

    Deviation from the reference: the authors' server computes the new mean gradient at the current global model
    from the clients selected this round, in an extra exchange before training; here it comes from the previous
    round's clients at the previous global model (one round stale; g_mean is 0 in round 0, where the reference
    uses 0.05 x the first mean). A round in which every client fails resets g_mean to 0.
    """

    name = "fediir"
    Params = FedIIRParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        self.train_mode(ctx)
        branch = ctx.task.branch
        params = classifier_parameters(ctx)
        self._params = params
        self._target = [ctx.server[mean_key(branch, i)].to(p.device, p.dtype) if mean_key(branch, i) in ctx.server
                        else torch.zeros_like(p) for i, p in enumerate(params)]
        sums, batches = self.gradient_sums(ctx, params)
        metrics = super().train(ctx)
        ctx.stats.update({f"{PREFIX}sum.{branch}.{i}": s.cpu() for i, s in enumerate(sums)})
        ctx.stats.update({f"{PREFIX}prev.{branch}.{i}": t.detach().cpu() for i, t in enumerate(self._target)})
        ctx.stats[f"{PREFIX}batches.{branch}"] = torch.tensor(float(batches))
        return metrics

    def gradient_sums(self, ctx: TrainContext, params: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], int]:
        """Sum over the client's batches (at most client.max_steps of them) of grad_w task at the received model,
        and the number of batches."""
        sums = [torch.zeros_like(p) for p in params]
        batches = 0
        for batch in ctx.data.batches(self.settings.batch_size, ctx.generator):
            grads = torch.autograd.grad(ctx.loss(ctx.model(batch.x), batch), params, allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:
                    s.add_(g)
            batches += 1
            if self.settings.max_steps is not None and batches >= self.settings.max_steps:
                break
        return sums, batches

    def loss(self, batch: Batch, ctx: TrainContext):
        task = ctx.loss(ctx.model(batch.x), batch)
        grads = torch.autograd.grad(task, self._params, create_graph=True)
        penalty = gradient_penalty(list(grads), self._target)
        return task + self.params.penalty * penalty, {"loss": task, "fediir.penalty": penalty}

    def aggregate_stats(self, server_round, stats):
        out: dict[str, torch.Tensor] = {}
        branches = sorted({int(k.rsplit(".", 1)[1]) for _, _, s in stats for k in s if k.startswith(f"{PREFIX}batches.")})
        for b in branches:
            clients = [s for _, _, s in stats if f"{PREFIX}batches.{b}" in s]
            total = sum(float(s[f"{PREFIX}batches.{b}"]) for s in clients)
            if total <= 0:
                continue
            i = 0
            while f"{PREFIX}sum.{b}.{i}" in clients[0]:
                mean = sum(s[f"{PREFIX}sum.{b}.{i}"].double() for s in clients) / total
                prev = clients[0][f"{PREFIX}prev.{b}.{i}"].double()
                out[mean_key(b, i)] = (self.params.ema * prev + (1 - self.params.ema) * mean).float()
                i += 1
        return out
