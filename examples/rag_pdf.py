"""Reference workflow 3: parent-child retrieval with question and summary metadata over a PDF, and an
answer with its sources -- the llama-index notebook's recipe, with fourbit's commands:

    fourbit rag index paper.pdf --db rag_db --metadata questions,summary
    fourbit rag query "Can you tell me about the paged optimizers?" --db rag_db --retriever all --show-sources

The PDF is split into parent chunks (what the model reads) and child chunks of several sizes; the 4-bit model
writes questions and a summary per parent; child chunks, questions and summaries all point back to their
parent, and retrieval returns distinct parents, which the 4-bit model answers from. This script runs those
two commands (``--json``) and prints the answer, its sources, and how many records of each kind the index holds.

    python examples/rag_pdf.py paper.pdf "What is NF4?"            # bundled SmolLM2 and embedding model
    python examples/rag_pdf.py                                     # a PDF made from fourbit's QLoRA guide
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[1] / "fourbit" / "data" / "qlora_guide.md"


def guide_pdf(path: Path) -> Path:
    """fourbit's QLoRA guide as a PDF (needs ``fpdf2``, in the dev extra)."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for page in GUIDE.read_text(encoding="utf-8").split("\n## "):
        pdf.add_page()
        text = page.encode("latin-1", "replace").decode("latin-1")
        pdf.multi_cell(0, 6, text)
    pdf.output(str(path))
    return path


def _fourbit(*argv: str) -> dict:
    """``fourbit ARGV --json`` in this process; its JSON output."""
    from fourbit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--json"])
    if code != 0:
        raise SystemExit(code)
    text = out.getvalue()
    return json.loads(text[text.index("{"):])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pdf", nargs="?", type=Path, help="the PDF (default: fourbit's QLoRA guide as a PDF)")
    parser.add_argument("question", nargs="?", default="Can you tell me about the paged optimizers?")
    parser.add_argument("--db", type=Path, default=None, help="index folder (default: a temporary folder)")
    parser.add_argument("--model", default=None, help="answering/metadata model (default: the bundled SmolLM2)")
    args, index_flags = parser.parse_known_args(argv)  # other flags go to `rag index` (chunk sizes...)

    work = Path(tempfile.mkdtemp(prefix="fourbit-rag-"))
    pdf = args.pdf or guide_pdf(work / "qlora_guide.pdf")
    db = str(args.db or work / "db")
    model = ["--model", args.model] if args.model else []
    indexed = _fourbit("rag", "index", str(pdf), "--db", db, "--metadata", "questions,summary", *model,
                       *index_flags)
    answer = _fourbit("rag", "query", args.question, "--db", db, "--retriever", "all", "--show-sources", *model)
    report = {"pdf": str(pdf), "indexed": indexed, "question": args.question, "answer": answer}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
