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

import fourbit.cli
from fourbit.cli.serve import add_parser

REPO = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fourbit")
    add_parser(p.add_subparsers(dest="command"))
    return p


def run(*argv: str) -> tuple[int, str]:
    """What ``fourbit.cli.main`` does with our subcommand (until the lead registers it there)."""
    p = parser()
    args = p.parse_args(list(argv))
    try:
        return int(args.func(args) or 0), ""
    except (ValueError, NotImplementedError, OSError) as err:
        return 1, f"fourbit serve: error: {fourbit.cli.user_message(err, fourbit.cli._flags(p))}"
    except KeyboardInterrupt:
        return 130, "fourbit serve: interrupted"


def test_flags_and_defaults():
    args = parser().parse_args(["serve", "m", "--adapter", "a=x/y", "--adapter", "b = z"])
    assert args.adapters == [("a", Path("x/y")), ("b", Path("z"))]
    assert (args.host, args.port, args.api_key, args.db) == ("127.0.0.1", 8000, None, None)
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--adapter", "no-equals-sign"])


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


def test_registered_in_the_fourbit_command(model_dir, tmp_path):
    from _cli import assert_clean_error, run_cli

    if "fourbit.cli.serve" not in fourbit.cli._COMMAND_MODULES:
        pytest.skip("fourbit.cli.serve is not registered in fourbit.cli._COMMAND_MODULES yet (the lead does it)")
    assert_clean_error(run_cli("serve", str(model_dir), "--port", "0", "--adapter", f"x={tmp_path}/nope"),
                       "--adapter")


@pytest.mark.multiprocess
def test_ctrl_c_stops_the_server_cleanly(model_dir, tmp_path):
    script = ("import sys; from tests.serve.test_cli import run; "
              "code, err = run('serve', sys.argv[1], '--port', '0', '--name', 'tiny', '--db', sys.argv[2]); "
              "print(err, file=sys.stderr); "
              "sys.exit(code)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "FOURBIT_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(model_dir), str(tmp_path / "db")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
