"""Shared test setup: deterministic seeds, few threads, and tiny models and tokenizers built in the test."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:  # so that test files in every folder can import _tiny_models
    sys.path.insert(0, _TESTS)

from _tiny_models import make_llama as _make_llama  # noqa: E402
from _tiny_models import make_tokenizer as make_tiny_tokenizer  # noqa: E402


def make_tiny_llama(seed: int = 0, tie_word_embeddings: bool = False, intermediate_size: int = 96):
    """The tiny llama in eval mode."""
    return _make_llama(seed, tie_word_embeddings=tie_word_embeddings, intermediate_size=intermediate_size).eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _default_ctrl_c():
    """Every test starts with Python's own SIGINT handler (KeyboardInterrupt): a test that runs a command
    in-process may leave another one installed (the CLI ignores SIGINT once its command has returned)."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def float_rows():
    """The compiled decoding step's float 4-bit rows for every layer, for tests that compare its greedy tokens
    one for one with the model's forward, whatever FOURBIT_DECODE_ROWS says: its int8 rows (CPUs with
    AVX512_VNNI, fourbit/kernels/csrc/decode.c; by default for layers of 2,048 columns or more) flip near-ties
    of the tiny random models (tests/models/test_decode.py checks them with a tolerance instead). The choice
    before is restored."""
    from fourbit.kernels import cpu

    before = cpu.set_decode_rows(None) if cpu.available() else "float"
    if cpu.available():
        cpu.set_decode_rows("float")
    yield
    if cpu.available():
        cpu.set_decode_rows(before)


@pytest.fixture
def make_llama():
    """Factory fixture: ``make_llama(seed=0, tie_word_embeddings=False, intermediate_size=96)`` builds a fresh
    tiny llama."""
    return make_tiny_llama


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def shared_tiny_llama_dir(tmp_path_factory):
    """One saved tiny llama folder with tokenizer for the whole session, for tests that only read it."""
    path = tmp_path_factory.mktemp("shared") / "tiny-llama"
    make_tiny_llama().save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A saved tiny llama folder with tokenizer (unquantized)."""
    path = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def ctrl_c_after_step(monkeypatch) -> Callable[[int], None]:
    """``ctrl_c_after_step(n)``: the next training run of this test to finish optimizer step ``n`` gets a real
    SIGINT, as from Ctrl-C, right after it (once: a resumed run goes on). The trainer's own handler takes it:
    the run stops at that step boundary with a checkpoint and raises
    :class:`~fourbit.train.trainer.TrainingInterrupted`. (The step function is wrapped by monkeypatching;
    nothing in fourbit knows about it.)"""
    import signal

    from fourbit.train.step import Stepper

    def arm(n: int) -> None:
        real, fired = Stepper.step, []

        def step(self, stream, state, **kw):
            result = real(self, stream, state, **kw)
            if state.step == n and not fired:
                fired.append(n)
                signal.raise_signal(signal.SIGINT)
            return result

        monkeypatch.setattr(Stepper, "step", step)

    return arm
