"""``fourbit rag``: index documents, ask questions, compare retrievers, evaluate retrieval.

One function per subcommand, each a thin layer over :mod:`fourbit.rag`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import sys
from pathlib import Path
from typing import Any

from fourbit._errors import FieldError

__all__ = ["add_parser"]

_COMPARE_DEFAULT = "baseline,chunks,metadata"


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from err


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", type=Path, help="folder of the embedded Chroma database")
    p.add_argument("--index", default="fourbit", help="index (collection) name (default: fourbit)")
    p.add_argument("--chroma-host", help="use a Chroma server instead of --db")
    p.add_argument("--chroma-port", type=int, default=8000)
    p.add_argument("--embedding-model", help="sentence-transformers folder or cached name "
                   "(default: bundled all-MiniLM-L6-v2, or the one the index records)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")


def _llm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="answering model: folder, 4-bit checkpoint or GGUF (default: bundled SmolLM2)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", type=Path, help="LoRA adapter folder from `fourbit finetune` or `fourbit rag "
                                                    "tune` (default: the bundled model's answer adapter, if any)")
    which.add_argument("--no-answer-adapter", action="store_true",
                       help="answer with the base model alone, without the default answer adapter")
    p.add_argument("--max-new-tokens", type=int, default=256)


def _load_answer_llm(args: argparse.Namespace) -> Any:
    from fourbit.rag.llm import answer_adapter, load_llm

    adapter = answer_adapter(args.model, args.adapter, use_default=not args.no_answer_adapter)
    return load_llm(args.model, adapter=adapter)


def _embedder(args: argparse.Namespace, recorded: str | None = None) -> Any:
    from fourbit.rag.embeddings import DEFAULT_EMBEDDING_MODEL, Embedder

    if args.embedding_model:
        return Embedder(args.embedding_model)
    if recorded not in (None, DEFAULT_EMBEDDING_MODEL):
        raise FieldError("embedding_model", f"the index was built with {recorded!r}; pass `embedding_model` "
                                            f"{recorded} again")
    return Embedder(None)


def _where(args: argparse.Namespace) -> dict[str, Any]:
    return {"index": args.index, "host": args.chroma_host, "port": args.chroma_port}


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    """(store, embedder) of an existing index; the store is opened (and checked) before the model loads."""
    from fourbit.rag.store import open_store

    store = open_store(args.db, **_where(args))
    if store.interrupted:
        print(f"fourbit rag: warning: the last `rag index` into {store.location} did not finish, so the index "
              "is incomplete; run it again to complete it", file=sys.stderr)
    embedder = _embedder(args, store.info.get("embedding_model"))
    store.check_embedder(embedder.name, embedder.dim)
    return store, embedder


def _check_flags(args: argparse.Namespace, *, llm: bool) -> None:
    """The checks that need no model or database, made first so that a mistake costs nothing."""
    from fourbit.rag.retrieval import RETRIEVERS

    if getattr(args, "question", None) is not None and not args.question.strip():
        raise FieldError("question", "is empty")
    if args.top_k < 1:
        raise FieldError("top_k", f"must be >= 1, got {args.top_k}")
    unknown = [mode for mode in getattr(args, "retrievers", ()) if mode not in RETRIEVERS]
    if unknown or getattr(args, "retrievers", None) == ():
        raise FieldError("retrievers", f"{', '.join(unknown) or 'none given'}: choose from {', '.join(RETRIEVERS)}")
    if llm:
        from fourbit.rag.llm import check_model_source

        if args.max_new_tokens < 1:
            raise FieldError("max_new_tokens", f"must be >= 1, got {args.max_new_tokens}")
        check_model_source(args.model)
        if args.adapter is not None and not args.adapter.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such adapter folder", str(args.adapter))


def _plain(err: Exception) -> str:
    """An error's message for a table cell: library names in backticks shown as the CLI's flags."""
    from fourbit.cli import user_message

    return user_message(err, {"retriever": "--retriever", "metadata": "--metadata"})


def _console() -> Any:
    from rich.console import Console

    return Console()


def _warn_skipped(report: Any) -> None:
    for path, reason in report.skipped:
        print(f"fourbit rag: warning: skipped {path}: {reason}", file=sys.stderr)


def cmd_index(args: argparse.Namespace) -> int:
    """Index PDF, text and Markdown files (or folders) into a Chroma database, incrementally.

    Files named explicitly must be usable; inside a folder, a file that cannot be used (damaged, encrypted,
    binary, no text) is skipped with a warning that names it. When every file is skipped, nothing is
    written (a new database is removed again, an existing one is left as it was) and the command fails.
    """
    from fourbit._io import check_output_dir
    from fourbit.rag.chunking import ChunkConfig
    from fourbit.rag.index import IndexConfig, NothingIndexedError, build_index, find_sources
    from fourbit.rag.store import index_info, open_store

    # Everything cheap first (flags, paths, files named explicitly, the database or server), so that a
    # mistake is reported in a moment, before the embedding model loads and before anything is written.
    config = IndexConfig(
        chunk=ChunkConfig(parent_tokens=args.parent_tokens, parent_overlap=args.parent_overlap,
                          child_tokens=args.child_tokens, child_overlap=args.child_overlap),
        metadata=args.metadata, n_questions=args.n_questions,
    )
    if args.batch_size < 1:
        raise FieldError("batch_size", f"must be >= 1, got {args.batch_size}")
    if not args.chroma_host:
        if args.db is None:
            raise FieldError("db_path", "give the folder of the index database (or `chroma_host` for a Chroma "
                                        "server)")
        check_output_dir(args.db, overwrite=True, field="db_path")
    sources = find_sources(args.paths)
    recorded = index_info(args.db, **_where(args))
    if config.metadata:
        from fourbit.rag.llm import check_model_source

        check_model_source(args.model)
        if args.adapter is not None and not args.adapter.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such adapter folder", str(args.adapter))

    embedder = _embedder(args, (recorded or {}).get("embedding_model"))
    store = open_store(args.db, **_where(args), create=True, embedding=embedder.describe())
    extractor = None
    if config.metadata:
        from fourbit.rag.llm import load_llm
        from fourbit.rag.metadata import MetadataCache, MetadataExtractor

        cache_dir = args.db if args.db and not args.chroma_host else Path.home() / ".cache" / "fourbit" / "rag"
        extractor = MetadataExtractor(load_llm(args.model, adapter=args.adapter, answering=False),
                                      MetadataCache(Path(cache_dir) / "metadata_cache.json"),
                                      batch_size=args.batch_size)
    try:
        report = build_index(sources, store, embedder, config, extractor=extractor, progress=not args.json)
    except NothingIndexedError as err:  # every file skipped: name each, leave no new empty index behind
        _warn_skipped(err.report)
        store.discard_created()
        raise
    _warn_skipped(report)
    for path, note in report.notes:
        print(f"fourbit rag: note: {path}: {note}", file=sys.stderr)
    if report.resumed:
        print(f"fourbit rag: note: the previous run into {store.location} was interrupted; this one completed "
              "it", file=sys.stderr)
    records = store.count()
    result = {**report.as_dict(), "index": store.name, "location": store.location, "records": records,
              "config": {"parent_tokens": config.chunk.parent_tokens, "child_tokens": config.chunk.child_tokens,
                         "metadata": config.metadata, "embedding_model": embedder.name}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _console().print(
            f"[bold]{store.name}[/] at {store.location}: {len(report.indexed)} indexed, "
            f"{len(report.unchanged)} unchanged, {len(report.skipped)} skipped, {len(report.removed)} removed; "
            f"{report.embedded} records embedded, {report.deleted} deleted, {records} in the index"
        )
    return 0


def _print_sources(con: Any, parents: list[Any], verbose: bool) -> None:
    from rich.table import Table

    from fourbit.rag.answer import source_rows

    table = Table(title="sources")
    for col in ("id", "score", "file", "page", "text"):
        table.add_column(col, overflow="fold")
    for row in source_rows(parents):
        table.add_row(row["id"], f"{row['score']:.3f}", row["source"], row["page"], row["text"][:200])
    con.print(table)
    if verbose:
        for p in parents:
            for ref in p.via:
                con.print(f"  {ref.kind:>14} {ref.id} ({ref.score:.3f}) -> {p.id}: {ref.text[:80]!r}")


def _print_evidence(con: Any, evidence: list[Any]) -> None:
    from rich.table import Table

    table = Table(title="evidence (the documents' own sentences)")
    for col in ("score", "file", "page", "sentence"):
        table.add_column(col, overflow="fold")
    for e in evidence:
        table.add_row(f"{e.score:.3f}", e.source, e.page, e.text)
    con.print(table)


def _query_one(args: argparse.Namespace, retriever: Any, llm: Any, question: str, *, jsonl: bool) -> None:
    """Answer one question: a JSON line (``jsonl``), one JSON document (--json), or streamed text + tables."""
    from fourbit.rag.answer import answer_question, source_rows

    if llm is None:  # --no-answer
        parents = retriever.retrieve(question)
        if args.json:
            row = {"question": question, "sources": source_rows(parents)}
            print(json.dumps(row) if jsonl else json.dumps(row, indent=2), flush=True)
        else:
            _print_sources(_console(), parents, args.verbose)
        return
    # Not streamed: the answer is shown only once it is checked against the evidence (an unsupported one
    # is replaced by the best evidence sentence, with a note).
    answer = answer_question(question, retriever, llm, max_new_tokens=args.max_new_tokens,
                             token_budget=args.token_budget)
    if args.json:
        print(json.dumps(answer.as_dict()) if jsonl else json.dumps(answer.as_dict(), indent=2), flush=True)
        return
    print(f"{answer.note}\n{answer.text}" if answer.note else answer.text, flush=True)
    con = _console()
    _print_evidence(con, answer.evidence)
    if args.show_sources or args.verbose:
        _print_sources(con, answer.sources, args.verbose)


def cmd_query(args: argparse.Namespace) -> int:
    """Answer a question (or each question of --questions FILE.jsonl) from the index with the 4-bit model.

    The model is given the retrieved parents' sentences that best match the question, within
    --evidence-tokens tokens; its answer is checked against them: one the evidence does not support is
    replaced by the best evidence sentence, with a note saying so. Then those sentences are printed as
    evidence (and with --show-sources the parents). With --questions, the model loads once and --json prints
    one JSON line per question: question, answer, supported (true: the answer is the model's; false: it is
    the best evidence sentence), answer_kind ("generated", "evidence" or "none"), support, note, generated,
    evidence, sources, seconds.
    """
    from fourbit.rag.retrieval import Retriever

    if (args.question is None) == (args.questions is None):
        raise FieldError("question", "give a question or `questions` FILE.jsonl (one of them)")
    _check_flags(args, llm=not args.no_answer)
    if args.token_budget < 1:
        raise FieldError("token_budget", f"must be >= 1, got {args.token_budget}")
    if args.questions is not None:
        from fourbit.rag.answer import read_question_file

        questions = read_question_file(args.questions)  # every line checked before anything loads
    else:
        questions = [args.question]
    store, embedder = _open(args)
    retriever = Retriever(store, embedder, args.retriever, args.top_k)
    llm = None if args.no_answer else _load_answer_llm(args)
    for number, question in enumerate(questions):
        if not args.json and len(questions) > 1:
            print(("\n" if number else "") + f"Q{number + 1}: {question}\nA: ", end="", flush=True)
        _query_one(args, retriever, llm, question, jsonl=args.questions is not None)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Answer one question with several retrievers and show the answers side by side."""
    from rich.table import Table

    from fourbit.rag.answer import answer_question
    from fourbit.rag.retrieval import Retriever

    _check_flags(args, llm=True)
    store, embedder = _open(args)
    llm = _load_answer_llm(args)
    results: dict[str, Any] = {}
    for mode in args.retrievers:
        try:
            results[mode] = answer_question(args.question, Retriever(store, embedder, mode, args.top_k), llm,
                                            max_new_tokens=args.max_new_tokens).as_dict()
        except ValueError as err:  # e.g. no metadata in the index: say so in that column
            results[mode] = {"answer": f"({_plain(err)})", "sources": []}
    if args.json:
        print(json.dumps({"question": args.question, "results": results}, indent=2))
        return 0
    table = Table(title=args.question, show_lines=True)
    table.add_column("")
    for mode in results:
        table.add_column(mode, overflow="fold", ratio=1)
    table.add_row("answer", *[r["answer"] if not r.get("note") else f"({r['note']}) {r['answer']}"
                              for r in results.values()])
    table.add_row("sources", *[", ".join(f"{s['id']} (p.{s['page']})" for s in r["sources"])
                               for r in results.values()])
    _console().print(table)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Hit rate and MRR at k of each retriever on a JSONL file of {"question", "evidence"}."""
    from rich.table import Table

    from fourbit.rag.evaluate import evaluate_retriever, load_questions
    from fourbit.rag.retrieval import Retriever

    _check_flags(args, llm=False)
    questions = load_questions(args.questions)
    store, embedder = _open(args)
    results: dict[str, Any] = {}
    for mode in args.retrievers:
        retriever = Retriever(store, embedder, mode, args.top_k)
        try:
            results[mode] = evaluate_retriever(retriever.retrieve, questions, args.top_k)
        except ValueError as err:
            results[mode] = {"error": _plain(err), "k": args.top_k}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    table = Table(title=f"retrieval on {len(questions)} questions, k={args.top_k}")
    for col in ("retriever", f"hit@{args.top_k}", f"MRR@{args.top_k}", "parents/query", "chars/query"):
        table.add_column(col)
    for mode, r in results.items():
        if "error" in r:
            table.add_row(mode, "-", "-", "-", r["error"][:60])
        else:
            table.add_row(mode, f"{r['hit_rate']:.3f}", f"{r['mrr']:.3f}", f"{r['parents_per_query']:.2f}",
                          f"{r['chars_per_query']:.0f}")
    _console().print(table)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Fine-tune a LoRA adapter that answers from the evidence, on examples built from the index.

    For each parent of the index: a question (the questions `rag index --metadata questions` generated, or
    templates over its text), the evidence `rag query` would give the model for it, and an answer made of
    the best evidence sentences; then QLoRA fine-tuning with fourbit's trainer (as `fourbit finetune`) into
    --out, with the examples saved beside the adapter. Use it with `rag query --adapter OUT`.
    """
    from fourbit.rag.tune import TuneConfig, tune_answer_adapter
    from fourbit.train import TrainConfig, TrainingInterrupted

    tune = TuneConfig(questions=args.questions, per_parent=args.per_parent, max_examples=args.max_examples,
                      retriever=args.retriever, top_k=args.top_k, token_budget=args.token_budget)
    train_config = TrainConfig(model=args.model, out=str(args.out), max_steps=args.max_steps,
                               learning_rate=args.learning_rate, lora_r=args.lora_r, batch_size=args.batch_size,
                               gradient_accumulation_steps=args.gradient_accumulation_steps,
                               overwrite=args.overwrite, seed=args.seed, progress=not args.json,
                               eval_steps=max(1, args.max_steps // 4), save_steps=args.max_steps)
    _check_flags(args, llm=True)
    store, embedder = _open(args)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    # The trainer writes its evaluation lines to stdout; with --json stdout holds the one JSON document.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with quiet:
            result, examples = tune_answer_adapter(store, embedder, train_config, tune, log=log)
    except TrainingInterrupted as stop:
        print(f"fourbit rag: interrupted at step {stop.step}; run the same command with --overwrite to start "
              "again", file=sys.stderr)
        return 130
    summary = {"out": str(result.out), "examples": examples, "train": result.n_train, "eval": result.n_eval,
               "steps": result.steps, "train_loss": result.train_loss, "eval_metrics": result.eval}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _console().print(f"adapter in [bold]{result.out}[/]: {examples} examples ({result.n_train} train, "
                         f"{result.n_eval} eval), {result.steps} steps, train loss {result.train_loss}; "
                         f"eval {result.eval}; ask with `fourbit rag query --adapter {result.out}`")
    return 0


def _first_line(func: Any) -> str:
    return (func.__doc__ or "").strip().splitlines()[0]


def add_parser(subparsers: Any) -> None:
    """Register ``fourbit rag {index,query,compare,tune,eval}``."""
    from fourbit.rag.grounding import DEFAULT_EVIDENCE_TOKENS
    from fourbit.rag.retrieval import RETRIEVERS

    rag = subparsers.add_parser("rag", help="question answering over documents with the 4-bit model")
    sub = rag.add_subparsers(dest="rag_command", required=True)

    p = sub.add_parser("index", help=_first_line(cmd_index), description=cmd_index.__doc__)
    p.add_argument("paths", nargs="+", type=Path, help="files or folders (.pdf, .txt, .md)")
    _store_args(p)
    p.add_argument("--parent-tokens", type=int, default=1024)
    p.add_argument("--parent-overlap", type=int, default=32, help="tokens shared by neighbouring parents")
    p.add_argument("--child-tokens", type=_ints, default=(128, 256, 512), help="e.g. 128,256,512")
    p.add_argument("--child-overlap", type=int, default=20, help="tokens shared by neighbouring children")
    p.add_argument("--metadata", type=_csv, default=(), help="generate per parent: questions,summary")
    p.add_argument("--n-questions", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per metadata generation batch")
    p.add_argument("--model", help="metadata LLM (default: bundled SmolLM2, 4-bit)")
    p.add_argument("--adapter", type=Path)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("query", help=_first_line(cmd_query), description=cmd_query.__doc__)
    p.add_argument("question", nargs="?", help="the question (or --questions FILE.jsonl)")
    p.add_argument("--questions", type=Path, metavar="FILE.jsonl",
                   help='JSONL, one {"question": ...} per line: answer each, the model loaded once '
                        "(with --json: one JSON line per question)")
    p.add_argument("--evidence-tokens", dest="token_budget", metavar="N", type=int, default=DEFAULT_EVIDENCE_TOKENS,
                   help="tokens of the model's context the evidence sentences may take "
                        f"(default: {DEFAULT_EVIDENCE_TOKENS})")
    _store_args(p)
    _llm_args(p)
    p.add_argument("--retriever", choices=list(RETRIEVERS), default="all")
    p.add_argument("--top-k", type=int, default=2, help="distinct parents given to the LLM")
    p.add_argument("--show-sources", action="store_true")
    p.add_argument("--verbose", "-v", action="store_true", help="trace which reference led to which parent")
    p.add_argument("--no-answer", action="store_true", help="retrieve only, do not load the LLM")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("compare", help=cmd_compare.__doc__, description=cmd_compare.__doc__)
    p.add_argument("question")
    _store_args(p)
    _llm_args(p)
    p.add_argument("--retrievers", type=_csv, default=_csv(_COMPARE_DEFAULT))
    p.add_argument("--top-k", type=int, default=2)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("tune", help=_first_line(cmd_tune), description=cmd_tune.__doc__)
    _store_args(p)
    p.add_argument("--out", type=Path, required=True, help="folder that receives the adapter")
    p.add_argument("--model", help="model to tune: folder or GGUF (default: bundled SmolLM2, 4-bit)")
    p.add_argument("--questions", choices=("auto", "metadata", "templates"), default="auto",
                   help="the index's generated questions, templates over each parent, or both (default)")
    p.add_argument("--per-parent", type=int, default=2, help="questions per parent at most")
    p.add_argument("--max-examples", type=int, default=400)
    p.add_argument("--retriever", choices=list(RETRIEVERS), default="chunks")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--evidence-tokens", dest="token_budget", metavar="N", type=int, default=DEFAULT_EVIDENCE_TOKENS)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    p.set_defaults(func=cmd_tune, adapter=None, max_new_tokens=1)

    p = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    p.add_argument("--questions", type=Path, required=True, help='JSONL: {"question": ..., "evidence": ...}')
    _store_args(p)
    p.add_argument("--retrievers", type=_csv, default=tuple(RETRIEVERS))
    p.add_argument("--top-k", type=int, default=2)
    p.set_defaults(func=cmd_eval)
