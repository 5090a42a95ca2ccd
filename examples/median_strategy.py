"""A custom server strategy: coordinate-wise median aggregation (Yin et al., ICML 2018), as a user would
write it by subclassing FedAvg and overriding one hook.

    fedshift run --set strategy.name=examples.median_strategy:FedMedian

(run from the repository root, so that ``examples`` is importable).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from fedshift.strategies import ClientReply, FedAvg
from fedshift.strategies.base import mean_metric


class FedMedian(FedAvg):
    """FedAvg whose aggregate is the coordinate-wise median of the client models (robust to a few outliers)."""

    name = "fedmedian"

    def aggregate_train(self, server_round: int, replies: Sequence[ClientReply]) -> dict[str, float]:
        ok = replies  # usable replies only: the round loop screens failed and non-finite ones
        if ok:
            update = {}
            for name, g in self.opt.arrays.items():
                stacked = torch.stack([r.arrays[name].to(torch.float64) for r in ok if name in r.arrays])
                update[name] = stacked.median(dim=0).values - g.to(torch.float64)
            self.opt.step(update)  # the server optimizer applies the median update
        return {"train/loss": mean_metric(ok, "loss")}
