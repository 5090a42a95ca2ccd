"""The hub datasets (emnist, cifar10, cifar100) on tiny local parquet files written in the hub's format.

The files mirror what the hub serves (flwrlabs/femnist, uoft-cs/cifar10, uoft-cs/cifar100): the image column is the
struct {bytes, path} with PNG bytes, the columns have the repositories' names, the folders their layout, and the
schema carries the `huggingface` features metadata that `datasets` writes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
Image = pytest.importorskip("PIL.Image")

from fedshift.core.errors import DatasetUnavailable  # noqa: E402
from fedshift.data import DATASETS, build_federation  # noqa: E402
from fedshift.scenario import load_scenario  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
WRITER_SIZES = {"f0000_14": 20, "f0001_41": 21, "f0002_01": 23, "f0003_22": 24, "f0004_33": 25, "f0005_10": 27}
FEMNIST_NAMES = [str(d) for d in range(10)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + \
                [chr(c) for c in range(ord("a"), ord("z") + 1)]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def class_label(names: list[str]) -> dict:
    return {"names": names, "_type": "ClassLabel"}


def write_parquet(path: Path, columns: dict[str, list], features: dict) -> None:
    """One parquet file as the hub stores it: images as {bytes, path} structs, the datasets features in metadata."""
    arrays, fields = [], []
    for name, values in columns.items():
        if features[name]["_type"] == "Image":
            arrays.append(pa.array([{"bytes": png(v), "path": None} for v in values], type=IMAGE_TYPE))
        elif features[name].get("dtype") == "string":
            arrays.append(pa.array(values, type=pa.string()))
        else:
            arrays.append(pa.array(values, type=pa.int64()))
        fields.append(pa.field(name, arrays[-1].type))
    schema = pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path)


def pixel_key(image_chw: np.ndarray) -> bytes:
    """Decoded float image -> the uint8 bytes it came from (PNG is lossless)."""
    return np.rint(image_chw * 255).astype(np.uint8).tobytes()


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def femnist(tmp_path_factory):
    """A FEMNIST folder (data/train-0000k-of-00002.parquet) and the rows written to it, in order."""
    rng = np.random.default_rng(0)
    rows = []
    for writer, n in WRITER_SIZES.items():
        for i in range(n):
            label = int(rng.integers(0, 10)) if i % 2 == 0 else int(rng.integers(10, 62))  # digits and letters
            rows.append({"image": rng.integers(0, 256, (28, 28), dtype=np.uint8), "writer_id": writer,
                         "hsf_id": 4, "character": label})
    root = tmp_path_factory.mktemp("femnist")
    features = {"image": {"_type": "Image"}, "writer_id": {"dtype": "string", "_type": "Value"},
                "hsf_id": {"dtype": "int64", "_type": "Value"}, "character": class_label(FEMNIST_NAMES)}
    half = len(rows) // 2
    for k, part in enumerate([rows[:half], rows[half:]]):
        write_parquet(root / "data" / f"train-{k:05d}-of-00002.parquet",
                      {c: [r[c] for r in part] for c in features}, features)
    return root, rows


def cifar_rows(rng, n: int, classes: int) -> list[dict]:
    """n random 32x32 RGB images, the first nearly constant and the second constant; CIFAR-100 rows also carry
    a coarse label that differs from the fine one."""
    rows = []
    for i in range(n):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        if i == 0:
            image = np.full((32, 32, 3), 100, dtype=np.uint8)
            image[16, 16, 0] = 101
        elif i == 1:
            image = np.full((32, 32, 3), 7, dtype=np.uint8)
        fine = int(rng.integers(0, classes))
        rows.append({"img": image, **({"label": fine} if classes == 10 else {"fine_label": fine, "coarse_label": fine // 5})})
    return rows


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """CIFAR-10 (plain_text/{train,test}-*) and CIFAR-100 (cifar100/{train,test}-*) folders and their rows."""
    rng = np.random.default_rng(1)
    out = {}
    for name, folder, labels in [("cifar10", "plain_text", {"label": 10}),
                                 ("cifar100", "cifar100", {"fine_label": 100, "coarse_label": 20})]:
        root = tmp_path_factory.mktemp(name)
        features = {"img": {"_type": "Image"}, **{c: class_label([f"c{i}" for i in range(k)]) for c, k in labels.items()}}
        classes = max(labels.values())
        splits = {"train": cifar_rows(rng, 40, classes), "test": cifar_rows(rng, 12, classes)}
        for split, rows in splits.items():
            write_parquet(root / folder / f"{split}-00000-of-00001.parquet", {c: [r[c] for r in rows] for c in features},
                          features)
        out[name] = (root, splits)
    return out


def source(name: str, **params):
    cls = DATASETS.get(name)
    return cls(cls.Params.model_validate(params))


# ------------------------------------------------------------------------------------------------ EMNIST


def test_emnist_decodes_images_labels_and_writer_ids(femnist):
    root, rows = femnist
    data = source("emnist", path=str(root)).load(seed=0, test_fraction=0.25)

    assert DATASETS.get("emnist").has_natural_ids
    assert data.train_x.dtype == np.float32 and data.train_y.dtype == np.int64
    assert data.input_shape == (1, 28, 28) and data.test_x.shape[1:] == (1, 28, 28)
    assert 0.0 <= min(data.train_x.min(), data.test_x.min()) and max(data.train_x.max(), data.test_x.max()) <= 1.0
    by_pixels = {r["image"].tobytes(): r for r in rows}
    assert len(by_pixels) == len(rows)
    train = [by_pixels[pixel_key(x)] for x in data.train_x]
    test = [by_pixels[pixel_key(x)] for x in data.test_x]
    assert sorted(id(r) for r in train + test) == sorted(id(r) for r in rows)  # every row once, train or test
    assert [r["character"] for r in train] == data.train_y.tolist()
    assert [r["character"] for r in test] == data.test_y.tolist()
    # writer ids are the natural client ids: one id per writer, different writers different ids
    ids_of_writer: dict[str, set] = {}
    for r, g in zip(train, data.train_groups):
        ids_of_writer.setdefault(r["writer_id"], set()).add(int(g))
    assert all(len(ids) == 1 for ids in ids_of_writer.values())
    assert len({next(iter(ids)) for ids in ids_of_writer.values()}) == len(WRITER_SIZES)
    # the test split holds out round(n / 4) of each writer's n examples (no size here ends in .5)
    for writer, n in WRITER_SIZES.items():
        assert sum(r["writer_id"] == writer for r in test) == int(n * 0.25 + 0.5)


def test_emnist_max_examples_keeps_whole_writers(femnist):
    root, rows = femnist
    data = source("emnist", path=str(root), max_examples=50).load(seed=3, test_fraction=0.25)
    by_pixels = {r["image"].tobytes(): r for r in rows}
    loaded = [by_pixels[pixel_key(x)] for x in np.concatenate([data.train_x, data.test_x])]
    writers = {r["writer_id"] for r in loaded}
    assert 1 <= len(writers) and len(loaded) <= 50
    for w in writers:
        assert sum(r["writer_id"] == w for r in loaded) == WRITER_SIZES[w]


def test_emnist_uses_a_test_split_when_the_folder_has_one(femnist, tmp_path):
    root, rows = femnist
    rng = np.random.default_rng(5)
    test_rows = [{"image": rng.integers(0, 256, (28, 28), dtype=np.uint8), "writer_id": "f0000_14", "hsf_id": 4,
                  "character": 7} for _ in range(3)]
    features = {"image": {"_type": "Image"}, "writer_id": {"dtype": "string", "_type": "Value"},
                "hsf_id": {"dtype": "int64", "_type": "Value"}, "character": class_label(FEMNIST_NAMES)}
    (tmp_path / "data").mkdir()
    for f in (root / "data").iterdir():
        (tmp_path / "data" / f.name).write_bytes(f.read_bytes())
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {c: [r[c] for r in test_rows] for c in features},
                  features)
    data = source("emnist", path=str(tmp_path)).load(seed=0, test_fraction=0.25)
    assert len(data.train_y) == len(rows) and data.test_y.tolist() == [7, 7, 7]
    assert [pixel_key(x) for x in data.test_x] == [r["image"].tobytes() for r in test_rows]


def test_emnist_scenario_builds_a_natural_federation(femnist):
    root, rows = femnist
    sc = load_scenario("emnist", [f"data.dataset.path={root}", "modes.day.clients=4", "modes.night.clients=5",
                                   "clients_per_round=4"])
    fed = build_federation(sc)

    assert fed.num_classes == 62 and fed.input_shape == (1, 28, 28)
    assert fed.mode_names == ["day", "night"] and fed.client_mode.tolist() == [0] * 4 + [1] * 5
    by_pixels = {r["image"].tobytes(): r for r in rows}
    writers_of_mode: dict[int, list[str]] = {0: [], 1: []}
    for cid in range(fed.num_clients):
        sl = fed.client_slice(cid)
        held = [by_pixels[pixel_key(x)] for x in fed.train_x[sl]]
        labels = fed.train_y[sl]
        mode = int(fed.client_mode[cid])
        assert ((labels <= 9) if mode == 0 else (labels >= 10)).all()
        assert len({r["writer_id"] for r in held}) == 1  # one client = one writer
        writers_of_mode[mode].append(held[0]["writer_id"])
    assert all(len(set(w)) == len(w) for w in writers_of_mode.values())  # distinct writers within a mode
    day_test, night_test = fed.test["day"][1], fed.test["night"][1]
    assert len(day_test) and (day_test <= 9).all() and len(night_test) and (night_test >= 10).all()


# ------------------------------------------------------------------------------------------------ CIFAR


@pytest.mark.parametrize("name, label", [("cifar10", "label"), ("cifar100", "fine_label")])
def test_cifar_decodes_official_splits(cifar, name, label):
    root, splits = cifar[name]
    data = source(name, path=str(root)).load(seed=0, test_fraction=0.2)
    for x, y, rows in [(data.train_x, data.train_y, splits["train"]), (data.test_x, data.test_y, splits["test"])]:
        expected = np.stack([r["img"] for r in rows]).transpose(0, 3, 1, 2).astype(np.float64) / 255
        assert x.dtype == np.float32 and x.shape == (len(rows), 3, 32, 32)
        np.testing.assert_allclose(x, expected, atol=1e-7)
        assert y.dtype == np.int64 and y.tolist() == [r[label] for r in rows]
    assert data.train_groups is None and not DATASETS.get(name).has_natural_ids


def test_cifar_crop_and_standardize_match_tensorflow_definition(cifar):
    root, splits = cifar["cifar100"]
    data = source("cifar100", path=str(root), crop=24, standardize=True).load(seed=0, test_fraction=0.2)
    # tf.image.resize_with_crop_or_pad to 24x24 keeps rows/columns 4..27 of 32; per_image_standardization on the
    # float-cast uint8 values: (x - mean) / max(std, 1 / sqrt(24 * 24 * 3)), std the population std of the image.
    raw = np.stack([r["img"] for r in splits["train"]]).astype(np.float64)[:, 4:28, 4:28, :]
    expected = np.empty_like(raw)
    for i, img in enumerate(raw):
        expected[i] = (img - img.mean()) / max(img.std(), 1 / np.sqrt(img.size))
    assert data.train_x.shape == (40, 3, 24, 24)
    np.testing.assert_allclose(data.train_x, expected.transpose(0, 3, 1, 2), atol=1e-5)
    # the nearly constant image (one value 101 among 1,727 of 100): on 0-255 values its std, sqrt(1727) / 1728, is
    # just under the floor 1 / sqrt(1728), so the bright value stands at (1 - 1/1728) * sqrt(1728) = 41.55;
    # standardizing [0, 1] values instead would put it 255 times lower
    assert data.train_x[0].max() == pytest.approx((1 - 1 / 1728) * np.sqrt(1728), rel=1e-4)
    assert np.abs(data.train_x[1]).max() == 0.0  # constant image -> zeros
    ordinary = data.train_x[2:].reshape(38, -1)
    np.testing.assert_allclose(ordinary.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(ordinary.std(axis=1), 1, atol=1e-4)


def test_cifar_crop_without_standardize_stays_in_unit_range(cifar):
    root, splits = cifar["cifar10"]
    data = source("cifar10", path=str(root), crop=24).load(seed=0, test_fraction=0.2)
    expected = np.stack([r["img"] for r in splits["test"]])[:, 4:28, 4:28, :].transpose(0, 3, 1, 2) / 255
    np.testing.assert_allclose(data.test_x, expected, atol=1e-7)


def test_cifar_max_examples_is_a_random_subset_of_train(cifar):
    root, splits = cifar["cifar10"]
    data = source("cifar10", path=str(root), max_examples=7).load(seed=0, test_fraction=0.2)
    originals = {r["img"].transpose(2, 0, 1).tobytes(): r["label"] for r in splits["train"]}
    keys = [pixel_key(x) for x in data.train_x]
    assert len(set(keys)) == 7 and all(originals[k] == y for k, y in zip(keys, data.train_y.tolist()))
    assert len(data.test_y) == len(splits["test"])  # the cap is on the train split only


def test_cifar_scenario_builds_the_110_way_task(cifar):
    (root10, s10), (root100, s100) = cifar["cifar10"], cifar["cifar100"]
    sc = load_scenario("cifar", [f"modes.day.dataset.path={root10}", f"data.dataset.path={root100}",
                                 "data.clients_per_mode=3", "clients_per_round=3"])
    fed = build_federation(sc)
    assert fed.num_classes == 110 and fed.input_shape == (3, 24, 24) and fed.num_clients == 6
    day = fed.train_y[fed.train_mode == 0]
    night = fed.train_y[fed.train_mode == 1]
    assert sorted(day.tolist()) == sorted(r["label"] + 100 for r in s10["train"])
    assert sorted(night.tolist()) == sorted(r["fine_label"] for r in s100["train"])
    assert fed.test["day"][1].tolist() == [r["label"] + 100 for r in s10["test"]]
    assert fed.test["night"][1].tolist() == [r["fine_label"] for r in s100["test"]]


# ------------------------------------------------------------------------------------------------ unavailable


@pytest.mark.parametrize("name", ["emnist", "cifar10", "cifar100"])
def test_without_datasets_package_the_error_says_how_to_fix_it(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DatasetUnavailable) as err:
        source(name).load(seed=0, test_fraction=0.1)
    msg = str(err.value)
    assert "pip install 'fedshift[datasets]'" in msg and "path" in msg and repr(name) in msg


@pytest.mark.parametrize("name, repo", [("emnist", "flwrlabs/femnist"), ("cifar10", "uoft-cs/cifar10"),
                                        ("cifar100", "uoft-cs/cifar100")])
def test_unreachable_hub_gives_a_clear_error(monkeypatch, name, repo):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append(args)
        raise ConnectionError(f"Couldn't reach '{args[0]}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DatasetUnavailable) as err:
        source(name).load(seed=0, test_fraction=0.1)
    msg = str(err.value)
    assert calls == [(repo,)]
    assert f"could not load {repo!r}" in msg and "Couldn't reach" in msg
    assert f"hf download {repo} --repo-type dataset --local-dir DIR" in msg and "path: DIR" in msg
    assert err.value.__suppress_context__  # the library's traceback is not chained onto ours


def test_missing_folder_and_missing_split_are_named(tmp_path, cifar):
    with pytest.raises(DatasetUnavailable, match="is not a folder.*hf download flwrlabs/femnist"):
        source("emnist", path=str(tmp_path / "nowhere")).load(seed=0, test_fraction=0.1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetUnavailable, match="no parquet file of the 'train' split under .*empty"):
        source("emnist", path=str(tmp_path / "empty")).load(seed=0, test_fraction=0.1)
    root100, _ = cifar["cifar100"]  # CIFAR-100 files passed as CIFAR-10: no 'label' column
    with pytest.raises(DatasetUnavailable, match=r"without \['label'\].*uoft-cs/cifar10"):
        source("cifar10", path=str(root100)).load(seed=0, test_fraction=0.1)


@pytest.mark.parametrize("overrides, expect", [
    ([], "pip install 'fedshift[datasets]'"),
    (["data.dataset.path=/nonexistent/femnist"], "is not a folder"),
])
def test_cli_run_prints_the_error_and_exits_2(monkeypatch, tmp_path, overrides, expect):
    from typer.testing import CliRunner

    from fedshift.apps.cli import app

    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    args = ["run", "emnist", "--out", str(tmp_path / "run"), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and expect in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_paper_scenarios_validate_without_datasets_or_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    emnist = load_scenario(str(REPO_ROOT / "scenarios" / "emnist.yaml"))
    cifar = load_scenario(str(REPO_ROOT / "scenarios" / "cifar.yaml"))
    assert emnist.data.dataset.name == "emnist" and emnist.data.partition.kind == "natural"
    assert emnist.modes["day"].labels == list(range(10)) and emnist.modes["night"].labels == list(range(10, 62))
    assert cifar.modes["day"].dataset.name == "cifar10" and cifar.modes["day"].label_offset == 100
    assert cifar.dataset_of_mode("night").name == "cifar100"
    assert cifar.dataset_of_mode("day").crop == 24 and cifar.dataset_of_mode("night").standardize is True


# ------------------------------------------------------------------------------------------------ real `datasets`


def test_hub_route_through_datasets_gives_the_same_arrays(monkeypatch, tmp_path, femnist):
    """``datasets.load_dataset`` on a local folder resolves data files as it does for a hub repository."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    root, _ = femnist
    via_hub = source("emnist", repo=str(root)).load(seed=0, test_fraction=0.25)
    via_path = source("emnist", path=str(root)).load(seed=0, test_fraction=0.25)
    np.testing.assert_array_equal(via_hub.train_x, via_path.train_x)
    np.testing.assert_array_equal(via_hub.train_y, via_path.train_y)
    np.testing.assert_array_equal(via_hub.train_groups, via_path.train_groups)
    np.testing.assert_array_equal(via_hub.test_x, via_path.test_x)


def test_datasets_offline_mode_gives_a_clear_error(tmp_path):
    pytest.importorskip("datasets")
    code = ("from fedshift.data import DATASETS\n"
            "from fedshift.core.errors import DatasetUnavailable\n"
            "cls = DATASETS.get('emnist')\n"
            "try:\n"
            "    cls(cls.Params()).load(0, 0.1)\n"
            "except DatasetUnavailable as exc:\n"
            "    print('UNAVAILABLE', exc)\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "UNAVAILABLE dataset 'emnist': could not load 'flwrlabs/femnist'" in out.stdout, out.stderr[-2000:]
