"""The evaluation runner: prepares every task (all input errors surface here), then
scores each task with each submodel, then compares submodels with the reference.

    plan = prepare(task_names, vocab, options)         # data only: no model work
    results = run(plan, config, params, submodels, reference, options)

Task names: eval tasks (`matlm.evaluation.tasks`), groups of them (`mmlu`: each member
is scored, plus the group's micro and macro averages), `loss` (held-out loss on
`options.data_task`'s validation split) or `loss:<seqio text task>`.

Multiple choice reports `acc` (argmax of the summed log-likelihood of each choice's
continuation), `acc_norm` (lm-eval-harness: argmax of that sum divided by the length in
characters of the choice, i.e. the continuation without its leading target delimiter " ")
and, with `EvalOptions.acc_uncond`, `acc_uncond` (OLMES/PMI: the sum minus the
continuation's log-likelihood after `uncond_context` alone). `run(..., log_samples=True)`
keeps every example's prompt, choices, log-likelihoods, prediction and gold.
"""
from __future__ import annotations

import dataclasses
import math
import string
import warnings
from typing import Optional, Sequence

import numpy as np

from matlm import data
from matlm.evaluation import mappings, metrics, prompts, scoring, task_metrics, tasks
from matlm.evaluation.errors import EmptySplitError, EvalError, UnknownEvalTaskError
from matlm.evaluation.submodels import Submodel

LOSS = task_metrics.LOSS  # The held-out-loss kind.


class VocabularyRoundTripWarning(UserWarning):
    """A prompt template or stop sequence the checkpoint's vocabulary cannot reproduce."""


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    num_shots: int = 0  # lm-eval-harness's default; the trainer's hook and search pass 1.
    seed: int = 0  # Exemplar draws.
    max_examples: Optional[int] = None  # Per task (held-out loss: sequences).
    batch_size: int = 8
    max_len: int = 1024  # Tokens the model reads per row; longer rows keep their last
    # max_len + 1 tokens, as lm-eval (scoring.make_row). A run's own: eval_options_for_run.
    masked: bool = True  # One compiled function for all submodels (see scoring.py).
    data_task: str = data.DEFAULT_TASK  # What `loss` means (the checkpoint's data task).
    loss_split: str = "validation"
    loss_seq_len: int = 256  # Tokens per held-out-loss row.
    progress: bool = False
    acc_uncond: bool = False  # Also score each continuation after `uncond_context` alone.
    uncond_context: str = "Answer:"  # OLMES's unconditional prompt.


def eval_options_for_run(run_config, **overrides) -> EvalOptions:
    """The EvalOptions that score a trained run, derived from its RunConfig here only, so
    that `matlm eval`, the trainer's in-loop eval and `matlm search` agree:

    - `loss` is held-out loss on the run's data task and eval split, in rows of the
      sequence length it trained at;
    - a row holds at most that many tokens (`max_len`): the model's context, as
      lm-evaluation-harness reads it from an export's max_position_embeddings.

    A dir that records no train section (`save_for_inference`, `matlm extract`) keeps
    EvalOptions' defaults for both lengths. `overrides` are EvalOptions fields, e.g. the
    command's flags; None leaves the derived value (a flag the user did not give)."""
    derived = {"data_task": run_config.data.task, "loss_split": run_config.data.eval_split}
    if run_config.seq_len is not None:
        derived.update(loss_seq_len=run_config.seq_len, max_len=run_config.seq_len)
    derived.update({name: value for name, value in overrides.items() if value is not None})
    return EvalOptions(**derived)


@dataclasses.dataclass
class PreparedTask:
    name: str
    kind: str  # "loss" or a mapping kind
    mapping: object = None
    metric: str = "loss"  # The primary metric (tasks.EvalTask.metric).
    requests: list = dataclasses.field(default_factory=list)
    rows: list = dataclasses.field(default_factory=list)  # ScoreRows or prompt token lists
    batches: list = dataclasses.field(default_factory=list)  # Held-out loss batches.
    uncond_rows: list = dataclasses.field(default_factory=list)  # acc_uncond's rows.


# --- preparation: data only ------------------------------------------------------------

def _loss_task_name(name: str, options: EvalOptions) -> str:
    """`loss` reads the run's data task (a mixture's largest component), `loss:T` task T."""
    return data.held_out_task(options.data_task) if name == LOSS else name[len(LOSS) + 1:]


def check_task_names(names: Sequence[str]) -> None:
    """Unknown names fail here, all at once, before anything is read."""
    if not names:
        raise UnknownEvalTaskError("no tasks given")
    for name in names:
        if name == LOSS or name.startswith(LOSS + ":") or tasks.is_group(name):
            continue
        tasks.get_eval_task(name)


def expand_groups(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(task names with each group replaced by its members, without repeats; the groups)."""
    check_task_names(names)
    expanded, groups = [], []
    for name in names:
        if tasks.is_group(name):
            groups.append(name)
            expanded += tasks.get_group(name).tasks
        else:
            expanded.append(name)
    return list(dict.fromkeys(expanded)), groups


def device_batch_size(requested: int) -> int:
    """`requested` rounded up to a multiple of the device count: eval batches are split
    over every device along the data axis (extra rows are padding, masked out)."""
    import jax
    return -(-requested // jax.device_count()) * jax.device_count()


def _start_id(vocab) -> int:
    return data.start_id(vocab)


def prepare(names: Sequence[str], vocab, options: EvalOptions) -> list[PreparedTask]:
    names, _ = expand_groups(names)
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


def fixed_pool_indices(split_size: int, pool_size: int, seed: int) -> list[int]:
    """The eval-split examples set aside as the exemplar pool of a task without a train
    split: `pool_size` of them drawn with `seed`, sorted. They are then never queries."""
    if pool_size >= split_size:
        raise EvalError(f"an exemplar pool of {pool_size} leaves none of the {split_size} "
                        "examples to evaluate (lower exemplar_pool_size or use --num_shots=0)")
    rng = np.random.default_rng([seed, split_size])
    return sorted(int(i) for i in rng.choice(split_size, size=pool_size, replace=False))


def _literal_texts(task, options: EvalOptions) -> list[str]:
    """The text a task's prompts always contain: the templates' literal parts, the shot
    separator, the stop sequences."""
    mapping, templates = task.mapping, [task.description]
    templates += [getattr(mapping, f, None) or "" for f in ("context", "continuation", "target")]
    templates += list(getattr(mapping, "choice_templates", ()))
    texts = [literal for t in templates for literal, *_ in string.Formatter().parse(t)
             if literal]
    if options.num_shots:
        texts.append(prompts.SHOT_SEPARATOR)
    return texts + list(getattr(mapping, "stop_sequences", ()))


def warn_unless_round_trips(task, vocab, options: EvalOptions) -> list[str]:
    """Warns once (naming the task) about template text or stop sequences that the
    vocabulary does not decode back to themselves (a normalising vocabulary turns "\n"
    into " ": prompts lose their line breaks and a "\n" stop never fires)."""
    from matlm.data.vocabulary import round_trips
    bad = sorted({t for t in _literal_texts(task, options) if not round_trips(vocab, t)})
    if bad:
        shown = ", ".join(f"{t!r} -> {vocab.decode(vocab.encode(t))!r}" for t in bad)
        warnings.warn(f"task {task.name!r}: the checkpoint's vocabulary does not round-trip "
                      f"its prompt text or stop sequences ({shown}); its prompts differ from "
                      "the intended format (a vocabulary trained before matlm's newline-"
                      "preserving format, see matlm/data/vocabulary.py)",
                      VocabularyRoundTripWarning, stacklevel=2)
    return bad


def _prepare_eval(name: str, vocab, options: EvalOptions) -> PreparedTask:
    task = tasks.get_eval_task(name)
    pool_split = task.exemplar_split
    all_examples = tasks.load_examples(name, task.eval_split)  # Validates the mapping.
    excluded: set = set()
    if not options.num_shots:
        pool = ()
    elif pool_split == task.eval_split:  # No train split: a fixed pool, never queried.
        pool_indices = fixed_pool_indices(len(all_examples), task.exemplar_pool_size,
                                          options.seed)
        pool, excluded = [all_examples[i] for i in pool_indices], set(pool_indices)
    else:
        pool = tasks.load_examples(name, pool_split)
    if options.num_shots > len(pool) and options.num_shots:
        raise EvalError(f"task {name!r}: {options.num_shots}-shot needs {options.num_shots} "
                        f"exemplars; its pool ({pool_split} split"
                        + (f", exemplar_pool_size={task.exemplar_pool_size}" if excluded else "")
                        + f") has {len(pool)}")
    # The queries come through the task's seqio dataset (the first max_examples that are
    # not in the exemplar pool).
    limit = options.max_examples and options.max_examples + len(excluded)  # Enough left.
    queries = tasks.seqio_examples(name, task.eval_split, limit)
    queries = [q for q in queries if q["index"] not in excluded][:options.max_examples]
    if not queries:
        raise EmptySplitError(f"task {name!r} split {task.eval_split!r} has no examples")
    assert len(all_examples) >= len(queries)
    warn_unless_round_trips(task, vocab, options)
    requests = [prompts.build_request(task.mapping, q, pool, options.num_shots, options.seed,
                                      exclude_query=False, sampler=task.fewshot_sampler,
                                      description=all_examples[q["index"]].get("description", ""))
                for q in queries]
    encode, start = vocab.encode, _start_id(vocab)
    prepared = PreparedTask(name, task.kind, task.mapping, task.metric, requests)
    if task.kind == mappings.GENERATIVE_QA:
        room = options.max_len - task.mapping.max_new_tokens
        if room < 2:
            raise EvalError(f"task {name!r}: max_len {options.max_len} leaves no room for a "
                            f"prompt beside max_new_tokens={task.mapping.max_new_tokens}")
        # Cut on the left to fit, as lm-evaluation-harness does (scoring.make_prompt).
        prepared.rows = [scoring.make_prompt(start, encode(r.contexts[0]), room)
                         for r in requests]
    else:
        for r in requests:
            # Errors name the task and the example (its index in the split: the doc id).
            where = f"task {name!r} ({task.eval_split} example {r.index}"
            for choice, (context, continuation) in enumerate(zip(r.contexts, r.continuations)):
                at = (f"{where}, choice {choice}): " if task.kind == mappings.MULTIPLE_CHOICE
                      else f"{where}): ")
                ctx_ids, cont_ids = scoring.encode_pair(encode, context, continuation)
                prepared.rows.append(scoring.make_row(start, ctx_ids, cont_ids, options.max_len,
                                                      at))
                if options.acc_uncond and task.kind == mappings.MULTIPLE_CHOICE:
                    ctx_ids, cont_ids = scoring.encode_pair(encode, options.uncond_context,
                                                            continuation)
                    prepared.uncond_rows.append(
                        scoring.make_row(start, ctx_ids, cont_ids, options.max_len, at))
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


def choice_length(continuation: str) -> int:
    """acc_norm's length: characters of the choice, as lm-eval-harness divides by
    len(choice); our continuation is the harness's target delimiter " " + the choice."""
    return max(len(continuation[1:] if continuation.startswith(" ") else continuation), 1)


def _score_multiple_choice(task: PreparedTask, scorer, widths, progress, log_samples=False):
    sums, _, _ = scorer.loglik(task.rows, widths, progress)
    uncond = (scorer.loglik(task.uncond_rows, widths, progress)[0] if task.uncond_rows
              else None)
    correct = {"acc": 0, "acc_norm": 0, "acc_uncond": 0}
    predictions, samples, k = [], [], 0
    for r in task.requests:
        n = len(r.continuations)
        scores = sums[k:k + n]
        lengths = np.array([choice_length(c) for c in r.continuations])
        pred = int(np.argmax(scores))
        pred_norm = int(np.argmax(scores / lengths))
        correct["acc"] += pred == r.label
        correct["acc_norm"] += pred_norm == r.label
        sample = {"index": r.index, "prompt": r.contexts[0], "choices": list(r.continuations),
                  "loglikelihoods": [float(x) for x in scores],
                  "choice_lengths": lengths.tolist(), "prediction": pred,
                  "prediction_norm": pred_norm, "gold": r.label}
        if uncond is not None:
            pred_uncond = int(np.argmax(scores - uncond[k:k + n]))
            correct["acc_uncond"] += pred_uncond == r.label
            sample.update(uncond_loglikelihoods=[float(x) for x in uncond[k:k + n]],
                          prediction_uncond=pred_uncond)
        if len(set(r.contexts)) > 1:  # Partial scoring: one context per choice.
            sample["prompt"] = list(r.contexts)
        if log_samples:
            samples.append(sample)
        predictions.append(pred)
        k += n
    n = len(task.requests)
    if uncond is None:
        del correct["acc_uncond"]
    return ({**{m: c / n for m, c in correct.items()}, "examples": n}, predictions,
            samples)


def _score_last_word(task: PreparedTask, scorer, widths, progress, log_samples=False):
    sums, all_greedy, greedy_tokens = scorer.loglik(task.rows, widths, progress)
    num_tokens = sum(len(r.tokens) - r.score_from for r in task.rows)
    samples = [{"index": r.index, "prompt": r.contexts[0], "target": r.continuations[0],
                "loglikelihood": float(ll), "target_tokens": len(row.tokens) - row.score_from,
                "greedy_match": bool(g)}
               for r, row, ll, g in zip(task.requests, task.rows, sums, all_greedy)
               ] if log_samples else []
    return ({"acc": float(np.mean(all_greedy)),
             "perplexity": math.exp(min(-float(sums.sum()) / num_tokens, 700)),
             "examples": len(task.rows)}, greedy_tokens, samples)


def _score_generative(task: PreparedTask, scorer, widths, vocab, progress):
    mapping = task.mapping
    outputs = scorer.generate(task.rows, widths, mapping.max_new_tokens, progress,
                              stop_ids=(vocab.eos_id,))  # Decoding ends at EOS.
    predictions, em, f1 = [], 0.0, 0.0
    for r, ids in zip(task.requests, outputs):
        if vocab.eos_id in ids:
            ids = ids[:ids.index(vocab.eos_id)]
        text = metrics.cut_at_stop(vocab.decode(ids), mapping.stop_sequences).strip()
        predictions.append(text)  # As generated (cut at a stop); logged by run().
        em += metrics.max_over_answers(metrics.exact_match, text, r.answers)
        f1 += metrics.max_over_answers(metrics.f1, text, r.answers)
    n = len(task.requests)
    return {"exact_match": em / n, "f1": f1 / n, "examples": n}, predictions


def _agreement(answers, reference) -> float:
    if isinstance(answers, np.ndarray):
        return float(np.mean(answers == reference)) if len(answers) else float("nan")
    return float(np.mean([a == b for a, b in zip(answers, reference)]))


def _generative_samples(task: PreparedTask, texts: Sequence[str]) -> list[dict]:
    return [{"index": r.index, "prompt": r.contexts[0], "generated": text,
             "answers": list(r.answers),
             "exact_match": metrics.max_over_answers(metrics.exact_match, text, r.answers),
             "f1": metrics.max_over_answers(metrics.f1, text, r.answers)}
            for r, text in zip(task.requests, texts)]


def group_metrics(group, task_results: dict, submodel: str) -> dict:
    """A group's averages of its members' primary metrics: `micro` weights each member by
    its number of examples (= the metric over all the group's examples pooled), `macro`
    weights members equally."""
    values = [(task_results[t]["metrics"][submodel][task_results[t]["metric"]],
               task_results[t]["metrics"][submodel]["examples"]) for t in group.tasks]
    total = sum(n for _, n in values)
    return {"micro": sum(v * n for v, n in values) / total,
            "macro": sum(v for v, _ in values) / len(values), "examples": total}


def run(plan: Sequence[PreparedTask], config, params, submodels: Sequence[Submodel],
        reference: str, vocab, options: EvalOptions, scorer=None, groups: Sequence[str] = (),
        log_samples: bool = False) -> dict:
    """{"tasks": {task: {submodel: metrics}}, "groups": {...}, "submodels": {...},
    "reference": name}; with `log_samples`, "samples": {task: {submodel: [per example]}}.

    Agreement with the reference: `greedy_agreement` (held-out positions whose greedy
    next token is the same) and `answer_agreement` (task answers that are the same)."""
    scorer = scorer or scoring.SubmodelScorer(config, params, options.batch_size,
                                              options.max_len, options.masked)
    byte_lengths = piece_byte_lengths(vocab, config.vocab_size)
    results: dict = {}
    samples: dict = {}
    for task in plan:
        answers: dict = {}
        per_model: dict = {}
        task_samples: dict = {}
        rows = (sum(len(b["loss_mask"]) for b in task.batches) if task.kind == LOSS
                else len(task.rows) + len(task.uncond_rows))
        bar = _Progress(options.progress, rows * len(submodels), task.name)
        for sub in submodels:
            logged: list = []
            if task.kind == LOSS:
                m, a = _score_loss(task, scorer, sub.widths, byte_lengths, bar)
            elif task.kind == mappings.MULTIPLE_CHOICE:
                m, a, logged = _score_multiple_choice(task, scorer, sub.widths, bar, log_samples)
            elif task.kind == mappings.LAST_WORD:
                m, a, logged = _score_last_word(task, scorer, sub.widths, bar, log_samples)
            else:
                m, texts = _score_generative(task, scorer, sub.widths, vocab, bar)
                logged = _generative_samples(task, texts) if log_samples else []
                a = [metrics.normalize_answer(t) for t in texts]
            per_model[sub.name], answers[sub.name] = m, a
            if log_samples and task.kind != LOSS:
                task_samples[sub.name] = logged
        bar.close()
        key = "greedy_agreement" if task.kind == LOSS else "answer_agreement"
        for name in per_model:
            per_model[name][key] = _agreement(answers[name], answers[reference])
        results[task.name] = {"kind": task.kind, "metric": task.metric, "metrics": per_model}
        if task_samples:
            samples[task.name] = task_samples
    group_results = {}
    for name in groups:
        group = tasks.get_group(name)
        group_results[name] = {
            "tasks": list(group.tasks),
            "metrics": {s.name: group_metrics(group, results, s.name) for s in submodels}}
    out = {
        "tasks": results,
        "groups": group_results,
        "submodels": {s.name: {"widths": list(s.widths), "params": s.params,
                               "non_embedding_params": s.non_embedding_params}
                      for s in submodels},
        "reference": reference,
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
        "compiled_functions": scorer.compiled_count(),
    }
    if log_samples:
        out["samples"] = samples
    return out
