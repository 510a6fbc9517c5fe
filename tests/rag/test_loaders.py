"""Loading: cleaning, PDF pages and labels, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from fourbit.rag.loaders import (
    NoTextError,
    clean_text,
    discover_files,
    doc_id_for,
    load_document,
    normalize_whitespace,
)


def test_clean_text_repairs_hyphenation_and_whitespace():
    raw = "An effi-\ncient   method\t uses 4-\nbit weights.\r\n\r\n\r\n\nNext  paragraph.  "
    assert clean_text(raw) == "An efficient method uses 4-\nbit weights.\n\nNext paragraph."
    assert normalize_whitespace(clean_text(raw)) == "An efficient method uses 4- bit weights. Next paragraph."


def test_pdf_pages_get_their_labels(tmp_path: Path, make_pdf):
    path = make_pdf(tmp_path / "two.pdf", ["First page talks about comets.", "Second page talks about bread."])
    doc = load_document(path)
    assert doc.doc_id == "two"
    assert [label for _, label in doc.pages] == ["1", "2"]
    assert doc.page_at(doc.text.index("comets")) == "1"
    assert doc.page_at(doc.text.index("bread")) == "2"


def test_text_and_markdown(tmp_path: Path):
    (tmp_path / "a.md").write_text("# Title\n\nSome  text.\n", encoding="utf-8")
    doc = load_document(tmp_path / "a.md")
    assert doc.text == "# Title\n\nSome text." and doc.pages == [(0, "1")]
    assert len(doc.sha256) == 64


def test_scanned_pdf_has_no_text(tmp_path: Path, make_pdf):
    path = make_pdf(tmp_path / "scan.pdf", ["", ""], blank=True)
    with pytest.raises(NoTextError, match="no extractable text"):
        load_document(path)


def test_encrypted_pdf_is_a_clear_error(tmp_path: Path, make_pdf):
    path = make_pdf(tmp_path / "secret.pdf", ["classified"], encrypt=True)
    with pytest.raises(ValueError, match="encrypted"):
        load_document(path)


def test_bad_paths(tmp_path: Path):
    (tmp_path / "x.docx").write_bytes(b"PK")
    with pytest.raises(ValueError, match="unsupported file type '.docx'"):
        discover_files([tmp_path / "x.docx"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no supported file"):
        discover_files([empty])
    with pytest.raises(FileNotFoundError):
        discover_files([tmp_path / "missing.txt"])


def test_discover_recurses_and_ignores_other_types(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b", encoding="utf-8")
    (tmp_path / "a.md").write_text("a", encoding="utf-8")
    (tmp_path / "c.png").write_bytes(b"\x89PNG")
    assert [p.name for p in discover_files([tmp_path])] == ["a.md", "b.txt"]
    assert doc_id_for(Path("My Paper (v2).pdf")) == "My_Paper_v2"


@pytest.mark.parametrize(
    "data, text, encoding",
    [
        (b"plain ascii\n", "plain ascii\n", "utf-8"),
        ("\ufeffwith a BOM, café".encode("utf-8"), "with a BOM, café", "utf-8"),
        ("utf-16 text".encode("utf-16"), "utf-16 text", "utf-16"),
        ("Le café de Sévérine, à Orléans.".encode("latin-1"), "Le café de Sévérine, à Orléans.", "cp1252"),
        ("“Quotes” – and … Größe".encode("cp1252"), "“Quotes” – and … Größe", "cp1252"),
    ],
)
def test_decode_text_reads_utf8_and_unambiguous_cp1252(data, text, encoding):
    from fourbit.rag.loaders import decode_text

    assert decode_text(data, "f.txt") == (text, encoding)


@pytest.mark.parametrize(
    "data, reason",
    [
        ("Привет, это документ на русском языке.".encode("cp1251"), "not UTF-8"),  # Cyrillic read as cp1252: gibberish
        ("zażółć gęślą jaźń".encode("cp1250"), "not UTF-8"),  # Polish: symbols inside words
        ("Καλημέρα κόσμε".encode("cp1253"), "not UTF-8"),
        (bytes(range(256)) * 4, "binary data"),
        (b"text\x00with a NUL", "binary data"),
    ],
)
def test_decode_text_refuses_binary_and_ambiguous_bytes(data, reason):
    from fourbit._errors import InputFileError
    from fourbit.rag.loaders import decode_text

    with pytest.raises(InputFileError, match=reason) as caught:
        decode_text(data, "f.txt")
    assert caught.value.path == "f.txt"
