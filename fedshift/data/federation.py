"""The federation: every client's training data and every mode's test data, built from a scenario.

Clients are numbered mode by mode: mode 0's clients first, then mode 1's, and so on. Each client's examples
are stored contiguously in one array per split, so a client's data is a slice (no copy). Building is
deterministic in the scenario seed; each Ray worker builds it once and keeps it (see ``simulation.worker``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedshift.core.errors import ScenarioError
from fedshift.core.tensors import UNLABELLED
from fedshift.schema import ModeConfig, Scenario, TransformSpec

from ..core.seeding import DataStream, Stream, rng_of
from .partition import dirichlet_partition, iid_partition, natural_partition
from .sources import DATASETS, SourceData


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
        keep = np.sort(rng_of(seed, Stream.DATA, DataStream.TEST_CAP + k).choice(len(te_y), max_test, replace=False))
        te_x, te_y = te_x[keep], te_y[keep]
    return ModeData(name, tr_x, tr_y, te_x, te_y, tr_g)




def mix_clients(holdings: list[list[np.ndarray]], share: float, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Each client gives away round(share * n) of its (mode, index) pairs and receives as many from the
    pairs given away by clients of other modes (drawn at random): its size stays, its mode becomes mixed."""
    given: list[list[np.ndarray]] = [[] for _ in holdings]
    kept: list[list[np.ndarray]] = []
    for k, clients in enumerate(holdings):
        kept.append([])
        for held in clients:
            held = held[rng.permutation(len(held))]
            n_give = int(round(share * len(held)))
            kept[k].append(held[n_give:])
            given[k].append(held[:n_give])
    pools = [np.concatenate(g) if g else np.empty((0, 2), dtype=np.int64) for g in given]
    out = []
    for k, clients in enumerate(kept):
        others = np.concatenate([p for j, p in enumerate(pools) if j != k])
        others = others[rng.permutation(len(others))]
        cursor, mixed = 0, []
        for held, gave in zip(clients, given[k]):
            n = len(gave)
            if cursor + n <= len(others):
                got = others[cursor:cursor + n]
                cursor += n
            else:  # other modes gave away fewer examples than this mode: draw with replacement
                got = others[rng.integers(0, len(others), size=n)] if len(others) else gave
            mixed.append(np.concatenate([held, got]))
        out.append(mixed)
    return out


def hide_labels(y: np.ndarray, offsets: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Hide round(share * n) labels of every client (set them to UNLABELLED), at random."""
    y = y.copy()
    for c in range(len(offsets) - 1):
        lo, hi = int(offsets[c]), int(offsets[c + 1])
        n_hide = min(int(round(share * (hi - lo))), hi - lo - 1)  # keep at least one labelled example
        y[lo + rng.choice(hi - lo, size=max(n_hide, 0), replace=False)] = UNLABELLED
    return y


def build_federation(scenario: Scenario, training_examples: bool = True) -> Federation:
    """Load the sources, build each mode, partition it among its clients. Deterministic in the seed.

    ``training_examples=False`` (the server, which never trains): the same clients, offsets and test sets, but
    ``train_x``, ``train_y`` and ``train_mode`` are left empty instead of being assembled."""
    loaded: dict[str, SourceData] = {}
    modes: list[ModeData] = []
    for k, name in enumerate(scenario.mode_names):
        spec = scenario.dataset_of_mode(name)
        key = repr(sorted(spec.model_dump().items()))
        if key not in loaded:
            cls = DATASETS.get(spec.name)
            loaded[key] = cls(cls.Params.model_validate(spec.params())).load(scenario.seed, scenario.data.test_fraction)
        modes.append(build_mode(name, scenario.modes[name], loaded[key], scenario.data.max_test_per_mode, scenario.seed, k))
    del loaded  # the modes hold what they use: at most one copy of the data besides the federation's

    shapes = {m.train_x.shape[1:] for m in modes}
    if len(shapes) != 1:
        raise ScenarioError([("modes", f"all modes must have inputs of one shape, got {sorted(map(tuple, shapes))}")])
    labels_max = max(int(max(m.train_y.max(initial=0), m.test_y.max(initial=0))) for m in modes)
    num_classes = scenario.data.num_classes or labels_max + 1
    if labels_max >= num_classes:
        raise ScenarioError([("data.num_classes", f"is {num_classes} but the modes use label {labels_max}")])

    parts_of_mode: list[list[np.ndarray]] = []
    part = scenario.data.partition
    for k, (name, mode) in enumerate(zip(scenario.mode_names, modes)):
        n_clients = scenario.clients_of_mode(name)
        rng = rng_of(scenario.seed, Stream.DATA, DataStream.PARTITION + k)
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
        parts_of_mode.append(parts)

    # (mode, index) pairs of each client; mixing moves a share of them to clients of other modes
    holdings = [[np.stack([np.full(len(idx), k), idx], axis=1) for idx in parts] for k, parts in enumerate(parts_of_mode)]
    if scenario.data.mix > 0:
        holdings = mix_clients(holdings, scenario.data.mix, rng_of(scenario.seed, Stream.DATA, DataStream.MIX))
    # one array per split, client by client, each client's examples ordered by mode; filled in place (no
    # per-client copies to concatenate: at paper scale, EMNIST, each copy of the images is 2.3 GB)
    sizes = [len(held) for clients in holdings for held in clients]
    client_mode = [k for k, clients in enumerate(holdings) for _ in clients]
    total = int(sum(sizes)) if training_examples else 0

    def like(arrays: list[np.ndarray]) -> np.ndarray:  # room for all clients' rows (labels may be sequences)
        return np.empty((total, *arrays[0].shape[1:]), dtype=np.result_type(*[a.dtype for a in arrays]))

    train_x, train_y = like([m.train_x for m in modes]), like([m.train_y for m in modes])
    train_mode = np.empty(total, dtype=np.int64)
    at = 0
    for clients in holdings if training_examples else []:
        for held in clients:
            for m, mode in enumerate(modes):
                idx = held[held[:, 0] == m, 1]
                train_x[at:at + len(idx)] = mode.train_x[idx]
                train_y[at:at + len(idx)] = mode.train_y[idx]
                train_mode[at:at + len(idx)] = m
                at += len(idx)
    if scenario.data.unlabelled > 0 and training_examples:
        train_y = hide_labels(train_y, np.concatenate([[0], np.cumsum(sizes)]), scenario.data.unlabelled,
                              rng_of(scenario.seed, Stream.DATA, DataStream.HIDE_LABELS))

    return Federation(
        mode_names=scenario.mode_names,
        num_classes=num_classes,
        input_shape=tuple(modes[0].train_x.shape[1:]),
        train_x=train_x,
        train_y=train_y,
        train_mode=train_mode,
        offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        client_mode=np.asarray(client_mode, dtype=np.int64),
        test={m.name: (m.test_x, m.test_y) for m in modes},
    )
