"""matlm-trained vocabularies keep "\\n" and runs of spaces (real text round-trips), a
"\\n" stop sequence ends a generated answer, and `matlm eval` warns, naming the task,
when a checkpoint's (older, normalising) vocabulary cannot reproduce a template."""
import io
import json
import warnings

import pytest
import sentencepiece as spm

from matlm.evaluation import mappings, metrics, runner, sources, tasks


def test_real_text_with_newlines_round_trips(wiki_vocab):
    from matlm.data import documents
    from matlm.data.tasks import WIKI_VALIDATION_FRACTION
    articles = documents.select_split(documents.wiki_articles(), "validation",
                                      WIKI_VALIDATION_FRACTION)
    assert sum(a.count("\n") for a in articles) > 100  # Real paragraphs, not one line.
    for text in articles:
        assert wiki_vocab.decode(wiki_vocab.encode(text)) == text
    prompt = "Question: who?\nAnswer:  two  spaces\n\n    indented code"
    assert wiki_vocab.decode(wiki_vocab.encode(prompt)) == prompt
    newline = wiki_vocab.tokenizer.piece_to_id("\n")
    assert wiki_vocab.tokenizer.id_to_piece(newline) == "\n"  # One piece of its own.
    assert wiki_vocab.encode("a\nb").count(newline) == 1


def test_a_newline_stop_sequence_ends_the_answer(wiki_vocab):
    ids = wiki_vocab.encode("Paris\nQuestion: what is the capital of Italy?")
    text = metrics.cut_at_stop(wiki_vocab.decode(ids), ["\n"])
    assert text == "Paris"
    assert metrics.exact_match(text, "Paris") == 1.0


def _old_style_vocab(tmp_path):
    """A vocabulary trained as matlm did before (nmt_nfkc, whitespace squashed)."""
    from matlm.data import documents, load_vocabulary
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for _, t in documents.wiki_articles()[:3]]),
        model_writer=model, vocab_size=400, pad_id=0, eos_id=1, unk_id=2, bos_id=3,
        byte_fallback=True, max_sentence_length=1 << 16, minloglevel=2)
    path = tmp_path / "old.model"
    path.write_bytes(model.getvalue())
    return load_vocabulary(path)


def test_eval_warns_once_naming_the_task_for_a_vocab_without_newlines(tmp_path, wiki_vocab):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"q{i}", "a": "x"}) + "\n" for i in range(3)))
    tasks.register_eval_task("nl_qa", sources.JsonlSource({"validation": str(path)}),
                             mappings.GenerativeQA(context="Q: {q}\nA:", answers_field="a"))
    old = _old_style_vocab(tmp_path)
    with pytest.warns(runner.VocabularyRoundTripWarning) as caught:
        runner.prepare(["nl_qa"], old, runner.EvalOptions(num_shots=0))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("task 'nl_qa': the checkpoint's vocabulary does not round-trip")
    assert "'\\n' -> ''" in message  # The stop sequence: lost entirely.
    with warnings.catch_warnings():
        warnings.simplefilter("error", runner.VocabularyRoundTripWarning)
        runner.prepare(["nl_qa"], wiki_vocab, runner.EvalOptions(num_shots=0))
