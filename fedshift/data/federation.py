"""The federation: every client's training data and every mode's test data, built from a scenario.

Clients are numbered mode by mode: mode 0's clients first, then mode 1's, and so on. Each client's examples
are stored contiguously in one array per split, so a client's data is a slice (no copy). Building is
deterministic in the scenario seed; each Ray worker builds it once and keeps it (see ``simulation.worker``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import ModeConfig, Scenario, TransformSpec
from ..errors import ScenarioError
from .partition import dirichlet_partition, iid_partition, natural_partition
from .sources import DATA_STREAM, DATASETS, SourceData


@dataclass
class ModeData:
    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_groups: np.ndarray | None = None


@dataclass
class Federation:
    mode_names: list[str]
    num_classes: int
    input_shape: tuple[int, ...]
    train_x: np.ndarray                 # all clients' examples, client by client
    train_y: np.ndarray
    train_mode: np.ndarray              # each example's mode (its domain for domain-based methods)
    offsets: np.ndarray                 # client c holds rows offsets[c]:offsets[c + 1]
    client_mode: np.ndarray             # the mode of each client
    test: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return len(self.client_mode)

    def client_slice(self, cid: int) -> slice:
        return slice(int(self.offsets[cid]), int(self.offsets[cid + 1]))

    def client_size(self, cid: int) -> int:
        return int(self.offsets[cid + 1] - self.offsets[cid])

    def pools(self) -> list[np.ndarray]:
        """Client ids of each mode."""
        return [np.flatnonzero(self.client_mode == k) for k in range(len(self.mode_names))]


def apply_transforms(x: np.ndarray, transforms: list) -> np.ndarray:
    """Input transforms of a mode, on [N, C, H, W] images in [0, 1]."""
    for t in transforms:
        spec = t if isinstance(t, TransformSpec) else TransformSpec(name=t)
        if spec.name == "invert":
            x = 1.0 - x
        elif spec.name == "hflip":
            x = x[..., ::-1]
        elif spec.name == "vflip":
            x = x[..., ::-1, :]
        elif spec.name == "rotate":
            turns, rest = divmod(spec.degrees, 90.0)
            if rest == 0:
                x = np.rot90(x, k=int(turns) % 4, axes=(-2, -1))
            else:
                from scipy.ndimage import rotate

                x = rotate(x, spec.degrees, axes=(-1, -2), reshape=False, order=1, mode="constant")
    return np.ascontiguousarray(x, dtype=np.float32)


def relabel(y: np.ndarray, mode: ModeConfig) -> np.ndarray:
    if mode.label_map:
        y = np.array([mode.label_map.get(int(v), int(v)) for v in y], dtype=np.int64)
    return y + mode.label_offset


def build_mode(name: str, mode: ModeConfig, source: SourceData, max_test: int | None, seed: int, k: int) -> ModeData:
    def select(x, y, groups=None):
        keep = np.isin(y, mode.labels) if mode.labels is not None else np.ones(len(y), dtype=bool)
        return (apply_transforms(x[keep], mode.transform), relabel(y[keep], mode),
                None if groups is None else groups[keep])

    tr_x, tr_y, tr_g = select(source.train_x, source.train_y, source.train_groups)
    te_x, te_y, _ = select(source.test_x, source.test_y)
    if max_test is not None and len(te_y) > max_test:
        keep = np.sort(np.random.default_rng([seed, DATA_STREAM, 100 + k]).choice(len(te_y), max_test, replace=False))
        te_x, te_y = te_x[keep], te_y[keep]
    return ModeData(name, tr_x, tr_y, te_x, te_y, tr_g)


def build_federation(scenario: Scenario) -> Federation:
    """Load the sources, build each mode, partition it among its clients. Deterministic in the seed."""
    loaded: dict[str, SourceData] = {}
    modes: list[ModeData] = []
    for k, name in enumerate(scenario.mode_names):
        spec = scenario.dataset_of_mode(name)
        key = repr(sorted(spec.model_dump().items()))
        if key not in loaded:
            cls = DATASETS.get(spec.name)
            loaded[key] = cls(cls.Params.model_validate(spec.params())).load(scenario.seed, scenario.data.test_fraction)
        modes.append(build_mode(name, scenario.modes[name], loaded[key], scenario.data.max_test_per_mode, scenario.seed, k))

    shapes = {m.train_x.shape[1:] for m in modes}
    if len(shapes) != 1:
        raise ScenarioError([("modes", f"all modes must have inputs of one shape, got {sorted(map(tuple, shapes))}")])
    labels_max = max(int(max(m.train_y.max(initial=0), m.test_y.max(initial=0))) for m in modes)
    num_classes = scenario.data.num_classes or labels_max + 1
    if labels_max >= num_classes:
        raise ScenarioError([("data.num_classes", f"is {num_classes} but the modes use label {labels_max}")])

    xs, ys, ms, sizes, client_mode = [], [], [], [], []
    part = scenario.data.partition
    for k, (name, mode) in enumerate(zip(scenario.mode_names, modes)):
        n_clients = scenario.clients_of_mode(name)
        rng = np.random.default_rng([scenario.seed, DATA_STREAM, 200 + k])
        if len(mode.train_y) < n_clients * part.min_examples:
            raise ScenarioError([(f"modes.{name}", f"has {len(mode.train_y)} training examples, too few for "
                                  f"{n_clients} clients of at least {part.min_examples} examples each")])
        try:
            if part.kind == "iid":
                parts = iid_partition(len(mode.train_y), n_clients, rng)
            elif part.kind == "dirichlet":
                parts = dirichlet_partition(mode.train_y, n_clients, part.alpha, rng, part.min_examples)
            else:
                if mode.train_groups is None:
                    raise ValueError(f"dataset {scenario.dataset_of_mode(name).name!r} has no natural client ids; "
                                     "use partition kind iid or dirichlet")
                parts = natural_partition(mode.train_groups, n_clients, rng)
        except ValueError as exc:
            raise ScenarioError([("data.partition", f"mode {name!r}: {exc}")]) from None
        for idx in parts:
            xs.append(mode.train_x[idx])
            ys.append(mode.train_y[idx])
            ms.append(np.full(len(idx), k, dtype=np.int64))
            sizes.append(len(idx))
            client_mode.append(k)

    return Federation(
        mode_names=scenario.mode_names,
        num_classes=num_classes,
        input_shape=tuple(modes[0].train_x.shape[1:]),
        train_x=np.concatenate(xs),
        train_y=np.concatenate(ys),
        train_mode=np.concatenate(ms),
        offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        client_mode=np.asarray(client_mode, dtype=np.int64),
        test={m.name: (m.test_x, m.test_y) for m in modes},
    )
