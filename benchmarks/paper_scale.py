"""The paper's EMNIST and CIFAR settings at full scale, on synthetic data: how long ``--paper`` runs take.

The paper's datasets cannot be downloaded everywhere (not on the machines this project is built on), so this
script writes stand-ins with the datasets' shape and format, parquet folders in the hub's layout with PNG images
in the {bytes, path} struct:

- emnist: FEMNIST (``data/train-0000k-of-0000n.parquet``, ``writer_id``, ``character``), 3,597 writers,
  814,277 28x28 images, 49 % digits;
- cifar: CIFAR-10 (``plain_text/{train,test}-*``, ``label``) and CIFAR-100 (``cifar100/{train,test}-*``,
  ``fine_label``, ``coarse_label``), 50,000 + 10,000 32x32 RGB images each.

The images are synthetic, so accuracy means nothing. What is measured, for the scenario's own settings
(scenarios/emnist.yaml, scenarios/cifar.yaml) and FedTKM with the paper's label smoothing of that task, through
Flower and Ray: the start-up (reading and decoding the folders, building the federation, starting Ray), the
time of a training round, and the time of one evaluation. ``--max-test M`` evaluates M test examples per mode
(data.max_test_per_mode) and scales the evaluation's time to the full test sets in the projection; evaluating all
of CIFAR's 20,000 takes over a minute on a CPU.

    python benchmarks/paper_scale.py --set eval.every=1000      # EMNIST; writes /tmp/fedshift-emnist-synthetic once
    python benchmarks/paper_scale.py --task cifar --rounds 3 --max-test 100 --set eval.every=1000
    python benchmarks/paper_scale.py --set eval.every=1000 --set backend.device=cuda --set backend.num_gpus=0.5

The rounds are timed through Flower and Ray (eval.every=1000 keeps the evaluation out of all but the last);
then one evaluation of the test sets is timed in this process, as the server runs it. Prints the phases and
the projected time of the scenario's 2,049 rounds with its own evaluation schedule. Needs pyarrow and
pillow (``pip install -e ".[datasets]"``). Measured on the 2-core CPU (docs/performance.md): EMNIST 1.5-2.1 s
per training round, 28-37 s per evaluation, 16-20 h in all; CIFAR (the reference's ResNet-18, 20 examples per
client) 6.0-6.6 s per training round, about 73 s per evaluation, about 8.8 h in all.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

WRITERS, IMAGES, DIGIT_SHARE = 3597, 814_277, 0.49
NAMES = [str(d) for d in range(10)] + [chr(c) for c in range(65, 91)] + [chr(c) for c in range(97, 123)]


def stroke_images(rng: np.random.Generator, n: int) -> list[bytes]:
    """n PNG images of a dark random stroke on white, about the size of FEMNIST's PNGs."""
    from PIL import Image, ImageDraw

    out = []
    for _ in range(n):
        img = Image.new("L", (28, 28), 255)
        ImageDraw.Draw(img).line([tuple(p) for p in rng.integers(4, 24, (4, 2)).tolist()], fill=0, width=3)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_femnist(root: Path, seed: int = 0, files: int = 8) -> None:
    """The synthetic FEMNIST folder; writer sizes are drawn so that they sum to 814,277."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(IMAGES - WRITERS, np.ones(WRITERS) / WRITERS) + 1
    writers = np.repeat([f"f{w:04d}_{w % 100:02d}" for w in range(WRITERS)], sizes)
    labels = np.where(rng.random(IMAGES) < DIGIT_SHARE, rng.integers(0, 10, IMAGES), rng.integers(10, 62, IMAGES))
    features = {"image": {"_type": "Image"}, "writer_id": {"dtype": "string", "_type": "Value"},
                "character": {"names": NAMES, "_type": "ClassLabel"}}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    bounds = np.linspace(0, IMAGES, files + 1).astype(int)
    for k in range(files):
        lo, hi = bounds[k], bounds[k + 1]
        images = pa.array([{"bytes": b, "path": None} for b in stroke_images(rng, hi - lo)], type=image_type)
        table = pa.Table.from_arrays([images, pa.array(writers[lo:hi]), pa.array(labels[lo:hi], type=pa.int64())],
                                     names=["image", "writer_id", "character"]).replace_schema_metadata(meta)
        path = root / "data" / f"train-{k:05d}-of-{files:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        print(f"  wrote {path} ({hi - lo} rows)", file=sys.stderr, flush=True)


def box_images(rng: np.random.Generator, n: int) -> list[bytes]:
    """n 32x32 RGB PNG images: a random colored box on a random background."""
    from PIL import Image, ImageDraw

    out = []
    for _ in range(n):
        img = Image.new("RGB", (32, 32), tuple(rng.integers(0, 256, 3).tolist()))
        x0, y0 = rng.integers(0, 16, 2).tolist()
        ImageDraw.Draw(img).rectangle([x0, y0, x0 + 16, y0 + 16], fill=tuple(rng.integers(0, 256, 3).tolist()))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_cifar(root: Path, seed: int = 0) -> None:
    """Synthetic CIFAR-10 (root/cifar10/plain_text) and CIFAR-100 (root/cifar100/cifar100) folders."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for name, folder, labels in [("cifar10", "plain_text", {"label": 10}),
                                 ("cifar100", "cifar100", {"fine_label": 100, "coarse_label": 20})]:
        features = {"img": {"_type": "Image"},
                    **{c: {"names": [f"c{i}" for i in range(k)], "_type": "ClassLabel"} for c, k in labels.items()}}
        meta = {"huggingface": json.dumps({"info": {"features": features}})}
        for split, n in [("train", 50_000), ("test", 10_000)]:
            columns = {"img": pa.array([{"bytes": b, "path": None} for b in box_images(rng, n)], type=image_type)}
            columns |= {c: pa.array(rng.integers(0, k, n), type=pa.int64()) for c, k in labels.items()}
            path = root / name / folder / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(columns).replace_schema_metadata(meta), path)
            print(f"  wrote {path} ({n} rows)", file=sys.stderr, flush=True)


def femnist_test_size(root: Path, test_fraction: float) -> int:
    """Test examples the emnist source holds out of the synthetic FEMNIST (its per-writer rule)."""
    import pyarrow.parquet as pq

    from fedshift.data.hf import writer_holdout

    ids = np.concatenate([pq.read_table(f, columns=["writer_id"]).column(0).to_numpy(zero_copy_only=False)
                          for f in sorted((root / "data").glob("*.parquet"))])
    writers = np.unique(ids, return_inverse=True)[1]
    return int(writer_holdout(writers, test_fraction, np.random.default_rng(0)).sum())


TASKS = {
    "emnist": {"write": write_femnist, "ready": lambda d: (d / "data").is_dir(),
               "paths": lambda d: [f"data.dataset.path={d}"], "test_size": femnist_test_size,
               "strategy": ["strategy.name=fedtkm", "strategy.label_smooth_w=0.5", "strategy.label_smooth_eps=0.1"]},
    "cifar": {"write": write_cifar, "ready": lambda d: (d / "cifar100").is_dir(),
              "paths": lambda d: [f"data.dataset.path={d / 'cifar100'}", f"modes.day.dataset.path={d / 'cifar10'}"],
              "test_size": lambda d, fraction: 20_000,
              "strategy": ["strategy.name=fedtkm", "strategy.label_smooth_w=0.1", "strategy.label_smooth_eps=0.5",
                           "strategy.zero_mid=true"]},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=list(TASKS), default="emnist")
    ap.add_argument("--data", type=Path, help="the synthetic folder (written if missing; default "
                                              "/tmp/fedshift-TASK-synthetic)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds to time (at least 2: the first is not counted)")
    ap.add_argument("--max-test", type=int, help="test examples evaluated per mode (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="scenario override (repeatable), after the strategy's")
    ap.add_argument("--fedavg", action="store_true", help="time FedAvg instead of FedTKM")
    ap.add_argument("--out", type=Path, default=Path("/tmp/fedshift-paper-scale-run"))
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be at least 2")

    import fedshift

    task = TASKS[args.task]
    data = args.data or Path(f"/tmp/fedshift-{args.task}-synthetic")
    if not task["ready"](data):
        t0 = time.perf_counter()
        task["write"](data)
        print(f"synthetic {args.task} data written in {time.perf_counter() - t0:.0f} s", flush=True)
    cap = [f"data.max_test_per_mode={args.max_test}"] if args.max_test else []
    overrides = [*task["paths"](data), f"rounds={args.rounds}", "output.tensorboard=false", "output.save_model=false",
                 *([] if args.fedavg else task["strategy"]), *cap, *args.overrides]
    scenario = fedshift.load_scenario(args.task, overrides)
    if args.out.exists():
        shutil.rmtree(args.out)
    t0 = time.perf_counter()
    fedshift.run_scenario(scenario, out=args.out)
    total = time.perf_counter() - t0
    summary = json.loads((args.out / "summary.json").read_text())
    with open(args.out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    seconds = [float(r["time/round_s"]) for r in rows]
    evaluated = [bool(r.get("eval/all/accuracy")) for r in rows]
    steady = list(zip(seconds[1:], evaluated[1:]))  # the first round pays first-use costs
    train = [t for t, e in steady if not e]
    with_eval = [t for t, e in steady if e]
    before = total - sum(seconds[1:])  # everything up to the end of the first round
    line = (f"{args.task}, {'fedavg' if args.fedavg else 'fedtkm'} on {summary['device']}: data and model built in "
            f"{summary['build_s']:.0f} s, Ray started in {summary['startup_s']:.0f} s, first round {seconds[0]:.1f} s")
    if train:
        line += f", training rounds {np.mean(train):.1f} s ({', '.join(f'{t:.1f}' for t in train)})"
    if with_eval:
        line += f", rounds with evaluation {np.mean(with_eval):.1f} s ({', '.join(f'{t:.1f}' for t in with_eval)})"
    print(line)
    if not train:
        print("(no projection: no training round was timed after the first; raise --rounds or eval.every)")
        return
    full = fedshift.load_scenario(args.task)  # the scenario as written: its rounds and evaluation schedule
    n_eval = sum(1 for t in range(full.rounds) if (t + 1) % full.eval.every == 0 or t == full.rounds - 1)
    test_size = task["test_size"](data, scenario.data.test_fraction)
    timed, examples = evaluation_seconds(scenario)
    eval_s = timed * test_size / examples
    projected = before + (full.rounds - 1) * np.mean(train) + n_eval * eval_s
    print(f"evaluating {examples} test examples took {timed:.1f} s in this process, so all {test_size}: about "
          f"{eval_s:.0f} s; the scenario's {full.rounds} rounds ({n_eval} evaluated, eval.every "
          f"{full.eval.every}): about {projected / 3600:.1f} h ({n_eval * eval_s / 3600:.1f} h of it evaluation)")


def evaluation_seconds(scenario) -> tuple[float, int]:
    """Time one evaluation of the scenario's test sets as the server runs it (the initial model, after one
    warm-up pass over a few examples); returns (seconds, examples evaluated)."""
    import torch

    from fedshift.runtime.worker import World

    world = World.build(scenario, on_worker=False)
    world.strategy.initialize(world.model)
    tests = {m: (torch.from_numpy(x).to(world.device), torch.from_numpy(y).to(world.device))
             for m, (x, y) in world.federation.test.items()}
    world.strategy.evaluate({m: (x[:2], y[:2]) for m, (x, y) in tests.items()}, scenario.eval.batch_size)
    t0 = time.perf_counter()
    world.strategy.evaluate(tests, scenario.eval.batch_size)
    if world.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, sum(len(y) for _, y in tests.values())

if __name__ == "__main__":
    main()
