"""Answers a reader would accept: does the answer text say what the evidence says, without looping?

Indexes the QLoRA paper (default chunk sizes, no metadata) and asks each held-out question of
``benchmarks/rag_questions.jsonl`` through :func:`fourbit.rag.answer.answer_question`, as ``rag query`` does
(bundled SmolLM2-135M-Instruct in 4 bits unless ``--model``), after one warm-up question. With
``--adapter DIR`` the same questions are asked of the base model and of the base model with the adapter,
side by side.

Per question, on the answer text alone (what a person reads first):

* **answer covers reference**: the answer holds >= 50 % of the content words of the question's reference
  evidence (its words without stop words, after the text cleaning the index applies);
* **answer inside evidence**: >= 80 % of the answer's content words are in the evidence sentences returned
  with it (an empty answer does not count);
* **loops**: the answer shown repeats a word 4-gram (more often than one evidence sentence does: a quoted
  sentence may repeat its own words); and the model's generated text (before the support check, which
  replaces a looping answer);
* **seconds** per answer (retrieval, evidence selection, prefill, decoding, check), median and p90; and
  the median **CPU seconds** of the process per answer: with ``--threads 1`` on a machine shared with other
  work, what one answer costs one core, whatever the load (the wall time on an idle core, near enough);
* which answers were the model's own ("generated") and which the best evidence sentence shown because the
  model's was not supported ("evidence").

The word measures here are the benchmark's own (simpler than :mod:`fourbit.rag.support`), so the library's
check is measured, not graded by itself. The decoding flags reproduce earlier settings for before/after rows:
``--repeat-scope sequence --no-stop --no-finish --answer-ratio 0 --no-support-check`` is the decoding before
issue 24.

Measured (bundled SmolLM2-135M, 4-bit, CPU, hybrid top_k 2; a 2-core machine shared with other work at load
6-12, so the seconds are not a speed measurement; `--rescore` re-measures the saved generations):

* before/after, ``--ablation --limit 20 --max-new-tokens 128`` (one generation per n-gram scope; each rule
  added in turn): n-grams banned over prompt + answer (before): answer covers 25 %, inside 0 %, 2 loops; over
  the answer only: 40 % / 30 %, 2 loops; + paragraph stop: 1 loop; + length <= evidence tokens: no change
  (ratio 0.5: no change either); + dropped cut sentence: no change; + cut before a repeated 4-gram: 35 %
  inside, 0 loops; + support check at 0.4-0.7: covers 50 %, inside 75 % (11 answers the model's, 9 the
  best sentence); at 0.8: 45 % / 90 % (8 / 12); at 0.9: 45 % / 95 % (6 / 14).
* the defaults on all 34 questions (256-token cap): answer covers >= 50 %: 50 %; >= 80 % inside the
  evidence: 88 %; loops shown 0 (generated 1); the model's answer shown for 11, the best sentence for 23;
  the generated text alone 41 % / 41 %; the evidence sentences alone cover 91 %. Questions 21-34, not used
  to choose the threshold: 57 % / 86 %, 0 loops shown. Seconds per answer: median 12.6, p90 33.7 (load 6-9).
* the first answer adapter (issue 24; ``--no-base --adapter fourbit/data/answer_adapter --threads 1``, all
  34 questions, load 11-16): covers 44 %, inside 100 %, no loops, the model's answer shown for 29; the base
  model in the same conditions 53 % / 88 %, 13 (benchmarks/RESULTS.md, "Answers (issue 24)"). The adapter
  of stop 27, evidence best first: 59 % / 100 %, 31, median 5.6 CPU s per answer (load 12-14).
* evidence sentences scored by cosine + half the share of the question's words
  (``fourbit.rag.grounding.sentence_scores``), the adapter retrained on examples built that way (the one
  shipped now): 65 % / 100 %, no loops, the model's answer shown for 32; the base model 68 % / 91 %, 12 (its
  generated text alone 44 % / 38 %); 4.9 and 5.7 CPU s per answer at one thread (load 1-5).

    python benchmarks/bench_answers.py [--paper /work/shared/data/qlora_paper.txt] [--db DIR] [--adapter DIR]
        [--no-base] [--retriever hybrid] [--top-k 2] [--max-new-tokens 256] [--limit N] [--threads N] [--json out.json]
        [--no-repeat-ngram N] [--repeat-scope answer|sequence] [--no-stop] [--no-finish] [--answer-ratio R]
        [--support-threshold T | --no-support-check] [--ablation] [--rescore ABLATION.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from _timing import load_average  # noqa: E402

STOP_WORDS = frozenset(
    "a an the of to in on for and or is are was were be been by with as at from that this these those it its "
    "we our you your they their than then there which who what when where why how can could would should "
    "will do does did has have had not no more most such into over about also each other only any all".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)*%?")


def content_words(text: str) -> set[str]:
    """Lower-case words and numbers of ``text`` (cleaned like indexed text) without stop words."""
    from fourbit.rag.loaders import clean_text, normalize_whitespace

    return {w for w in _WORD.findall(normalize_whitespace(clean_text(text)).lower()) if w not in STOP_WORDS}


def coverage(reference: str, text: str) -> float:
    """Fraction of the content words of ``reference`` found among the words of ``text``."""
    wanted = content_words(reference)
    if not wanted:
        return 1.0
    have = set(_WORD.findall(text.lower())) | content_words(text)
    return len(wanted & have) / len(wanted)


def inside(answer: str, evidence: str) -> float:
    """Fraction of the content words of ``answer`` found in ``evidence``; 0.0 for an answer without any."""
    words = content_words(answer)
    return len(words & content_words(evidence)) / len(words) if words else 0.0


def _grams(text: str, n: int) -> Counter:
    words = _WORD.findall(text.lower())
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def loops(text: str, evidence: list[str] | tuple[str, ...] = (), n: int = 4) -> bool:
    """Whether ``text`` repeats a word ``n``-gram (stop words included) more often than one of the ``evidence``
    sentences does: a quoted sentence that repeats its own words ("an expected win-rate of ... an expected
    win-rate of", QLoRA paper) is the document's wording, not the model looping."""
    quoted = Counter()
    for sentence in evidence:
        quoted |= _grams(sentence, n)  # per gram, the most any one sentence holds
    return any(count > max(1, quoted[gram]) for gram, count in _grams(text, n).items())


def cpu_description() -> str:
    """CPU model, core count and the SIMD flags that matter for the 4-bit kernels."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(f for f in wanted if f in flags) or 'none of note'}"


def open_index(paper: Path, db: Path) -> tuple[Any, Any]:
    """(store, embedder) of the paper's index in ``db``, built when missing (re-indexing is a no-op)."""
    from fourbit.rag.embeddings import Embedder
    from fourbit.rag.index import build_index
    from fourbit.rag.store import open_store

    embedder = Embedder()
    store = open_store(db, create=True, embedding=embedder.describe())
    start = time.perf_counter()
    report = build_index([paper], store, embedder, progress=False)
    print(f"index: {store.count()} records ({report.embedded} embedded now) in {time.perf_counter() - start:.1f} s",
          flush=True)
    return store, embedder


def load(args: argparse.Namespace, adapter: Path | None) -> Any:
    """The answering model with the decoding the flags ask for."""
    from fourbit.rag.llm import load_llm

    llm = load_llm(args.model, adapter=adapter)
    llm.no_repeat_ngram_size = args.no_repeat_ngram
    llm.repeat_scope = args.repeat_scope
    llm.stop_at_paragraph = not args.no_stop
    return llm


def ask_all(llm: Any, retriever: Any, questions: list[dict[str, str]], args: argparse.Namespace) -> list[dict]:
    """One row per question: the answer, its kind and the measures of the module docstring."""
    from fourbit.rag.answer import answer_question

    options = dict(max_new_tokens=args.max_new_tokens, answer_ratio=args.answer_ratio, finish=not args.no_finish,
                   support_threshold=None if args.no_support_check else args.support_threshold)
    answer_question("What is QLoRA?", retriever, llm, **options)  # warm-up: first-call costs are not an answer's
    rows = []
    for n, q in enumerate(questions, 1):
        cpu = time.process_time()
        got = answer_question(q["question"], retriever, llm, **options)
        cpu = time.process_time() - cpu
        evidence = " ".join(e.text for e in got.evidence)
        row = {
            "question": q["question"], "reference": q["evidence"], "answer": got.text, "kind": got.answer_kind,
            "generated": got.generated, "support": got.support, "evidence_sentences": [e.text for e in got.evidence],
            "covers": coverage(q["evidence"], got.text), "inside": inside(got.text, evidence),
            "generated_covers": coverage(q["evidence"], got.generated),
            "generated_inside": inside(got.generated, evidence),
            "evidence_covers": coverage(q["evidence"], evidence), "loops": loops(got.generated, [e.text for e in got.evidence]),
            "shown_loops": loops(got.text, [e.text for e in got.evidence]),
            "generated_words": len(_WORD.findall(got.generated)), "seconds": got.seconds, "cpu_seconds": cpu,
            "evidence_tokens": sum(llm.count_tokens(e.text) for e in got.evidence),
        }
        rows.append(row)
        print(f"{n:>2}. {row['kind']:<9} covers {row['covers']:.2f} inside {row['inside']:.2f} "
              f"(generated: {row['generated_covers']:.2f}/{row['generated_inside']:.2f}, support "
              f"{row['support']:.2f}, {row['generated_words']} words{', LOOPS' if row['loops'] else ''}) "
              f"{row['seconds']:.1f} s ({cpu:.1f} s CPU)  {q['question'][:50]}", flush=True)
    return rows


def _variant_row(row: dict, text: str, threshold: float | None) -> dict:
    """``row`` re-measured as if ``text`` had been generated (and checked at ``threshold``)."""
    from fourbit.rag.support import check_support

    evidence = row["evidence_sentences"]
    shown, kind = text, "generated"
    if threshold is not None and not check_support(text, evidence, row["question"], threshold).grounded:
        shown, kind = (evidence[0], "evidence") if evidence else ("", "none")
    joined = " ".join(evidence)
    return {**row, "answer": shown, "kind": kind, "generated": text, "covers": coverage(row["reference"], shown),
            "inside": inside(shown, joined), "generated_covers": coverage(row["reference"], text),
            "generated_inside": inside(text, joined), "loops": loops(text, evidence),
            "shown_loops": loops(shown, evidence),
            "generated_words": len(_WORD.findall(text))}


def ablation(rows: list[dict], tokenizer: Any, prefix: str) -> dict[str, list[dict]]:
    """The decoding rules one at a time, from one generation without them (greedy decoding: a stopping rule
    or a shorter cap only cuts the same text; the cap is applied by re-tokenizing, near-exact)."""
    from fourbit.rag.decoding import answer_token_limit, finish_answer

    def cap(row: dict, ratio: float) -> str:
        ids = tokenizer(row["generated"], add_special_tokens=False).input_ids
        return tokenizer.decode(ids[: answer_token_limit(row["evidence_tokens"], 10**6, ratio=ratio)])

    stop = dict(drop_partial=False, drop_repeats=False)
    out = {f"{prefix}raw": [_variant_row(r, r["generated"], None) for r in rows]}
    out[f"{prefix}+stop"] = [_variant_row(r, finish_answer(r["generated"], **stop), None) for r in rows]
    for ratio in (1.0, 0.5):
        out[f"{prefix}+stop+len{ratio}"] = [_variant_row(r, finish_answer(cap(r, ratio), **stop), None) for r in rows]
        out[f"{prefix}+stop+len{ratio}+partial"] = [
            _variant_row(r, finish_answer(cap(r, ratio), drop_repeats=False), None) for r in rows]
    out[f"{prefix}+stop+len1.0+partial+repeats"] = [_variant_row(r, finish_answer(cap(r, 1.0)), None) for r in rows]
    for threshold in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        out[f"{prefix}+all, check {threshold}"] = [_variant_row(r, finish_answer(cap(r, 1.0)), threshold)
                                                   for r in rows]
    return out


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Shares and counts over the questions (see the module docstring)."""
    n = len(rows)
    seconds = [r["seconds"] for r in rows]
    return {
        "questions": n,
        "answer_covers_50": sum(r["covers"] >= 0.5 for r in rows) / n,
        "answer_inside_80": sum(r["inside"] >= 0.8 for r in rows) / n,
        "loops": sum(r["loops"] for r in rows),
        "shown_loops": sum(r.get("shown_loops", r["loops"]) for r in rows),
        "generated_shown": sum(r["kind"] == "generated" for r in rows),
        "evidence_shown": sum(r["kind"] == "evidence" for r in rows),
        "generated_covers_50": sum(r["generated_covers"] >= 0.5 for r in rows) / n,
        "generated_inside_80": sum(r["generated_inside"] >= 0.8 for r in rows) / n,
        "evidence_covers_50": sum(r["evidence_covers"] >= 0.5 for r in rows) / n,
        "generated_words_mean": statistics.mean(r["generated_words"] for r in rows),
        "seconds_median": statistics.median(seconds), "seconds_p90": _p90(seconds),
        **({"cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in rows)}
           if all("cpu_seconds" in r for r in rows) else {}),
    }


def print_table(summaries: dict[str, dict[str, Any]]) -> None:
    """One row per run: the shares of the module docstring, then what the generated text alone scores."""
    print("\n| run | answer covers >= 50 % | answer >= 80 % inside evidence | loops: shown / generated | model's "
          "answer / best sentence shown | generated alone: covers / inside | words (mean) | s/answer median (p90) "
          "| CPU s/answer median |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, s in summaries.items():
        print(f"| {label} | {s['answer_covers_50']:.0%} | {s['answer_inside_80']:.0%} | {s['shown_loops']} / "
              f"{s['loops']} | "
              f"{s['generated_shown']} / {s['evidence_shown']} | {s['generated_covers_50']:.0%} / "
              f"{s['generated_inside_80']:.0%} | {s['generated_words_mean']:.1f} | {s['seconds_median']:.1f} "
              f"({s['seconds_p90']:.1f}) | {s.get('cpu_seconds_median', float('nan')):.1f} |")
    first = next(iter(summaries.values()))
    print(f"evidence sentences alone hold >= 50 % of the reference's words for {first['evidence_covers_50']:.0%}")


def parse_args() -> argparse.Namespace:
    from fourbit.rag.support import DEFAULT_SUPPORT_THRESHOLD

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", type=Path, default=Path("/work/shared/data/qlora_paper.txt"))
    p.add_argument("--questions", type=Path, default=HERE / "rag_questions.jsonl")
    p.add_argument("--db", type=Path, help="index folder (built when missing; default a temporary one)")
    p.add_argument("--model", help="answering model (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", type=Path, help="also answer with this LoRA adapter, side by side")
    p.add_argument("--no-base", action="store_true", help="only the adapter's run (the base model's saved by an "
                   "earlier --json run; `--rescore` of both files' rows merged puts them side by side)")
    p.add_argument("--retriever", default="hybrid")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length cap (rag query's default)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--json", type=Path, help="write the rows and the summaries here")
    p.add_argument("--no-repeat-ngram", type=int, default=4, help="n-gram size banned from repeating (0: off)")
    p.add_argument("--repeat-scope", choices=("answer", "sequence"), default="answer")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the first paragraph end")
    p.add_argument("--no-finish", action="store_true", help="keep text after the first paragraph and cut ends")
    p.add_argument("--answer-ratio", type=float, default=1.0, help="answer tokens per evidence token (0: off)")
    p.add_argument("--support-threshold", type=float, default=DEFAULT_SUPPORT_THRESHOLD)
    p.add_argument("--no-support-check", action="store_true")
    p.add_argument("--ablation", action="store_true",
                   help="generate without the rules (n-grams banned over prompt+answer, then over the answer "
                        "only), then measure each rule added in turn and thresholds 0.4-0.9")
    p.add_argument("--rescore", type=Path, metavar="ABLATION.json",
                   help="re-measure the rules on the generations an --ablation run saved (no generation)")
    return p.parse_args()


def rescore(path: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """The ablation of an earlier ``--ablation --json`` run (or the answers of another run), re-measured with
    the current library."""
    from fourbit.rag.decoding import finish_answer

    saved = json.loads(path.read_text(encoding="utf-8"))["rows"]
    tokenizer = load(args, None).tokenizer if any(label.endswith(" raw") for label in saved) else None
    results = {}
    for label, rows in saved.items():
        if label.endswith(" raw"):
            results.update(ablation(rows, tokenizer, label[: -len("raw")]))
    if not results:  # a run with the rules on: its finished answers checked again
        threshold = None if args.no_support_check else args.support_threshold
        results = {label: [_variant_row(r, finish_answer(r["generated"]), threshold) for r in rows]
                   for label, rows in saved.items()}
    return results


def main() -> None:
    args = parse_args()
    import torch

    from fourbit._io import read_jsonl
    from fourbit.rag.retrieval import Retriever

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rescore:
        print_table({label: summarize(rows) for label, rows in rescore(args.rescore, args).items()})
        return
    questions = read_jsonl(args.questions)[: args.limit]
    runs = {**({} if args.no_base else {"base": None}),
            **({f"adapter {args.adapter.name}": args.adapter} if args.adapter else {})}
    if not runs:
        raise SystemExit("--no-base needs --adapter")
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        store, embedder = open_index(args.paper, args.db or Path(tmp) / "db")
        retriever = Retriever(store, embedder, args.retriever, args.top_k)
        results = {}
        for label, adapter in runs.items():
            print(f"\n{label}:", flush=True)
            if not args.ablation:
                results[label] = ask_all(load(args, adapter), retriever, questions, args)
                continue
            args.no_stop = args.no_finish = args.no_support_check = True
            args.answer_ratio = 0.0
            for scope in ("sequence", "answer"):
                args.repeat_scope = scope
                llm = load(args, adapter)
                rows = ask_all(llm, retriever, questions, args)
                results.update(ablation(rows, llm.tokenizer, f"{label} {scope} n-grams "))
    summaries = {label: summarize(rows) for label, rows in results.items()}
    print_table(summaries)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"\n{len(questions)} questions; {json.dumps({k: settings[k] for k in ('retriever', 'top_k')})}; "
          f"{cpu_description()}; torch threads {torch.get_num_threads()}; load average before/after: "
          f"{load_before} / {load_average()}")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "summaries": summaries, "rows": results}, indent=2),
                             encoding="utf-8")


if __name__ == "__main__":
    main()
