"""Checkpoint files that load with safe unpickling.

``checkpoint.pt`` is read with ``torch.load(..., weights_only=True)``: tensors and plain containers (dict, list,
tuple, set, str, numbers, None) only, so a run directory from someone else cannot run code when it is resumed.
A file that needs anything else is refused with a FedshiftError and not loaded.

``to_safe`` turns what a checkpoint holds into that vocabulary when it is written: numpy arrays become tensors,
numpy scalars and ``str``/``int``/``float`` subclasses (``torch.__version__``) plain numbers and strings,
named tuples and dict subclasses plain tuples and dicts. Readers convert back where they need numpy
(``restore_rng_states``; the strategies' ``load_state_dict`` accept tensors or arrays).

Checkpoints written before that conversion hold numpy arrays (numpy's random state, FedTKM's scales), numpy
scalars (metrics rows) and ``torch.__version__``. They still load: the only extra globals allowed are numpy's
array and scalar reconstructors, ``numpy.ndarray``, numeric dtypes and torch's ``TorchVersion`` (a ``str``),
the allowlist torch documents for numpy arrays; arrays of Python objects are refused.
"""

from __future__ import annotations

import pickle
import pickletools
import random
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshift.core.errors import FedshiftError


def _numpy_compat_globals() -> list[Any]:
    from torch.torch_version import TorchVersion

    multiarray = getattr(np, "_core", np).multiarray  # numpy 2 (numpy.core is its deprecated alias)
    out: list[Any] = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, TorchVersion]
    out += list(dict.fromkeys(type(np.dtype(c)) for c in "?bhilqBHILQefdgFDG"))  # numeric dtypes only
    # files written under numpy 1 name numpy.core.multiarray; torch >= 2.6 accepts (object, name) pairs
    out += [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (multiarray.scalar, "numpy.core.multiarray.scalar")]
    return out


def to_safe(obj: Any) -> Any:
    """``obj`` with everything that ``torch.load(weights_only=True)`` refuses converted to what it accepts."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biufc":
            try:
                return torch.from_numpy(np.array(obj, copy=True))
            except TypeError:  # a numeric dtype torch has no tensor type for
                pass
        return to_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return to_safe(obj.item())
    if obj is None or type(obj) in (bool, int, float, complex, str, bytes):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, OrderedDict):
        return OrderedDict((to_safe(k), to_safe(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {to_safe(k): to_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_safe(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return {to_safe(v) for v in obj}
    return obj  # anything else is left as it is: loading refuses it, with its name


def save_checkpoint(state: Any, f) -> None:
    """``torch.save`` of ``to_safe(state)``: a file ``load_checkpoint`` reads with weights_only=True."""
    torch.save(to_safe(state), f)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with safe unpickling; a FedshiftError naming the file when it cannot or must not."""
    try:
        with torch.serialization.safe_globals(_numpy_compat_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _refused_globals(Path(path), exc)
        if names is not None:
            found = f" ({', '.join(names)})" if names else ""
            raise FedshiftError(
                f"refusing checkpoint {str(path)!r}: it contains objects other than tensors and plain containers"
                f"{found}, which only arbitrary unpickling could rebuild (and run code with); it was not loaded. "
                "Checkpoints load with safe unpickling (torch.load weights_only=True)") from None
        why = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(exc))  # not torch's advice to load unsafely
        raise FedshiftError(f"cannot read checkpoint {str(path)!r}: not a checkpoint file"
                            + (f" ({why.group(1).strip()})" if why else "")) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem to the user
        raise FedshiftError(f"cannot read checkpoint {str(path)!r}: {_first_line(exc)}") from None
    if not isinstance(state, dict):
        raise FedshiftError(f"cannot read checkpoint {str(path)!r}: it holds a {type(state).__name__}, "
                            "not a fedshift checkpoint")
    if _has_object_array(state):
        raise FedshiftError(f"refusing checkpoint {str(path)!r}: it contains a numpy array of Python objects, "
                            "not only tensors and plain containers; it was not loaded")
    return state


def as_numpy(value: Any, dtype: Any = np.float64) -> np.ndarray:
    """A numpy copy of a state entry that a checkpoint holds as a tensor (or, when older, as a numpy array)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.array(value, dtype=dtype, copy=True)


def restore_rng_states(rng: dict[str, Any]) -> None:
    """Set torch's, numpy's and Python's global random states from a checkpoint's ``rng`` entry (numpy's key
    as a tensor, list or array; Python's state as nested tuples or lists)."""
    torch.set_rng_state(rng["torch"])
    name, key, *rest = rng["numpy"]
    key = key.numpy() if isinstance(key, torch.Tensor) else key
    np.random.set_state((str(name), np.asarray(key, dtype=np.uint32), *rest))
    version, internal, gauss = rng["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _has_object_array(obj: Any) -> bool:
    if isinstance(obj, np.ndarray):
        return obj.dtype.hasobject
    if isinstance(obj, dict):
        return any(_has_object_array(v) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return any(_has_object_array(v) for v in obj)
    return False


def _refused_globals(path: Path, exc: BaseException) -> list[str] | None:
    """What made safe unpickling refuse ``path``: the names of the globals it would have imported (possibly
    none found), or None when the file is not a pickle at all (garbage, a truncated file)."""
    text = str(exc)
    names = set(re.findall(r"GLOBAL (\S+) was not an allowed global", text))
    names |= set(re.findall(r"but got <class '([^']+)'>", text))
    if names:
        return sorted(names)
    try:  # torch.save's zip format: torch lists the globals of data.pkl without unpickling it
        with torch.serialization.safe_globals(_numpy_compat_globals()):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not torch.save's format: read it as a plain pickle
        pass
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return _pickle_globals(data)


def _pickle_globals(data: bytes) -> list[str] | None:
    """The globals a plain pickle names, read with pickletools (nothing is unpickled); None if not a pickle."""
    names: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(".".join(strings[-2:]) if len(strings) >= 2 else "?")
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
    except Exception:  # noqa: BLE001 - not a pickle
        return None
    return sorted(set(names))
