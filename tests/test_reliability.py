"""Regression tests of the reliability defects: branched cooldowns, early checks, CLI messages, checkpoints, text
splits, process counts, output folders, progress and logging."""

import glob
import hashlib
import os
from pathlib import Path

import pytest
import torch
import yaml

from lightning_epfl.cli import cli_main, main

EXAMPLES = Path(__file__).parent.parent / "examples"


def _tiny_main_job(tmp_path: Path, max_steps: int = 12) -> str:
    cfg = yaml.safe_load(open(EXAMPLES / "lm_wsd_swa.yaml"))
    cfg["trainer"].update(
        max_steps=max_steps,
        val_check_interval=4,
        limit_val_batches=2,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path / "root"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("WindowedSWA"):
            cb["init_args"].update(window_steps=4, every_n_steps=2)
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"].update(every_n_train_steps=4)
    cfg["model"]["init_args"]["config"] = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    cfg["model"]["init_args"]["lr_scheduler"]["init_args"]["warmup_steps"] = 2
    cfg["data"]["init_args"].update(block_size=32, batch_size=4)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _swa_state(ckpt: Path) -> dict:
    return next(v for k, v in torch.load(ckpt, weights_only=True)["callbacks"].items() if k.startswith("WindowedSWA"))


def _digest(paths) -> dict:
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def test_branched_cooldown_leaves_the_trunk_exactly_as_it_was(tmp_path, monkeypatch):
    """(1) A branch from a trunk checkpoint writes elsewhere; the trunk's checkpoints and exports are unchanged and
    restore their averages exactly, from any working directory."""
    from lightning_epfl.callbacks import WindowedSWA

    job = _tiny_main_job(tmp_path)
    cli_main(["fit", "--config", job])
    trunk = tmp_path / "root" / "lightning_logs" / "version_0"
    trunk_files = sorted(glob.glob(str(trunk / "**" / "*.*"), recursive=True))
    before = _digest(trunk_files)
    final_ckpt = trunk / "checkpoints" / "step=12.ckpt"
    swa = WindowedSWA(window_steps=4, every_n_steps=2, horizons=[1, 2])
    swa.load_state_dict(_swa_state(final_ckpt))
    expected = {j: swa.average_state_dict(j) for j in (1, 2)}
    assert (trunk / "swa" / "swa_average_h1.pt").is_file()

    branch = cli_main(
        ["fit", "--config", job, "--trainer.max_steps", "20", "--ckpt_path", str(trunk / "checkpoints" / "step=8.ckpt")]
    )
    assert Path(branch.trainer.log_dir).name == "version_1"
    assert (Path(branch.trainer.log_dir) / "swa" / "swa_average_h1.pt").is_file()
    assert _digest(trunk_files) == before  # nothing of the trunk rewritten
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # loading from another working directory needs no file next to the checkpoint
    reloaded = WindowedSWA(window_steps=4, every_n_steps=2, horizons=[1, 2])
    reloaded.load_state_dict(_swa_state(final_ckpt))
    assert reloaded.num_closed_windows == 2
    for j in (1, 2):
        got = reloaded.average_state_dict(j)
        assert all(torch.equal(got[k], expected[j][k]) for k in expected[j])


def _run_main(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return exc.value.code, err[-1] if err else ""


def test_small_max_steps_fails_before_anything_is_written(tmp_path, capsys):
    """(2) max_steps=20 with a 30-step warmup fails before training or logging, naming every setting to change."""
    root = tmp_path / "root"
    code, last = _run_main(
        [
            "fit",
            "-c",
            str(EXAMPLES / "lm_wsd_swa.yaml"),
            "--trainer.max_steps=20",
            f"--trainer.default_root_dir={root}",
        ],
        capsys,
    )
    assert code == 1
    for needle in ("`trainer.max_steps`=20", "`trainer.max_steps` >= 37", "`warmup_steps`=30", "`warmup_steps` <= 16"):
        assert needle in last
    assert not root.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainer.callbacks+=lightning_epfl.callbacks.Cooldown", "--trainer.callbacks.cooldown_fraction=1.5"],
         "Cooldown: `cooldown_fraction` must be in (0, 1], got 1.5."),
        (["--trainer.callbacks+=lightning_epfl.callbacks.Cooldown", "--trainer.callbacks.cooldown_fraction=0"],
         "Cooldown: `cooldown_fraction` must be in (0, 1], got 0.0."),
        (["--trainer.callbacks+=lightning_epfl.callbacks.WindowedSWA", "--trainer.callbacks.window_steps=0"],
         "WindowedSWA: `window_steps` must be >= 1, got 0."),
        (["--data.init_args.paths=/no/such/text.txt"],
         "TextDataModule: `paths` entry '/no/such/text.txt' does not exist."),
    ],
)  # fmt: skip
def test_cli_prints_the_component_message_last(tmp_path, capsys, args, message):
    """(3) The CLI's last line is the component's own message; no parser wrapper, no traceback, exit status 1."""
    code, last = _run_main(
        ["fit", "-c", str(EXAMPLES / "lm_wsd_swa.yaml"), f"--trainer.default_root_dir={tmp_path}", *args], capsys
    )
    assert code == 1 and last == f"lightning-epfl: error: {message}"


def test_cli_cobo_bad_rho_message(tmp_path, capsys):
    """(3) A bad algorithm argument of the collaborative example is reported by its own message."""
    code, last = _run_main(
        ["fit", "-c", str(EXAMPLES / "cobo_digits.yaml"), f"--trainer.default_root_dir={tmp_path}",
         "--trainer.strategy.init_args.algorithm.init_args.rho=-1"],
        capsys,
    )  # fmt: skip
    assert code == 1 and "`rho` must be >= 0" in last and "Union" not in last


def test_cli_traceback_flag_shows_the_exception(tmp_path):
    """(3) --traceback lets the exception propagate (with its traceback) instead of the one-line message."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(Exception) as exc:
        main(["fit", "-c", str(EXAMPLES / "lm_wsd_swa.yaml"), "--data.init_args.paths=/nope.txt", "--traceback"])
    chain, e = [], exc.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, MisconfigurationException) for x in chain)


@pytest.mark.parametrize("kind", ["truncated", "random", "missing", "folder"])
def test_cli_bad_checkpoint_names_the_path_and_writes_nothing(tmp_path, capsys, kind):
    """(4) A truncated, foreign or missing --ckpt_path is reported with its path, before any folder is created."""
    job = _tiny_main_job(tmp_path, max_steps=4)
    good = tmp_path / "good.ckpt"
    if kind in ("truncated", "random"):
        cli_main(["fit", "--config", job])
        src = next((tmp_path / "root").rglob("step=4.ckpt"))
        data = src.read_bytes()
        good.write_bytes(data[: len(data) // 2] if kind == "truncated" else os.urandom(len(data)))
    elif kind == "folder":
        good.mkdir()
    root = tmp_path / "fresh"
    code, last = _run_main(
        ["fit", "--config", job, f"--trainer.default_root_dir={root}", "--ckpt_path", str(good)], capsys
    )
    assert code == 1 and str(good) in last and "`ckpt_path`" in last
    assert "weights_only=False" not in last
    expected = {"missing": "does not exist", "folder": "is a folder", "truncated": "truncated", "random": "truncated"}
    assert expected[kind] in last
    assert not root.exists()


def test_one_file_without_blank_lines_still_has_a_validation_split(tmp_path):
    """(5) A single file of one sentence per line (no blank line) is cut into documents; val and train both fill."""
    from lightning_epfl.datamodules import TextDataModule

    lines = [f"Sentence number {i} says something about topic {i % 17}." for i in range(6000)]
    path = tmp_path / "one.txt"
    path.write_text("\n".join(lines))
    dm = TextDataModule(paths=str(path), block_size=64, batch_size=4, val_fraction=0.1, test_fraction=0.05)
    dm.setup()
    sizes = {k: len(dm.datasets[k]) for k in ("train", "val", "test")}
    total = sum(sizes.values())
    assert sizes["val"] / total == pytest.approx(0.1, abs=0.03) and sizes["test"] / total == pytest.approx(
        0.05, abs=0.03
    )
    docs = dm.load_documents()
    assert "\n".join(docs) == path.read_text()  # nothing lost, nothing reordered before the split


def test_too_many_processes_for_the_clients_fail_before_any_process(tmp_path, capsys):
    """(6) 16 clients on 3 processes fail in the main process before launch, once, with the valid counts."""
    root = tmp_path / "root"
    code, last = _run_main(
        ["fit", "-c", str(EXAMPLES / "cobo_digits.yaml"), "--trainer.devices=3", f"--trainer.default_root_dir={root}"],
        capsys,
    )
    assert code == 1 and "`n_clients`=16 must be divisible" in last and "[1, 2, 4, 8, 16]" in last
    assert not root.exists()


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_outputs_follow_default_root_dir(path):
    """(7) No example hard-codes an output folder: logger, checkpoints and averages derive from default_root_dir."""
    cfg = yaml.safe_load(open(path))
    trainer = cfg["trainer"]
    assert "logger" not in trainer or trainer["logger"] in (True, False)
    for cb in trainer.get("callbacks", []):
        args = cb.get("init_args", {}) or {}
        assert not {"save_dir", "dirpath"} & set(args), (path.name, cb["class_path"])


def test_grokking_example_shows_progress():
    """(8) The long grokking example shows a progress bar and logs often enough to follow."""
    cfg = yaml.safe_load(open(EXAMPLES / "grokking_digits.yaml"))["trainer"]
    assert cfg.get("enable_progress_bar", True) and cfg["log_every_n_steps"] <= 50


def test_feature_rank_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    """Saving the FeatureRankMonitor plot neither switches the backend nor registers figures with pyplot."""
    import matplotlib
    import matplotlib.pyplot as plt

    from lightning_epfl.callbacks import FeatureRankMonitor

    matplotlib.use("svg")
    monitor = FeatureRankMonitor(metrics=["effective_rank"])
    monitor.history = [
        {"step": s, "values": {"feature_rank/effective_rank/l0": 3.0 - s}, "overlay": {}} for s in (0, 1)
    ]
    assert monitor.save_plot(str(tmp_path / "fr.png"))
    assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    assert (tmp_path / "fr.png").read_bytes()[:4] == b"\x89PNG"


def test_windowed_swa_evaluation_honours_reduce_fx_and_refuses_non_scalars(tmp_path):
    """The averaged-model pass reduces logged values with their reduce_fx; a non-scalar value raises."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_epfl.callbacks import WindowedSWA

    class Logs(BoringModel):
        def validation_step(self, batch, batch_idx):
            out = self.layer(batch).sum()
            self.log("val/max", float(batch_idx), reduce_fx="max")
            self.log("val/sum", 1.0, reduce_fx="sum")
            self.log("val/mean", float(batch_idx))
            return out

    def fit(model):
        swa = WindowedSWA(window_steps=2, every_n_steps=1, save_dir=str(tmp_path / "swa"))
        trainer = Trainer(
            callbacks=[swa],
            max_steps=4, limit_train_batches=4, limit_val_batches=3, val_check_interval=4, logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            num_sanity_val_steps=0, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model)
        return trainer.callback_metrics

    metrics = fit(Logs())
    assert float(metrics["val/max_swa"]) == 2.0 and float(metrics["val/sum_swa"]) == 3.0
    assert float(metrics["val/mean_swa"]) == pytest.approx(1.0)
    from lightning_epfl.callbacks.windowed_swa import _LogCollector

    with pytest.raises(ValueError, match="needs a scalar"):  # as Lightning's own `self.log` (raw validation) does
        _LogCollector().log("val/vector", torch.ones(3))


def test_atomic_checkpoint_io_never_leaves_a_partial_file(tmp_path, monkeypatch):
    """A save that dies mid-write leaves the previous file intact and no temporary file; bad loads name the file."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_epfl.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "step=1.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "pytorch-lightning_version": "2.6"}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # interrupted half-way

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "pytorch-lightning_version": "2.6"}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(path.parent) == ["step=1.ckpt"]
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MisconfigurationException, match=r"step=1\.ckpt.*truncated"):
        io.load_checkpoint(path)


def test_dataloaders_do_not_draw_from_the_global_rng(tmp_path):
    """Creating and iterating the package's loaders leaves torch's global RNG untouched (exact resumes)."""
    from lightning_epfl.datamodules import TextDataModule

    dm = TextDataModule(block_size=64, batch_size=8)
    dm.setup()
    state = torch.get_rng_state()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)
    torch.utils.data.DataLoader(list(range(4)), batch_size=2).__iter__()  # control: a plain loader does draw
    assert not torch.equal(torch.get_rng_state(), state)


def test_atomic_checkpoint_io_removes_temporaries_of_killed_savers(tmp_path):
    """A `.ckpt.tmp<pid>` left by a dead process is removed at the next save; a live process's is kept."""
    import subprocess
    import sys

    from lightning_epfl.checkpoint_io import AtomicCheckpointIO

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"step=1.ckpt.tmp{int(dead.stdout)}"
    live = tmp_path / f"step=2.ckpt.tmp{os.getppid()}"
    stale.write_bytes(b"half")
    live.write_bytes(b"busy")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "pytorch-lightning_version": "2.6"}, tmp_path / "s.ckpt")
    assert not stale.exists() and live.exists() and (tmp_path / "s.ckpt").exists()


def test_cli_refuses_foreign_and_other_model_checkpoints_before_writing(tmp_path, capsys):
    """An exported weights file and a checkpoint of another model class are refused before any folder exists."""
    job = _tiny_main_job(tmp_path, max_steps=4)
    cli_main(["fit", "--config", job])
    swa_file = next((tmp_path / "root").rglob("swa_average_h1.pt"))
    cobo_ckpt = tmp_path / "mlp.ckpt"
    from lightning_epfl.modules import MLPClassifier

    torch.save(
        {
            "state_dict": {},
            "pytorch-lightning_version": "2.6",
            "hyper_parameters": {"_class_path": MLPClassifier.__module__ + ".MLPClassifier"},
        },
        cobo_ckpt,
    )
    for path, needle in ((swa_file, "not a Lightning checkpoint"), (cobo_ckpt, "is a checkpoint of lightning_epfl")):
        root = tmp_path / path.stem
        code, last = _run_main(
            ["fit", "--config", job, f"--trainer.default_root_dir={root}", "--ckpt_path", str(path)], capsys
        )
        assert code == 1 and needle in last and str(path) in last, last
        assert not root.exists()


def test_branch_cooldown_checks_against_the_resumed_step(tmp_path, capsys):
    """A cooldown that would start before the resumed step fails before any folder, with a max_steps that works;
    branching from a cooled-down checkpoint warns."""
    job = _tiny_main_job(tmp_path, max_steps=16)  # trunk cooldown 20 %: from step 13 (16 - 3); checkpoints every 4
    cli_main(["fit", "--config", job])
    ckpts = tmp_path / "root" / "lightning_logs" / "version_0" / "checkpoints"
    root = tmp_path / "branch"
    code, last = _run_main(
        ["fit", "--config", job, "--trainer.max_steps=13", f"--trainer.default_root_dir={root}",
         "--ckpt_path", str(ckpts / "step=12.ckpt")],
        capsys,
    )  # fmt: skip
    assert code == 1 and "start at step 11" in last and "before the resumed step 12" in last, last
    assert "`trainer.max_steps` >= 14" in last and not root.exists()
    with pytest.warns(RuntimeWarning, match="inside \\(or after\\) the cooldown it was trained with"):
        cli_main(["fit", "--config", job, "--trainer.max_steps=30", f"--trainer.default_root_dir={root}",
                  "--ckpt_path", str(ckpts / "step=16.ckpt")])  # fmt: skip


def test_unreachable_validation_interval_warns(tmp_path):
    """max_steps below val_check_interval (never validates) or the checkpoint interval gives a warning."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_epfl.utilities import warn_on_unreachable_intervals

    trainer = Trainer(
        max_steps=50, val_check_interval=100, callbacks=[ModelCheckpoint(every_n_train_steps=100)], logger=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning) as record:
        warn_on_unreachable_intervals(trainer)
    text = " ".join(str(w.message) for w in record)
    assert "never validates" in text and "no step checkpoint" in text


def test_console_script_reads_sys_argv_without_lightning_warning(tmp_path, monkeypatch, capsys):
    """`lightning-epfl ...` (main() on sys.argv) does not trigger LightningCLI's warning about `args`."""
    import warnings

    monkeypatch.setattr(
        "sys.argv", ["lightning-epfl", "fit", "-c", str(EXAMPLES / "lm_wsd_swa.yaml"), "--print_config"]
    )
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        main()
    assert not [w for w in caught if "args" in str(w.message) and "LightningCLI" in str(w.message)]
