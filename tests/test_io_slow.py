"""Slow parity checks against HF transformers (torch): export round trip, and SmolLM2-135M from
its real GGUF file (perplexity equal to transformers' on the same dequantized weights).

Run: ``pytest tests/test_io_slow.py -m slow -s`` (needs torch; skipped without it).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paretoq_jax.io import load_pretrained, load_tokenizer, save_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent / "fixtures"


@nnx.jit
def forward(model, ids):
    return model(ids)


@pytest.mark.parametrize("name", ["tiny_llama_gqa", "tiny_llama_tied_llama3", "tiny_llama_qwen2"])
@pytest.mark.parametrize("bits", [2, 1.58, 4])
def test_quantized_export_loads_in_transformers(tmp_path, name, bits):
    """load -> quantize -> save_pretrained -> transformers.from_pretrained -> same logits."""
    d = FIXTURES / name
    ids = np.load(d / "input_ids.npy")
    model = load_pretrained(d, bits=bits)
    ours = np.asarray(forward(model, jnp.asarray(ids)))
    assert np.abs(ours - np.load(d / "logits.npy")).max() > 1e-3  # quantized != float
    save_pretrained(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4


def _wiki_text(n_chars: int = 40_000) -> str:
    from paretoq_jax.data.corpora import default_corpus

    docs = [json.loads(line)["text"] for line in default_corpus().read_text().splitlines()]
    return "\n\n".join(docs)[-n_chars:]


def _hf_from_gguf(path: Path):
    """transformers' own GGUF reader (its dequantization and q/k un-permutation), without the
    `accelerate` dependency that `from_pretrained(gguf_file=...)` insists on."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.AutoConfig.for_model(**load_gguf_checkpoint(str(path))["config"])
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()}, False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf.eval()


def test_smollm2_gguf_perplexity_matches_transformers(tmp_path):
    from paretoq_jax.assets import smollm2_gguf

    path = smollm2_gguf()
    tok = load_tokenizer(path)
    text = _wiki_text()
    ids = np.asarray(tok(text)["input_ids"], np.int64)
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ref_tok(text)["input_ids"] == ids.tolist()  # transformers' own GGUF tokenizer
    n_blocks, seq = 8, 256
    blocks = ids[-n_blocks * seq :].reshape(n_blocks, seq)

    model = load_pretrained(path)
    nll = []
    for b in blocks:
        logits = np.asarray(forward(model, jnp.asarray(b[None], jnp.int32)), np.float64)[0]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll.append(logz[:-1] - logits[np.arange(seq - 1), b[1:]])
    ppl_jax = float(np.exp(np.mean(nll)))

    hf = _hf_from_gguf(path)
    with torch.no_grad():
        loss = [hf(input_ids=torch.from_numpy(b[None]), labels=torch.from_numpy(b[None])).loss
                for b in blocks]  # fmt: skip
    ppl_hf = float(np.exp(np.mean([float(x) for x in loss])))
    print(f"SmolLM2-135M GGUF ppl over {n_blocks}x{seq} tokens: jax {ppl_jax:.4f} hf {ppl_hf:.4f}")
    assert abs(ppl_jax / ppl_hf - 1) < 2e-5  # docs/model.md: within 0.002%
    assert 5 < ppl_jax < 100  # a working model on real English text

    # the tokenizer saved by save_pretrained reloads in transformers and encodes identically
    save_pretrained(model, tmp_path / "smol", tokenizer=tok)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "smol")
    text = _wiki_text(2000)
    assert again(text)["input_ids"] == tok(text)["input_ids"]
