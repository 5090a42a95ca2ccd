"""Deep CORAL: align the first and second moments of the features of different domains."""

from __future__ import annotations

import torch
from pydantic import Field

from fedshift.core.params import ComponentParams

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .utils import domain_masks


def masked_moments(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``masks`` ([E, B]): example count [E], feature mean [E, D] and covariance [E, D, D] (1/(n-1)),
    without host synchronisation (rows with fewer than two examples give meaningless moments)."""
    w = masks.to(features.dtype)
    n = w.sum(1)
    mean = (w @ features) / n.clamp(min=1)[:, None]
    centred = (features[None] - mean[:, None]) * w[..., None]
    cov = centred.transpose(1, 2) @ centred / (n - 1).clamp(min=1)[:, None, None]
    return n, mean, cov


def coral_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor,
                   cov_b: torch.Tensor) -> torch.Tensor:
    """DomainBed's CORAL penalty between two domains: mean over d of (mu_a - mu_b)^2 plus mean over d^2 of
    (C_a - C_b)^2 (4x Sun & Saenko's 1/(4 d^2) ||C_a - C_b||_F^2, plus a first-moment term)."""
    return (mean_a - mean_b).pow(2).mean(-1) + (cov_a - cov_b).pow(2).mean((-2, -1))


def feature_sums(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``masks``: count, sum and sum of outer products of the features, in float64 (they are
    summed over steps and clients)."""
    f, w = features.double(), masks.double()
    return w.sum(1), w @ f, torch.einsum("eb,bi,bj->eij", w, f, f)


def sums_to_stats(domains: list[int], sums: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The statistics a client sends: ``coral.{n,sum,outer}.<mode>`` for each of its modes."""
    return {f"coral.{key}.{mode}": value[e] for e, mode in enumerate(domains)
            for key, value in zip(("n", "sum", "outer"), sums)}


def pooled_moments(n: torch.Tensor, total: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (1/(n-1)) of examples known by their count, sum and sum of outer products."""
    mean = total / n
    return mean, (outer - n * torch.outer(mean, mean)) / (n - 1)


class CORALParams(ComponentParams):
    penalty_weight: float = Field(1.0, ge=0, description="weight of the CORAL penalty")


@CLIENT_STRATEGIES.register
class CORAL(ClientTrainer):
    """Deep CORAL: penalise differences of feature means and covariances between modes (D3 moments).

    Sun & Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation", ECCV Workshops 2016; as
    DomainBed's ``CORAL`` (mean + covariance penalty, averaged over pairs of domains).

    loss = task loss + penalty_weight * mean over domain pairs (i, j) of coral_distance(moments_i, moments_j),
    on the model's features (the trunk output).

    Domains: D1 on mixed clients: the pairs of the client's modes, with both sides' moments from the batch
    (a pair counts when both sides have >= 2 examples in it). D3 for modes the client does not hold: every
    client sends the count, sum and sum of outer products of its features per mode (accumulated over its
    local steps, detached); the server pools them per mode and broadcasts mean and covariance; the next
    round's clients pair each of their own modes (batch moments) with each broadcast mode they do not hold
    (fixed moments). So single-mode clients align to the other modes' moments of the previous round (stale
    by one round; none in round 0, where the penalty is 0). Uplink and downlink: D + D^2 floats per mode.

    Parameters:
        penalty_weight (1.0): gamma (DomainBed mmd_gamma, WILDS coral_penalty_weight).
    """

    name = "coral"
    Params = CORALParams

    def train(self, ctx: TrainContext) -> dict[str, float]:
        self._sums: tuple[torch.Tensor, ...] | None = None
        metrics = super().train(ctx)
        if self._sums is not None:
            ctx.stats.update(sums_to_stats(ctx.data.domains, self._sums))
        return metrics

    def loss(self, batch: Batch, ctx: TrainContext):
        output = ctx.model(batch.x)
        own = ctx.data.domains
        masks = domain_masks(batch, own)
        n, mean, cov = masked_moments(output.features, masks)
        valid = n >= 2
        distances, weights = [], []
        for i in range(len(own)):
            for j in range(i + 1, len(own)):
                distances.append(coral_distance(mean[i], cov[i], mean[j], cov[j]))
                weights.append(valid[i] & valid[j])
            for mode in self.server_modes(ctx):
                if mode not in own:
                    other_mean, other_cov = ctx.server[f"coral.mean.{mode}"], ctx.server[f"coral.cov.{mode}"]
                    distances.append(coral_distance(mean[i], cov[i], other_mean, other_cov))
                    weights.append(valid[i])
        penalty = output.features.new_zeros(())
        if distances:
            w = torch.stack(weights).to(penalty.dtype)
            penalty = (torch.stack(distances) * w).sum() / w.sum().clamp(min=1)
        task = ctx.loss(output, batch)
        sums = feature_sums(output.features.detach(), masks)  # this round's moments, sent to the server
        self._sums = sums if self._sums is None else tuple(a + b for a, b in zip(self._sums, sums))
        return task + self.params.penalty_weight * penalty, {"loss": task, "coral.penalty": penalty}

    @staticmethod
    def server_modes(ctx: TrainContext) -> list[int]:
        return sorted(int(k.rsplit(".", 1)[1]) for k in ctx.server if k.startswith("coral.mean."))

    def aggregate_stats(self, server_round, stats):
        totals: dict[str, torch.Tensor] = {}
        for _, _, client in stats:
            for key, value in client.items():
                if key.startswith("coral."):
                    totals[key] = totals[key] + value.double() if key in totals else value.double()
        out = {}
        for key in totals:
            if key.startswith("coral.n."):
                mode = key.rsplit(".", 1)[1]
                n = totals[key]
                if n >= 2:
                    mean, cov = pooled_moments(n, totals[f"coral.sum.{mode}"], totals[f"coral.outer.{mode}"])
                    out[f"coral.mean.{mode}"], out[f"coral.cov.{mode}"] = mean.float(), cov.float()
        return out
