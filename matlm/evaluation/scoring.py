"""The model-scoring core (plain JAX): log-likelihoods, greedy decoding, held-out loss.

Rows of token ids are grouped into padded length buckets (powers of two) and fixed-size
batches, so each jitted function compiles once per bucket; batches are sharded over all
devices along a `data` mesh axis, parameters replicated.

Submodels. With `masked=True` (default) widths are a traced `[n_layers]` int array: the
masked FFN path, so *every* submodel — S, M, L, XL and any Mix'n'Match vector — reuses
one compiled function per bucket. With `masked=False` widths are static tuples: kernels
are sliced (fewer FLOPs) but every width vector compiles its own function.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from matlm.decoding.buckets import bucket_for, bucket_lengths
from matlm.decoding.generate import Decoder
from matlm.evaluation.errors import EvalError
from matlm.model import ModelConfig, build_model


@dataclasses.dataclass(frozen=True)
class ScoreRow:
    """A token sequence (the start id, context, continuation; cut on the left when too
    long, see `make_row`) whose tokens from `score_from` on are scored given everything
    before them."""

    tokens: tuple
    score_from: int
    # Which task and example the row scores ("task 'piqa' (validation example 7): "),
    # for errors; not part of the row's value.
    where: str = dataclasses.field(default="", compare=False)

    @property
    def length(self) -> int:  # Model inputs: all tokens but the last.
        return len(self.tokens) - 1


def _batches(lengths: Sequence[int], buckets: Sequence[int], batch_size: int):
    """[(bucket_len, [row indices])]: rows grouped by bucket, length-sorted, chunked."""
    by_bucket: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        by_bucket.setdefault(bucket_for(lengths[i], buckets), []).append(i)
    return [(b, rows[k:k + batch_size]) for b, rows in sorted(by_bucket.items())
            for k in range(0, len(rows), batch_size)]


class SubmodelScorer:
    """Scores rows with any submodel of one model; see the module docstring."""

    def __init__(self, config: ModelConfig, params, batch_size: int = 8,
                 max_len: int = 1024, masked: bool = True):
        self.config, self.masked, self.max_len = config, masked, max_len
        # Auto axes: data parallel over every device, XLA propagates the rest.
        self.mesh = jax.make_mesh((jax.device_count(),), ("data",),
                                  axis_types=(jax.sharding.AxisType.Auto,))
        devices = jax.device_count()
        self.batch_size = -(-batch_size // devices) * devices  # Whole rows per device.
        self._rows_sharding = NamedSharding(self.mesh, P("data"))
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self.buckets = bucket_lengths(max_len)
        model = build_model(config)

        def logits(params, inputs_BT, segment_ids_BT, positions_BT, widths):
            return model.apply({"params": params}, inputs_BT, segment_ids_BT, positions_BT,
                               widths=widths)

        def token_logp(params, inputs_BT, targets_BT, segment_ids_BT, positions_BT, widths):
            logits_BTV = logits(params, inputs_BT, segment_ids_BT, positions_BT, widths)
            logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
            logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
            return logp_BT, jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)

        if masked:
            self._token_logp = jax.jit(token_logp)
        else:  # Widths are static: one compile per width vector and bucket.
            self._token_logp = jax.jit(token_logp, static_argnums=(5,))
        # Generation: the KV-cache decoder, its own compiled functions (counted below),
        # rows sharded like the scoring batches.
        self._decoder = Decoder(config, rows_sharding=self._rows_sharding)

    def with_params(self, params) -> "SubmodelScorer":
        """A scorer for new parameters of the same model that reuses the compiled
        functions (in-loop eval: no recompiling every N steps)."""
        other = object.__new__(SubmodelScorer)
        other.__dict__.update(self.__dict__)
        other.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        return other

    def compiled_count(self) -> int:
        """Compiled variants so far (a jitted function's cache size)."""
        return self._token_logp._cache_size() + self._decoder.compiled_count()

    def _widths(self, widths: Sequence[int]):
        widths = tuple(int(w) for w in widths)
        return jnp.asarray(widths, jnp.int32) if self.masked else widths

    def _put(self, array):
        return jax.device_put(array, self._rows_sharding)

    def token_logprobs(self, features: dict, widths: Sequence[int]):
        """Per-position log p(target) and greedy tokens of one padded batch (numpy)."""
        logp_BT, greedy_BT = self._token_logp(
            self.params, self._put(features["inputs"]), self._put(features["targets"]),
            self._put(features["segment_ids"]), self._put(features["positions"]),
            self._widths(widths))
        return np.asarray(logp_BT), np.asarray(greedy_BT)

    def loglik(self, rows: Sequence[ScoreRow], widths: Sequence[int],
               progress: Optional[Callable[[int], None]] = None):
        """For each row: (sum of log p over its scored tokens, whether every scored token
        is the greedy choice, the greedy tokens at the scored positions)."""
        for row in rows:  # make_row cuts rows to the max_len they were made for.
            if row.length > self.max_len:
                raise EvalError(f"{row.where}a row of {row.length} model inputs exceeds this "
                                f"scorer's max_len {self.max_len} (prepared for a longer "
                                "max_len?)")
        sums = np.zeros(len(rows), np.float64)
        all_greedy = np.zeros(len(rows), bool)
        greedy_tokens: list = [None] * len(rows)
        for length, indices in _batches([r.length for r in rows], self.buckets, self.batch_size):
            features = _pad_rows([rows[i] for i in indices], length, self.batch_size)
            logp_BT, greedy_BT = self.token_logprobs(features, widths)
            scored_BT = features["scored"]
            for b, i in enumerate(indices):
                where = scored_BT[b]
                sums[i] = logp_BT[b][where].sum(dtype=np.float64)
                greedy_tokens[i] = tuple(greedy_BT[b][where].tolist())
                all_greedy[i] = bool(np.all(greedy_BT[b][where] == features["targets"][b][where]))
            if progress:
                progress(len(indices))
        return sums, all_greedy, greedy_tokens

    def generate(self, prompts: Sequence[Sequence[int]], widths: Sequence[int],
                 max_new_tokens: int, progress: Optional[Callable[[int], None]] = None,
                 stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """Greedy continuations of up to `max_new_tokens` tokens with the KV cache
        (matlm.decoding.generate), each ending before its first stop id; text-level stops
        are the caller's. The context is max_len tokens."""
        return self._decoder.generate(
            self.params, prompts, widths=self._widths(widths), max_new_tokens=max_new_tokens,
            stop_ids=stop_ids, batch_size=self.batch_size, max_len=self.max_len,
            progress=progress)


def _pad_rows(rows: Sequence[ScoreRow], length: int, batch_size: int) -> dict:
    """Right-padded model features of `rows` (plus empty rows up to `batch_size`)."""
    inputs = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    segment_ids = np.zeros((batch_size, length), np.int32)
    scored = np.zeros((batch_size, length), bool)
    for b, row in enumerate(rows):
        n = row.length
        inputs[b, :n] = row.tokens[:-1]
        targets[b, :n] = row.tokens[1:]
        segment_ids[b, :n] = 1
        scored[b, row.score_from - 1:n] = True  # Target t predicts tokens[t + 1].
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)).copy()
    return dict(inputs=inputs, targets=targets, segment_ids=segment_ids, positions=positions,
                scored=scored)


def encode_pair(encode: Callable[[str], list], context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, as the model reads them together:
    `encode(context + continuation)` split after the context's tokens (SentencePiece
    merges across the boundary otherwise), falling back to separate encodes when the
    joint encoding does not start with the context's tokens."""
    context_ids = list(encode(context)) if context else []
    whole = list(encode(context + continuation))
    if whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return context_ids, whole[len(context_ids):]
    return context_ids, list(encode(continuation))


def make_row(start_id: int, context_ids: Sequence[int], continuation_ids: Sequence[int],
             max_len: int, where: str = "") -> ScoreRow:
    """[start] + context + continuation, of which the model reads all but the last token.

    Too long for `max_len` inputs, the row keeps its last `max_len + 1` tokens, exactly as
    lm-evaluation-harness (HFLM._loglikelihood_tokens: `(context_enc +
    continuation_enc)[-(max_length + 1):][:-1]` are the inputs, its context_enc starting
    with BOS): the start id is the first token to go, then the context's from the left.
    A continuation longer than `max_len` cannot be scored (the harness asserts the same);
    that is an EvalError starting with `where` (the task and the example)."""
    if not continuation_ids:
        raise EvalError(f"{where}empty continuation")
    if len(continuation_ids) > max_len:
        raise EvalError(f"{where}the continuation of {len(continuation_ids)} tokens does not "
                        f"fit max_len {max_len}; it needs --max_len >= {len(continuation_ids)} (the "
                        "default is the context the model trained at; positions beyond it "
                        "were never trained) or leave the task out")
    tokens = (start_id, *context_ids, *continuation_ids)[-(max_len + 1):]
    return ScoreRow(tokens=tokens, score_from=len(tokens) - len(continuation_ids), where=where)


def make_prompt(start_id: int, context_ids: Sequence[int], room: int) -> list:
    """A generation prompt of at most `room` tokens: [start] + context, its last `room`
    tokens when longer (lm-evaluation-harness's generate_until left-truncates the encoded
    context, BOS included, to max_length - max_gen_toks the same way)."""
    return [start_id, *context_ids][-room:]
