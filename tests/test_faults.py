"""The fault-injection harness (benchmarks/faults.py): its comparison can fail, and a killed run resumes exactly."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import faults  # noqa: E402


def _fake_run(root: Path, values: dict, weight: float) -> None:
    version = root / "lightning_logs" / "version_0"
    (version / "checkpoints").mkdir(parents=True)
    with open(version / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "val/loss"])
        writer.writeheader()
        for step, v in values.items():
            writer.writerow({"step": step, "val/loss": v})
    torch.save({"state_dict": {"w": torch.full((2,), weight)}, "loops": {}}, version / "checkpoints" / "step=4.ckpt")


def test_fault_comparison_detects_changed_missing_and_different_weights(tmp_path):
    """compare() reports a changed value, a missing value and different final weights; equal runs give 0."""
    _fake_run(tmp_path / "a", {2: 1.0, 4: 0.5}, 1.0)
    _fake_run(tmp_path / "same", {2: 1.0, 4: 0.5}, 1.0)
    _fake_run(tmp_path / "b", {2: 1.25}, 3.0)
    assert faults.compare(tmp_path / "a", tmp_path / "same", 4) == (0.0, [])
    diff, problems = faults.compare(tmp_path / "a", tmp_path / "b", 4)
    assert diff == 2.0 and any("step 4 val/loss" in p for p in problems)
    _fake_run(tmp_path / "nan", {2: float("nan"), 4: 0.5}, 1.0)
    assert faults.compare(tmp_path / "a", tmp_path / "nan", 4)[0] == float("inf")  # a NaN is not "equal"


@pytest.mark.slow
def test_fault_harness_main_job_survives_kills_bit_identically(tmp_path):
    """Slow (~2-4 min): the main job killed twice (inside checkpoint writes) resumes bit-identically, and a branched
    cooldown leaves its trunk unchanged."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "faults.py"), "--jobs", "main", "--kills", "2", "--steps", "36"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "faults survived 2/2  largest difference 0.000e+00" in out.stdout
    assert "ok" in out.stdout.splitlines()[-2]
