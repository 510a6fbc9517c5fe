"""The core CLI commands on a tiny model folder: quantize, info, generate, eval-quant, errors."""

import argparse
import json

import pytest
from _cli import assert_clean_error, run_cli


def _json(result):
    assert result.code == 0, result.err
    return json.loads(result.out[result.out.index("{"):])


def test_quantize_then_info_then_generate(tiny_llama_dir, tmp_path):
    out = tmp_path / "q4"
    result = _json(run_cli("quantize", tiny_llama_dir, "--out", out, "--json", "--compute-dtype", "fp32"))
    assert result["quantized_layers"] == 14 and result["skipped"] == ["lm_head"]
    assert 4.1 < result["bits_per_param"] < 4.2 and 0 < result["mean_relative_error"] < 0.2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    info = _json(run_cli("info", out, "--json"))
    assert info["quantized"] and info["quantized_layers"] == 14 and info["quantized_params"] == result["quantized_params"]
    assert info["quant_types"] == ["nf4"] and info["fourbit"]["quant_config"]["quant_type"] == "nf4"

    gen = _json(run_cli("generate", out, "hello", "--max-new-tokens", "5", "--json"))
    assert gen["prompt"] == "hello" and 1 <= gen["tokens"] <= 5


def test_info_of_a_float_model_folder(tiny_llama_dir):
    info = _json(run_cli("info", tiny_llama_dir, "--json"))
    assert not info["quantized"] and info["quantized_layers"] == 0 and info["quant_types"] == []
    table = run_cli("info", tiny_llama_dir)
    assert table.code == 0 and "LlamaForCausalLM" in table.out


def test_quantize_table_output_and_refusal_to_overwrite(tiny_llama_dir, tmp_path):
    out = tmp_path / "q4"
    result = run_cli("quantize", tiny_llama_dir, "--out", out, "--quant-type", "fp4", "--no-double-quant")
    assert result.code == 0, result.err
    assert "bits per 4-bit parameter" in result.out and "4.500" in result.out
    table = run_cli("info", out)
    assert table.code == 0 and "fp4" in table.out and "4.500" in table.out
    assert_clean_error(run_cli("quantize", tiny_llama_dir, "--out", out), "--out", "--overwrite")


def test_generate_streams_text(tiny_llama_dir):
    result = run_cli("generate", tiny_llama_dir, "hi", "--max-new-tokens", "4")
    assert result.code == 0 and "tokens/s" in result.out


def test_eval_quant_reports_every_type(tiny_llama_dir):
    rows = _json(run_cli("eval-quant", tiny_llama_dir, "--chars", "2000", "--window", "128", "--max-windows", "2",
                         "--json"))["results"]
    assert [r["model"] for r in rows] == ["unquantized", "nf4", "fp4", "int4"]
    assert all(r["perplexity"] > 1 for r in rows)


@pytest.mark.parametrize("argv, names", [
    (["quantize", "/no/such/model", "--out", "x"], ["/no/such/model", "does not exist"]),
    (["quantize", "--out", "x", "--blocksize", "100"], ["--blocksize"]),
    (["info", "/no/such/dir"], ["config.json"]),
    (["eval-quant", "--types", ",", "--window", "8"], ["--types"]),
])
def test_errors_are_one_line_and_exit_1(argv, names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clean_error(run_cli(*argv), *names)
    assert not (tmp_path / "x").exists()


def test_quant_module_registers_only_the_quantization_commands():
    """cli/quant.py holds quantize, info and eval-quant; generate and demo live in their own modules."""
    import fourbit.cli
    from fourbit.cli import demo, generate, quant

    def commands(register) -> set[str]:
        sub = argparse.ArgumentParser().add_subparsers()
        register(sub)
        return set(sub.choices)

    assert commands(quant.add_parser) == {"quantize", "info", "eval-quant"}
    assert commands(generate.add_parser) == {"generate"} and commands(demo.add_parser) == {"demo"}
    assert {"generate", "demo"} <= set(fourbit.cli.build_parser()._subparsers._group_actions[0].choices)


def test_a_wrapped_field_error_names_its_flag_once():
    from fourbit._errors import FieldError
    from fourbit.cli import user_message

    inner = FieldError("target_modules", "'x' matched no linear module")
    outer = FieldError("target_modules", f"{inner}; or use all-linear")  # a caller that names the field again
    flags = {"target_modules": "--target-modules"}
    assert user_message(outer, flags) == "--target-modules: 'x' matched no linear module; or use all-linear"
    assert user_message(FieldError("lr", "`lr`: must be > 0"), {}) == "--learning-rate: must be > 0"
    assert user_message(ValueError("a: b: c"), {}) == "a: b: c"  # different names stay


def test_the_console_entry_point_starts_without_torch() -> None:
    """Until ``console_main`` runs, a Ctrl-C meets Python's default handler: a traceback and the process ended by
    the signal. Importing the entry point (``fourbit.cli``, and the package above it) must therefore be quick:
    torch (seconds to import) comes later, inside ``console_main``'s own handling."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, fourbit.cli; print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))"
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": root},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    import fourbit  # the package's names still come from fourbit.quant, on first use
    from fourbit.quant import quantize_4bit

    assert fourbit.quantize_4bit is quantize_4bit and "quantize_4bit" in dir(fourbit)
    assert fourbit.quant.QuantState is fourbit.QuantState and fourbit.kernels.__name__ == "fourbit.kernels"
    with pytest.raises(AttributeError, match="no_such_name"):
        fourbit.no_such_name  # noqa: B018


@pytest.mark.parametrize("handler", ["python's", "fourbit's"])
def test_a_ctrl_c_during_an_import_waits_for_the_import_to_finish(tmp_path, monkeypatch, handler) -> None:
    """A module that gets a SIGINT while it initializes: under Python's handler the KeyboardInterrupt cuts its
    initialization short (what left numpy half-made under torch's import); under fourbit's the import finishes
    and the KeyboardInterrupt comes right after it; a second Ctrl-C meanwhile stops it at once."""
    import importlib
    import sys
    import time

    from fourbit.cli import CtrlCOutsideImports

    name = f"ctrl_c_victim_{handler[:-2].replace(' ', '_')}"
    (tmp_path / f"{name}.py").write_text("import signal\nsignal.raise_signal(signal.SIGINT)\nfinished = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    if handler == "python's":
        with pytest.raises(KeyboardInterrupt):
            importlib.import_module(name)
        assert name not in sys.modules  # its initialization was cut short
        return
    with CtrlCOutsideImports.installed() as ctrl_c, pytest.raises(KeyboardInterrupt):
        module = importlib.import_module(name)
        assert ctrl_c.pending and module.finished
        time.sleep(60)  # the kept Ctrl-C arrives here (SIGINT is sent again 20 ms after it was kept)
    assert not ctrl_c.pending and sys.modules[name].finished

    # A second Ctrl-C while the first is kept stops at once, inside the import.
    (tmp_path / f"{name}_twice.py").write_text("import signal\nsignal.raise_signal(signal.SIGINT)\n"
                                                "signal.raise_signal(signal.SIGINT)\nfinished = True\n")
    with CtrlCOutsideImports.installed(), pytest.raises(KeyboardInterrupt):
        importlib.import_module(f"{name}_twice")
    assert f"{name}_twice" not in sys.modules


@pytest.mark.parametrize("returned", [0, KeyboardInterrupt])
def test_console_main_exits_with_the_code_and_then_ignores_ctrl_c(monkeypatch, capsys, returned):
    """A Ctrl-C before a command began (while the arguments are parsed) exits 130 with one line; once the
    command has returned, SIGINT is ignored, so that the interpreter's teardown (which restores its default
    action) cannot end the process by the signal."""
    import signal

    import fourbit.cli

    def main():
        if returned is KeyboardInterrupt:
            raise KeyboardInterrupt
        return returned

    monkeypatch.setattr(fourbit.cli, "main", main)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exited:
            fourbit.cli.console_main()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    if returned is KeyboardInterrupt:
        assert exited.value.code == 130 and capsys.readouterr().err == "fourbit: interrupted\n"
    else:
        assert exited.value.code == 0 and capsys.readouterr().err == ""
