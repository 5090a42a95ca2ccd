"""Datasets, modes and partitions."""

from .federation import Federation, build_federation
from .sources import DATASETS, DatasetSource, SourceData

__all__ = ["DATASETS", "DatasetSource", "Federation", "SourceData", "build_federation"]
