"""Export a submodel as a Hugging Face model dir (docs/export.md).

    DIR/config.json            LlamaConfig (uniform widths) or MatLMConfig (per-layer widths)
    DIR/model.safetensors      float32 weights under Llama's parameter names
    DIR/tokenizer.json         the SentencePiece model as a `tokenizers` pipeline
    DIR/tokenizer_config.json  BOS/EOS/UNK/PAD, add_bos_token=True (matlm's document start)
    DIR/tokenizer.model        the SentencePiece model itself (matlm's vocab.model)
    DIR/modeling_matlm.py      per-layer widths only: remote code (modeling_matlm.py here)

Why the weights map onto Llama exactly (matlm.model.layers / head):
- RoPE: matlm rotates the two halves of each head (GPT-NeoX layout) with frequencies
  theta^(-2i/E): that is HF's `rotate_half` with `inv_freq = 1/theta^(arange(0,E,2)/E)`,
  so q/k projections are copied as they are, no row permutation.
- GQA: query head h reads KV head h // (H/K) in both (`repeat_kv`).
- RMSNorm: x * rsqrt(mean(x^2) + eps) * scale in both; eps is `norm_eps`.
- Tied embeddings: matlm scales the tied head by d_model^-1/2; Llama's tied head has no
  scale, so the factor is folded into the final norm's weight (exact up to one fp32
  rounding). Untied models copy `unembedding` to `lm_head`.
- FFN: swiglu = silu(gate) * up (Llama's MLP); geglu = gelu_tanh(gate) * up (flax's
  `nn.gelu` is the tanh approximation: hidden_act="gelu_pytorch_tanh"). Non-gated
  activations have no Llama-family equivalent and are refused.
- Per-layer widths: nest blocks undone and kernels cut by
  `matlm.submodels.extract.extract_submodel` (the same code as `matlm extract`).

transformers and safetensors are imported here only, when an export runs; torch is not
needed to write an export (only to load one).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from matlm.model.config import ModelConfig
from matlm.submodels.extract import check_output_dir, extract_submodel

# matlm activation -> the Llama `hidden_act` that computes the same gated FFN.
HIDDEN_ACT = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}
REMOTE_CODE = Path(__file__).with_name("modeling_matlm.py")
REMOTE_CONFIG = "modeling_matlm.MatLMConfig"
REMOTE_MODEL = "modeling_matlm.MatLMForCausalLM"
INSTALL_HINT = 'pip install -e ".[export]"'


class ExportError(ValueError):
    """A model, widths, output dir or environment that cannot be exported (one line,
    raised before anything is written)."""


def require_backend() -> None:
    """transformers and safetensors importable, else a one-line ExportError."""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ExportError(f"--format=hf needs the export extra ({e.name} is missing): "
                          f"{INSTALL_HINT}") from None


def check_exportable(config: ModelConfig) -> None:
    """Refuses models that no Hugging Face Llama computes exactly: a position encoding
    other than RoPE, a non-gated activation."""
    if config.position_encoding != "rope":
        raise ExportError(
            f"position_encoding={config.position_encoding!r} cannot be exported to Hugging "
            "Face: the Llama architecture the export targets encodes positions with RoPE "
            "only")
    if config.activation not in HIDDEN_ACT:
        raise ExportError(
            f"activation={config.activation!r} cannot be exported to Hugging Face: no "
            "transformers architecture has a non-gated FFN with RMSNorm and RoPE like "
            f"matlm's; supported: {', '.join(HIDDEN_ACT)} (Llama's gated MLP)")


def llama_state_dict(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """Llama parameter names -> float32 arrays ([out, in] like torch.nn.Linear) of an
    unrolled, contiguous-layout parameter tree whose FFN kernels are at their widths."""
    D, H, K, E = config.d_model, config.n_heads, config.num_kv_heads, config.head_size
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
    out = {"model.embed_tokens.weight": f32(params["embedding"])}
    for i in range(config.n_layers):
        p, pre = params[f"layer_{i}"], f"model.layers.{i}."
        attn, ffn = p["attn"], p["ffn"]
        out[pre + "self_attn.q_proj.weight"] = f32(np.reshape(attn["wq"], (D, H * E)).T)
        out[pre + "self_attn.k_proj.weight"] = f32(np.reshape(attn["wk"], (D, K * E)).T)
        out[pre + "self_attn.v_proj.weight"] = f32(np.reshape(attn["wv"], (D, K * E)).T)
        out[pre + "self_attn.o_proj.weight"] = f32(np.reshape(attn["wo"], (H * E, D)).T)
        out[pre + "mlp.gate_proj.weight"] = f32(np.asarray(ffn["wi_gate"]).T)
        out[pre + "mlp.up_proj.weight"] = f32(np.asarray(ffn["wi_up"]).T)
        out[pre + "mlp.down_proj.weight"] = f32(np.asarray(ffn["wo"]).T)
        out[pre + "input_layernorm.weight"] = f32(p["attn_norm"]["scale"])
        out[pre + "post_attention_layernorm.weight"] = f32(p["ffn_norm"]["scale"])
    final_scale = np.asarray(params["final_norm"]["scale"], np.float32)
    if config.tie_embeddings:
        # matlm's tied head is (norm(x) * d^-1/2) @ E^T; Llama's is norm(x) @ E^T.
        final_scale = final_scale * np.float32(D ** -0.5)
    else:
        out["lm_head.weight"] = f32(np.asarray(params["unembedding"]).T)
    out["model.norm.weight"] = f32(final_scale)
    return out


def transformers4_fields(config: ModelConfig) -> dict:
    """The fields transformers 4.x reads where 5.x has new names: 4.x takes RoPE's base
    from `rope_theta` (5.x from `rope_parameters`, and folds a top-level `rope_theta` into
    it) and the load dtype from `torch_dtype` before 4.56 (`dtype` since)."""
    return {"rope_theta": float(config.rope_theta), "dtype": "float32",
            "torch_dtype": "float32"}


def hf_config(config: ModelConfig, special_ids: dict, max_positions: int) -> dict:
    """config.json: LlamaConfig for uniform widths; MatLMConfig (remote code, auto_map)
    when layers differ. Loads in transformers 4.x and 5.x (docs/export.md)."""
    from transformers import LlamaConfig

    widths = config.ffn_dims
    llama = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        intermediate_size=max(widths), num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_size, hidden_act=HIDDEN_ACT[config.activation],
        max_position_embeddings=max_positions, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=False, mlp_bias=False, **special_ids)
    out = llama.to_dict()
    out.update(transformers4_fields(config))
    if len(set(widths)) == 1:
        out["architectures"] = ["LlamaForCausalLM"]
        return out
    out.update(model_type="matlm_llama", architectures=["MatLMForCausalLM"],
               layer_intermediate_sizes=[int(w) for w in widths],
               auto_map={"AutoConfig": REMOTE_CONFIG, "AutoModelForCausalLM": REMOTE_MODEL})
    return out


def special_token_ids(vocab_path: str) -> dict:
    """bos/eos/pad ids of the SentencePiece model (None where it has none)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=vocab_path)
    get = lambda i: int(i) if i >= 0 else None
    return {"bos_token_id": get(sp.bos_id()), "eos_token_id": get(sp.eos_id()),
            "pad_token_id": get(sp.pad_id())}


def sentencepiece_pipeline(vocab_path: str):
    """The SentencePiece model as a `tokenizers.Tokenizer` that encodes like
    SentencePieceProcessor, and the model's proto.

    The pipeline is transformers' own conversion
    (`SpmConverter.build_tokenizer_from_spm_proto`: the model's normalizer charsmap,
    whitespace rules, dummy prefix, byte fallback), with the dummy prefix moved into the
    normaliser (below).
    """
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    proto = SentencePieceExtractor(vocab_path).proto
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if proto.trainer_spec.model_type == 1:  # Unigram: (piece, score) list.
        backend = SpmConverter.build_tokenizer_from_spm_proto(proto, pieces, legacy=False)
    else:  # BPE: merges regenerated from the piece scores.
        backend = SpmConverter.build_tokenizer_from_spm_proto(
            proto, {p: i for i, (p, _) in enumerate(pieces)}, legacy=False)
    if backend is None:
        raise ExportError(f"vocabulary {vocab_path!r}: SentencePiece model type "
                          f"{proto.trainer_spec.model_type} is not supported (unigram or BPE)")
    if proto.normalizer_spec.add_dummy_prefix:
        # The converter's Metaspace(prepend_scheme="first") adds the dummy prefix only when
        # the text's first character survives normalisation: text that starts with
        # whitespace (" x", "\nx", stripped by the normaliser) lost its "▁" ("▁x" ->
        # "x"). SentencePiece prefixes the normalised text whatever it started with, so
        # the prefix goes at the end of the normaliser instead (Prepend skips empty text).
        backend.normalizer = normalizers.Sequence([backend.normalizer, normalizers.Prepend("▁")])
        user_defined = [p.piece for p in proto.pieces if p.type == 4]
        backend.pre_tokenizer = (pre_tokenizers.Split(
            Regex("|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))),
            behavior="isolated") if user_defined else None)
    return backend, proto


def tokenizer_config(special_tokens: dict) -> dict:
    """tokenizer_config.json that transformers 4.x and 5.x read alike.

    `PreTrainedTokenizerFast` is a class both know: in 4.x the `tokenizer.json` wrapper,
    in 5.x an alias of `TokenizersBackend` (a 5.x-only name that 4.x refuses: "does not
    exist"). Not `LlamaTokenizerFast`: 5.x rebuilds its own Llama pipeline (BPE, Metaspace)
    for it instead of reading tokenizer.json. `add_bos_token` is what 5.x builds the
    post-processor from; 4.x uses tokenizer.json's post-processor, which adds the same BOS.
    `clean_up_tokenization_spaces` was True by default until about 4.45 and would change
    decoded text (" ." -> ".").
    """
    return {"tokenizer_class": "PreTrainedTokenizerFast", **special_tokens,
            "add_bos_token": "bos_token" in special_tokens, "add_eos_token": False,
            "clean_up_tokenization_spaces": False}


def write_tokenizer(vocab_path: str, directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json (AutoTokenizer, offline) and tokenizer.model.

    BOS is prepended by default (tokenizer.json's post-processor and `add_bos_token`):
    matlm starts every document with it. Written with `tokenizers` itself, not through a
    transformers tokenizer class, so no version's class-specific fields get in.
    """
    from tokenizers import AddedToken, processors

    backend, proto = sentencepiece_pipeline(vocab_path)
    spec = proto.trainer_spec
    ids = {"bos_token": spec.bos_id, "eos_token": spec.eos_id, "unk_token": spec.unk_id,
           "pad_token": spec.pad_id}
    ids = {name: i for name, i in ids.items() if 0 <= i < len(proto.pieces)}
    special = {name: proto.pieces[i].piece for name, i in ids.items()}
    # Special: never split out of text, skipped by decode(skip_special_tokens=True).
    backend.add_special_tokens([AddedToken(proto.pieces[i].piece, special=True,
                                           normalized=False) for i in sorted(ids.values())])
    if "bos_token" in special:
        bos = special["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, ids["bos_token"])])
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(special), indent=2) + "\n")
    shutil.copyfile(vocab_path, directory / "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class Exported:
    path: Path
    config: ModelConfig  # The exported (sliced) model's config.
    widths: tuple[int, ...]
    remote_code: bool
    bytes: int


def export_hf(params, config: ModelConfig, widths, vocab_path: str, output,
              max_positions: Optional[int] = None, provenance: Optional[dict] = None
              ) -> Exported:
    """Writes the submodel of (`params`, `config`) at `widths` (anything
    `ModelConfig.resolve_widths` takes; None = the stored widths) to `output` as a
    Hugging Face model dir. Checks everything first; writes into a temporary sibling dir
    and renames it into place, so a failure leaves no partial export."""
    check_exportable(config)
    require_backend()
    path = check_output_dir(output)
    if not vocab_path or not os.path.isfile(vocab_path):
        raise ExportError(f"the checkpoint has no vocabulary (vocab.model) to export "
                          f"({vocab_path or 'none recorded'})")
    sliced, sub = extract_submodel(params, config, config.ffn_dims if widths is None
                                   else widths)
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        state = llama_state_dict(sub, sliced)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config_dict = hf_config(sub, special_token_ids(vocab_path), max_positions or 2048)
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        remote = "auto_map" in config_dict
        if remote:
            shutil.copyfile(REMOTE_CODE, tmp / REMOTE_CODE.name)
        write_tokenizer(vocab_path, tmp)
        if provenance is not None:
            (tmp / "matlm_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
        size = sum(f.stat().st_size for f in tmp.iterdir())
        if path.is_dir():  # Empty (checked above): rename() replaces an empty dir.
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(path=path, config=sub, widths=tuple(sub.ffn_dims), remote_code=remote,
                    bytes=size)
