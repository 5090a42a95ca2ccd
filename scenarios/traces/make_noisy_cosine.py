"""Writes digits-noisy-cosine.csv: a period-16 cosine day weight whose phase random-walks (std 1/32 period per
round) plus noise of std 0.1, clipped to [0, 1]; 384 rows, seed 0. Run: python scenarios/traces/make_noisy_cosine.py"""
from pathlib import Path

import numpy as np

rng = np.random.default_rng(0)
rounds, period = 384, 16
phase = np.arange(rounds) / period + np.cumsum(rng.normal(0, 1 / 32, rounds))
q = np.clip((np.cos(2 * np.pi * phase) + 1) / 2 + rng.normal(0, 0.1, rounds), 0, 1)
lines = ["round,day,night", *(f"{t},{v:.4f},{1 - v:.4f}" for t, v in enumerate(q))]
(Path(__file__).parent / "digits-noisy-cosine.csv").write_text("\n".join(lines) + "\n")
