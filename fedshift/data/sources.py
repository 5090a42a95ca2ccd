"""Dataset sources: where the examples of each mode come from.

A source returns numpy arrays (images as float32 [N, C, H, W] in [0, 1], labels as int64) with a train and a
test split, and natural client ids (writers) where the dataset has them. Sources are registered by name and
declare their options as a pydantic ``Params`` model, written in the scenario as
``data.dataset: {name: synthetic, shape: [1, 28, 28]}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import Field

from fedshift.core.params import ComponentParams
from fedshift.core.registry import Registry

from ..core.seeding import DataStream, Stream, rng_of

DATASETS: Registry[type[DatasetSource]] = Registry("dataset")



@dataclass
class SourceData:
    """One dataset, loaded: a train split, a test split, and optional natural client ids of the train split."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_groups: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


class DatasetSource:
    """Base class: subclasses set ``name``, ``Params`` and implement ``load``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[ComponentParams]] = ComponentParams
    has_natural_ids: ClassVar[bool] = False

    def __init__(self, params: ComponentParams):
        self.params = params

    def load(self, seed: int, test_fraction: float) -> SourceData:
        raise NotImplementedError


def split_train_test(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, groups: np.ndarray | None = None) -> SourceData:
    """A stratified train/test split (each class keeps the test fraction), seeded."""
    rng = rng_of(seed, Stream.DATA, DataStream.SPLIT)
    test_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    return SourceData(x[~test_mask], y[~test_mask], x[test_mask], y[test_mask],
                      None if groups is None else groups[~test_mask])


@DATASETS.register
class Digits(DatasetSource):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes); offline."""

    name = "digits"

    def load(self, seed: int, test_fraction: float) -> SourceData:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
        return split_train_test(x, bunch.target.astype(np.int64), test_fraction, seed)


class SyntheticParams(ComponentParams):
    shape: list[int] = Field(default_factory=lambda: [1, 8, 8], description="example shape, e.g. [1, 28, 28]")
    classes: int = Field(10, ge=2)
    train_size: int = Field(2000, ge=1)
    test_size: int = Field(500, ge=1)
    noise: float = Field(0.5, ge=0, description="std of the noise around each class's prototype")
    writers: int = Field(0, ge=0, description="> 0 gives natural client ids (round-robin writers)")


@DATASETS.register
class Synthetic(DatasetSource):
    """Labelled image-shaped data of any size: a random prototype per class plus Gaussian noise."""

    name = "synthetic"
    Params = SyntheticParams
    has_natural_ids = True

    def load(self, seed: int, test_fraction: float) -> SourceData:
        p: SyntheticParams = self.params  # type: ignore[assignment]
        rng = rng_of(seed, Stream.DATA, DataStream.SYNTHETIC)
        protos = rng.uniform(0, 1, size=(p.classes, *p.shape)).astype(np.float32)

        def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
            y = rng.integers(0, p.classes, size=n)
            x = protos[y] + rng.normal(0, p.noise, size=(n, *p.shape)).astype(np.float32)
            return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)

        train_x, train_y = draw(p.train_size)
        test_x, test_y = draw(p.test_size)
        groups = np.arange(p.train_size) % p.writers if p.writers else None
        return SourceData(train_x, train_y, test_x, test_y, groups)
