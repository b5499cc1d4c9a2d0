"""Prompts (exemplar choice, stability, field mappings on real data) and answer metrics."""
import json

import pytest

from matlm.evaluation import metrics, prompts


@pytest.mark.parametrize("pool_size,shots", [(2, 1), (5, 1), (5, 4), (100, 3)])
def test_exemplars_never_the_query_and_distinct(pool_size, shots):
    for seed in range(20):
        for query in range(pool_size):
            picks = prompts.exemplar_indices(query, pool_size, shots, seed, exclude_query=True)
            assert query not in picks
            assert len(set(picks)) == shots and all(0 <= p < pool_size for p in picks)


def test_exemplars_from_a_train_split_may_share_the_index():
    picks = {prompts.exemplar_indices(0, 3, 1, seed, exclude_query=False)[0] for seed in range(50)}
    assert picks == {0, 1, 2}


def test_exemplar_pool_too_small_is_an_error():
    with pytest.raises(ValueError, match="pool has only 0"):
        prompts.exemplar_indices(0, 1, 1, 0, exclude_query=True)


def test_one_shot_prompt_is_stable_for_a_fixed_seed(eval_tasks):
    from matlm.evaluation import tasks
    task = tasks.get_eval_task("copa")
    pool = tasks.load_examples("copa", "validation")
    request = prompts.build_request(task.mapping, pool[0], pool, 1, 0, exclude_query=True)
    assert request.exemplars == (85,)
    assert request.contexts[0] == (
        "The woman read the newspaper therefore she discovered the outcome of the election."
        "\n\nThe man turned on the faucet therefore")
    assert request.continuations == (" the toilet filled with water.", " water flowed from the spout.")
    assert request.label == 1
    qa = tasks.get_eval_task("nq_open")
    pool = tasks.load_examples("nq_open", "validation")
    request = prompts.build_request(qa.mapping, pool[5], pool, 1, 0, exclude_query=True)
    assert request.contexts[0] == (
        "Question: where will the next summer and winter olympics be held?\nAnswer: Beijing"
        "\n\nQuestion: when did the isle of wight become an island?\nAnswer:")
    zero = prompts.build_request(qa.mapping, pool[5], pool, 0, 0, exclude_query=True)
    assert zero.contexts[0] == pool[5]["context"] and zero.exemplars == ()


def test_exemplars_come_from_train_split_when_it_exists(tmp_path, eval_tasks):
    from matlm.evaluation import mappings, runner, sources, tasks
    for split, questions in (("train", ["t1", "t2"]), ("validation", ["v1", "v2", "v3"])):
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(json.dumps({"q": q, "a": [q.upper()]}) + "\n" for q in questions))
    tasks.register_eval_task(
        "test_with_train", sources.JsonlSource({s: str(tmp_path / f"{s}.jsonl")
                                                 for s in ("train", "validation")}),
        mappings.GenerativeQA(context="Q: {q}\nA:", answers_field="a"))
    assert tasks.get_eval_task("test_with_train").exemplar_split == "train"
    plan = runner.prepare(["test_with_train"], _Vocab(), runner.EvalOptions(num_shots=1))
    for request in plan[0].requests:
        shot = request.contexts[0].split("\n\n")[0]
        assert shot in ("Q: t1\nA: T1", "Q: t2\nA: T2")


class _Vocab:  # Enough of a vocabulary for preparing a QA task.
    eos_id = 1

    class tokenizer:
        @staticmethod
        def bos_id():
            return 3

    def encode(self, text):
        return [ord(c) + 4 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 4) for i in ids)


def test_real_field_mappings(eval_tasks):
    from matlm.evaluation import tasks
    ex = tasks.load_examples("winogrande", "validation")[0]
    # Partial scoring: the option fills the blank; the rest of the sentence is scored.
    assert ex["contexts"] == ["Sarah was a much better surgeon than Maria so Sarah",
                              "Sarah was a much better surgeon than Maria so Maria"]
    assert ex["continuations"] == [" always got the easier cases."] * 2 and ex["label"] == 1
    arc = tasks.load_examples("arc_challenge", "validation")[0]
    assert arc["label"] == 3 and arc["continuations"][3] == " Record the details of the investigation."
    boolq = tasks.load_examples("boolq", "validation")[0]
    # lm-eval-harness's order: choices ["no", "yes"], gold = the bool as 0/1.
    assert boolq["continuations"] == [" no", " yes"] and boolq["label"] == 0  # answer False
    lam = tasks.load_examples("lambada", "validation")[0]
    assert lam["target"] == " signs" and lam["context"].endswith("I don't care about")
    trivia = tasks.load_examples("trivia_qa", "validation")[0]
    assert "Sunset Boulevard" in trivia["answers"]
    assert [len(tasks.load_examples(n, "validation")) for n in ("hellaswag", "piqa", "cb")] == \
        [10042, 1838, 56]


def test_seqio_task_gives_the_mapped_examples(eval_tasks):
    from matlm.evaluation import tasks
    through_seqio = tasks.seqio_examples("copa", "validation", limit=3)
    assert through_seqio == [dict(e) for e in tasks.load_examples("copa", "validation")[:3]]


@pytest.mark.parametrize("text,normalized", [
    ("The Beatles!", "beatles"),
    ("  An   apple, a day ", "apple day"),
    ("Sunset Blvd.", "sunset blvd"),
    ("THE the", ""),
    ("rock-n-roll", "rocknroll"),
    ("Theatre", "theatre"),  # 'the' only as a whole word.
])
def test_squad_normalization(text, normalized):
    assert metrics.normalize_answer(text) == normalized


def test_exact_match_and_f1_known_cases():
    assert metrics.exact_match("the Beatles", "Beatles.") == 1.0
    assert metrics.exact_match("Beatles band", "Beatles") == 0.0
    assert metrics.f1("Beatles band", "the Beatles") == pytest.approx(2 / 3)  # p=1/2, r=1
    assert metrics.f1("w x y z", "y z v") == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert metrics.f1("x", "y") == 0.0 and metrics.f1("", "the") == 1.0
    aliases = ["Sunset Boulevard", "Sunset Blvd"]
    assert metrics.max_over_answers(metrics.exact_match, "sunset blvd.", aliases) == 1.0
    assert metrics.max_over_answers(metrics.f1, "Boulevard", aliases) == pytest.approx(2 / 3)


def test_stop_sequences():
    assert metrics.cut_at_stop("Paris, France\nQuestion", ["\n", ","]) == "Paris"
    assert metrics.cut_at_stop("no stop here", ["\n"]) == "no stop here"
