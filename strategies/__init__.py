"""Server strategies (federated algorithms), selected by ``strategy.name`` in a scenario."""

from .base import (STRATEGIES, ClientInstruction, ClientJob, ClientReply, ClientResult, ClientSpec,
                   ServerStrategy, StrategyParams, StrategySetup)
from .fedavg import FedAvg

__all__ = ["STRATEGIES", "ClientInstruction", "ClientJob", "ClientReply", "ClientResult", "ClientSpec", "FedAvg",
           "ServerStrategy", "StrategyParams", "StrategySetup"]
