#!/usr/bin/env python
"""PyTorch eager reference for benchmark_train.py: the MatFormer joint train step written
the way a PyTorch user would, a Python loop over the granularities' FFN widths.

It trains the same model as matlm (pre-norm RMSNorm, GPT-NeoX RoPE, causal multi-head
attention, GELU-tanh FFN sliced to each width, tied embeddings with logits scaled by
d_model^-1/2, loss = Σ λ_i · CE_i, AdamW with global-norm clipping) starting from the
parameters matlm wrote to an .npz, so that the first step's per-granularity losses can
be checked against matlm's before any timing is trusted. It uses nn.Linear's [out, in]
weight layout (prefix slices of the first kernel stay contiguous, as in the MatFormer
authors' PyTorch code) and scaled_dot_product_attention's fused causal kernel.

Not a matlm dependency: benchmark_train.py runs it with an interpreter that has torch
(`--torch_python`). Prints one JSON object: losses, step times, torch's own matmul peak.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F


def load_model(npz, n_layers: int):
    """matlm's [in, out] kernels as trainable [out, in] tensors (nn.Linear's layout)."""
    def linear(key):
        kernel = npz[key]
        return torch.nn.Parameter(torch.from_numpy(kernel.reshape(kernel.shape[0], -1).T.copy()))
    def vector(key):
        return torch.nn.Parameter(torch.from_numpy(npz[key].copy()))
    params = {"embedding": vector("embedding"), "final_norm": vector("final_norm/scale")}
    for i in range(n_layers):
        for name in ("attn/wq", "attn/wk", "attn/wv", "ffn/wi"):
            params[f"{i}/{name}"] = linear(f"layer_{i}/{name}")
        # wo kernels are [H, E, D] and [F, D]: [in, out] once the leading axes are merged.
        for name in ("attn/wo", "ffn/wo"):
            kernel = npz[f"layer_{i}/{name}"]
            params[f"{i}/{name}"] = torch.nn.Parameter(
                torch.from_numpy(kernel.reshape(-1, kernel.shape[-1]).T.copy()))
        for name in ("attn_norm", "ffn_norm"):
            params[f"{i}/{name}"] = vector(f"layer_{i}/{name}/scale")
    return params


def make_forward(params, n_layers, n_heads, seq_len, rope_theta, eps):
    E = params["0/attn/wq"].shape[0] // n_heads
    half = E // 2
    angle = torch.arange(seq_len, dtype=torch.float64)[:, None] * (
        rope_theta ** (-torch.arange(half, dtype=torch.float64) / half))
    sin, cos = angle.sin().float(), angle.cos().float()  # [T, E/2], broadcast over B, H

    def rms(x, scale):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale

    def rope(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(tokens_BT, widths):
        B, T = tokens_BT.shape
        emb = params["embedding"]
        x = emb[tokens_BT]
        D = x.shape[-1]
        for i in range(n_layers):
            h = rms(x, params[f"{i}/attn_norm"])
            q, k, v = (F.linear(h, params[f"{i}/attn/{n}"]).view(B, T, n_heads, E).transpose(1, 2)
                       for n in ("wq", "wk", "wv"))
            a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, D), params[f"{i}/attn/wo"])
            h = rms(x, params[f"{i}/ffn_norm"])
            w = widths[i]
            up = F.linear(h, params[f"{i}/ffn/wi"][:w])
            x = x + F.linear(F.gelu(up, approximate="tanh"), params[f"{i}/ffn/wo"][:, :w])
        x = rms(x, params["final_norm"]) * D ** -0.5
        return F.linear(x.reshape(B * T, D), emb)

    return forward


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", required=True, help="parameters and tokens written by "
                        "benchmark_train.py")
    parser.add_argument("--spec", required=True, help="JSON: n_layers, n_heads, widths, "
                        "weights, rope_theta, norm_eps, adamw settings")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    spec = json.loads(args.spec)
    npz = np.load(args.npz)
    tokens = torch.from_numpy(npz["tokens"].astype(np.int64))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    params = load_model(npz, spec["n_layers"])
    forward = make_forward(params, spec["n_layers"], spec["n_heads"], inputs.shape[1],
                           spec["rope_theta"], spec["norm_eps"])
    no_decay = [p for name, p in params.items() if name.endswith("norm")]
    decay = [p for name, p in params.items() if not name.endswith("norm")]
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=spec["learning_rate"],
        betas=(spec["adam_b1"], spec["adam_b2"]), eps=spec["adam_eps"],
        weight_decay=spec["weight_decay"])

    first_losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = [F.cross_entropy(forward(inputs, widths), targets) for widths in spec["widths"]]
        if not first_losses:
            first_losses.extend(float(loss) for loss in losses)
        total = sum(weight * loss for weight, loss in zip(spec["weights"], losses))
        total.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), spec["clip_grad_norm"])
        optimizer.step()

    a = torch.randn(2048, 2048)
    peak_times = []
    for _ in range(6):
        start = time.perf_counter()
        a @ a
        peak_times.append(time.perf_counter() - start)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"losses": first_losses, "step_times": times,
                      "peak_gflops": 2 * 2048 ** 3 / min(peak_times[1:]) / 1e9,
                      "torch_version": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
