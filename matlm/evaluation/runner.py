"""The evaluation runner: prepares every task (all input errors surface here), then
scores each task with each submodel, then compares submodels with the reference.

    plan = prepare(task_names, vocab, options)         # data only: no model work
    results = run(plan, config, params, submodels, reference, options)

Task names: eval tasks (`matlm.evaluation.tasks`), `loss` (held-out loss on
`options.data_task`'s validation split) or `loss:<seqio text task>`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from matlm import data
from matlm.evaluation import mappings, metrics, prompts, scoring, tasks
from matlm.evaluation.errors import EmptySplitError, EvalError, UnknownEvalTaskError
from matlm.evaluation.submodels import Submodel

LOSS = "loss"


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    num_shots: int = 1
    seed: int = 0  # Exemplar draws.
    max_examples: Optional[int] = None  # Per task (held-out loss: sequences).
    batch_size: int = 8
    max_len: int = 1024  # Tokens the model reads per row; contexts are cut on the left.
    masked: bool = True  # One compiled function for all submodels (see scoring.py).
    data_task: str = data.DEFAULT_TASK  # What `loss` means (the checkpoint's data task).
    loss_split: str = "validation"
    loss_seq_len: int = 256
    progress: bool = False


@dataclasses.dataclass
class PreparedTask:
    name: str
    kind: str  # "loss" or a mapping kind
    mapping: object = None
    requests: list = dataclasses.field(default_factory=list)
    rows: list = dataclasses.field(default_factory=list)  # ScoreRows or prompt token lists
    batches: list = dataclasses.field(default_factory=list)  # Held-out loss batches.


# --- preparation: data only ------------------------------------------------------------

def _loss_task_name(name: str, options: EvalOptions) -> str:
    """`loss` reads the run's data task (a mixture's largest component), `loss:T` task T."""
    return data.held_out_task(options.data_task) if name == LOSS else name[len(LOSS) + 1:]


def check_task_names(names: Sequence[str]) -> None:
    """Unknown names fail here, all at once, before anything is read."""
    if not names:
        raise UnknownEvalTaskError("no tasks given")
    for name in names:
        if name == LOSS or name.startswith(LOSS + ":"):
            continue
        tasks.get_eval_task(name)


def device_batch_size(requested: int) -> int:
    """`requested` rounded up to a multiple of the device count: eval batches are split
    over every device along the data axis (extra rows are padding, masked out)."""
    import jax
    return -(-requested // jax.device_count()) * jax.device_count()


def _start_id(vocab) -> int:
    return data.start_id(vocab)


def prepare(names: Sequence[str], vocab, options: EvalOptions) -> list[PreparedTask]:
    check_task_names(names)
    return [_prepare_loss(n, vocab, options) if n == LOSS or n.startswith(LOSS + ":")
            else _prepare_eval(n, vocab, options) for n in names]


def _prepare_loss(name: str, vocab, options: EvalOptions) -> PreparedTask:
    task_name = _loss_task_name(name, options)
    try:
        iterator = data.make_batch_iterator(task_name, options.loss_split, options.loss_seq_len,
                                            options.batch_size, vocab, seed=0, shuffle=False,
                                            repeat=False)
    except data.DataError as e:
        if "no documents" in str(e):
            raise EmptySplitError(f"{name}: {e}") from None
        raise EvalError(f"{name}: {e}") from None
    limit = (math.ceil(options.max_examples / options.batch_size) if options.max_examples
             else iterator.num_batches)
    batches = [iterator.batch(s) for s in range(min(limit, iterator.num_batches))]
    if options.max_examples:  # Whole batches; rows past max_examples are masked out.
        extra = len(batches) * options.batch_size - options.max_examples
        if extra > 0:
            batches[-1]["loss_mask"][-extra:] = 0
    return PreparedTask(f"{LOSS}:{task_name}" if name == LOSS else name, LOSS, batches=batches)


def _prepare_eval(name: str, vocab, options: EvalOptions) -> PreparedTask:
    task = tasks.get_eval_task(name)
    pool_split = task.exemplar_split
    exclude_query = pool_split == task.eval_split
    all_examples = tasks.load_examples(name, task.eval_split)  # Validates the mapping.
    pool = tasks.load_examples(name, pool_split) if options.num_shots else ()
    # The queries come through the task's seqio dataset (the first max_examples).
    queries = tasks.seqio_examples(name, task.eval_split, options.max_examples)
    if not queries:
        raise EmptySplitError(f"task {name!r} split {task.eval_split!r} has no examples")
    assert len(all_examples) >= len(queries)
    requests = [prompts.build_request(task.mapping, q, pool, options.num_shots,
                                      options.seed, exclude_query) for q in queries]
    encode, start = vocab.encode, _start_id(vocab)
    prepared = PreparedTask(name, task.kind, task.mapping, requests)
    if task.kind == mappings.GENERATIVE_QA:
        room = options.max_len - task.mapping.max_new_tokens
        if room < 2:
            raise EvalError(f"task {name!r}: max_len {options.max_len} leaves no room for a "
                            f"prompt beside max_new_tokens={task.mapping.max_new_tokens}")
        prepared.rows = [[start, *encode(r.contexts[0])[-(room - 1):]] for r in requests]
    else:
        for r in requests:
            for context, continuation in zip(r.contexts, r.continuations):
                ctx_ids, cont_ids = scoring.encode_pair(encode, context, continuation)
                prepared.rows.append(scoring.make_row(start, ctx_ids, cont_ids, options.max_len))
    return prepared


# --- scoring ----------------------------------------------------------------------------

def piece_byte_lengths(vocab, size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for (control pieces 0, byte pieces 1), for bits
    per byte. SentencePiece's word-start marker counts as the space it decodes to."""
    sp = vocab.tokenizer
    table = np.zeros(size, np.int64)
    for i in range(min(size, sp.get_piece_size())):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        table[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return table


class _Progress:
    def __init__(self, enabled: bool, total: int, description: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=description, unit="row", leave=False)

    def __call__(self, n: int):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _score_loss(task: PreparedTask, scorer, widths, byte_lengths, progress):
    nll, tokens, num_bytes, greedy = 0.0, 0.0, 0, []
    for batch in task.batches:
        logp_BT, greedy_BT = scorer.token_logprobs(batch, widths)
        mask_BT = batch["loss_mask"] > 0
        nll -= float(logp_BT[mask_BT].sum(dtype=np.float64))
        tokens += float(mask_BT.sum())
        num_bytes += int(byte_lengths[batch["targets"][mask_BT]].sum())
        greedy.append(greedy_BT[mask_BT])
        progress(len(mask_BT))
    if tokens == 0:
        raise EmptySplitError(f"{task.name}: no tokens to score")
    loss = nll / tokens
    return ({"loss": loss, "perplexity": math.exp(min(loss, 700)),
             "bits_per_byte": nll / math.log(2) / max(num_bytes, 1), "tokens": int(tokens)},
            np.concatenate(greedy))


def _score_multiple_choice(task: PreparedTask, scorer, widths, progress):
    sums, _, _ = scorer.loglik(task.rows, widths, progress)
    correct, correct_norm, predictions, k = 0, 0, [], 0
    for r in task.requests:
        n = len(r.continuations)
        scores = sums[k:k + n]
        lengths = np.array([max(len(c.encode()), 1) for c in r.continuations])
        pred = int(np.argmax(scores))
        correct += pred == r.label
        correct_norm += int(np.argmax(scores / lengths)) == r.label
        predictions.append(pred)
        k += n
    n = len(task.requests)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "examples": n}, predictions


def _score_last_word(task: PreparedTask, scorer, widths, progress):
    sums, all_greedy, greedy_tokens = scorer.loglik(task.rows, widths, progress)
    num_tokens = sum(len(r.tokens) - r.score_from for r in task.rows)
    return ({"acc": float(np.mean(all_greedy)),
             "perplexity": math.exp(min(-float(sums.sum()) / num_tokens, 700)),
             "examples": len(task.rows)}, greedy_tokens)


def _score_generative(task: PreparedTask, scorer, widths, vocab, progress):
    mapping = task.mapping
    outputs = scorer.generate(task.rows, widths, mapping.max_new_tokens, progress)
    predictions, em, f1 = [], 0.0, 0.0
    for r, ids in zip(task.requests, outputs):
        if vocab.eos_id in ids:
            ids = ids[:ids.index(vocab.eos_id)]
        text = metrics.cut_at_stop(vocab.decode(ids), mapping.stop_sequences).strip()
        predictions.append(metrics.normalize_answer(text))
        em += metrics.max_over_answers(metrics.exact_match, text, r.answers)
        f1 += metrics.max_over_answers(metrics.f1, text, r.answers)
    n = len(task.requests)
    return {"exact_match": em / n, "f1": f1 / n, "examples": n}, predictions


def _agreement(answers, reference) -> float:
    if isinstance(answers, np.ndarray):
        return float(np.mean(answers == reference)) if len(answers) else float("nan")
    return float(np.mean([a == b for a, b in zip(answers, reference)]))


def run(plan: Sequence[PreparedTask], config, params, submodels: Sequence[Submodel],
        reference: str, vocab, options: EvalOptions, scorer=None) -> dict:
    """{"tasks": {task: {submodel: metrics}}, "submodels": {...}, "reference": name}.

    Agreement with the reference: `greedy_agreement` (held-out positions whose greedy
    next token is the same) and `answer_agreement` (task answers that are the same)."""
    scorer = scorer or scoring.SubmodelScorer(config, params, options.batch_size,
                                              options.max_len, options.masked)
    byte_lengths = piece_byte_lengths(vocab, config.vocab_size)
    results: dict = {}
    for task in plan:
        answers: dict = {}
        per_model: dict = {}
        rows = (sum(len(b["loss_mask"]) for b in task.batches) if task.kind == LOSS
                else len(task.rows))
        bar = _Progress(options.progress, rows * len(submodels), task.name)
        for sub in submodels:
            if task.kind == LOSS:
                m, a = _score_loss(task, scorer, sub.widths, byte_lengths, bar)
            elif task.kind == mappings.MULTIPLE_CHOICE:
                m, a = _score_multiple_choice(task, scorer, sub.widths, bar)
            elif task.kind == mappings.LAST_WORD:
                m, a = _score_last_word(task, scorer, sub.widths, bar)
            else:
                m, a = _score_generative(task, scorer, sub.widths, vocab, bar)
            per_model[sub.name], answers[sub.name] = m, a
        bar.close()
        key = "greedy_agreement" if task.kind == LOSS else "answer_agreement"
        for name in per_model:
            per_model[name][key] = _agreement(answers[name], answers[reference])
        results[task.name] = {"kind": task.kind, "metrics": per_model}
    return {
        "tasks": results,
        "submodels": {s.name: {"widths": list(s.widths), "params": s.params,
                               "non_embedding_params": s.non_embedding_params}
                      for s in submodels},
        "reference": reference,
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
        "compiled_functions": scorer.compiled_count(),
    }
