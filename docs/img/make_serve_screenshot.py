"""Make docs/img/serve.png: the page of a real ``fourbit serve`` (bundled SmolLM2, 4-bit) over the shipped
QLoRA guide, with one chat turn and one answered question whose evidence is highlighted.

    python docs/img/make_serve_screenshot.py [--out docs/img/serve.png] [--chromium /usr/bin/chromium]

Needs playwright (Python) and a chromium; takes a minute or two on a 2-core CPU (indexing, model load,
two generations).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "Can you tell me about the paged optimizers?"
CHAT = "What is the capital of France?"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "serve.png")
    parser.add_argument("--chromium", default=os.environ.get("FOURBIT_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()

    import httpx
    from playwright.sync_api import sync_playwright

    fourbit = [sys.executable, "-m", "fourbit"]
    guide = ROOT / "fourbit" / "data" / "qlora_guide.md"
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "db"
        subprocess.run([*fourbit, "rag", "index", str(guide), "--db", str(db), "--parent-tokens", "256",
                        "--parent-overlap", "16", "--child-tokens", "128"], env=_env(), check=True)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([*fourbit, "serve", "--db", str(db), "--port", str(port)], env=_env())
        try:
            deadline = time.monotonic() + 600
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"fourbit serve exited with {server.returncode}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("fourbit serve did not start")
                time.sleep(0.5)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.set_default_timeout(300_000)
                page.goto(url + "/")
                page.wait_for_function("document.querySelectorAll('#model option').length >= 1")
                page.fill("#chat-input", CHAT)
                page.click("#chat-send")
                page.wait_for_selector(".msg.assistant[data-done='true']")
                page.fill("#question", QUESTION)
                page.select_option("#retriever", "chunks")
                page.click("#ask")
                page.wait_for_selector("#answer[data-done='true']")
                page.wait_for_selector("#sources mark")
                # Zoomed out a little so that the highlighted evidence in the sources fits the 1200x800 view.
                page.evaluate("document.body.style.zoom = '0.8'")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    from PIL import Image

    # A 128-colour palette: the page is flat colours and text, so it looks the same at a third of the size.
    Image.open(args.out).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.out,
                                                                                                  optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
