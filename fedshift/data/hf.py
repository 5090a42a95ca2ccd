"""The download datasets of the paper's tasks, from the Hugging Face hub: EMNIST (as FEMNIST), CIFAR-10, CIFAR-100.

Where the files come from (the ``path`` option):

- ``path`` not set: ``datasets.load_dataset(repo)`` downloads the hub repository once into the Hugging Face cache
  (``~/.cache/huggingface``; ``HF_HUB_OFFLINE=1`` reuses that cache without the network). Needs
  ``pip install 'fedshift[datasets]'``.
- ``path: DIR``: a local folder holding the repository's parquet files in the hub's own layout, read with pyarrow
  alone (no ``datasets`` package, no network). On a machine with network, ``hf download REPO --repo-type dataset
  --local-dir DIR`` writes exactly that folder (``data/train-00000-of-00001.parquet`` for ``flwrlabs/femnist``,
  ``plain_text/{train,test}-*.parquet`` for ``uoft-cs/cifar10``, ``cifar100/{train,test}-*.parquet`` for
  ``uoft-cs/cifar100``). A relative path is relative to the scenario file.

Both routes give the same Arrow table, whose image column is the hub's image struct ``{bytes, path}`` holding PNG
bytes, and the same code decodes it. Anything that stops a dataset from loading (no network, a missing package,
missing files or columns) raises ``DatasetUnavailable`` saying what is missing and how to get it.

Splits in a local folder are found by name: a parquet file belongs to split ``train`` when ``train`` is a whole
word of its path below the folder (``data/train-00000-of-00002.parquet``, ``train/0000.parquet``).
"""

from __future__ import annotations

import importlib
import io
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from fedshift.core.errors import DatasetUnavailable
from fedshift.core.params import ComponentParams

from ..core.seeding import DataStream, Stream, rng_of
from .sources import DATASETS, DatasetSource, SourceData, split_train_test

INSTALL_HINT = "pip install 'fedshift[datasets]'"



def whole_groups_under_cap(groups: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Rows of whole groups (writers, users), drawn in a seeded random order until ``cap`` rows are reached
    (at least one group), so a capped dataset keeps natural clients intact."""
    sizes = np.bincount(groups)
    order = rng_of(seed, Stream.DATA, DataStream.SUBSET).permutation(len(sizes))
    kept = order[: max(1, int(np.searchsorted(np.cumsum(sizes[order]), cap, side="right")))]
    return np.flatnonzero(np.isin(groups, kept))

class HubParams(ComponentParams):
    path: str | None = Field(None, description="local folder with the repository's parquet files in the hub's layout "
                                               "(hf download REPO --repo-type dataset --local-dir DIR); "
                                               "not set: download REPO from the hub")
    repo: str = Field("", description="Hugging Face hub dataset id")
    max_examples: int | None = Field(None, ge=1, description="cap on the examples read from the train split, drawn "
                                                             "at random before decoding")


class EMNISTParams(HubParams):
    repo: str = Field("flwrlabs/femnist", description="Hugging Face hub dataset id (FEMNIST layout)")


class CIFARParams(HubParams):
    crop: int | None = Field(None, ge=1, le=32, description="center crop to crop x crop pixels (the paper: 24)")
    standardize: bool = Field(False, description="per-image standardization, as tf.image.per_image_standardization")


class CIFAR10Params(CIFARParams):
    repo: str = Field("uoft-cs/cifar10", description="Hugging Face hub dataset id")


class CIFAR100Params(CIFARParams):
    repo: str = Field("uoft-cs/cifar100", description="Hugging Face hub dataset id")


def _import(module: str, purpose: str, name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DatasetUnavailable(f"dataset {name!r}: {purpose} needs the Python package {module.split('.')[0]!r}, "
                                 f"which is not installed; install it with: {INSTALL_HINT}") from None


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def split_of(relative: Path, splits: tuple[str, ...]) -> str | None:
    """The split a parquet file belongs to: the split name that is a whole word of its path, if exactly one is."""
    words = set(re.split(r"[/\\._-]", relative.as_posix().lower()))
    found = [s for s in splits if s in words]
    return found[0] if len(found) == 1 else None


class HubImageSource(DatasetSource):
    """An image-classification dataset stored on the hub as parquet (image struct + label column).

    Subclasses set ``image_column``, ``label_column``, ``pil_mode`` ("L" or "RGB"), optionally ``writer_column``,
    and implement ``load`` with ``read_splits`` and ``decode``.
    """

    image_column: ClassVar[str] = "image"
    label_column: ClassVar[str] = "label"
    writer_column: ClassVar[str | None] = None
    pil_mode: ClassVar[str] = "L"
    splits: ClassVar[tuple[str, ...]] = ("train", "test")

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.image_column, self.label_column, self.writer_column) if c]

    def read_splits(self) -> dict[str, Any]:
        """Split name -> pyarrow Table holding ``columns``, from ``path`` if set, else from the hub."""
        tables = self._read_local(Path(self.params.path)) if self.params.path else self._read_hub()
        if "train" not in tables:
            raise DatasetUnavailable(f"dataset {self.name!r}: {self._where()} has no 'train' split "
                                     f"(splits found: {', '.join(sorted(tables)) or 'none'})")
        for split, table in tables.items():
            missing = [c for c in self.columns if c not in table.column_names]
            if missing:
                raise DatasetUnavailable(f"dataset {self.name!r}: the {split!r} split of {self._where()} has columns "
                                         f"{table.column_names}, without {missing}; is it a copy of {self.params.repo!r}?")
        return {split: table.select(self.columns) for split, table in tables.items()}

    def _where(self) -> str:
        return f"folder {self.params.path}" if self.params.path else f"hub dataset {self.params.repo!r}"

    def _read_local(self, root: Path) -> dict[str, Any]:
        if not root.is_dir():
            raise DatasetUnavailable(f"dataset {self.name!r}: path {str(root)!r} is not a folder. Put the parquet files "
                                     f"of {self.params.repo!r} there (hf download {self.params.repo} --repo-type dataset "
                                     f"--local-dir {root}) or leave path unset to download from the hub")
        pq = _import("pyarrow.parquet", "reading parquet files", self.name)
        pa = _import("pyarrow", "reading parquet files", self.name)
        files: dict[str, list[Path]] = {}
        for f in sorted(root.rglob("*.parquet")):
            rel = f.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):  # hf download's .cache folder
                continue
            split = split_of(rel, self.splits)
            if split is not None:
                files.setdefault(split, []).append(f)
        if "train" not in files:
            raise DatasetUnavailable(f"dataset {self.name!r}: no parquet file of the 'train' split under {root} "
                                     f"(expected the hub's layout, e.g. data/train-00000-of-00001.parquet, as "
                                     f"'hf download {self.params.repo} --repo-type dataset --local-dir {root}' writes it)")
        try:
            return {split: pa.concat_tables([pq.read_table(f) for f in paths]) for split, paths in files.items()}
        except (OSError, pa.ArrowException) as exc:
            raise DatasetUnavailable(f"dataset {self.name!r}: cannot read the parquet files under {root}: {exc}") from None

    def _read_hub(self) -> dict[str, Any]:
        repo = self.params.repo
        datasets = _import("datasets", f"downloading {repo!r} from the Hugging Face hub (or pass path: a local folder "
                                       f"with its parquet files)", self.name)
        try:
            loaded = datasets.load_dataset(repo)
        except Exception as exc:  # noqa: BLE001 - any failure of the download library means "not available here"
            raise DatasetUnavailable(
                f"dataset {self.name!r}: could not load {repo!r} from the Hugging Face hub "
                f"({type(exc).__name__}: {first_line(exc)}). Without network, download it on another machine with "
                f"'hf download {repo} --repo-type dataset --local-dir DIR', copy DIR here and pass path: DIR "
                f"(or set HF_HUB_OFFLINE=1 to reuse a Hugging Face cache that already holds it)") from None
        return {split: ds.with_format("arrow")[:] for split, ds in loaded.items()}

    def capped_train(self, tables: dict[str, Any], seed: int) -> Any:
        """The train split, cut to ``max_examples`` rows (``subset_rows``) before anything is decoded."""
        rows = self.subset_rows(tables["train"], seed)
        return tables["train"] if rows is None else tables["train"].take(rows)

    def subset_rows(self, table: Any, seed: int) -> np.ndarray | None:
        """Rows of the train split kept under ``max_examples`` (None: all), drawn at random."""
        cap = self.params.max_examples
        if cap is None or cap >= table.num_rows:
            return None
        rng = rng_of(seed, Stream.DATA, DataStream.SUBSET)
        return np.sort(rng.choice(table.num_rows, size=cap, replace=False))

    def decode(self, table: Any) -> np.ndarray:
        """The image column (the hub's struct of encoded ``bytes`` and ``path``) as uint8 [N, C, H, W]."""
        Image = _import("PIL.Image", "decoding images", self.name)
        pa = _import("pyarrow", "reading parquet files", self.name)
        column = table.column(self.image_column)
        kind = column.type
        if not (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0):
            raise DatasetUnavailable(f"dataset {self.name!r}: column {self.image_column!r} of {self._where()} is "
                                     f"{kind}, not the hub's image struct {{bytes, path}}")
        if len(column) == 0:
            raise DatasetUnavailable(f"dataset {self.name!r}: a split of {self._where()} holds no images")
        blobs = column.combine_chunks().field("bytes").to_pylist()
        out: np.ndarray | None = None
        for i, blob in enumerate(blobs):
            if blob is None:
                raise DatasetUnavailable(f"dataset {self.name!r}: image {i} of {self._where()} has no embedded bytes "
                                         "(the hub's parquet files embed every image)")
            try:
                img = np.asarray(Image.open(io.BytesIO(blob)).convert(self.pil_mode))
            except OSError as exc:
                raise DatasetUnavailable(f"dataset {self.name!r}: image {i} of {self._where()} cannot be decoded: "
                                         f"{exc}") from None
            img = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
            if out is None:
                out = np.empty((len(blobs), *img.shape), dtype=np.uint8)
            elif img.shape != out.shape[1:]:
                raise DatasetUnavailable(f"dataset {self.name!r}: image {i} of {self._where()} is {img.shape} "
                                         f"(C, H, W), the first one {out.shape[1:]}; all images must have one size")
            out[i] = img
        return out

    def labels(self, table: Any) -> np.ndarray:
        return table.column(self.label_column).to_numpy().astype(np.int64)


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]."""
    x = images.astype(np.float32)
    x /= 255
    return x


def writer_holdout(groups: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Test mask holding out round(n * test_fraction) random examples of each writer (n examples), keeping at least
    one training example per writer."""
    n = len(groups)
    order = np.lexsort((rng.random(n), groups))  # by writer, random within a writer
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]) if n else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, counts)
    n_test = np.minimum(np.rint(counts * test_fraction), counts - 1)
    mask = np.zeros(n, dtype=bool)
    mask[order] = rank < np.repeat(n_test, counts)
    return mask


@DATASETS.register
class EMNIST(HubImageSource):
    """EMNIST, 62 classes, as FEMNIST (hub ``flwrlabs/femnist``): handwriting by 3,597 writers, one client each.

    FEMNIST (LEAF; Caldas et al. 2018) holds 814,277 28x28 grayscale images of NIST SD 19 with their writers.
    Labels are the ``character`` column: digits 0-9, uppercase letters A-Z 10-35,
    lowercase a-z 36-61, so the paper's day (digits) / night (letters) modes are ``labels:`` subsets of the
    scenario. Natural client ids are the writers (``writer_id``), numbered in sorted order.

    Parameters:
        path (None): local folder with the repository's parquet files; not set: download ``repo``.
        repo ("flwrlabs/femnist"): hub dataset id.
        max_examples (None): cap on the examples read; whole writers are kept, drawn at random, until the next
            writer would pass the cap (at least one writer).

    The hub repository has only a train split: each writer's examples are split at random, round(n *
    data.test_fraction) of them to the test split (at least one kept for training), as LEAF's per-writer sample
    split does. A ``test`` split in the folder or repository is used instead when there is one. Pixels are the
    stored gray values / 255, not inverted.
    """

    name = "emnist"
    Params = EMNISTParams
    has_natural_ids = True
    image_column = "image"
    label_column = "character"
    writer_column = "writer_id"
    pil_mode = "L"

    def subset_rows(self, table: Any, seed: int) -> np.ndarray | None:
        cap = self.params.max_examples
        if cap is None or cap >= table.num_rows:
            return None
        return whole_groups_under_cap(self.writer_codes(table), cap, seed)

    def writer_codes(self, table: Any) -> np.ndarray:
        ids = table.column(self.writer_column).to_numpy(zero_copy_only=False)
        return np.unique(ids.astype(str), return_inverse=True)[1].astype(np.int64)

    def load(self, seed: int, test_fraction: float) -> SourceData:
        tables = self.read_splits()
        train = self.capped_train(tables, seed)
        pixels = self.decode(train)  # uint8: split before the 4x larger float copy
        y = self.labels(train)
        groups = self.writer_codes(train)
        if "test" in tables:
            test = tables["test"]
            return SourceData(to_unit(pixels), y, to_unit(self.decode(test)), self.labels(test), groups)
        test_mask = writer_holdout(groups, test_fraction, rng_of(seed, Stream.DATA, DataStream.HOLDOUT))
        return SourceData(to_unit(pixels[~test_mask]), y[~test_mask], to_unit(pixels[test_mask]), y[test_mask],
                          groups[~test_mask])


def center_crop(x: np.ndarray, size: int) -> np.ndarray:
    """The central size x size window of [N, C, H, W] images (offset floor((H - size) / 2), as
    tf.image.resize_with_crop_or_pad)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(x[..., top:top + size, left:left + size])


def per_image_standardization(x: np.ndarray) -> np.ndarray:
    """tf.image.per_image_standardization of each image of [N, C, H, W] pixel values (uint8, 0-255):
    (x - mean) / max(std, 1 / sqrt(C * H * W)), mean and (population) std over the whole image."""
    flat = x.reshape(len(x), -1)
    out = np.empty(flat.shape, dtype=np.float32)
    for lo in range(0, len(flat), 4096):  # float64 in chunks: exact without a float64 copy of the whole split
        chunk = flat[lo:lo + 4096].astype(np.float64)
        mean = chunk.mean(axis=1, keepdims=True)
        std = np.maximum(chunk.std(axis=1, keepdims=True), 1.0 / np.sqrt(flat.shape[1]))
        out[lo:lo + 4096] = (chunk - mean) / std
    return out.reshape(x.shape)


class CIFAR(HubImageSource):
    """CIFAR (Krizhevsky 2009) from the hub: 32x32 RGB images, official train (50,000) and test (10,000) splits.

    ``crop`` and ``standardize`` reproduce the paper's preprocessing (the reference code casts the uint8 image to
    float, center-crops it with tf.image.resize_with_crop_or_pad, then applies tf.image.per_image_standardization):
    standardization works on pixel values in [0, 255], so its 1/sqrt(n) floor on the std matches TensorFlow's, and
    standardized images are not in [0, 1]. A repository without a test split gets a stratified hold-out of
    data.test_fraction. Subclasses name the repository and the label column.
    """

    Params = CIFARParams
    image_column = "img"
    pil_mode = "RGB"

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        crop = self.params.crop
        if crop is not None:
            if crop > min(images.shape[-2:]):
                raise DatasetUnavailable(f"dataset {self.name!r}: crop {crop} is larger than its images "
                                         f"({images.shape[-2]}x{images.shape[-1]})")
            images = center_crop(images, crop)
        return per_image_standardization(images) if self.params.standardize else to_unit(images)

    def load(self, seed: int, test_fraction: float) -> SourceData:
        tables = self.read_splits()
        train = self.capped_train(tables, seed)
        x, y = self.preprocess(self.decode(train)), self.labels(train)
        if "test" not in tables:
            return split_train_test(x, y, test_fraction, seed)
        test = tables["test"]
        return SourceData(x, y, self.preprocess(self.decode(test)), self.labels(test))


@DATASETS.register
class CIFAR10(CIFAR):
    """CIFAR-10 (hub ``uoft-cs/cifar10``, label column ``label``, 10 classes); the paper's day mode.

    Parameters:
        path (None): local folder with the repository's parquet files; not set: download ``repo``.
        repo ("uoft-cs/cifar10"): hub dataset id.
        max_examples (None): cap on the training examples read, a random subset.
        crop (None): center crop size; the paper uses 24.
        standardize (False): per-image standardization, as tf.image.per_image_standardization.
    """

    name = "cifar10"
    Params = CIFAR10Params
    label_column = "label"


@DATASETS.register
class CIFAR100(CIFAR):
    """CIFAR-100 with its 100 fine labels (hub ``uoft-cs/cifar100``, column ``fine_label``); the paper's night mode.

    Parameters:
        path (None): local folder with the repository's parquet files; not set: download ``repo``.
        repo ("uoft-cs/cifar100"): hub dataset id.
        max_examples (None): cap on the training examples read, a random subset.
        crop (None): center crop size; the paper uses 24.
        standardize (False): per-image standardization, as tf.image.per_image_standardization.
    """

    name = "cifar100"
    Params = CIFAR100Params
    label_column = "fine_label"
