"""The paper's EMNIST setting at full scale, on synthetic data: how long ``reproduce_fedtkm.py --paper`` takes.

The paper's datasets cannot be downloaded everywhere (not on the machines this project is built on), so this
script writes a stand-in with FEMNIST's shape and format: a parquet folder in the hub's layout
(``data/train-0000k-of-0000n.parquet``, PNG images in the {bytes, path} struct, ``writer_id``, ``character``),
3,597 writers, 814,277 28x28 images, 49 % digits. The images are synthetic strokes, so accuracy means nothing;
what is measured is the start-up (reading and decoding the folder, building the federation, starting Ray) and
the time per round (ten clients of one to two hundred examples training the EMNIST CNN, and the evaluation of
every test example of both modes, which the scenario does every round), for the scenario's own settings and
the strategy given (default: FedTKM with the paper's EMNIST label smoothing).

    python benchmarks/paper_scale.py --set eval.every=2     # writes /tmp/fedshift-femnist-synthetic once
    python benchmarks/paper_scale.py --set eval.every=2 --set backend.device=cuda --set backend.num_gpus=0.5

With eval.every=2 the five timed rounds hold both kinds: rounds with and without the evaluation.

Prints the start-up time, the time per round (the rounds after the first), and the projected time of the
scenario's 2,049 rounds. Needs pyarrow and pillow (``pip install -e ".[datasets]"``). Measured figures:
docs/performance.md (2-core CPU: 1.5-2.1 s per training round, 28-37 s per round that evaluates the 81k test
examples, 16-19 h for the scenario).
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
FEDTKM_EMNIST = ["strategy.name=fedtkm", "strategy.label_smooth_w=0.5", "strategy.label_smooth_eps=0.1"]


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/fedshift-femnist-synthetic"),
                    help="the synthetic folder (written if missing)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds to time (at least 2: the first is not counted)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="scenario override (repeatable), after the strategy's")
    ap.add_argument("--fedavg", action="store_true", help="time FedAvg instead of FedTKM")
    ap.add_argument("--out", type=Path, default=Path("/tmp/fedshift-paper-scale-run"))
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be at least 2")

    import fedshift

    if not (args.data / "data").is_dir():
        t0 = time.perf_counter()
        write_femnist(args.data)
        print(f"synthetic FEMNIST written in {time.perf_counter() - t0:.0f} s", flush=True)
    strategy = [] if args.fedavg else FEDTKM_EMNIST
    overrides = [f"data.dataset.path={args.data}", f"rounds={args.rounds}", "output.tensorboard=false",
                 "output.save_model=false", *strategy, *args.overrides]
    scenario = fedshift.load_scenario("emnist", overrides)
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
    full = fedshift.load_scenario("emnist").rounds
    before = total - sum(seconds[1:])  # everything up to the end of the first round
    line = (f"{'fedavg' if args.fedavg else 'fedtkm'} on {summary['device']}: data and model built in "
            f"{summary['build_s']:.0f} s, Ray started in {summary['startup_s']:.0f} s, first round {seconds[0]:.1f} s")
    if train:
        line += f", training rounds {np.mean(train):.1f} s ({', '.join(f'{t:.1f}' for t in train)})"
    if with_eval:
        line += f", rounds with evaluation {np.mean(with_eval):.1f} s ({', '.join(f'{t:.1f}' for t in with_eval)})"
    line += f". The scenario's {full} rounds:"
    if with_eval:
        line += f" evaluated every round (as it says) about {(before + (full - 1) * np.mean(with_eval)) / 3600:.1f} h"
    if train:
        line += f"{';' if with_eval else ''} evaluated once about {(before + (full - 1) * np.mean(train)) / 3600:.1f} h"
    print(line)


if __name__ == "__main__":
    main()
