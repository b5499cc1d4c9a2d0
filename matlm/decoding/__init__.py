"""Decoding: KV-cache generation for any submodel (static or traced widths) and
speculative decoding with a nested draft from the same checkpoint.

- `sampling`: turning logits into a next-token distribution (greedy, temperature,
  top-k, top-p) and sampling it with a seed; shared by plain and speculative decoding.
"""
