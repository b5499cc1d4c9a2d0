"""The TFDS-backed eval suite (configs/eval/tfds.gin) on `tfds.testing.mock_data`: every
task's field mapping fits its TFDS builder's features, and prompts build from train-split
exemplars. Fields whose values carry meaning (COPA's cause/effect, RACE's answer letters,
Winogrande's blank, LAMBADA's last word, ARC's label list, which must have one entry per
choice) get hand-written mock examples."""
import pytest

MEANINGFUL_VALUES = {
    "super_glue": lambda: [{"premise": "The man fell.", "question": q, "choice1": "He slipped.",
                            "choice2": "He laughed.", "idx": i, "label": i % 2}
                           for i, q in enumerate(["cause", "effect", "cause"])],
    "race": lambda: [{"article": "Tom has a red car.", "example_id": "1",
                      "questions": ["What colour?", "Who?"],
                      "options": [["red", "blue", "green", "grey"], ["Tom", "Ann", "Bo", "Cy"]],
                      "answers": ["A", "A"]}] * 2,
    "winogrande": lambda: [{"sentence": "Ann gave Bo a gift because _ was kind.",
                            "option1": "Ann", "option2": "Bo", "label": i % 2} for i in range(3)],
    "ai2_arc": lambda: [{"id": str(i), "question": "Which is a metal?",
                         "choices": {"text": ["iron", "wood", "glass", "salt"],
                                     "label": [0, 1, 2, 3]}, "answerKey": i % 4}
                        for i in range(3)],
    "lambada": lambda: [{"passage": "she opened the door and saw her " + w} for w in
                        ("mother", "father", "dog")],
}


def _as_dataset(self, split, *args, **kwargs):
    import tensorflow as tf
    examples = MEANINGFUL_VALUES[self.name]()
    def spec(value):  # Lists are tensors here, not nested structures.
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        tensor = tf.constant(value)
        return tf.TensorSpec([None] * tensor.shape.rank, tensor.dtype)
    return tf.data.Dataset.from_generator(lambda: iter(examples),
                                          output_signature=spec(examples[0]))


@pytest.fixture(scope="module")
def tfds_tasks(eval_tasks):
    from matlm.evaluation import tasks
    from matlm.gin_config import parse_gin
    parse_gin(["configs/eval/offline.gin", "configs/eval/tfds.gin"], [])
    return [n for n in tasks.eval_suite() if n.startswith("tfds_")]


def test_the_paper_suite_is_defined(tfds_tasks):
    for name in ("boolq", "cb", "copa", "rte", "wic", "hellaswag", "piqa", "arc_easy",
                 "arc_challenge", "winogrande", "trivia_qa", "natural_questions_open",
                 "web_questions", "lambada", "squad", "race_high", "anli_r1", "story_cloze"):
        assert f"tfds_{name}" in tfds_tasks


def test_tfds_tasks_map_mock_data(tfds_tasks, wiki_vocab):
    import tensorflow_datasets as tfds
    from matlm.evaluation import mappings, runner, tasks
    special = {"tfds_copa", "tfds_race_high", "tfds_race_middle", "tfds_lambada",
               "tfds_winogrande", "tfds_arc_easy", "tfds_arc_challenge"}
    kinds = set()
    for group, kwargs in ((set(tfds_tasks) - special, dict(num_examples=3, max_value=2)),
                          (special, dict(as_dataset_fn=_as_dataset))):
        tasks.load_examples.cache_clear()
        with tfds.testing.mock_data(**kwargs):
            for name in sorted(group):
                task = tasks.get_eval_task(name)
                examples = tasks.load_examples(name, task.eval_split)
                assert len(examples) >= 2, name
                # 1-shot from a train split; the mock splits are too small for a pool.
                shots = int(task.exemplar_split != task.eval_split)
                options = runner.EvalOptions(max_examples=2, max_len=128, num_shots=shots)
                [prepared] = runner.prepare([name], wiki_vocab, options)
                assert len(prepared.requests) == 2 and prepared.rows, name
                if task.exemplar_split != task.eval_split:  # Shots from the train split.
                    assert task.exemplar_split in ("train", "train_xl"), name
                kinds.add(task.kind)
    tasks.load_examples.cache_clear()
    assert kinds == {mappings.MULTIPLE_CHOICE, mappings.GENERATIVE_QA, mappings.LAST_WORD}


def test_tfds_special_values(tfds_tasks):
    import tensorflow_datasets as tfds
    from matlm.evaluation import tasks
    tasks.load_examples.cache_clear()
    with tfds.testing.mock_data(as_dataset_fn=_as_dataset):
        copa = tasks.load_examples("tfds_copa", "validation")
        race = tasks.load_examples("tfds_race_high", "validation")
        lam = tasks.load_examples("tfds_lambada", "test")
    tasks.load_examples.cache_clear()
    assert copa[0]["contexts"][0] == "The man fell because"
    assert copa[1]["continuations"] == [" he slipped.", " he laughed."]
    assert len(race) == 4 and race[1]["continuations"][0] == " Tom" and race[1]["label"] == 0
    assert lam[2] == {"context": "she opened the door and saw her", "target": " dog", "index": 2}
