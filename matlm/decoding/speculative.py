"""Speculative decoding with a nested draft (Leviathan et al. 2023; Chen et al. 2023).

A MatFormer checkpoint holds its own draft: a narrower width vector of the same params
(S, M, a Mix'n'Match vector) proposes `k` tokens autoregressively, and the target (XL)
scores all of them in ONE `extend` of k + 1 tokens. Draft token x_i is accepted with
probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is drawn
from norm(max(0, p_i - q_i)); if all k are accepted a bonus token is drawn from p_{k+1}.
The output is then distributed exactly as the target's own sampling, for the processed
distributions of `matlm.decoding.sampling.token_probs` (greedy = one-hot, so greedy output
is token-for-token plain target greedy).

Invariant of one decoding round, per row: the target cache holds every token but the last
one, `pending_B` (sampled, not yet fed); the round feeds [pending, d_1..d_k] to the target,
so a row that accepts n drafts keeps base + 1 + n cache positions (the rejected tail is
rewound, each row to its own length) and its new pending token is the resampled/bonus one.

The draft keeps its own cache in step with the target's: it is fed pending, d_1..d_k
(d_k's logits unused) and rewound to the same per-row length, so every round starts with
a one-token draft extend. With `shared_cache=True` (the MatFormer paper's shared
attention cache) the draft instead reads the *target's* cache for the verified prefix
(attention weights are shared across widths, so the shapes agree) and writes its draft
K/V into a copy that verification discards: no draft prefill and one draft extend fewer
per round, at the price of draft K/V that come from the target's residual stream (layers
after the first see XL's FFN outputs), which may lower acceptance. Verification never
reads the draft's K/V, so the output stays exact.

Rows that are finished keep running in the batch (shapes stay fixed: one compile) but
their caches are rewound to where they were, so they never grow.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from matlm.decoding.generate import sample_step
from matlm.decoding.sampling import SamplingConfig, sample_rows, token_probs


class SpeculativeError(ValueError):
    """Bad speculative-decoding input (a ValueError: the CLI prints one line, exit 2)."""


# The acceptance rule. "standard" is the only correct one; the broken variants exist so
# that the statistical test can show it detects a wrong rule (tests pass `_rule=`).
_RULES = ("standard", "always_accept", "resample_from_p")


@dataclasses.dataclass
class SpeculativeStats:
    """Counts over all rows of one `speculative_generate` call."""
    drafted: int = 0  # Draft tokens proposed to active rows (k per row per round).
    accepted: int = 0  # Of those, accepted by the target.
    target_passes: int = 0  # Target forward calls: the prompt prefill + one verify per round.
    draft_passes: int = 0  # Draft forward calls (prefill, k extends per round).
    rounds: int = 0
    new_tokens: int = 0  # Tokens returned (stop ids excluded).
    seconds: float = 0.0  # Wall clock of the decoding (compiles included on a first call).

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "acceptance_rate": self.acceptance_rate,
                "tokens_per_second": self.tokens_per_second}


@dataclasses.dataclass(frozen=True)
class _MatLMBackend:
    """The cache interface of `matlm.decoding.kv_cache` for one ModelConfig (hashable:
    a static argument of the jitted round)."""
    config: object

    def init_cache(self, batch_size: int, max_len: int):
        from matlm.decoding import kv_cache
        return kv_cache.init_cache(self.config, batch_size, max_len)

    def prefill(self, params, cache, tokens_BT, lengths_B, widths):
        from matlm.decoding import kv_cache
        return kv_cache.prefill(params, self.config, cache, tokens_BT, lengths_B, widths)

    def extend(self, params, cache, tokens_BK, widths):
        from matlm.decoding import kv_cache
        return kv_cache.extend(params, self.config, cache, tokens_BK, widths)


def _split_rows(keys_B, n: int):
    """n independent keys per row: [n, B]."""
    return jnp.swapaxes(jax.vmap(lambda key: jax.random.split(key, n))(keys_B), 0, 1)


def _accept(keys_B, p_BJV, q_BkV, drafts_Bk, rule: str):
    """The acceptance rule for every row at once. p: the target's distributions at the
    k + 1 verified positions (J = k + 1), q: the draft's at the k drafted ones; each row
    draws with its own key. Returns (accepted count n_B, the token drawn at n_B)."""
    B, k = drafts_Bk.shape
    u_keys_B, r_keys_B = _split_rows(keys_B, 2)
    p_drafts_Bk = jnp.take_along_axis(p_BJV[:, :k], drafts_Bk[..., None], axis=-1)[..., 0]
    q_drafts_Bk = jnp.take_along_axis(q_BkV, drafts_Bk[..., None], axis=-1)[..., 0]
    u_Bk = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(u_keys_B)
    if rule == "always_accept":
        ok_Bk = jnp.ones((B, k), bool)
    else:
        # u < p/q without the division: q > 0 for a token the draft sampled. Greedy:
        # q = 1 and p is 0 or 1, so this accepts exactly the target's argmax.
        ok_Bk = u_Bk * q_drafts_Bk < p_drafts_Bk
    n_B = jnp.sum(jnp.cumprod(ok_Bk.astype(jnp.int32), axis=1), axis=1)
    rows_B = jnp.arange(B)
    p_BV = p_BJV[rows_B, n_B]
    # After k acceptances the "residual" is p_{k+1} itself (the bonus token): q is 0 there.
    q_BV = jnp.concatenate([q_BkV, jnp.zeros_like(q_BkV[:, :1])], axis=1)[rows_B, n_B]
    if rule == "resample_from_p":
        residual_BV = p_BV
    else:
        residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
    # A rejection has probability 0 where p <= q everywhere, but rounding can still land
    # there with an all-zero residual: fall back to p rather than sample from nothing.
    residual_BV = jnp.where(jnp.sum(residual_BV, axis=-1, keepdims=True) > 0, residual_BV, p_BV)
    next_B = jax.vmap(lambda key, r_V: jax.random.categorical(key, jnp.log(r_V)))(
        r_keys_B, residual_BV).astype(jnp.int32)
    return n_B, next_B


@functools.partial(jax.jit, static_argnames=("backend", "k", "target_widths", "draft_widths",
                                             "sampling", "shared", "rule"))
def _round(params, tcache, dcache, pending_B, active_B, row_keys_B, round_index, *, backend, k,
           target_widths, draft_widths, sampling, shared, rule):
    """One draft-k-then-verify round for every row. Returns the new caches, the pending
    tokens, the emitted tokens [B, k + 1] (the first n_B + 1 are valid) and n_B.
    Row b draws from fold_in(row_keys_B[b], round_index) only: its output depends on its
    prompt's key, not on the other rows of the batch."""
    keys_B = jax.vmap(lambda key: jax.random.fold_in(key, round_index))(row_keys_B)
    keys_JB = _split_rows(keys_B, k + 1)  # [0]: acceptance, [1..k]: the k draft draws.
    base_B = tcache.lengths_B
    # Both caches hold everything before `pending` (the shared variant: the target's).
    logits_B1V, dcache_run = backend.extend(params, tcache if shared else dcache,
                                            pending_B[:, None], draft_widths)

    def draft_step(carry, step_keys_B):
        cache, logits_BV = carry
        token_B = sample_rows(step_keys_B, logits_BV, sampling)
        next_logits_B1V, cache = backend.extend(params, cache, token_B[:, None], draft_widths)
        return (cache, next_logits_B1V[:, 0]), (token_B, token_probs(logits_BV, sampling))

    # The own cache also takes d_k (its logits unused), so that after every round it holds
    # exactly the target's accepted prefix: the next round starts with a 1-token extend.
    # (One token, not a 2-token catch-up: a multi-token extend costs several 1-token ones
    # on CPU.) The shared variant's cache is discarded, so it skips that extend.
    scanned = k - 1 if shared else k
    (dcache_run, last_logits_BV), (tokens_sB, q_sBV) = jax.lax.scan(
        draft_step, (dcache_run, logits_B1V[:, 0]), keys_JB[1:scanned + 1])
    drafts_Bk, q_BkV = tokens_sB.T, jnp.swapaxes(q_sBV, 0, 1)
    if shared:
        last_B = sample_rows(keys_JB[k], last_logits_BV, sampling)
        drafts_Bk = jnp.concatenate([drafts_Bk, last_B[:, None]], axis=1)
        q_BkV = jnp.concatenate([q_BkV, token_probs(last_logits_BV, sampling)[:, None]],
                                axis=1)

    fed_BJ = jnp.concatenate([pending_B[:, None], drafts_Bk], axis=1)
    logits_BJV, tcache = backend.extend(params, tcache, fed_BJ, target_widths)
    n_B, next_B = _accept(keys_JB[0], token_probs(logits_BJV, sampling), q_BkV, drafts_Bk, rule)

    # A finished row keeps its length, so its caches never grow past the bound.
    lengths_B = jnp.where(active_B, base_B + 1 + n_B, base_B)
    tcache = tcache.rewind(lengths_B)
    dcache = None if shared else dcache_run.rewind(lengths_B)
    emitted_BJ = jnp.where(jnp.arange(k + 1)[None] < n_B[:, None],
                           jnp.concatenate([drafts_Bk, next_B[:, None]], axis=1),
                           next_B[:, None])
    return tcache, dcache, jnp.where(active_B, next_B, pending_B), emitted_BJ, n_B


@functools.partial(jax.jit, static_argnames=("backend", "widths", "sampling"))
def _prefill(params, cache, tokens_BT, lengths_B, row_keys_B, *, backend, widths, sampling):
    """Prompt prefill; samples the first new token from the last prompt position."""
    logits_BTV, cache = backend.prefill(params, cache, tokens_BT, lengths_B, widths)
    last_BV = logits_BTV[jnp.arange(tokens_BT.shape[0]), lengths_B - 1]
    return cache, sample_step(row_keys_B, 0, last_BV, sampling)


@functools.partial(jax.jit, static_argnames=("backend", "batch_size", "max_len"))
def _empty_cache(*, backend, batch_size, max_len):
    # Jitted: built op by op, the per-layer zeros cost more than a short decode's rounds.
    return backend.init_cache(batch_size, max_len)


@jax.jit
def _row_keys(base_key, indices_B):
    return jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices_B)


def check_speculative_args(config, target_widths, draft_widths, draft_tokens: int
                           ) -> tuple[tuple, tuple]:
    """(target, draft) width vectors, validated; a one-line SpeculativeError naming the
    flag otherwise. Accepts anything ModelConfig.resolve_widths does (names, ints, lists)."""
    if not isinstance(draft_tokens, (int, np.integer)) or draft_tokens < 1:
        raise SpeculativeError(f"--draft_tokens must be an integer >= 1 (tokens drafted per "
                               f"round), got {draft_tokens!r}")
    try:
        target = config.resolve_widths(target_widths)
    except ValueError as e:
        raise SpeculativeError(f"--widths={target_widths!r} is invalid: {e}") from None
    try:
        draft = config.resolve_widths(draft_widths)
    except ValueError as e:
        raise SpeculativeError(f"--draft={draft_widths!r} is invalid: {e}") from None
    wider = [i for i, (d, t) in enumerate(zip(draft, target)) if d > t]
    if wider:
        i = wider[0]
        raise SpeculativeError(
            f"--draft={draft_widths!r} is wider than the target --widths={target_widths!r} in "
            f"layer {i} ({draft[i]} > {target[i]}): the draft must be a nested (narrower) "
            "submodel")
    if draft == target:
        raise SpeculativeError(
            f"--draft={draft_widths!r} equals the target --widths={target_widths!r}: drafting "
            "with the target itself is pointless; pick a narrower draft such as S")
    return target, draft


def speculative_generate(params, config, prompts: Sequence[Sequence[int]], *, target_widths,
                         draft_widths, draft_tokens: int, max_new_tokens: int,
                         sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                         stop_ids: Sequence[int] = (),
                         stop_fn: Optional[Callable[[int, list], bool]] = None,
                         on_tokens: Optional[Callable[[int, list], None]] = None,
                         shared_cache: bool = False, batch_size: Optional[int] = None,
                         max_len: Optional[int] = None, _rule: str = "standard",
                         _backend=None) -> tuple[list[list[int]], SpeculativeStats]:
    """Each prompt's new tokens and the decoding statistics.

    Prompts, stops, streaming and the context are as in `matlm.decoding.generate.generate`
    (a stop id ends a row and is not returned; `stop_fn(row, new_tokens)` after every
    token; `on_tokens(row, token_ids)` once per round with the row's accepted tokens;
    `max_len`: the model's context). `target_widths` / `draft_widths`: anything
    ModelConfig.resolve_widths takes ("XL", "S", a per-layer list), static (sliced
    kernels). `batch_size`: rows decoded together (default all). Greedy output equals
    `generate`'s; sampled output has the target's distribution (not its exact draws).
    """
    # The checks and stop rules every decoder shares.
    from matlm.decoding.generate import check_prompts, token_budgets
    target, draft = check_speculative_args(config, target_widths, draft_widths, draft_tokens)
    if _rule not in _RULES:
        raise ValueError(f"unknown acceptance rule {_rule!r}; one of {_RULES}")
    prompts = check_prompts(prompts, config, max_new_tokens, max_len)
    if batch_size is not None and batch_size < 1:
        raise SpeculativeError(f"batch_size must be >= 1, got {batch_size}")
    if _backend is None:
        from matlm.decoding import kv_cache
        # Scanned params are unstacked once here, not inside every jitted extend.
        params, config = kv_cache.decoding_form(params, config)
    backend = _backend or _MatLMBackend(config)
    budgets = token_budgets(prompts, max_new_tokens, max_len)
    stats = SpeculativeStats()
    outputs: list = [[] for _ in prompts]
    B = batch_size or len(prompts)
    base_key = jax.random.key(seed)
    start = time.perf_counter()
    for first in range(0, len(prompts), B):
        rows = list(range(first, min(first + B, len(prompts))))
        _decode_batch(params, backend, prompts, rows, budgets, outputs, stats, B=B,
                      target=target, draft=draft, k=int(draft_tokens), sampling=sampling,
                      base_key=base_key, stop_ids=stop_ids, stop_fn=stop_fn,
                      on_tokens=on_tokens, shared=shared_cache, rule=_rule)
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = sum(len(o) for o in outputs)
    return outputs, stats


def _decode_batch(params, backend, prompts, rows, budgets, outputs, stats, *, B, target,
                  draft, k, sampling, base_key, stop_ids, stop_fn, on_tokens, shared, rule):
    from matlm.decoding.generate import cache_buckets, pad_prompts, take_tokens
    T = cache_buckets(None, max(len(prompts[i]) for i in rows))
    # The deepest write: an active row holds at most prompt + budget - 2 positions at the
    # start of a round, and the round appends k + 1 (to either cache).
    # Past the context (max_len) only draft tokens are written: the accepted ones stay
    # within it (budgets), so S is a power of two, not capped at max_len.
    S = cache_buckets(None, max(len(prompts[i]) + budgets[i] for i in rows) + k)
    tokens_BT, lengths_B, indices_B = pad_prompts(prompts, rows, B, T)  # Padding rows start done.
    row_keys_B = _row_keys(base_key, indices_B)
    empty = _empty_cache(backend=backend, batch_size=B, max_len=S)
    tcache, pending_B = _prefill(params, empty, tokens_BT, lengths_B, row_keys_B,
                                 backend=backend, widths=target, sampling=sampling)
    stats.target_passes += 1
    dcache = None
    if not shared:
        dcache, _ = _prefill(params, empty, tokens_BT, lengths_B, row_keys_B,
                             backend=backend, widths=draft, sampling=sampling)
        stats.draft_passes += 1
    done = np.array([b >= len(rows) for b in range(B)])
    stop_set = {int(s) for s in stop_ids}

    def take(b, tokens):
        i = rows[b]
        done[b] = take_tokens(i, tokens.tolist(), outputs, budgets[i], stop_set, stop_fn,
                              on_tokens)

    first_B = np.asarray(pending_B)
    for b in range(len(rows)):
        take(b, first_B[b:b + 1])
    round_index = 1  # 0 was the prefill's draw.
    while not done.all():
        active = ~done
        tcache, dcache, pending_B, emitted_BJ, n_B = _round(
            params, tcache, dcache, pending_B, jnp.asarray(active), row_keys_B,
            round_index, backend=backend, k=k, target_widths=target, draft_widths=draft,
            sampling=sampling, shared=shared, rule=rule)
        round_index += 1
        emitted, n = np.asarray(emitted_BJ), np.asarray(n_B)
        stats.rounds += 1
        stats.target_passes += 1
        stats.draft_passes += k if shared else k + 1
        stats.drafted += k * int(active.sum())
        stats.accepted += int(n[active].sum())
        for b in np.flatnonzero(active):
            take(b, emitted[b, :n[b] + 1])
