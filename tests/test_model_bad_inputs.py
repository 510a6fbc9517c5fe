"""Bad model files and folders through the command line: each fails with exit code 1 and one line that names
the file, field or flag and says what to do; no traceback; inputs and earlier outputs are left as they were.

Also: a quantize (of one file or streamed from shards) or an export killed with SIGKILL in the middle of
writing leaves nothing that looks like a finished output, and running it again gives the same bytes as a run
that was never interrupted; DoRA and LoftQ where they cannot apply are refused the same way.

Elsewhere, the same treatment of the other new commands and fields: the memory planner's refusal
(tests/train/test_memory_check.py), GGUF export's bad flags, architectures, folders and full disks
(tests/test_export.py), the server's bad bodies, adapters and overload (tests/serve/test_errors.py,
test_options.py, test_load_adapters.py, test_overload.py), nothing indexable (tests/rag/test_bad_inputs.py).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _cli import assert_clean_error, run_cli

from fourbit._io import TEMP_PREFIX

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_temps(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)], "a temporary was left"


def _quantize(model: Path, out: Path, *extra: str):
    return run_cli("quantize", model, "--out", out, "--json", "--compute-dtype", "fp32", *extra)


@pytest.fixture
def checkpoint(tiny_llama_dir, tmp_path) -> Path:
    """A 4-bit checkpoint of the tiny llama, saved by ``fourbit quantize``."""
    out = tmp_path / "q4"
    assert _quantize(tiny_llama_dir, out).code == 0
    return out


# ------------------------------------------------------------------------------------- model weights files
@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_damaged_safetensors_of_a_float_model_are_named(tiny_llama_dir, tmp_path, damage):
    weights = tiny_llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    before = _snapshot(tiny_llama_dir)
    out = tmp_path / "q4"
    message = assert_clean_error(_quantize(tiny_llama_dir, out), str(weights))
    assert "truncated or damaged" in message
    assert not out.exists() and _snapshot(tiny_llama_dir) == before
    assert_clean_error(run_cli("info", tiny_llama_dir), str(weights))
    assert_clean_error(run_cli("generate", tiny_llama_dir, "hi", "--max-new-tokens", "2"), str(weights))


def test_damaged_safetensors_of_a_checkpoint_are_named(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    assert_clean_error(run_cli("info", checkpoint), str(weights))
    assert_clean_error(run_cli("generate", checkpoint, "hi", "--max-new-tokens", "2"), str(weights))


def test_pickled_weights_are_refused_without_unpickling(tiny_llama_dir, tmp_path):
    (tiny_llama_dir / "model.safetensors").unlink()
    pickled = tiny_llama_dir / "pytorch_model.bin"
    # A pickle that would run code if it were unpickled: nothing may unpickle it.
    pickled.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    message = assert_clean_error(_quantize(tiny_llama_dir, tmp_path / "q4"), str(pickled))
    assert "safetensors or GGUF only" in message
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "q4").exists()


def _write_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("cut", [2, 10, 30, 60])
def test_gguf_cut_inside_its_header_is_named(tmp_path, cut):
    path = tmp_path / "model.gguf"
    _write_gguf(path)
    path.write_bytes(path.read_bytes()[:cut])
    message = assert_clean_error(_quantize(path, tmp_path / "q4"), str(path))
    assert "GGUF" in message and "struct" not in message.split(str(path))[0]
    assert not (tmp_path / "q4").exists()


# ------------------------------------------------------------------------------------- checkpoint contents
def test_info_refuses_a_checkpoint_whose_config_says_nf5(checkpoint):
    config_file = checkpoint / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "nf5"
    config_file.write_text(json.dumps(config))
    message = assert_clean_error(run_cli("info", checkpoint), str(config_file), "bnb_4bit_quant_type")
    assert "'nf5'" in message
    assert_clean_error(run_cli("generate", checkpoint, "hi", "--max-new-tokens", "2"), str(config_file))


def test_info_refuses_a_quant_state_of_an_unknown_type(checkpoint):
    from safetensors.torch import load_file, save_file

    weights = checkpoint / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("bitsandbytes__nf4"))
    meta = json.loads(bytes(tensors[key].numpy()).decode())
    meta["blocksize"] = 48
    tensors[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(tensors, weights)
    message = assert_clean_error(run_cli("info", checkpoint), str(weights), key)
    assert "blocksize 48" in message


# ------------------------------------------------------------------------------------------ output folder
def test_quantize_refuses_to_write_over_its_input(tiny_llama_dir):
    before = _snapshot(tiny_llama_dir)
    for out in (tiny_llama_dir, tiny_llama_dir / "q4", tiny_llama_dir.parent):
        assert_clean_error(_quantize(tiny_llama_dir, out, "--overwrite"), "--out", str(tiny_llama_dir))
    assert _snapshot(tiny_llama_dir) == before, "the float model is untouched"


def test_quantize_refuses_an_out_that_is_a_file(tiny_llama_dir, tmp_path):
    out = tmp_path / "q4"
    out.write_text("keep me")
    assert_clean_error(_quantize(tiny_llama_dir, out, "--overwrite"), "--out", str(out))
    assert out.read_text() == "keep me"


def test_quantize_refuses_an_out_it_cannot_write(tiny_llama_dir, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # as if `locked` were read-only (root ignores chmod)
        if Path(path).resolve() == locked.resolve() and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    assert_clean_error(_quantize(tiny_llama_dir, locked / "q4"), "--out", str(locked))
    assert list(locked.iterdir()) == []


def test_quantize_refuses_a_non_empty_out_without_overwrite(tiny_llama_dir, checkpoint):
    before = _snapshot(checkpoint)
    assert_clean_error(_quantize(tiny_llama_dir, checkpoint), "--out", "--overwrite")
    assert _snapshot(checkpoint) == before


@pytest.mark.parametrize("previous", [False, True])
def test_disk_full_while_saving_names_the_file_and_leaves_nothing_half_written(
        tiny_llama_dir, tmp_path, monkeypatch, previous):
    out = tmp_path / "q4"
    if previous:
        assert _quantize(tiny_llama_dir, out, "--quant-type", "fp4").code == 0
    before = _snapshot(out) if previous else None

    def disk_full(fd):  # file systems with delayed allocation report a full disk at fsync
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    message = assert_clean_error(_quantize(tiny_llama_dir, out, "--overwrite"), str(out / "model.safetensors"))
    assert "no space left" in message
    assert (_snapshot(out) == before) if previous else not out.exists()
    _no_temps(tmp_path)


# ------------------------------------------------------------------------------------------- model values
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_module(tmp_path, value, tiny_tokenizer, make_llama):
    model = make_llama().eval()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value
    folder = tmp_path / "broken"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    assert_clean_error(_quantize(folder, tmp_path / "q4"), str(folder), "model.layers.1.mlp.up_proj")
    assert not (tmp_path / "q4").exists()


@pytest.mark.parametrize("argv, names", [
    (["--quant-type", "nf5"], ["--quant-type", "nf5"]),
    (["--blocksize", "48"], ["--blocksize", "48"]),
])
def test_bad_quantization_flags_are_named(tiny_llama_dir, tmp_path, argv, names):
    assert_clean_error(_quantize(tiny_llama_dir, tmp_path / "q4", *argv), *names)
    assert not (tmp_path / "q4").exists()


def test_eval_quant_names_a_bad_type_in_types(tiny_llama_dir):
    assert_clean_error(run_cli("eval-quant", tiny_llama_dir, "--types", "nf4,nf5"), "--types", "nf5")


def test_generate_names_a_bad_max_new_tokens(tiny_llama_dir):
    assert_clean_error(run_cli("generate", tiny_llama_dir, "hi", "--max-new-tokens", "0"), "--max-new-tokens")


# ----------------------------------------------------------------------------------------------- adapters
def _adapter(tmp_path: Path, intermediate_size: int = 96) -> Path:
    """A LoRA adapter on the MLP up-projections of a tiny llama (``intermediate_size`` wide)."""
    from _tiny_models import make_llama

    from fourbit.nn.adapters import save_adapter
    from fourbit.nn.lora import LoRASpec, inject_lora

    model = make_llama(intermediate_size=intermediate_size)
    inject_lora(model, LoRASpec(r=4, alpha=8, target_modules=("up_proj",)))
    return save_adapter(model, tmp_path / f"adapter-{intermediate_size}")


def test_truncated_adapter_weights_are_named(tiny_llama_dir, tmp_path):
    adapter = _adapter(tmp_path)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    before = _snapshot(adapter)
    message = assert_clean_error(
        run_cli("generate", tiny_llama_dir, "hi", "--adapter", adapter, "--max-new-tokens", "2"), str(weights))
    assert "truncated" in message
    out = tmp_path / "merged"
    assert_clean_error(run_cli("merge", tiny_llama_dir, "--adapter", adapter, "--out", out), str(weights))
    assert not out.exists() and _snapshot(adapter) == before


def test_adapter_of_another_model_names_the_module_and_both_shapes(tiny_llama_dir, tmp_path):
    adapter = _adapter(tmp_path, intermediate_size=128)  # up_proj is 64 -> 128 there, 64 -> 96 here
    message = assert_clean_error(
        run_cli("generate", tiny_llama_dir, "hi", "--adapter", adapter, "--max-new-tokens", "2"),
        str(adapter / "adapter_model.safetensors"), "model.layers.0.mlp.up_proj")
    assert "(128, 4)" in message and "(96, 4)" in message


def test_adapter_whose_targets_are_not_in_the_model_is_named(tiny_llama_dir, tmp_path):
    adapter = _adapter(tmp_path)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = ["w_gate"]
    config_file.write_text(json.dumps(config))
    out = tmp_path / "merged"
    for argv in (["generate", tiny_llama_dir, "hi", "--adapter", adapter, "--max-new-tokens", "2"],
                 ["merge", tiny_llama_dir, "--adapter", adapter, "--out", out]):
        assert_clean_error(run_cli(*argv), str(config_file), "w_gate")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ killed saves
_KILLABLE = textwrap.dedent("""
    import sys, time
    import fourbit._io as io

    real = io.SafetensorsStreamWriter.write

    def stall(self, name, tensor):
        # Halfway through the weights file's tensors, say so and wait for the SIGKILL.
        if self.path.name == "model.safetensors" and self._next == len(self.entries) // 2:
            self._file.flush()
            open(sys.argv[1], "w").close()
            time.sleep(600)
        return real(self, name, tensor)

    io.SafetensorsStreamWriter.write = stall
    from fourbit.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _kill_mid_save(tmp_path: Path, argv: list[str], script: str = _KILLABLE) -> None:
    """Run ``fourbit ARGV`` in a child through ``script``, which creates a marker file and stalls at the moment
    under test; SIGKILL the child once the marker exists."""
    marker = tmp_path / "saving"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(marker), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"quantize ended before the marker: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("quantize did not reach the marker within 300 s")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.multiprocess
@pytest.mark.parametrize("previous", [False, True])
def test_sigkill_during_quantize_leaves_nothing_that_looks_complete(tiny_llama_dir, tmp_path, previous):
    out, reference = tmp_path / "q4", tmp_path / "reference"
    argv = ["quantize", str(tiny_llama_dir), "--out", str(out), "--json", "--compute-dtype", "fp32"]
    if previous:  # an earlier, different checkpoint in --out must survive the killed --overwrite
        assert _quantize(tiny_llama_dir, out, "--quant-type", "fp4").code == 0
        argv.append("--overwrite")
    before = _snapshot(out) if previous else None
    _kill_mid_save(tmp_path, argv)
    if previous:
        assert _snapshot(out) == before, "the previous checkpoint is intact"
    else:
        assert not out.exists(), "no folder under the output name"
    assert [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)], "the killed run's temporary exists"

    assert run_cli(*argv).code == 0  # the rerun also removes the dead run's temporary
    _no_temps(tmp_path)
    assert _quantize(tiny_llama_dir, reference).code == 0
    assert _snapshot(out) == _snapshot(reference), "the rerun wrote the bytes of an uninterrupted run"


# -------------------------------------------------------------------------- architectures fourbit cannot fully quantize
def _register_conv_lm():
    """A causal LM type made of an embedding, a torch ``nn.Conv1d`` mixer and an ``nn.Linear`` head, with an
    optional ``nn.Linear`` projection: registered with transformers' Auto classes (once per process)."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    if "fourbit_test_conv_lm" in getattr(_register_conv_lm, "done", ()):
        return _register_conv_lm.classes

    class ConvLMConfig(PretrainedConfig):
        model_type = "fourbit_test_conv_lm"

        def __init__(self, vocab_size=259, hidden_size=64, with_linear=False, **kw):
            self.vocab_size, self.hidden_size, self.with_linear = vocab_size, hidden_size, with_linear
            super().__init__(**kw)

    class ConvLMForCausalLM(PreTrainedModel):
        config_class = ConvLMConfig
        base_model_prefix = "conv_lm"

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.mixer = nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=3, padding=1)
            self.proj = nn.Linear(config.hidden_size, 16) if config.with_linear else None
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids=None, **kw):
            h = self.mixer(self.embed(input_ids).transpose(1, 2)).transpose(1, 2)
            return CausalLMOutput(logits=self.lm_head(h))

    AutoConfig.register("fourbit_test_conv_lm", ConvLMConfig)
    AutoModelForCausalLM.register(ConvLMConfig, ConvLMForCausalLM)
    _register_conv_lm.done = ("fourbit_test_conv_lm",)
    _register_conv_lm.classes = ConvLMConfig, ConvLMForCausalLM
    return _register_conv_lm.classes


def _conv_lm_folder(tmp_path: Path, tiny_tokenizer, with_linear: bool) -> Path:
    config_cls, model_cls = _register_conv_lm()
    folder = tmp_path / f"conv-lm-{with_linear}"
    torch.manual_seed(0)
    model_cls(config_cls(with_linear=with_linear)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_a_model_type_without_linear_layers_is_refused_naming_the_type(tmp_path, tiny_tokenizer):
    folder = _conv_lm_folder(tmp_path, tiny_tokenizer, with_linear=False)
    before = _snapshot(folder)
    message = assert_clean_error(_quantize(folder, tmp_path / "q4"), "ConvLMForCausalLM", "fourbit_test_conv_lm")
    assert "no linear" in message
    assert not (tmp_path / "q4").exists() and _snapshot(folder) == before


def test_weights_left_in_full_precision_are_reported_and_warned(tmp_path, tiny_tokenizer):
    folder = _conv_lm_folder(tmp_path, tiny_tokenizer, with_linear=True)
    result = _quantize(folder, tmp_path / "q4")
    assert result.code == 0, result.err
    warning = [line for line in result.err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "Conv1d" in warning[0] and "--skip-modules" in warning[0], result.err
    report = json.loads(result.out)
    assert report["full_precision"] == {"Conv1d": {"matrices": 1, "params": 64 * 64 * 3}}
    assert report["quantized_params"] == 64 * 16 and report["full_precision_fraction"] > 0.9
    # naming the module in skip_modules keeps it float on purpose: reported, not warned
    again = _quantize(folder, tmp_path / "q4b", "--skip-modules", "lm_head,mixer")
    assert again.code == 0 and "warning:" not in again.err
    assert json.loads(again.out)["full_precision"] == {"Conv1d": {"matrices": 1, "params": 64 * 64 * 3}}


def test_conv1d_shapes_the_blocksize_does_not_divide_are_padded(tmp_path, tiny_tokenizer):
    """GPT-2 with n_embd=36: c_attn holds 36 x 108 = 3888 weights, not a multiple of 64; the last block is
    padded as the flat blockwise layout does, and the checkpoint loads back exactly."""
    import transformers

    from fourbit.models import QuantConfig, load_model

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=36, n_layer=1, n_head=4, vocab_size=259, n_positions=64,
                                     bos_token_id=256, eos_token_id=256)
    folder = tmp_path / "gpt2-36"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    result = _quantize(folder, tmp_path / "q4")
    assert result.code == 0, result.err
    assert json.loads(result.out)["quantized_layers"] == 4 and "warning:" not in result.err
    loaded, _ = load_model(tmp_path / "q4", quant=QuantConfig(compute_dtype="fp32"))
    c_attn = loaded.transformer.h[0].attn.c_attn
    assert (c_attn.in_features, c_attn.out_features) == (36, 108) and c_attn.quant_state.absmax.numel() == 61
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randint(0, 256, (1, 7))).logits).all()


# -------------------------------------------------------------- sharded float checkpoints (streaming quantization)
@pytest.fixture
def sharded(tmp_path, make_llama, tiny_tokenizer) -> Path:
    """A bf16 tiny llama in several shards with model.safetensors.index.json, as large models come."""
    folder = tmp_path / "sharded"
    make_llama().to(torch.bfloat16).save_pretrained(folder, max_shard_size="50KB")
    tiny_tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) >= 3 and (folder / "model.safetensors.index.json").is_file()
    return folder


def _shard(folder: Path, n: int) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[n]


def test_a_missing_shard_is_named(sharded, tmp_path):
    shard = _shard(sharded, 1)
    shard.unlink()
    before = _snapshot(sharded)
    message = assert_clean_error(_quantize(sharded, tmp_path / "q4"), str(shard))
    assert "missing" in message
    assert not (tmp_path / "q4").exists() and _snapshot(sharded) == before


def test_a_truncated_shard_is_named(sharded, tmp_path):
    shard = _shard(sharded, 1)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    before = _snapshot(sharded)
    message = assert_clean_error(_quantize(sharded, tmp_path / "q4"), str(shard))
    assert "truncated" in message
    assert not (tmp_path / "q4").exists() and _snapshot(sharded) == before


@pytest.mark.parametrize("case", ["unknown tensor", "wrong shard"])
def test_an_index_naming_a_tensor_its_shard_lacks_is_named(sharded, tmp_path, case):
    index = sharded / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first, second = _shard(sharded, 0).name, _shard(sharded, 1).name
    if case == "unknown tensor":
        name, shard = "model.layers.0.mlp.extra_proj.weight", first
    else:  # a tensor that exists, listed in a shard that does not hold it
        name = next(k for k, v in doc["weight_map"].items() if v == first)
        shard = second
    doc["weight_map"][name] = shard
    index.write_text(json.dumps(doc))
    message = assert_clean_error(_quantize(sharded, tmp_path / "q4"), str(sharded / shard), name)
    assert "model.safetensors.index.json" in message
    assert not (tmp_path / "q4").exists()


_KILLABLE_STREAM = textwrap.dedent("""
    import sys, time
    import fourbit.models.stream as stream

    real = stream.quantize_named_layer
    calls = []

    def stall(*args, **kwargs):
        # Some layers read and quantized, the rest not yet: say so and wait for the SIGKILL.
        calls.append(1)
        if len(calls) == 5:
            open(sys.argv[1], "w").close()
            time.sleep(600)
        return real(*args, **kwargs)

    stream.quantize_named_layer = stall
    from fourbit.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("previous", [False, True])
def test_sigkill_during_streaming_quantization_leaves_nothing_that_looks_complete(sharded, tmp_path, previous):
    out, reference = tmp_path / "q4", tmp_path / "reference"
    argv = ["quantize", str(sharded), "--out", str(out), "--json", "--compute-dtype", "fp32"]
    if previous:  # an earlier, different checkpoint in --out must survive the killed --overwrite
        assert _quantize(sharded, out, "--quant-type", "fp4").code == 0
        argv.append("--overwrite")
    before = _snapshot(out) if previous else None
    _kill_mid_save(tmp_path, argv, _KILLABLE_STREAM)
    assert (_snapshot(out) == before) if previous else not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)], "nothing written mid-stream"

    assert run_cli(*argv).code == 0
    _no_temps(tmp_path)
    assert _quantize(sharded, reference).code == 0
    assert _snapshot(out) == _snapshot(reference), "the rerun wrote the bytes of an uninterrupted run"


@pytest.mark.parametrize("previous", [False, True])
def test_disk_full_during_streaming_quantization_names_the_file_and_leaves_nothing(sharded, tmp_path, monkeypatch,
                                                                                   previous):
    """The disk fills while the tensors streamed from the shards are written (the third one): one line naming
    the output file, exit 1, no temporary left, and an earlier checkpoint in --out as it was."""
    import fourbit._io as fio

    out = tmp_path / "q4"
    if previous:
        assert _quantize(sharded, out, "--quant-type", "fp4").code == 0
    before = _snapshot(out) if previous else None
    real, calls = fio.SafetensorsStreamWriter.write, []

    def disk_full(self, name, tensor):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, name, tensor)

    monkeypatch.setattr(fio.SafetensorsStreamWriter, "write", disk_full)
    message = assert_clean_error(_quantize(sharded, out, "--overwrite"), str(out / "model.safetensors"))
    assert "no space left" in message and len(calls) == 3
    assert (_snapshot(out) == before) if previous else not out.exists()
    _no_temps(tmp_path)


# ---------------------------------------------------------------------------- DoRA and LoftQ where they cannot apply
def _dora_run(model: Path, tmp_path: Path) -> Path:
    """A finetune run with a DoRA adapter (one step)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} plus 3 is {i + 3}."}) + "\n" for i in range(12)))
    out = tmp_path / "dora-run"
    result = run_cli("finetune", model, "--data", data, "--out", out, "--use-dora", "--max-steps", "1",
                     "--lora-r", "4", "--batch-size", "2", "--max-length", "64", "--compute-dtype", "fp32",
                     "--no-progress", "--json")
    assert result.code == 0, result.err
    return out


@pytest.mark.parametrize("case", ["loftq on a 4-bit checkpoint", "loftq without a 4-bit base",
                                  "loftq for classification"])
def test_loftq_where_it_cannot_apply_is_named_and_nothing_is_written(tiny_llama_dir, checkpoint, tmp_path, case):
    """LoftQ fits the adapter to the error of quantizing the float weights: a base that is already 4-bit, a run
    without a 4-bit base, and a classifier are refused with one line naming the flags (and the checkpoint)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} plus 3 is {i + 3}.", "label": str(i % 2)}) + "\n"
                            for i in range(12)))
    model, extra, names = {
        "loftq on a 4-bit checkpoint": (checkpoint, [], ["--init-lora-weights", str(checkpoint), "float"]),
        "loftq without a 4-bit base": (tiny_llama_dir, ["--quant", "none"], ["--init-lora-weights", "--quant"]),
        "loftq for classification": (tiny_llama_dir, ["--task", "classify"], ["--init-lora-weights", "--task"]),
    }[case]
    before = _snapshot(checkpoint)
    out = tmp_path / "run"
    result = run_cli("finetune", model, "--data", data, "--out", out, "--init-lora-weights", "loftq",
                     "--max-steps", "1", "--lora-r", "4", "--compute-dtype", "fp32", "--no-progress", *extra)
    assert_clean_error(result, *names)
    assert not out.exists() and _snapshot(checkpoint) == before
    _no_temps(tmp_path)


def test_a_dora_adapter_cannot_become_a_llama_cpp_lora_file(tiny_llama_dir, tmp_path):
    """llama.cpp's LoRA file has no place for DoRA's magnitude vectors: ``export --lora-gguf`` of a DoRA run is
    refused naming --adapter and what to do, and writes nothing; the merged model exports."""
    run = _dora_run(tiny_llama_dir, tmp_path)
    out = tmp_path / "exports"
    out.mkdir()
    message = assert_clean_error(run_cli("export", tiny_llama_dir, "--adapter", run, "--lora-gguf",
                                         out / "a.gguf"), "--adapter", "DoRA")
    assert "--gguf" in message
    assert list(out.iterdir()) == []
    merged = run_cli("export", tiny_llama_dir, "--adapter", run, "--gguf", out / "m.gguf", "--type", "q8_0",
                     "--no-modelfile")
    assert merged.code == 0, merged.err
    assert sorted(p.name for p in out.iterdir()) == ["m.gguf"]


# ---------------------------------------------------------------------------------------- killed GGUF export
_KILLABLE_EXPORT = textwrap.dedent("""
    import sys, time
    import gguf

    real = gguf.GGUFWriter.write_tensor_data
    calls = []

    def stall(self, *args, **kwargs):
        # Two tensors written, the rest not yet: say so and wait for the SIGKILL.
        calls.append(1)
        if len(calls) == 3:
            open(sys.argv[1], "w").close()
            time.sleep(600)
        return real(self, *args, **kwargs)

    gguf.GGUFWriter.write_tensor_data = stall
    from fourbit.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.multiprocess
@pytest.mark.parametrize("previous", [False, True])
def test_sigkill_during_export_leaves_nothing_that_looks_complete(tiny_llama_dir, tmp_path, previous):
    """``fourbit export`` killed while it writes the tensors: no file under the output name (an older export
    there is kept), only fourbit's temporary, which the rerun removes; the rerun's bytes equal an uninterrupted
    export's."""
    out = tmp_path / "m.gguf"
    if previous:
        out.write_bytes(b"an older export")
    argv = ["export", str(tiny_llama_dir), "--gguf", str(out), "--type", "q8_0", "--no-modelfile"]
    _kill_mid_save(tmp_path, argv, _KILLABLE_EXPORT)
    assert (out.read_bytes() == b"an older export") if previous else not out.exists()
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert temps and all(p.name.endswith("m.gguf") for p in temps), "the killed export's partial file is a temporary"

    assert run_cli(*argv).code == 0
    _no_temps(tmp_path)
    reference = tmp_path / "reference.gguf"
    assert run_cli("export", tiny_llama_dir, "--gguf", reference, "--type", "q8_0", "--no-modelfile").code == 0
    assert out.read_bytes() == reference.read_bytes(), "the rerun wrote the bytes of an uninterrupted export"
