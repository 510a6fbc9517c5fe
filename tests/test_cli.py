"""The core CLI commands on a tiny model folder: quantize, info, generate, eval-quant, errors."""

import json

import pytest

from fourbit.cli import main


def _json_out(capsys):
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_quantize_then_info_then_generate(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), "--json", "--compute-dtype", "fp32"]) == 0
    result = _json_out(capsys)
    assert result["quantized_layers"] == 14 and result["skipped"] == ["lm_head"]
    assert 4.1 < result["bits_per_param"] < 4.2 and 0 < result["mean_relative_error"] < 0.2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    assert main(["info", str(out), "--json"]) == 0
    info = _json_out(capsys)
    assert info["quantized"] and info["quantized_layers"] == 14 and info["quantized_params"] == result["quantized_params"]

    assert main(["generate", str(out), "hello", "--max-new-tokens", "5", "--json"]) == 0
    gen = _json_out(capsys)
    assert gen["prompt"] == "hello" and 1 <= gen["tokens"] <= 5


def test_quantize_table_output_and_refusal_to_overwrite(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), "--quant-type", "fp4", "--no-double-quant"]) == 0
    text = capsys.readouterr().out
    assert "bits per 4-bit parameter" in text and "4.500" in text
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_generate_streams_text(tiny_llama_dir, capsys):
    assert main(["generate", str(tiny_llama_dir), "hi", "--max-new-tokens", "4"]) == 0
    assert "tokens/s" in capsys.readouterr().out


def test_eval_quant_reports_every_type(tiny_llama_dir, capsys):
    assert main(["eval-quant", str(tiny_llama_dir), "--chars", "2000", "--window", "128", "--max-windows", "2",
                 "--json"]) == 0
    rows = _json_out(capsys)["results"]
    assert [r["model"] for r in rows] == ["unquantized", "nf4", "fp4", "int4"]
    assert all(r["perplexity"] > 1 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["quantize", "/no/such/model", "--out", "x"], "does not exist"),
    (["quantize", "--out", "x", "--blocksize", "100"], "--blocksize"),
    (["info", "/no/such/dir"], "config.json"),
])
def test_errors_are_one_line_and_exit_1(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
