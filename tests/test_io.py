"""fourbit._io and the CLI's error mapping: atomic files and folders, modes, stale temporaries, safe readers."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from fourbit._errors import FieldError, InputFileError
from fourbit._io import (
    TEMP_PREFIX,
    atomic_dir,
    atomic_write_text,
    check_output_dir,
    load_safetensors,
    read_json,
    read_jsonl,
    remove_stale_temps,
    save_safetensors,
)
from fourbit.cli import user_message


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_folders_respect_the_umask(tmp_path, umask_022):
    f = atomic_write_text(tmp_path / "a.json", "{}")
    with atomic_dir(tmp_path / "out") as tmp:
        save_safetensors({"x": torch.ones(2)}, tmp / "w.safetensors")
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_atomic_dir_replaces_whole_or_leaves_the_old_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary left behind"


@pytest.mark.multiprocess
def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f"{TEMP_PREFIX}{dead.stdout.strip()}-abcd-out"
    stale.mkdir()
    live = tmp_path / f"{TEMP_PREFIX}{os.getppid()}-abcd-out"  # a live process: kept
    live.mkdir()
    foreign = tmp_path / ".tmp-something"  # not of our naming: kept
    foreign.mkdir()
    assert remove_stale_temps(tmp_path) == [stale]
    assert live.exists() and foreign.exists() and not stale.exists()


def test_check_output_dir_refuses_what_would_lose_data(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FieldError, match="is a file"):
        check_output_dir(tmp_path / "file")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("x")
    with pytest.raises(FieldError, match="`overwrite`") as info:
        check_output_dir(full, field="out_dir")
    assert info.value.field == "out_dir"
    assert check_output_dir(full, overwrite=True) == full
    with pytest.raises(FieldError, match="input"):
        check_output_dir(full, overwrite=True, inputs=[full / "keep"])
    with pytest.raises(FieldError, match="input"):
        check_output_dir(full / "sub", inputs=[full])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_dir_refuses_a_read_only_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(FieldError, match="cannot write"):
        check_output_dir(ro / "out")


def test_readers_name_the_file_and_line(tmp_path):
    bad = tmp_path / "w.safetensors"
    save_safetensors({"x": torch.ones(100)}, bad)
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(InputFileError, match=r"w\.safetensors: not a readable safetensors"):
        load_safetensors(bad)
    js = tmp_path / "state.json"
    js.write_text('{"a": 1,\n "b": ')
    with pytest.raises(InputFileError, match=r"state\.json:2: not valid JSON"):
        read_json(js)
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(b'{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(log, skip_torn_last_line=True) == [{"step": 1}, {"step": 2}]
    with pytest.raises(InputFileError, match=r"metrics\.jsonl:3: malformed JSON"):
        read_jsonl(log)
    latin = tmp_path / "data.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputFileError, match=r"data\.jsonl:2: not UTF-8"):
        read_jsonl(latin)


def test_user_message_turns_library_names_into_flags():
    flags = {"learning_rate": "--learning-rate", "overwrite": "--overwrite"}
    err = FieldError("learning_rate", "must be a positive finite number, got inf")
    assert user_message(err, flags) == "--learning-rate: must be a positive finite number, got inf"
    err = FieldError("out_dir", "x already holds files; choose another `out_dir` or pass `overwrite`")
    assert user_message(err, flags) == "--out: x already holds files; choose another --out or pass --overwrite"
    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/optimizer.safetensors")
    assert user_message(full, flags) == "/data/run/optimizer.safetensors: no space left on device: free some space and run again"


def test_save_safetensors_streams_in_safetensors_order_and_reads_back(tmp_path):
    """The streaming writer gives a file safetensors reads back exactly (every dtype, an empty and a
    non-contiguous tensor), its metadata, and safetensors' own tensor order (wider elements first, then name)."""
    import json

    import torch
    from safetensors import safe_open

    from fourbit._io import save_safetensors

    tensors = {"b.u8": torch.arange(7, dtype=torch.uint8), "a.f32": torch.randn(3, 5).t(),
               "c.bf16": torch.randn(4, dtype=torch.bfloat16), "d.i32": torch.tensor([1, -2], dtype=torch.int32),
               "e.empty": torch.zeros(0, 3), "f.bool": torch.tensor([True, False])}
    path = save_safetensors(tensors, tmp_path / "x.safetensors", {"note": "hi"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    offsets = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    assert [k for _, k in offsets] == ["a.f32", "d.i32", "e.empty", "c.bf16", "b.u8", "f.bool"]
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
