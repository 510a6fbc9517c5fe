"""Fixtures for the RAG tests: the real MiniLM embedder (loaded once), small documents made here."""

from __future__ import annotations

from pathlib import Path

import pytest

TOPICS = {
    "bread": [
        "Sourdough bread rises because wild yeast and lactic acid bacteria ferment the flour.",
        "A starter is fed with equal weights of flour and water every day to keep the culture active.",
        "Bakers score the loaf with a razor so that steam escapes in a controlled way in the oven.",
        "A Dutch oven traps moisture during the first twenty minutes and gives the crust its shine.",
        "Rye flour holds more water than wheat flour, so rye doughs feel sticky and dense.",
    ],
    "comets": [
        "A comet is a frozen body of ice and dust that develops a glowing coma near the Sun.",
        "The tail of a comet always points away from the Sun, pushed by the solar wind and radiation pressure.",
        "Halley's comet returns to the inner solar system roughly every seventy-six years.",
        "Short-period comets come from the Kuiper belt beyond the orbit of Neptune.",
        "Long-period comets are thought to originate in the distant Oort cloud.",
    ],
    "tomatoes": [
        "Tomato seedlings need sixteen hours of light a day or they grow tall and weak.",
        "Gardeners pinch out the side shoots of cordon tomatoes to direct energy into the fruit.",
        "Blossom end rot is caused by irregular watering that limits calcium uptake.",
        "Tomatoes ripen best at temperatures between twenty and twenty-five degrees Celsius.",
        "Companion planting with basil is said to deter whiteflies from tomato plants.",
    ],
}


def topic_text(name: str, repeat: int = 2) -> str:
    """A few paragraphs on one topic (sentences repeated with numbered variations to make length)."""
    paragraphs = []
    for round_ in range(repeat):
        paragraphs.append(" ".join(f"{s[:-1]} (note {round_ + 1})." for s in TOPICS[name]))
    return "\n\n".join(paragraphs)


def make_pdf(path: Path, pages: list[str], *, encrypt: bool = False, blank: bool = False) -> Path:
    """Write a PDF with one page per string (fpdf2); ``blank`` draws only a rectangle (a "scan")."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        if blank:
            pdf.rect(20, 20, 100, 60, style="F")
        else:
            pdf.multi_cell(0, 6, text)
    if encrypt:
        pdf.set_encryption(owner_password="owner", user_password="user")
    pdf.output(str(path))
    return path


@pytest.fixture(scope="session")
def embedder():
    import torch

    from fourbit.rag.embeddings import Embedder

    torch.set_num_threads(1)
    return Embedder()


@pytest.fixture
def docs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in TOPICS:
        (folder / f"{name}.txt").write_text(topic_text(name), encoding="utf-8")
    return folder


@pytest.fixture
def small_config():
    """Sizes that give several parents and children per small document."""
    from fourbit.rag.chunking import ChunkConfig
    from fourbit.rag.index import IndexConfig

    return IndexConfig(chunk=ChunkConfig(parent_tokens=64, parent_overlap=0, child_tokens=(16, 32), child_overlap=0))


@pytest.fixture(name="make_pdf", scope="session")
def make_pdf_fixture():
    return make_pdf


@pytest.fixture(name="topic_text", scope="session")
def topic_text_fixture():
    return topic_text
