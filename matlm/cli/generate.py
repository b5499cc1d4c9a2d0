"""`matlm generate`: text from any submodel of a checkpoint, plain or speculative.

    matlm generate --model_dir=runs/default --prompt="The history of"
    matlm generate --model_dir=runs/default --prompt="The" --widths=M --temperature=0.8 --top_p=0.9
    matlm generate --model_dir=runs/default --prompt="The" --draft=S --draft_tokens=4
    matlm generate --model_dir=runs/default --prompts_file=prompts.jsonl --output=out.jsonl

One prompt (`--prompt`) is streamed to stdout as it is produced; a file of prompts
(`--prompts_file`: JSONL with a "prompt" field per line if the name ends in `.jsonl`,
else one prompt per line) is decoded in batches and written as JSONL (stdout, or
`--output`). The summary (tokens/s; with `--draft`, the acceptance rate) goes to stderr.
Every prompt is the vocabulary's start id followed by the encoded text. Generation ends
at the vocabulary's EOS, at `--max_new_tokens`, at the model's context (the run's
seq_len) or at the first `--stop` sequence (repeatable; the text is cut before it; `\\n`
and `\\t` in it mean a line break and a tab).

Checked before any parameter is loaded: the flags, the checkpoint dir, the widths and the
draft (narrower than the target in every layer, not equal), the prompts (none empty,
none longer than the context) and the output path.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from matlm.cli import flags
from matlm.config_checks import Check, FlagError, check_flags

FLAG_CHECKS = {
    "step": Check(int, ge=0),
    "max_new_tokens": Check(int, ge=1),
    "top_k": Check(int, ge=0),
    "seed": Check(int, ge=0),
    "draft_tokens": Check(int, ge=1),
    "batch_size": Check(int, ge=1),
}


PARENTS = [flags.model_dir(), flags.step(),
           flags.output("JSONL results file for --prompts_file (default stdout)")]


def add_arguments(parser) -> None:
    parser.add_argument("--widths", default=None,
                        help="the submodel that generates (the target with --draft): a "
                             "granularity name, an integer, or one per layer (default: the "
                             "largest granularity)")
    parser.add_argument("--prompt", default=None, help="one prompt (streamed to stdout)")
    parser.add_argument("--prompts_file", default=None,
                        help="prompts, one per line; a .jsonl file: one JSON object with a "
                             "'prompt' field per line")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0: off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[],
                        help="a text stop sequence (repeatable); \\n and \\t are escapes")
    parser.add_argument("--draft", default=None,
                        help="speculative decoding: the draft submodel (S, M, a per-layer "
                             "vector), narrower than --widths")
    parser.add_argument("--draft_tokens", type=int, default=4,
                        help="tokens the draft proposes per round (k)")
    parser.add_argument("--shared_cache", action="store_true",
                        help="the draft reads the target's KV cache (the MatFormer paper's "
                             "shared attention cache) instead of keeping its own")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="rows decoded together for --prompts_file")


def _unescape(stop: str) -> str:
    return stop.replace("\\n", "\n").replace("\\t", "\t")


def read_prompts(args) -> list[str]:
    """The prompt texts of --prompt or --prompts_file (one-line FlagError otherwise)."""
    if (args.prompt is None) == (args.prompts_file is None):
        raise FlagError("give exactly one of --prompt=TEXT or --prompts_file=FILE")
    if args.prompt is not None:
        if not args.prompt:
            raise FlagError("--prompt is empty: give some text to continue")
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise FlagError(f"--prompts_file={args.prompts_file!r} does not exist")
    prompts = []
    jsonl = path.suffix == ".jsonl"
    for n, line in enumerate(path.read_text().splitlines(), 1):
        where = f"--prompts_file={args.prompts_file!r} line {n}"
        if jsonl:
            if not line.strip():
                continue  # Blank lines between JSON objects carry no prompt.
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FlagError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise FlagError(f"{where}: expected an object with a string 'prompt' field")
            line = record["prompt"]
        if not line:
            raise FlagError(f"{where}: empty prompt")
        prompts.append(line)
    if not prompts:
        raise FlagError(f"--prompts_file={args.prompts_file!r} holds no prompts")
    return prompts


def _check_output(output) -> None:
    if output is None:
        return
    parent = Path(output).parent
    if not parent.is_dir():
        raise FlagError(f"--output={output!r}: directory {str(parent)!r} does not exist")
    if Path(output).is_dir():
        raise FlagError(f"--output={output!r} is a directory; name a .jsonl file")


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """The text before the earliest stop sequence, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class _Detokenizer:
    """Text of a prompt's new tokens. SentencePiece drops the leading space of a text's
    first word, so the new tokens are decoded after the prompt's and the prompt's text is
    cut off, which keeps the space between the prompt and the continuation."""

    def __init__(self, vocab, prompt_ids):
        self.vocab, self.prompt_ids = vocab, list(prompt_ids)
        self.prompt_chars = len(vocab.decode(self.prompt_ids))

    def __call__(self, new_ids) -> str:
        return self.vocab.decode(self.prompt_ids + list(new_ids))[self.prompt_chars:]


class _Streamer:
    """Prints the growing text of one row as tokens arrive: only what can no longer
    change — not a trailing incomplete UTF-8 character (byte pieces), nor a tail that may
    be the start of a stop sequence."""

    def __init__(self, detokenize, stops, out=None):
        self.detokenize, self.stops = detokenize, stops
        self.out = out or sys.stdout
        self.ids, self.printed = [], 0

    def _stable(self, text: str) -> str:
        text, _ = cut_at_stop(text, self.stops)
        text = text.rstrip("\ufffd")
        hold = max((n for s in self.stops for n in range(1, len(s))
                    if text.endswith(s[:n])), default=0)
        return text[:len(text) - hold]

    def __call__(self, row, ids) -> None:
        self.ids.extend(ids)
        self._write(self._stable(self.detokenize(self.ids)))

    def finish(self, final_text: str) -> None:
        self._write(final_text)
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def run(args, gin_bindings) -> int:
    check_flags(args, FLAG_CHECKS)
    flags.refuse_gin_bindings("matlm generate", gin_bindings)
    from matlm.decoding.sampling import SamplingConfig
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    texts = read_prompts(args)
    _check_output(args.output)
    if args.output is not None and args.prompt is not None:
        raise FlagError("--output is for --prompts_file; --prompt streams to stdout")
    stops = [_unescape(s) for s in args.stop]
    if any(not s for s in stops):
        raise FlagError("--stop is empty: give the text that ends generation")

    from matlm.decoding.generate import GenerateError, check_prompts
    from matlm.decoding.speculative import check_speculative_args
    import matlm.model_dir as model_dir_lib

    # 1. The checkpoint's config, the submodels and the step, before any parameter.
    model_dir, run_config = model_dir_lib.open_run(args.model_dir)
    config = run_config.model
    target_flag = args.widths or config.granularity_names[-1]
    try:
        target = config.resolve_widths(target_flag)
    except ValueError as e:
        raise FlagError(f"--widths={target_flag!r} is invalid for this checkpoint: {e}") from None
    draft = None
    if args.draft is not None:
        target, draft = check_speculative_args(config, target_flag, args.draft,
                                               args.draft_tokens)
    step = model_dir.resolve_step(args.step)
    # 2. Prompts as tokens (the vocabulary the model was trained with), checked.
    from matlm import data
    vocab = model_dir.vocabulary(
        fallback=lambda: run_config.data.vocabulary())
    start_id = data.start_id(vocab)
    prompts = [[start_id, *vocab.encode(t)] for t in texts]
    # The model's context: the seq_len it trained at (None when the dir records none,
    # e.g. an extracted model).
    max_len = run_config.seq_len
    try:
        check_prompts(prompts, config, args.max_new_tokens, max_len)
    except GenerateError as e:
        flag = "--prompt" if args.prompt is not None else f"--prompts_file={args.prompts_file!r}"
        raise FlagError(f"{flag}: {e}") from None
    # 3. Parameters, then decoding.
    loaded = model_dir_lib.load_checkpoint_for_inference(model_dir, step)
    detokenizers = [_Detokenizer(vocab, p) for p in prompts]

    def stop_fn(row, new_ids):
        return bool(stops) and cut_at_stop(detokenizers[row](new_ids), stops)[1]

    streamer = _Streamer(detokenizers[0], stops) if args.prompt is not None else None
    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                  stop_ids=[vocab.eos_id], stop_fn=stop_fn if stops else None,
                  on_tokens=streamer, batch_size=args.batch_size, max_len=max_len)
    start = time.perf_counter()
    if draft is None:
        from matlm.decoding.generate import generate
        outputs = generate(loaded.params, config, prompts, widths=target, **common)
        stats = None
    else:
        from matlm.decoding.speculative import speculative_generate
        outputs, stats = speculative_generate(
            loaded.params, config, prompts, target_widths=target, draft_widths=draft,
            draft_tokens=args.draft_tokens, shared_cache=args.shared_cache, **common)
    seconds = time.perf_counter() - start
    completions = [cut_at_stop(d(o), stops)[0] for d, o in zip(detokenizers, outputs)]

    if streamer is not None:
        streamer.finish(completions[0])
    else:
        lines = [json.dumps({"prompt": t, "completion": c, "new_tokens": len(o)},
                            ensure_ascii=False)
                 for t, c, o in zip(texts, completions, outputs)]
        if args.output is None:
            print("\n".join(lines))
        else:
            Path(args.output).write_text("".join(line + "\n" for line in lines))
    name = config.granularities.name_of(target)
    new_tokens = sum(len(o) for o in outputs)
    summary = (f"{len(prompts)} prompt{'s' if len(prompts) > 1 else ''}, {new_tokens} new "
               f"tokens in {seconds:.2f}s ({new_tokens / seconds:.1f} tokens/s, compiling "
               f"included); {name} of {model_dir.path} step {loaded.step}")
    if stats is not None:
        summary += (f"; draft {config.granularities.name_of(draft)}, k={args.draft_tokens}"
                    f"{', shared cache' if args.shared_cache else ''}: acceptance "
                    f"{stats.acceptance_rate:.1%} ({stats.accepted}/{stats.drafted}), "
                    f"{stats.target_passes} target passes")
    if args.output is not None:
        summary += f"; wrote {args.output}"
    print(summary, file=sys.stderr)
    return 0
