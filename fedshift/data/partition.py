"""Splitting one mode's training examples among its clients."""

from __future__ import annotations

import numpy as np


def iid_partition(n_examples: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then cut into n_clients nearly equal parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(n_examples), n_clients)]


def dirichlet_partition(labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator,
                        min_examples: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Label skew (Hsu et al. 2019): each class is split among clients by proportions ~ Dir(alpha).

    Redrawn until every client holds at least ``min_examples``; smaller alpha means more skew.
    """
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_examples:
            return result
    raise ValueError(f"could not give each of {n_clients} clients at least {min_examples} examples with "
                     f"dirichlet alpha={alpha} in {max_tries} draws; raise alpha or lower clients_per_mode")


def natural_partition(groups: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One client per natural id (writer, user), ``n_clients`` ids drawn at random from those present."""
    ids = np.unique(groups)
    if len(ids) < n_clients:
        raise ValueError(f"the data has {len(ids)} natural client ids, fewer than the {n_clients} clients asked for")
    chosen = rng.choice(ids, size=n_clients, replace=False)
    return [np.flatnonzero(groups == g) for g in chosen]
