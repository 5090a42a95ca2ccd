"""Datasets, modes and partitions."""

from . import (
    hf,  # noqa: F401  (registers the hub datasets: emnist, cifar10, cifar100)
    stackoverflow,  # noqa: F401  (registers stackoverflow)
)
from .federation import Federation, build_federation
from .sources import DATASETS, DatasetSource, SourceData

__all__ = ["DATASETS", "DatasetSource", "Federation", "SourceData", "build_federation"]
