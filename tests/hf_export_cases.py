"""What the Hugging Face export tests share: the tiny model, the logits tolerance, the
texts the tokenizer must encode like matlm's vocabulary, and matlm's greedy continuation.
Used by tests/test_export_hf.py (transformers 5.x, in-process) and
tests/test_export_transformers4.py (transformers 4.x, in a second environment)."""
import jax
import numpy as np

from matlm.model import ModelConfig, init_params
from matlm.model.transformer import MatLM

# GQA (4 query heads on 2 KV heads), head_dim != d_model / n_heads, non-default RoPE theta
# and norm eps, shard-local nest blocks: each is a way the mapping to Llama could be wrong.
BASE = ModelConfig(vocab_size=2048, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                   head_dim=16, d_ff=64, rope_theta=500.0, norm_eps=1e-5, ffn_nest_blocks=2)
# fp32 in both frameworks; logits are O(1-10), the differences come from the matmul and
# softmax summation orders of XLA vs torch.
ATOL = 2e-5  # Measured: 2.7e-6 (uniform) and 2.6e-6 (Mix'n'Match) on [4, 64] tokens.


def random_params(config, seed):
    """Init params with every norm scale randomised (init sets them to 1, which would hide a
    norm that is not copied or the tied head's folded scale)."""
    params = init_params(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (np.asarray(x) * rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
                         if "scale" in jax.tree_util.keystr(path) else np.asarray(x)), params)


def random_tokens(seed=0, shape=(2, 12)):
    return np.random.default_rng(seed).integers(0, BASE.vocab_size, shape).astype(np.int32)


def greedy_continuation(config, params, prompt, widths, steps=5):
    """matlm's argmax continuation of `prompt` ([1, T]), token by token: what HF's greedy
    `generate` must reproduce."""
    seq = np.asarray(prompt)
    for _ in range(steps):
        nxt = np.asarray(MatLM(config).apply({"params": params}, seq, widths=widths))[0, -1]
        seq = np.concatenate([seq, [[int(nxt.argmax())]]], axis=1)
    return seq


def tokenizer_texts():
    """Every paragraph of the embedded Wikipedia sample, the first five paragraphs of each
    article as one text with its newlines (a piece of matlm's vocabulary, which HF's must
    split out the same way), and edge cases: leading/trailing whitespace and newlines,
    runs of spaces, tabs, byte-fallback text."""
    from matlm.data import documents
    articles = [text for _, text in documents.wiki_articles()]
    paragraphs = [p for text in articles for p in text.split("\n") if p.strip()]
    multi_line = ["\n".join(text.split("\n")[:5]) for text in articles]
    assert sum("\n" in t for t in multi_line) > 100
    edge = ["  two  spaces\n\nand\ttabs, é ✓ 漢字 \n", "\nstarts with a newline", " x", "a\n",
            "\n\n", "", "\t\u00a0nbsp"]
    return paragraphs + multi_line + edge
