"""Eval tasks: a source, a field mapping, splits — registered by name (and as seqio tasks).

    register_eval_task(name="piqa", source=ArrowSource("hf_datasets/piqa/plain_text"),
                       mapping=MultipleChoice(context="Question: {goal}\\nAnswer:",
                                              choice_templates=("{sol1}", "{sol2}")))

The built-in tasks are defined in gin (`configs/eval/offline.gin` over the offline data,
`configs/eval/tfds.gin` for prepared TFDS data); `eval_suite(...)` collects them.
Each task is also a seqio Task named `matlm_eval_<name>` whose examples are the mapped
canonical examples (see `matlm.evaluation.mappings`) plus their `index` in the split.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import gin
import seqio

from matlm.data.tf_setup import tf  # Also imports matlm.data: its gin names register now.
from matlm.evaluation import mappings, sources, task_metrics
from matlm.evaluation.errors import (EmptySplitError, EvalError, FieldMappingError,
                                     UnknownEvalTaskError)
from matlm.evaluation.templates import render

SEQIO_PREFIX = "matlm_eval_"
FEWSHOT_SAMPLERS = ("random", "first_n")


@dataclasses.dataclass(frozen=True)
class EvalTask:
    name: str
    source: Any  # ArrowSource | JsonlSource | TfdsSource
    mapping: Any  # MultipleChoice | GenerativeQA | LastWord
    eval_split: str = "validation"
    # Exemplars come from here when the source has it, else from a fixed pool of
    # `exemplar_pool_size` examples of eval_split that are then not evaluated.
    train_split: Optional[str] = "train"
    # List fields zipped into one record each (RACE: several questions per article).
    explode_fields: tuple = ()
    # The task's one number; None: its kind's default (matlm.evaluation.task_metrics;
    # published tables use acc_norm for some multiple-choice tasks).
    primary_metric: Optional[str] = None
    # Put once before the shots and the query (MMLU's "The following are ..."); a
    # template over the query's record fields.
    description: str = ""
    # "random": seeded per query; "first_n": the pool's first k, in order (MMLU's dev).
    fewshot_sampler: str = "random"
    exemplar_pool_size: int = 20

    @property
    def kind(self) -> str:
        return self.mapping.kind

    @property
    def metric(self) -> str:
        return task_metrics.primary_metric(self.kind, self.primary_metric)

    @property
    def exemplar_split(self) -> str:
        if self.train_split and self.source.has_split(self.train_split):
            return self.train_split
        return self.eval_split


_TASKS: dict[str, EvalTask] = {}


def register_eval_task(name: str, source, mapping, eval_split: str = "validation",
                       train_split: Optional[str] = "train",
                       explode_fields: Sequence[str] = (), primary_metric: Optional[str] = None,
                       description: str = "", fewshot_sampler: str = "random",
                       exemplar_pool_size: int = 20) -> str:
    """Registers (or replaces) an eval task; returns its name. Every argument is checked
    here (one-line EvalError naming the task and the binding)."""
    if not isinstance(name, str) or not name or "," in name:
        raise EvalError(f"eval_task: name={name!r} is not valid; expected a non-empty task "
                        "name without commas")
    where = f"task {name!r}: "
    if not hasattr(mapping, "kind"):
        raise EvalError(f"{where}mapping {mapping!r} is not one of multiple_choice, "
                        "generative_qa, last_word")
    if not (hasattr(source, "read") and hasattr(source, "has_split")):
        raise EvalError(f"{where}source {source!r} is not a source (arrow_source, "
                        "jsonl_source, tfds_source)")
    if not isinstance(eval_split, str) or not source.has_split(eval_split):
        raise EvalError(f"{where}eval_split={eval_split!r} is not a split of its source")
    if primary_metric is not None:
        task_metrics.check_primary(mapping.kind, primary_metric, where)
    if not isinstance(description, str):
        raise EvalError(f"{where}description={description!r}; expected a template string")
    if fewshot_sampler not in FEWSHOT_SAMPLERS:
        raise EvalError(f"{where}fewshot_sampler={fewshot_sampler!r}; expected one of "
                        f"{FEWSHOT_SAMPLERS}")
    if isinstance(exemplar_pool_size, bool) or not isinstance(exemplar_pool_size, int) \
            or exemplar_pool_size < 1:
        raise EvalError(f"{where}exemplar_pool_size={exemplar_pool_size!r}; expected an "
                        "integer >= 1")
    task = EvalTask(name, source, mapping, eval_split, train_split, tuple(explode_fields),
                    primary_metric, description, fewshot_sampler, exemplar_pool_size)
    _TASKS[name] = task
    load_examples.cache_clear()
    _register_seqio(task)
    return name


def registered_eval_tasks() -> list[str]:
    return sorted(_TASKS)


# --- groups ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalGroup:
    """Member tasks scored together; reported with the micro average (over all member
    examples) and the macro average (over members) of the members' primary metrics."""
    name: str
    tasks: tuple


_GROUPS: dict[str, EvalGroup] = {}


def register_eval_group(name: str, tasks: Sequence[str]) -> str:
    """Registers (or replaces) a group of registered eval tasks; returns its name."""
    if not isinstance(name, str) or not name or "," in name:
        raise EvalError(f"eval_group: name={name!r} is not valid; expected a non-empty name "
                        "without commas")
    if isinstance(tasks, str) or not tasks:
        raise EvalError(f"group {name!r}: tasks={tasks!r}; expected a non-empty list of "
                        "task names")
    if not all(isinstance(t, str) for t in tasks):
        raise EvalError(f"group {name!r}: tasks={tasks!r}; expected task names")
    # Members are checked when the group is used (get_group): gin may build a group
    # before the tasks it names.
    _GROUPS[name] = EvalGroup(name, tuple(dict.fromkeys(tasks)))
    return name


def is_group(name: str) -> bool:
    return name in _GROUPS


def get_group(name: str) -> EvalGroup:
    group = _GROUPS[name]
    if name in _TASKS:
        raise EvalError(f"group {name!r}: a task has the same name")
    for task in group.tasks:
        if task not in _TASKS:
            raise EvalError(f"group {name!r}: member {task!r} is not a registered eval task"
                            + (" (groups do not nest)" if task in _GROUPS else ""))
    return group


def registered_groups() -> list[str]:
    return sorted(_GROUPS)


def register_subject_tasks(prefix: str, subjects: Sequence[str], path: str, mapping,
                           splits: Mapping[str, str], eval_split: str = "test",
                           train_split: Optional[str] = "dev",
                           description: str = "", fewshot_sampler: str = "random",
                           primary_metric: Optional[str] = None,
                           data_root: Optional[str] = None) -> list[str]:
    """One task per subject, named `prefix + subject`, over `path.format(subject=...)`
    (an arrow_source), all with the same mapping and description; returns the names
    (for an eval_group: MMLU's 57 subjects)."""
    if isinstance(subjects, str) or not subjects:
        raise EvalError(f"subject_tasks {prefix!r}: subjects={subjects!r}; expected a "
                        "non-empty list")
    if "{subject}" not in path:
        raise EvalError(f"subject_tasks {prefix!r}: path={path!r} has no '{{subject}}'")
    return [register_eval_task(prefix + subject,
                               sources.ArrowSource(path.format(subject=subject), dict(splits),
                                                   data_root),
                               mapping, eval_split, train_split, (), primary_metric,
                               description, fewshot_sampler)
            for subject in subjects]


def _listed_tasks() -> list[str]:
    """Registered tasks for an error message: a large group's members (MMLU's 57
    subjects) are summarised as `<group>'s N members`."""
    large = [g for g in _GROUPS.values() if len(g.tasks) > 16]
    hidden = {t for g in large for t in g.tasks}
    return ([t for t in registered_eval_tasks() if t not in hidden]
            + [f"{g.name}'s {len(g.tasks)} members ({g.tasks[0]}, ...)" for g in large])


def get_eval_task(name: str) -> EvalTask:
    if name not in _TASKS:
        raise UnknownEvalTaskError(
            f"unknown task {name!r}. Eval tasks: {', '.join(_listed_tasks()) or 'none'}; "
            f"groups: {', '.join(registered_groups()) or 'none'}; "
            "held-out loss: 'loss' (the checkpoint's data task) or 'loss:<seqio task>'. "
            "New tasks are defined in gin (see configs/eval/offline.gin)")
    return _TASKS[name]


def _explode(records: list[dict], fields: tuple, where: str) -> list[dict]:
    out = []
    for record in records:
        missing = [f for f in fields if f not in record]
        if missing:
            raise FieldMappingError(f"{where}explode_fields {missing} are not in the data "
                                    f"(available: {sorted(record)})")
        for values in zip(*(record[f] for f in fields)):
            out.append({**record, **dict(zip(fields, values))})
    return out


@functools.lru_cache(maxsize=64)
def load_examples(name: str, split: str) -> tuple[dict, ...]:
    """Every example of a task split, mapped and validated (errors name task and example)."""
    task = get_eval_task(name)
    records = task.source.read(split)
    if task.explode_fields:
        records = _explode(records, task.explode_fields, f"task {name!r}: ")
    if not records:
        raise EmptySplitError(f"task {name!r} split {split!r} has no examples")
    examples = []
    for index, record in enumerate(records):
        where = f"task {name!r} ({split} example {index}): "
        example = task.mapping(record, where=where, index=index)
        if task.description:  # A template over the record (MMLU: its subject).
            example["description"] = render(task.description, record, where=where)
        examples.append({**example, "index": index})
    return tuple(examples)


# --- seqio ---------------------------------------------------------------------------

def _seqio_features(kind: str):
    def feature(dtype, rank):
        return seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False,
                             required=False, dtype=dtype, rank=rank)
    features = {"index": feature(tf.int32, 0)}
    if kind == mappings.MULTIPLE_CHOICE:
        features.update(contexts=feature(tf.string, 1), continuations=feature(tf.string, 1),
                        label=feature(tf.int32, 0))
    elif kind == mappings.GENERATIVE_QA:
        features.update(context=feature(tf.string, 0), answers=feature(tf.string, 1))
    else:
        features.update(context=feature(tf.string, 0), target=feature(tf.string, 0))
    return features


def _register_seqio(task: EvalTask) -> None:
    """A seqio Task over the mapped examples (read lazily, when a dataset is built)."""
    features = _seqio_features(task.kind)
    signature = {k: tf.TensorSpec([None] * f.rank, f.dtype) for k, f in features.items()}

    def dataset_fn(split: str, shuffle_files: bool, seed=None):
        del shuffle_files, seed
        examples = load_examples(task.name, split)
        return tf.data.Dataset.from_generator(
            lambda: ({k: e[k] for k in signature} for e in examples), output_signature=signature)

    splits = [s for s in {task.eval_split, task.train_split} if s and task.source.has_split(s)]
    seqio_name = SEQIO_PREFIX + task.name
    seqio.TaskRegistry.remove(seqio_name)
    seqio.TaskRegistry.add(seqio_name, source=seqio.FunctionDataSource(dataset_fn, splits=splits),
                           preprocessors=[], output_features=features)


def seqio_examples(name: str, split: str, limit: Optional[int] = None) -> list[dict]:
    """A task split's examples read through its seqio Task (as plain Python)."""
    task = seqio.TaskRegistry.get(SEQIO_PREFIX + name)
    dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                               num_epochs=1, use_cached=False)
    if limit:
        dataset = dataset.take(limit)
    return [sources._to_python(e) for e in dataset.as_numpy_iterator()]


# --- gin -----------------------------------------------------------------------------

arrow_source = gin.external_configurable(sources.ArrowSource, name="arrow_source", module="matlm")
jsonl_source = gin.external_configurable(sources.JsonlSource, name="jsonl_source", module="matlm")
tfds_source = gin.external_configurable(sources.TfdsSource, name="tfds_source", module="matlm")
multiple_choice = gin.external_configurable(mappings.MultipleChoice, name="multiple_choice",
                                            module="matlm")
generative_qa = gin.external_configurable(mappings.GenerativeQA, name="generative_qa",
                                          module="matlm")
last_word = gin.external_configurable(mappings.LastWord, name="last_word", module="matlm")
eval_task = gin.external_configurable(register_eval_task, name="eval_task", module="matlm")
eval_group = gin.external_configurable(register_eval_group, name="eval_group", module="matlm")
subject_tasks = gin.external_configurable(register_subject_tasks, name="subject_tasks",
                                          module="matlm")


@gin.configurable("eval_suite", module="matlm")
def eval_suite(offline: Sequence[str] = (), tfds: Sequence[str] = (),
               extra: Sequence[str] = (), optional: Sequence[str] = (),
               groups: Sequence[str] = ()) -> list[str]:
    """The task names a default `matlm eval` runs. Gin evaluates each `@name/eval_task()`
    and `@name/eval_group()` reference (which registers it) when this is called:
    `configs/eval/offline.gin` binds `offline`, `optional` (registered, run only when
    named) and `groups`, `configs/eval/tfds.gin` binds `tfds`, your own gin file `extra`."""
    del optional, groups  # Registered by gin evaluating the references; run when named.
    return [*offline, *tfds, *extra]
