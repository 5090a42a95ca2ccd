"""benchmarks/gpu_check.sh on a machine without CUDA: it says so and exits 0 (CI has no GPU)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the no-CUDA path")
def test_gpu_check_skips_without_cuda(tmp_path):
    env = {**os.environ, "GPU_CHECK_RESULTS": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here; skipped" in proc.stdout
    assert not list(tmp_path.iterdir())  # nothing written
