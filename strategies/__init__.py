"""Server strategies (federated algorithms), selected by ``strategy.name`` in a scenario."""

from .base import (
                   STRATEGIES,
                   ClientInstruction,
                   ClientJob,
                   ClientReply,
                   ClientResult,
                   ClientSpec,
                   ServerStrategy,
                   StrategyParams,
                   StrategySetup,
)
from .fedavg import FedAvg
from .fedprox import FedProx
from .fedtem import FedTEM
from .fedtkm import FedTKM
from .ifca import IFCA
from .oracle import Oracle
from .pluralistic import Pluralistic
from .prior_ifca import PriorIFCA
from .server_optimizer import ModelStrategy

__all__ = ["IFCA", "STRATEGIES", "ModelStrategy", "ClientInstruction", "ClientJob", "ClientReply", "ClientResult", "ClientSpec", "FedAvg",
           "FedProx", "FedTEM", "FedTKM", "Oracle", "Pluralistic", "PriorIFCA", "ServerStrategy", "StrategyParams", "StrategySetup"]
