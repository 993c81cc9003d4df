"""Fault injection: kill training with SIGKILL at random moments, resume from the last checkpoint, compare.

For each job (the main WSD+SWA job, the CoBo example, the meta-learning example, shortened to a few dozen steps)
an uninterrupted reference run is made, then the same run is killed several times (at random times, and inside a
checkpoint write: after the temporary file is complete but before its rename, or half-way through writing it) and
resumed each time from its newest checkpoint. Every value the reference logged (same step, same key), the final
checkpoint's weights, optimizer state and callback state (SWA averages, cooldown) are compared with the faulted run.
Then the branch-a-cooldown recipe: a branch (itself killed once) from a trunk checkpoint must leave every trunk file
byte-identical and every trunk checkpoint restoring the averages it held.

Prints ``faults survived k/N`` and the largest difference. One process, CPU::

    python benchmarks/faults.py                 # all jobs, 3 kills each (about 6 minutes on 2 cores)
    python benchmarks/faults.py --jobs main --kills 2 --seed 1
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
FAULT_ENV = "LIGHTNING_EPFL_FAULT"

# The child process: arm a fault, then run the package CLI. A fault "commit:k" kills the process at the k-th
# checkpoint rename (the temporary file is complete); "write:k" kills it half-way through writing the k-th checkpoint.
CHILD = r"""
import os, signal, sys
fault = os.environ.get("LIGHTNING_EPFL_FAULT", "")
if fault:
    kind, k = fault.split(":"); k = int(k)
    count = [0]
    if kind == "commit":
        real_replace = os.replace
        def replace(src, dst, *a, **kw):
            if str(dst).endswith(".ckpt"):
                count[0] += 1
                if count[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *a, **kw)
        os.replace = replace
    else:
        import torch
        real_save = torch.save
        def save(obj, f, *a, **kw):
            if isinstance(f, str) and ".ckpt.tmp" in f:
                count[0] += 1
                if count[0] == k:
                    import io
                    buf = io.BytesIO(); real_save(obj, buf, *a, **kw)
                    with open(f, "wb") as fh:
                        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2]); fh.flush(); os.fsync(fh.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **kw)
        torch.save = save
from lightning_epfl.cli import main
main(sys.argv[1:])
"""


def _checkpoint_callback(every: int) -> dict:
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "filename": "step={step}",
            "auto_insert_metric_name": False,
            "every_n_train_steps": every,
            "save_top_k": -1,
        },
    }


def job_configs(steps: int) -> dict[str, dict]:
    """The three examples, shortened to ``steps`` optimizer steps with a checkpoint every ``steps // 6`` steps."""
    every = max(steps // 6, 1)
    jobs = {}
    main = yaml.safe_load(open(EXAMPLES / "lm_wsd_swa.yaml"))
    main["trainer"].update(max_steps=steps, val_check_interval=2 * every, limit_val_batches=4, log_every_n_steps=2)
    main["model"]["init_args"]["lr_scheduler"]["init_args"]["warmup_steps"] = every
    for cb in main["trainer"]["callbacks"]:
        if cb["class_path"].endswith("WindowedSWA"):
            cb["init_args"].update(window_steps=every, every_n_steps=2 if every % 2 == 0 else 1)
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = every
    jobs["main"] = main
    cobo = yaml.safe_load(open(EXAMPLES / "cobo_digits.yaml"))
    cobo["trainer"].update(max_steps=steps, log_every_n_steps=2)
    cobo["trainer"]["strategy"]["init_args"]["pair_warmup_steps"] = every
    cobo["trainer"]["callbacks"] = [_checkpoint_callback(every)]
    cobo["data"]["init_args"]["steps_per_epoch"] = 2 * every
    jobs["cobo"] = cobo
    maml = yaml.safe_load(open(EXAMPLES / "maml_sinusoid.yaml"))
    maml["trainer"].update(max_steps=steps, log_every_n_steps=2, val_check_interval=2 * every, limit_val_batches=2)
    maml["trainer"]["callbacks"] = [_checkpoint_callback(every)]
    maml["model"]["init_args"]["monitor_every_n_steps"] = every
    maml["model"]["init_args"]["lr_scheduler"]["init_args"]["total_iters"] = steps
    maml["data"]["init_args"]["batches_per_epoch"] = 2 * every
    jobs["maml"] = maml
    for cfg in jobs.values():
        cfg["trainer"]["enable_progress_bar"] = False
        cfg["trainer"]["enable_model_summary"] = False
    return jobs


def _run(config: Path, root: Path, ckpt: str | None = None, fault: str = "", kill_after: float | None = None) -> int:
    """Run the CLI on ``config`` in a child process; kill it after ``kill_after`` s; return its exit status."""
    args = [sys.executable, "-c", CHILD, "fit", "--config", str(config), f"--trainer.default_root_dir={root}"]
    if ckpt:
        args += ["--ckpt_path", ckpt]
    env = {**os.environ, FAULT_ENV: fault, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        return -signal.SIGKILL
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"run failed ({proc.returncode}):\n{err[-3000:]}")
    return proc.returncode


def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (temporary files are named ``*.ckpt.tmp<pid>``), oldest step first."""
    found = [Path(p) for p in glob.glob(str(root / "lightning_logs" / "version_*" / "checkpoints" / "*.ckpt"))]
    return sorted(found, key=lambda p: (int(p.stem.split("=")[1]), p.parent.parent.name))


def _last_step(root: Path) -> int:
    found = _checkpoints(root)
    return int(found[-1].stem.split("=")[1]) if found else 0


def _logged(root: Path) -> dict[tuple[int, str], float]:
    """Every numeric value in every version's metrics.csv; a later version overrides a replayed (step, key)."""
    values: dict[tuple[int, str], float] = {}
    versions = sorted(glob.glob(str(root / "lightning_logs" / "version_*")), key=lambda v: int(v.rsplit("_", 1)[1]))
    for version in versions:
        path = os.path.join(version, "metrics.csv")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key in ("step", "epoch") or value in ("", None):
                        continue
                    values[(int(row["step"]), key)] = float(value)
    return values


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint except Lightning's loop counters and timing, by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if prefix == "" and k in ("loops", "hyper_parameters", "datamodule_hyper_parameters"):
                continue
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def compare(ref: Path, faulted: Path, steps: int, counts: dict | None = None) -> tuple[float, list[str]]:
    """Largest difference over logged values and final-checkpoint tensors, and the list of mismatches.

    ``counts`` (if given) receives how many logged values and checkpoint tensors were compared.
    """
    problems: list[str] = []
    diff = 0.0
    a, b = _logged(ref), _logged(faulted)
    for key, value in a.items():
        if key not in b:
            problems.append(f"logged value missing after faults: step {key[0]} {key[1]}")
            continue
        diff = max(diff, _difference(value, b[key]))
    final_a = [p for p in _checkpoints(ref) if p.stem == f"step={steps}"]
    final_b = [p for p in _checkpoints(faulted) if p.stem == f"step={steps}"]
    if not final_a or not final_b:
        problems.append("no final checkpoint")
        return diff, problems
    ta = _tensors(torch.load(final_a[-1], map_location="cpu", weights_only=True))
    tb = _tensors(torch.load(final_b[-1], map_location="cpu", weights_only=True))
    if set(ta) != set(tb):
        problems.append(f"checkpoint entries differ: {sorted(set(ta) ^ set(tb))[:5]}")
    if counts is not None:
        counts.update(values=len(a), tensors=len(set(ta) & set(tb)))
    for key in set(ta) & set(tb):
        x, y = ta[key], tb[key]
        if x.shape != y.shape:
            problems.append(f"{key}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
        elif x.numel():
            x, y = x.double(), y.double()
            if bool((x.isnan() != y.isnan()).any()):
                diff = math.inf
            else:
                keep = ~x.isnan()
                diff = max(diff, float((x[keep] - y[keep]).abs().max()) if bool(keep.any()) else 0.0)
    return diff, problems


def _difference(a: float, b: float) -> float:
    """``|a - b|``; two NaNs are equal, a NaN against a number is an infinite difference."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b)


def run_job(name: str, cfg: dict, work: Path, kills: int, rng: random.Random, steps: int) -> dict:
    """Reference run, then a run killed ``kills`` times (times and checkpoint writes) and resumed each time."""
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    _run(config, work / f"{name}-ref")
    duration = time.time() - t0
    root = work / f"{name}-faulted"
    faults = ["commit:2", "write:3"] + [None] * max(kills - 2, 0)
    faults = faults[:kills]
    survived, attempts, resume = 0, 0, None
    unfired: list[str] = []
    while True:
        fault = faults[attempts] if attempts < len(faults) else ""
        kill_after = None
        if fault is None:  # a timed kill somewhere between start-up and the end of a run of this length
            kill_after = rng.uniform(0.3, 0.8) * duration
            fault = ""
        code = _run(config, root, resume, fault=fault, kill_after=kill_after)
        if attempts < len(faults):
            attempts += 1
            survived += int(code == -signal.SIGKILL)
            if fault and code != -signal.SIGKILL:  # a checkpoint-write fault must fire
                unfired.append(fault)
        last = _checkpoints(root)
        resume = str(last[-1]) if last else None
        if code == 0 and _last_step(root) >= steps:
            break
        if attempts > len(faults) + 5:
            raise RuntimeError(f"{name}: no progress after {attempts} runs")
    counts: dict = {}
    diff, problems = compare(work / f"{name}-ref", root, steps, counts)
    problems += [f"checkpoint fault {f} never fired" for f in unfired]
    ok = not problems and diff == 0.0 and counts.get("values", 0) > 0
    return {
        "job": name,
        "faults": attempts,
        "killed": survived,
        "identical": ok,
        "max_diff": diff,
        "problems": problems[:5],
        "ref_s": duration,
        **counts,
    }


def branch_recipe(cfg: dict, work: Path, steps: int, rng: random.Random) -> dict:
    """Trunk, then a branched cooldown from its middle checkpoint (killed once, resumed): the trunk is unchanged."""
    from lightning_epfl.callbacks import WindowedSWA

    config = work / "branch.yaml"
    config.write_text(yaml.safe_dump(cfg))
    root = work / "branch"
    _run(config, root)
    trunk_files = sorted(glob.glob(str(root / "lightning_logs" / "version_0" / "**" / "*.*"), recursive=True))
    before = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in trunk_files}
    swa_args = next(cb["init_args"] for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("WindowedSWA"))

    def averages(ckpt: Path) -> dict:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
        swa = WindowedSWA(**swa_args)
        swa.load_state_dict(next(v for k, v in state.items() if k.startswith("WindowedSWA")))
        if not swa.num_closed_windows:
            return {}
        return {j: swa.average_state_dict(j) for j in swa.horizons if j <= swa.num_closed_windows}

    trunk_ckpts = _checkpoints(root)
    held = {p: averages(p) for p in trunk_ckpts}
    middle = trunk_ckpts[len(trunk_ckpts) // 2]
    longer = f"--trainer.max_steps={int(steps * 1.5)}"
    # the branch, killed once at a random moment, then resumed from its own newest checkpoint
    args = [sys.executable, "-c", CHILD, "fit", "--config", str(config), f"--trainer.default_root_dir={root}", longer]
    proc = subprocess.Popen([*args, "--ckpt_path", str(middle)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(6.0, 12.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    branch_ckpts = [p for p in _checkpoints(root) if p.parent.parent.name != "version_0"]
    resume_from = str(branch_ckpts[-1]) if branch_ckpts else str(middle)
    subprocess.run(
        [*args, "--ckpt_path", resume_from], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    after = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in trunk_files}
    changed = [p for p in trunk_files if before[p] != after[p]]
    diff = 0.0
    for p in trunk_ckpts:
        again = averages(p)
        for j, avg in held[p].items():
            diff = max(diff, max(float((avg[k] - again[j][k]).abs().max()) for k in avg))
    new_files = [p for p in glob.glob(str(root / "lightning_logs" / "version_0" / "**" / "*.*"), recursive=True)]
    return {
        "trunk_files": len(trunk_files),
        "changed": changed,
        "added_to_trunk": sorted(set(new_files) - set(trunk_files)),
        "max_diff": diff,
        "ok": not changed and diff == 0.0 and set(new_files) == set(trunk_files),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", default=["main", "cobo", "maml"], choices=["main", "cobo", "maml"])
    parser.add_argument("--kills", type=int, default=3, help="faults per job (2 inside checkpoint writes, rest timed)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per job")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--no-branch", action="store_true", help="skip the branch-a-cooldown check")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary folder, removed)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    configs = job_configs(args.steps)
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for name in args.jobs:
            res = run_job(name, configs[name], work, args.kills, rng, args.steps)
            results.append(res)
            status = "bit-identical" if res["identical"] else f"DIFFERENT {res['problems']}"
            print(
                f"{name:5s} killed {res['killed']} times ({res['faults']} faults armed)  max |diff| "
                f"{res['max_diff']:.3e} over {res.get('values', 0)} logged values and {res.get('tensors', 0)} "
                f"checkpoint tensors  {status}  (reference run {res['ref_s']:.0f} s)",
                flush=True,
            )
        branch = None
        if not args.no_branch:
            branch = branch_recipe(configs["main"], work, args.steps, rng)
            print(
                f"branch recipe: trunk files {branch['trunk_files']}, changed {len(branch['changed'])}, "
                f"added {len(branch['added_to_trunk'])}, max |average diff| {branch['max_diff']:.3e}  "
                f"{'ok' if branch['ok'] else 'CORRUPTED'}",
                flush=True,
            )
    total = sum(r["killed"] for r in results)  # kills that happened (a timed kill may come after a run ended)
    survived = sum(r["killed"] for r in results if r["identical"])
    largest = max([r["max_diff"] for r in results] + [branch["max_diff"] if branch else 0.0])
    print(f"faults survived {survived}/{total}  largest difference {largest:.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"jobs": results, "branch": branch}, indent=2, default=str))
    ok = total > 0 and survived == total and (branch is None or branch["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
