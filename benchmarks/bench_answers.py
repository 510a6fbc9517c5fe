"""Grounded answers through the running server: content-word coverage and seconds per answer.

Indexes the QLoRA paper (``fourbit rag index``, default chunk sizes, no metadata), starts ``fourbit serve``
(the bundled SmolLM2-135M-Instruct in 4 bits) on a free port of 127.0.0.1, and asks each question of
``benchmarks/rag_questions.jsonl`` through ``POST /v1/answers``, one at a time, after one warm-up question.

For each question: whether the returned answer plus evidence sentences contain the content words of the
question's evidence string (its words without stop words, after the text cleaning the index applies), as
the fraction covered and as "all covered"; the same for the evidence alone and the answer alone; and the
wall seconds of the request (retrieval, evidence selection, prefill and decoding). Prints per-question
rows, then the means, the median and p90 seconds, the CPU model and flags and the load average.

    python benchmarks/bench_answers.py [--paper /work/shared/data/qlora_paper.txt] [--db DIR]
                                       [--retriever hybrid] [--top-k 2] [--max-tokens N] [--threads N]
                                       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _timing import load_average  # noqa: E402

STOP_WORDS = frozenset(
    "a an the of to in on for and or is are was were be been by with as at from that this these those it its "
    "we our you your they their than then there which who what when where why how can could would should "
    "will do does did has have had not no more most such into over about also each other only any all".split()
)


def content_words(text: str) -> set[str]:
    """Lower-case words and numbers of ``text`` (cleaned like indexed text) without stop words."""
    from fourbit.rag.loaders import clean_text, normalize_whitespace

    words = re.findall(r"[a-z0-9]+(?:[.,][0-9]+)*%?", normalize_whitespace(clean_text(text)).lower())
    return {w for w in words if w not in STOP_WORDS}


def coverage(evidence: str, text: str) -> float:
    """Fraction of the content words of ``evidence`` found among the words of ``text``."""
    wanted = content_words(evidence)
    if not wanted:
        return 1.0
    have = set(re.findall(r"[a-z0-9]+(?:[.,][0-9]+)*%?", text.lower())) | content_words(text)
    return len(wanted & have) / len(wanted)


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fourbit(*argv: str) -> list[str]:
    return [sys.executable, "-m", "fourbit", *argv]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def build_index(paper: Path, db: Path) -> dict[str, Any]:
    start = time.perf_counter()
    out = subprocess.run(_fourbit("rag", "index", str(paper), "--db", str(db), "--json"), env=_env(),
                         check=True, capture_output=True, text=True)
    report = json.loads(out.stdout)
    report["wall_s"] = time.perf_counter() - start
    return report


class Server:
    """``fourbit serve --db DB`` in a subprocess; stopped with SIGINT (as Ctrl-C) on exit."""

    def __init__(self, db: Path, extra: list[str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = _fourbit("serve", "--db", str(db), "--port", str(self.port), "--name", "smollm2", *extra)

    def __enter__(self) -> Server:
        import httpx

        start = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, env=_env())
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fourbit serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("fourbit serve did not start in 600 s")
            time.sleep(0.5)
        self.start_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ask(url: str, question: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    body: dict[str, Any] = {"question": question, "retriever": args.retriever, "top_k": args.top_k}
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    start = time.perf_counter()
    r = httpx.post(url + "/v1/answers", json=body, timeout=600)
    seconds = time.perf_counter() - start
    r.raise_for_status()
    return {**r.json(), "seconds": seconds}


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", type=Path, default=Path("/work/shared/data/qlora_paper.txt"))
    parser.add_argument("--questions", type=Path, default=HERE / "rag_questions.jsonl")
    parser.add_argument("--db", type=Path, help="index folder (built when missing; default a temporary one)")
    parser.add_argument("--retriever", default="hybrid")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, help="answer length cap (default: the server's)")
    parser.add_argument("--threads", type=int, help="the server's --threads (default: torch's)")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--json", type=Path, help="write the rows and the summary here")
    args = parser.parse_args()

    from fourbit._io import read_jsonl

    questions = read_jsonl(args.questions)[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "db"
        index = build_index(args.paper, db)
        print(f"index: {index['records']} records ({index['embedded']} embedded) in {index['wall_s']:.1f} s",
              flush=True)
        load_before = load_average()
        with Server(db, ["--threads", str(args.threads)] if args.threads else []) as server:
            print(f"server up in {server.start_s:.1f} s at {server.url}", flush=True)
            ask(server.url, "What is QLoRA?", args)  # warm-up: first-call costs are not an answer's
            rows = []
            for n, q in enumerate(questions, 1):
                got = ask(server.url, q["question"], args)
                evidence_text = " ".join(e["text"] for e in got["evidence"])
                row = {
                    "question": q["question"], "evidence": q["evidence"], "answer": got["answer"],
                    "evidence_sentences": [e["text"] for e in got["evidence"]],
                    "coverage": coverage(q["evidence"], got["answer"] + " " + evidence_text),
                    "coverage_evidence": coverage(q["evidence"], evidence_text),
                    "coverage_answer": coverage(q["evidence"], got["answer"]),
                    "seconds": got["seconds"], "prompt_tokens": got["usage"]["prompt_tokens"],
                    "completion_tokens": got["usage"]["completion_tokens"],
                }
                rows.append(row)
                print(f"{n:>2}. {row['coverage']:.2f} (evidence {row['coverage_evidence']:.2f}, answer "
                      f"{row['coverage_answer']:.2f}) {row['seconds']:.2f} s, {row['prompt_tokens']}+"
                      f"{row['completion_tokens']} tokens  {q['question'][:60]}", flush=True)
    seconds = [r["seconds"] for r in rows]
    summary = {
        "questions": len(rows),
        "coverage_mean": statistics.mean(r["coverage"] for r in rows),
        "all_words_covered": sum(r["coverage"] == 1.0 for r in rows),
        "evidence_only_mean": statistics.mean(r["coverage_evidence"] for r in rows),
        "answer_only_mean": statistics.mean(r["coverage_answer"] for r in rows),
        "seconds_median": statistics.median(seconds), "seconds_p90": _p90(seconds), "seconds_max": max(seconds),
        "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in rows),
        "completion_tokens_mean": statistics.mean(r["completion_tokens"] for r in rows),
        "retriever": args.retriever, "top_k": args.top_k, "max_tokens": args.max_tokens, "threads": args.threads,
        "cpu": cpu_description(), "load_average_before_after": [load_before, load_average()],
    }
    print(f"\ncoverage of the evidence's content words by answer + evidence: mean {summary['coverage_mean']:.3f}, "
          f"all words in {summary['all_words_covered']}/{len(rows)} "
          f"(evidence alone {summary['evidence_only_mean']:.3f}, answer alone {summary['answer_only_mean']:.3f})")
    print(f"seconds per answer: median {summary['seconds_median']:.2f}, p90 {summary['seconds_p90']:.2f}, "
          f"max {summary['seconds_max']:.2f}; tokens per answer: {summary['prompt_tokens_mean']:.0f} prompt + "
          f"{summary['completion_tokens_mean']:.0f} completion")
    print(f"retriever {args.retriever}, top_k {args.top_k}, server threads {args.threads or 'default'}; "
          f"{summary['cpu']}")
    print(f"load average before/after: {load_before} / {load_average()}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
