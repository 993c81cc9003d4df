import json
import os

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.datamodules import ByteTokenizer, TextDataModule, load_tokenizer
from lightning_epfl.modules import CausalLMModule

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_text_default_corpus_is_pydoc_split_deterministic():
    """The default corpus is pydoc_data's topics; the document split is disjoint, complete and seeded."""
    from pydoc_data.topics import topics

    dm = TextDataModule(block_size=64)
    docs = dm.load_documents()
    assert len(docs) == len(topics) and sum(map(len, docs)) == sum(map(len, topics.values()))
    a, b = dm.split_documents(docs), TextDataModule(block_size=64).split_documents(docs)
    assert a == b
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(docs)
    frac = sum(map(len, a["val"])) / sum(map(len, docs))
    assert 0.1 <= frac < 0.1 + max(map(len, docs)) / sum(map(len, docs))
    c = TextDataModule(block_size=64, seed=1).split_documents(docs)
    assert c["val"] != a["val"]


def test_text_blocks_are_packed_bytes(tmp_path):
    """Blocks are consecutive UTF-8 bytes of the joined training documents."""
    paras = [f"paragraph {i} " + "é" * i for i in range(40)]
    path = _write(tmp_path, "a.txt", "\n\n".join(paras))
    dm = TextDataModule(paths=path, block_size=16, batch_size=4, val_fraction=0.2)
    dm.setup()
    train_docs = dm.split_documents(dm.load_documents())["train"]
    stream = list("\n".join(train_docs).encode("utf-8"))
    ds = dm.datasets["train"]
    assert len(ds) == len(stream) // 16
    for i in (0, len(ds) - 1):
        assert ds[i]["input_ids"].tolist() == stream[16 * i : 16 * i + 16]
    assert dm.vocab_size == 256
    assert ByteTokenizer().decode(ds[0]["input_ids"]) == bytes(stream[:16]).decode("utf-8", errors="replace")


def test_text_folder_and_hf_dataset_sources(tmp_path):
    """A folder of files and a local `datasets` JSON file both load."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(5):
        (d / f"{i}.txt").write_text(f"document number {i} " * 20)
    dm = TextDataModule(paths=str(d), block_size=8, val_fraction=0.2)
    assert len(dm.load_documents()) == 5
    dm.setup()
    assert len(dm.datasets["val"]) > 0
    jl = tmp_path / "data.jsonl"
    jl.write_text("\n".join(json.dumps({"body": f"row {i} " * 30}) for i in range(6)))
    dm = TextDataModule(dataset_path=str(jl), text_column="body", block_size=8)
    assert len(dm.load_documents()) == 6
    with pytest.raises(MisconfigurationException, match="text_column"):
        TextDataModule(dataset_path=str(jl), text_column="nope").load_documents()


def test_text_local_hf_tokenizer(tmp_path):
    """A tokenizer saved in a local folder is used, with its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("the cat sat on a mat".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(tmp_path / "tok")
    text = _write(tmp_path, "t.txt", "\n\n".join(["the cat sat on a mat"] * 30))
    dm = TextDataModule(paths=text, tokenizer_path=str(tmp_path / "tok"), block_size=7)
    dm.setup()
    assert dm.vocab_size == 8
    assert dm.datasets["train"][0]["input_ids"].tolist() == [2, 3, 4, 5, 6, 7, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"paths": "/no/such/file.txt"}, "paths"),
        ({"dataset_path": "/no/such/ds"}, "dataset_path"),
        ({"block_size": 1}, "block_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 0.95}, "test_fraction"),
        ({"tokenizer_path": "no-such-model-name"}, "tokenizer_path.*smollm2-135m-instruct"),
    ],
)
def test_text_bad_input(kwargs, match):
    """Bad arguments raise in __init__, naming the argument."""
    with pytest.raises(MisconfigurationException, match=match):
        TextDataModule(**kwargs)


def test_text_bad_tokenizer_and_block_size(tmp_path):
    """A folder that is not a tokenizer and a block larger than the corpus raise clearly."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(MisconfigurationException, match="tokenizer_path"):
        TextDataModule(tokenizer_path=str(tmp_path / "empty"))
    path = _write(tmp_path, "small.txt", "a\n\nb\n\nc")
    dm = TextDataModule(paths=path, block_size=64)
    with pytest.raises(MisconfigurationException, match="block_size"):
        dm.setup()


def test_causal_lm_loss_matches_transformers_and_roundtrip(tmp_path):
    """Our token-mean loss equals transformers' own loss; save_pretrained reloads to identical logits."""
    from transformers import AutoModelForCausalLM

    seed_everything(0)
    text = _write(tmp_path, "t.txt", "\n\n".join(f"line {i} of some text" for i in range(200)))
    dm = TextDataModule(paths=text, block_size=16, batch_size=8)
    model = CausalLMModule(config=TINY)
    trainer = Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        val_check_interval=3,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    assert model.model.config.vocab_size == 256
    assert {"train/loss", "val/loss", "val/ppl"} <= set(trainer.callback_metrics)
    vl = trainer.callback_metrics["val/loss"]
    assert torch.allclose(trainer.callback_metrics["val/ppl"], vl.exp(), rtol=1e-4)
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        ours = model._loss_sum(batch)
        ref = model.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    assert torch.allclose(ours[0] / ours[1], ref, atol=1e-5)
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("not an export")
    with pytest.raises(FileExistsError, match="no export wrote"):  # a folder the export did not write is kept
        model.save_pretrained(str(out))
    assert (out / "mine.txt").read_text() == "not an export"
    (out / "mine.txt").unlink()
    model.save_pretrained(str(out))
    (out / "stale.txt").write_text("left in an earlier export")
    model.save_pretrained(str(out))  # an earlier export is replaced whole
    assert not (out / "stale.txt").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=batch["input_ids"]).logits, model(batch["input_ids"]), atol=1e-5)
    assert isinstance(load_tokenizer(str(out)), ByteTokenizer)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-export")]


def test_causal_lm_checkpoint_and_pretrained_path(tmp_path):
    """load_from_checkpoint rebuilds the model; pretrained_path loads a saved model; bad args raise."""
    text = _write(tmp_path, "t.txt", "\n\n".join(f"line {i} of some text" for i in range(200)))
    dm = TextDataModule(paths=text, block_size=16, batch_size=8)
    model = CausalLMModule(config=TINY)
    trainer = Trainer(
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = CausalLMModule.load_from_checkpoint(ckpt)
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    model.save_pretrained(str(tmp_path / "hf"))
    ft = CausalLMModule(pretrained_path=str(tmp_path / "hf"), lora={"r": 2})
    ft.configure_model()
    trainable = [n for n, p in ft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.allclose(ft(x), model(x), atol=1e-5)  # LoRA B starts at zero
    with pytest.raises(MisconfigurationException, match="pretrained_path"):
        CausalLMModule(pretrained_path=str(tmp_path / "missing"))
    with pytest.raises(MisconfigurationException, match="config"):
        CausalLMModule(config=TINY, pretrained_path=str(tmp_path / "hf"))


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_text_resume_mid_epoch_reproduces_uninterrupted_run(tmp_path, where):
    """A run resumed from a mid-epoch (or end-of-epoch) checkpoint sees the same batches: identical weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    text = _write(tmp_path, "t.txt", "\n\n".join(f"paragraph {i}: " + "abc xyz " * (i % 7 + 1) for i in range(120)))

    def fit(max_steps, ckpt_path=None, callbacks=()):
        seed_everything(0)
        dm = TextDataModule(paths=text, block_size=16, batch_size=8, seed=5)
        model = CausalLMModule(config=TINY)
        trainer = Trainer(
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=list(callbacks),
            default_root_dir=tmp_path,
            enable_checkpointing=bool(callbacks),
        )
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model, dm

    model, dm = fit(0)
    per_epoch = len(dm.train_dataloader())
    assert 4 <= per_epoch <= 40
    total = 2 * per_epoch + 3
    cut = per_epoch + per_epoch // 2 if where == "mid_epoch" else per_epoch
    full, _ = fit(total)
    fit(cut, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=cut, filename="cut")])
    resumed, _ = fit(total, ckpt_path=str(tmp_path / "ck" / "cut.ckpt"))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    # negative control: the same checkpoint without the loader position replays the batches from the start
    ckpt = torch.load(tmp_path / "ck" / "cut.ckpt", weights_only=False)
    state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state == {"position": cut}  # batch index across epochs
    ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] = []
    torch.save(ckpt, tmp_path / "ck" / "no_state.ckpt")
    control, _ = fit(total, ckpt_path=str(tmp_path / "ck" / "no_state.ckpt"))
    assert not all(torch.equal(a, b) for a, b in zip(full.parameters(), control.parameters()))
