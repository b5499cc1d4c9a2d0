"""Task mappings that cannot silently mislabel: gold as an index / a mapped label / the
field holding the gold text, choices from several fields with a seeded shuffle, every
label checked against the number of choices, every bad declaration a one-line error."""
import json

import jax
import pytest

from matlm.cli.main import main
from matlm.evaluation import FieldMappingError, mappings, sources, tasks


def _register(tmp_path, name, records, mapping):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks.register_eval_task(name, sources.JsonlSource({"validation": str(path)}), mapping)
    return name


def test_label_out_of_range_names_task_example_and_value(tmp_path):
    name = _register(tmp_path, "oor", [{"q": "a", "c": ["x", "y"], "l": 1},
                                       {"q": "b", "c": ["x", "y"], "l": 2}],
                     mappings.MultipleChoice(context="{q}", choices_field="c", label_field="l"))
    with pytest.raises(FieldMappingError) as info:
        tasks.load_examples(name, "validation")
    assert str(info.value) == ("task 'oor' (validation example 1): label 2 of field 'l' is out "
                               "of range for 2 choices (0...1)")


@pytest.mark.parametrize("record,mapping_kw,message", [
    # A boolean is not an index: int(True) would silently be choice 1.
    ({"c": ["x", "y"], "l": True}, {}, "label field 'l' is True, not an index"),
    ({"c": ["x", "y"], "l": "B"}, {}, "label field 'l' is 'B', not an integer index"),
    ({"c": ["x", "y"], "l": 1.5}, {}, "label field 'l' is 1.5, not an integer index"),
    ({"c": ["x", "y"], "l": -1}, {}, "label -1 of field 'l' is out of range for 2 choices"),
    ({"c": ["x", "y"], "l": "yes"}, {"label_map": {"yes": 2, "no": 0}},
     "label 'yes' of field 'l' is out of range for 2 choices"),
    # A label list longer than the choices: 'C' would be found but name no choice.
    ({"c": ["x", "y"], "keys": ["A", "B", "C"], "l": "C"}, {"label_index_field": "keys"},
     "'keys' has 3 entries (['A', 'B', 'C']) for 2 choices"),
])
def test_bad_labels_are_errors(tmp_path, record, mapping_kw, message):
    name = _register(tmp_path, "bad", [record], mappings.MultipleChoice(
        context="Q", choices_field="c", label_field="l", **mapping_kw))
    with pytest.raises(FieldMappingError, match="task 'bad' \\(validation example 0\\): ") as info:
        tasks.load_examples(name, "validation")
    assert message in str(info.value)


def test_gold_text_field_after_a_seeded_shuffle(tmp_path):
    records = [{"q": f"q{i}", "right": f"R{i}", "d1": f"a{i}", "d2": f"b{i}", "d3": f"c{i}"}
               for i in range(40)]
    mapping = mappings.MultipleChoice(context="{q}", choice_fields=("d1", "d2", "d3", "right"),
                                      shuffle_seed=3, label_field=None, gold_text_field="right")
    examples = tasks.load_examples(_register(tmp_path, "sciq_like", records, mapping), "validation")
    for record, example in zip(records, examples):
        assert example["continuations"][example["label"]] == " " + record["right"]
        assert sorted(example["continuations"]) == sorted(
            " " + record[f] for f in ("d1", "d2", "d3", "right"))
    # Shuffled: the gold (always the last field in the data) lands at every position.
    assert {e["label"] for e in examples} == {0, 1, 2, 3}
    again = tasks.load_examples.__wrapped__("sciq_like", "validation")
    assert again == examples  # Seeded: the same order every time.


def test_index_label_follows_the_shuffle(tmp_path):
    records = [{"a": "A", "b": "B", "c": "C", "l": str(i % 3)} for i in range(30)]
    mapping = mappings.MultipleChoice(context="x", choice_fields=("a", "b", "c"), shuffle_seed=0,
                                      label_field="l")
    examples = tasks.load_examples(_register(tmp_path, "idx", records, mapping), "validation")
    for record, example in zip(records, examples):
        assert example["continuations"][example["label"]] == " " + "ABC"[int(record["l"])]


def test_gold_text_not_among_the_choices(tmp_path):
    mapping = mappings.MultipleChoice(context="x", choice_fields=("a", "b"), label_field=None,
                                      gold_text_field="g")
    name = _register(tmp_path, "nogold", [{"a": "A", "b": "B", "g": "A"},
                                          {"a": "A", "b": "B", "g": "C"}], mapping)
    with pytest.raises(FieldMappingError, match=r"example 1\): gold text 'C' of field 'g' is "
                                                r"not among the choices \['A', 'B'\]"):
        tasks.load_examples(name, "validation")


def test_sciq_gold_is_the_correct_answer_on_real_data(eval_tasks):
    task = tasks.get_eval_task("sciq")
    records = task.source.read("validation")
    examples = tasks.load_examples("sciq", "validation")
    assert len(examples) == len(records) == 1000
    for record, example in zip(records, examples):
        assert example["continuations"][example["label"]] == " " + record["correct_answer"]
    counts = [sum(e["label"] == k for e in examples) for k in range(4)]
    assert min(counts) > 200, counts  # Not always the same slot.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, wiki_vocab):
    from matlm.model import ModelConfig, init_params
    from matlm.model_dir import save_for_inference
    config = ModelConfig(vocab_size=2048, d_model=32, n_layers=2, n_heads=2, d_ff=128)
    model_dir = tmp_path_factory.mktemp("model")
    save_for_inference(model_dir, config, init_params(config, jax.random.key(0)), 1,
                       wiki_vocab.sentencepiece_model_file, {"task": "matlm_wiki"})
    return model_dir


@pytest.mark.parametrize("binding,message", [
    ("piqa/multiple_choice.label_field=None",
     "piqa/multiple_choice: label_field=None, gold_text_field=None; expected exactly one"),
    ("piqa/multiple_choice.choice_templates='{sol1}'",
     "piqa/multiple_choice: choice_templates='{sol1}' is not valid; expected a tuple of strings"),
    ("arc/multiple_choice.label_field=3",
     "arc/multiple_choice: label_field=3 is not valid; expected a field path string"),
    ("hellaswag/multiple_choice.context_conversions='z'",
     "context_conversions='z' is not valid; expected a string of template conversions"),
    ("piqa/multiple_choice.shuffle_seed=-1", "shuffle_seed=-1 is not valid"),
    ("piqa/eval_task.primary_metric='f1'",
     "task 'piqa': primary_metric='f1'; expected one of ('acc', 'acc_norm', 'acc_uncond')"),
    ("trivia_qa/generative_qa.stop_sequences=('',)", "stop_sequences=('',) is not valid"),
])
def test_bad_declarations_are_one_line_errors(checkpoint, capsys, no_model_work, eval_tasks,
                                              binding, message):
    assert main(["eval", f"--model_dir={checkpoint}", "--tasks=piqa",
                 f"--gin.{binding}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
