"""Client training strategies (robustness methods), selected by ``client.strategy`` in a scenario."""

from .base import CLIENT_STRATEGIES, Batch, ClientData, ClientTrainer, TrainContext, TrainTask
from .erm import ERM

__all__ = ["CLIENT_STRATEGIES", "ERM", "Batch", "ClientData", "ClientTrainer", "TrainContext", "TrainTask"]
