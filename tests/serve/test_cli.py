"""``fourbit serve`` on the command line: flags, clean errors naming the flag, Ctrl-C stops it cleanly."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _cli import assert_clean_error, run_cli

import fourbit.cli
from fourbit.cli.serve import add_parser

REPO = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fourbit")
    add_parser(p.add_subparsers(dest="command"))
    return p


def console_script() -> Path:
    """The installed ``fourbit`` executable beside this Python: a missing one is a broken install, a failure."""
    path = Path(sys.executable).parent / "fourbit"
    assert path.is_file(), f"no `fourbit` console script at {path}: install the package (pip install -e .)"
    return path


def run(*argv: str) -> tuple[int, str]:
    """``fourbit ARGV...`` in this process: (exit code, stderr)."""
    result = run_cli(*argv)
    return result.code, result.err


def test_flags_and_defaults():
    args = parser().parse_args(["serve", "m", "--adapter", "a=x/y", "--adapter", "b = z"])
    assert args.adapters == [("a", Path("x/y")), ("b", Path("z"))]
    assert (args.host, args.port, args.api_key, args.db, args.decoder) == ("127.0.0.1", 8000, None, None, "auto")
    assert parser().parse_args(["serve", "--decoder", "hf"]).decoder == "hf"
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--adapter", "no-equals-sign"])
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--decoder", "fast"])


def test_answers_use_the_shipped_answer_adapter_unless_told_otherwise(model_dir, adapter_dirs, serve_embedder,
                                                                     tmp_path, monkeypatch):
    import fourbit.rag.embeddings
    import fourbit.rag.llm
    from fourbit.cli.serve import ANSWER_ADAPTER_NAME, _answer_adapter, build_engine

    shipped = tmp_path / "answer_adapter"
    monkeypatch.setattr(fourbit.rag.llm, "ANSWER_ADAPTER_DIR", shipped)
    db = ["--db", str(tmp_path / "db")]
    assert _answer_adapter(parser().parse_args(["serve", *db])) == []  # none shipped
    shipped.mkdir()
    (shipped / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert _answer_adapter(parser().parse_args(["serve", *db])) == [(ANSWER_ADAPTER_NAME, shipped)]
    assert _answer_adapter(parser().parse_args(["serve"])) == []  # no documents: no /v1/answers
    assert _answer_adapter(parser().parse_args(["serve", *db, "--no-answer-adapter"])) == []
    assert _answer_adapter(parser().parse_args(["serve", "other/model", *db])) == []  # another base
    mine = parser().parse_args(["serve", str(model_dir), *db, "--answer-adapter", str(adapter_dirs["alpha"])])
    assert _answer_adapter(mine) == [(ANSWER_ADAPTER_NAME, adapter_dirs["alpha"])]
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--answer-adapter", "x", "--no-answer-adapter"])
    monkeypatch.setattr(fourbit.rag.embeddings, "Embedder", lambda model=None: serve_embedder)
    engine = build_engine(mine)
    try:
        assert engine.answer_model == ANSWER_ADAPTER_NAME and engine.models == ["tiny-llama", ANSWER_ADAPTER_NAME]
    finally:
        engine.close()
    taken = parser().parse_args(["serve", str(model_dir), *db, "--answer-adapter", str(adapter_dirs["alpha"]),
                                 "--adapter", f"{ANSWER_ADAPTER_NAME}={adapter_dirs['beta']}"])
    with pytest.raises(ValueError, match="given twice"):
        build_engine(taken)


def test_bad_adapter_folder_names_the_flag(model_dir, tmp_path):
    code, err = run("serve", str(model_dir), "--port", "0", "--adapter", f"x={tmp_path / 'nope'}")
    assert code == 1
    assert "--adapter" in err and str(tmp_path / "nope") in err


def test_taken_port_names_the_flag(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, err = run("serve", str(model_dir), "--port", str(taken.getsockname()[1]))
    assert code == 1 and "--port" in err and "in use" in err
    code, err = run("serve", str(model_dir), "--port", "70000")
    assert code == 1 and "--port" in err
    code, err = run("serve", str(model_dir), "--port", "0", "--threads", "0")
    assert code == 1 and "--threads" in err and "got 0" in err
    for flag in ("--max-queue", "--max-batch"):
        code, err = run("serve", str(model_dir), "--port", "0", flag, "0")
        assert code == 1 and f"{flag}: must be >= 1, got 0" in err and "Traceback" not in err


def test_registered_in_the_fourbit_command(model_dir, tmp_path):
    assert "fourbit.cli.serve" in fourbit.cli._COMMAND_MODULES
    assert_clean_error(run_cli("serve", str(model_dir), "--port", "0", "--adapter", f"x={tmp_path}/nope"),
                       "--adapter")
    done = subprocess.run([str(console_script()), "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--api-key" in done.stdout and "OpenAI-compatible" in done.stdout


@pytest.mark.multiprocess
def test_ctrl_c_stops_the_server_cleanly(model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "FOURBIT_API_KEY": "k"}
    argv = [str(console_script()), "serve", str(model_dir), "--port", "0", "--name", "tiny", "--db", str(tmp_path / "db")]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving tiny on http://127.0.0.1:PORT/ (API key required); ..."
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{match.group(1)}"
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok", "models": ["tiny"],
                                                                         "documents": True}
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server never answered /health"
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401  # the key came from the environment
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}, timeout=5).status_code == 200
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, 130, -signal.SIGINT), stderr
    assert "Traceback" not in stderr
    assert (tmp_path / "db" / "chroma.sqlite3").is_file()  # --db created an empty index to upload into


@pytest.mark.parametrize("missing, package", [(("fastapi",), "fastapi"), (("uvicorn",), "uvicorn"),
                                              (("python_multipart", "multipart"), "python-multipart")])
def test_without_the_serve_extra_one_line_names_it(model_dir, monkeypatch, missing, package):
    for module in missing:  # a None entry makes `import module` fail as if it were not installed
        monkeypatch.setitem(sys.modules, module, None)
    message = assert_clean_error(run_cli("serve", str(model_dir), "--port", "0"), package,
                                 "pip install 'fourbit[serve]'")
    assert message.startswith("fourbit serve: error: the server needs the serve extra")
