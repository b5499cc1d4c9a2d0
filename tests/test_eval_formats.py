"""Prompts equal lm-evaluation-harness's task definitions on real examples. The expected
strings are written out here from the harness's rules (lm_eval/tasks/*/): hellaswag's
`preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())` and preprocessed
endings; piqa/arc "Question: ...\\nAnswer:"; winogrande's partial evaluation; boolq's
"{passage}\\nQuestion: {question}?\\nAnswer:" with choices ["no", "yes"]; openbookqa's
bare question_stem; MMLU's description + "A. ..\\nAnswer:" with dev shots (first_n).
The target delimiter is " " throughout."""
import pytest

from matlm.evaluation import prompts, runner, tasks


def _example(name, index, split="validation"):
    return tasks.load_examples(name, split)[index]


def test_hellaswag_query_and_endings(eval_tasks):
    ex = _example("hellaswag", 0)  # HF ctx is "... roof. he": ctx_b capitalised.
    assert ex["contexts"] == ["Roof shingle removal: A man is sitting on a roof. He"] * 4
    assert ex["continuations"][3] == " starts pulling up roofing on a roof." and ex["label"] == 3
    ex = _example("hellaswag", 3243)  # WikiHow: [header]/[title]/[step] markup, empty ctx_b.
    assert ex["contexts"][0] == (
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school "
        "diploma or ged. This job requires a high school diploma or equivalent, so make sure "
        "to apply yourself and finish school. If your high school offers these classes, take "
        "art, design, and sewing to familiarize yourself with foundational concepts in fashion.")
    # Endings are preprocessed too: "[substeps] Many" → " Many", " [title]" → ". ".
    assert ex["continuations"][0] == (
        "  Many high schools have classes offered for their students who do not have a high "
        "school diploma, so be sure to register to take these classes and find a job in your "
        "field.. Search for entry-level positions in fashion industries.")
    assert ex["continuations"][3] == (
        "  Earn a bachelor's degree in a fashion-related field. Degrees for the fashion "
        "industry include art, fashion merchandising, and marketing.")


def test_piqa_arc_openbookqa(eval_tasks):
    ex = _example("piqa", 0)
    assert ex["contexts"][0] == ("Question: How do I ready a guinea pig cage for it's new "
                                 "occupants?\nAnswer:")
    assert ex["continuations"][1].startswith(" Provide the guinea pig with a cage full of a "
                                             "few inches of bedding made of ripped jeans")
    assert ex["label"] == 0
    ex = _example("arc_easy", 0)
    assert ex["contexts"] == ["Question: Which technology was developed most recently?\nAnswer:"] * 4
    assert ex["continuations"] == [" cellular telephone", " television", " refrigerator",
                                   " airplane"] and ex["label"] == 0
    ex = _example("openbookqa", 0)
    assert ex["contexts"][0] == ("Frilled sharks and angler fish live far beneath the surface "
                                 "of the ocean, which is why they are known as")
    assert ex["continuations"] == [" Deep sea animals", " fish", " Long Sea Fish",
                                   " Far Sea Animals"] and ex["label"] == 0


def test_winogrande_partial_evaluation(eval_tasks):
    ex = _example("winogrande", 0)
    assert ex["contexts"] == ["Sarah was a much better surgeon than Maria so Sarah",
                              "Sarah was a much better surgeon than Maria so Maria"]
    assert ex["continuations"] == [" always got the easier cases."] * 2 and ex["label"] == 1


def test_boolq(eval_tasks):
    ex = _example("boolq", 0)
    assert ex["contexts"][0].startswith("All biomass goes through at least some of these steps:")
    assert ex["contexts"][0].endswith(
        "producing gasoline.\nQuestion: does ethanol take more energy make that produces?\n"
        "Answer:")
    assert ex["continuations"] == [" no", " yes"] and ex["label"] == 0  # answer: False


def test_mmlu_five_shot_from_dev_with_the_description(eval_tasks):
    task = tasks.get_eval_task("mmlu_anatomy")
    assert (task.eval_split, task.exemplar_split, task.fewshot_sampler) == ("test", "dev",
                                                                           "first_n")
    dev = tasks.load_examples("mmlu_anatomy", "dev")
    query = _example("mmlu_anatomy", 0, "test")
    request = prompts.build_request(task.mapping, query, dev, 2, seed=7, exclude_query=False,
                                    sampler="first_n", description=query["description"])
    assert request.contexts[0] == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
        "B. The first and second pharyngeal arches\nC. The second pharyngeal arch\n"
        "D. The second and third pharyngeal arches\nAnswer: D\n\n"
        "Which of these branches of the trigeminal nerve contain somatic motor processes?\n"
        "A. The supraorbital nerve\nB. The infraorbital nerve\nC. The mental nerve\n"
        "D. None of the above\nAnswer: D\n\n"
        "A lesion causing compression of the facial nerve at the stylomastoid foramen will "
        "cause ipsilateral\nA. paralysis of the facial muscles.\n"
        "B. paralysis of the facial muscles and loss of taste.\n"
        "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
        "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased "
        "salivation.\nAnswer:")
    assert request.continuations == (" A", " B", " C", " D") and request.label == 0
    assert len(tasks.get_group("mmlu").tasks) == 57


def test_acc_norm_divides_by_characters_of_the_choice():
    # lm-eval-harness: len(choice) characters; the leading target delimiter is not counted.
    assert runner.choice_length(" airplane") == 8
    assert runner.choice_length(" café au lait") == 12  # 13 UTF-8 bytes.
    assert runner.choice_length("  Earn") == 5  # Only one delimiter space is dropped.


def test_exemplars_without_a_train_split_come_from_a_disjoint_pool(eval_tasks):
    from test_eval_prompts_metrics import _Vocab  # A character-level stand-in.
    options = runner.EvalOptions(num_shots=3, seed=1)
    plan = runner.prepare(["copa"], _Vocab(), options)
    task = tasks.get_eval_task("copa")
    pool = runner.fixed_pool_indices(100, task.exemplar_pool_size, 1)
    queried = [r.index for r in plan[0].requests]
    assert not set(pool) & set(queried) and len(queried) == 100 - len(pool)
    shots = {s for r in plan[0].requests for s in r.exemplars}
    assert shots <= set(range(len(pool)))  # Pool positions, drawn per query.
    zero = runner.prepare(["copa"], _Vocab(), runner.EvalOptions(num_shots=0))
    assert [r.index for r in zero[0].requests] == list(range(100))  # 0-shot: every example.
    with pytest.raises(ValueError, match="25-shot needs 25 exemplars; its pool .*"
                                         "exemplar_pool_size=20.* has 20"):
        runner.prepare(["copa"], _Vocab(), runner.EvalOptions(num_shots=25))
