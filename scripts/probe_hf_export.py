"""Loads `matlm export --format=hf` dirs in whatever transformers this interpreter has and
writes what they compute as JSON: the logits for given token ids, greedy continuations,
and the tokenizer's ids and decoded text for given texts.

    python scripts/probe_hf_export.py REQUEST.json RESULT.json

REQUEST: {"exports": {name: {"path": DIR, "trust_remote_code": bool}},
          "tokens": [[id, ...], ...], "texts": [str, ...]}

tests/test_export_transformers4.py runs it under transformers 4.x (the exports must load
there as well as in the 5.x the export extra pins) and compares the result with matlm's
own numbers. It imports neither matlm nor jax: only torch and transformers, as a user of
the export would.
"""
from __future__ import annotations

import json
import sys


def probe(export: dict, tokens, texts) -> dict:
    import torch
    import transformers

    remote = export["trust_remote_code"]
    model = transformers.AutoModelForCausalLM.from_pretrained(export["path"],
                                                              trust_remote_code=remote)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export["path"],
                                                           trust_remote_code=remote)
    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    plain = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return {
        "model_class": type(model).__name__,
        "tokenizer_class": type(tokenizer).__name__,
        "ffn_widths": [layer.mlp.gate_proj.out_features for layer in model.model.layers],
        "logits": logits.tolist(),
        "generated": generated.tolist(),
        "ids": plain,
        "ids_with_special_tokens": tokenizer(texts)["input_ids"],
        "decoded": tokenizer.batch_decode(plain),
        "special_ids": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                        "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id},
    }


def main(request_path: str, result_path: str) -> None:
    import huggingface_hub
    import tokenizers
    import transformers

    with open(request_path) as f:
        request = json.load(f)
    result = {"versions": {"transformers": transformers.__version__,
                           "tokenizers": tokenizers.__version__,
                           "huggingface_hub": huggingface_hub.__version__},
              "exports": {name: probe(export, request["tokens"], request["texts"])
                          for name, export in request["exports"].items()}}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
