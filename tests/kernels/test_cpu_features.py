"""native_bf16: the CPU's own flags decide (torch's capability string names only the vector ISA)."""

import pytest
import torch

from fourbit.kernels import cpu_features


@pytest.fixture
def flags(monkeypatch):
    """Replace the /proc/cpuinfo reader; clears the cached answers before and after."""

    def use(flag_set):
        monkeypatch.setattr(cpu_features, "_read_cpu_flags", lambda: frozenset(flag_set))
        cpu_features.cpu_flags.cache_clear()
        cpu_features._cpu_native_bf16.cache_clear()

    yield use
    cpu_features.cpu_flags.cache_clear()
    cpu_features._cpu_native_bf16.cache_clear()


XEON_AMX = "fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile".split()
XEON_AVX512_ONLY = "fpu sse2 avx2 avx512f avx512bw avx512vl".split()


@pytest.mark.parametrize("flag_set, expected", [
    (XEON_AMX, True),
    (["avx2", "avx512f", "avx512_bf16"], True),
    (["avx2", "amx_bf16"], True),
    (["fp", "asimd", "bf16"], True),  # Arm
    (XEON_AVX512_ONLY, False),  # the same "AVX512" capability for torch, no bf16 hardware
    (["fpu", "sse2", "avx2"], False),
])
def test_cpu_answer_follows_the_flags(flags, monkeypatch, flag_set, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    flags(flag_set)
    assert cpu_features.native_bf16("cpu") is expected
    assert cpu_features.native_bf16(torch.device("cpu")) is expected
    assert cpu_features.native_bf16() is expected


def test_without_cpuinfo_torch_amx_probe_answers(flags, monkeypatch):
    flags([])
    probe = type("P", (), {"_is_amx_tile_supported": staticmethod(lambda: True)})
    monkeypatch.setattr(torch._C, "_cpu", probe, raising=False)
    assert cpu_features.native_bf16("cpu") is True


def test_the_answer_is_cached_and_nothing_is_read_at_import(flags, monkeypatch):
    reads = []
    monkeypatch.setattr(cpu_features, "_read_cpu_flags", lambda: reads.append(1) or frozenset(XEON_AMX))
    cpu_features.cpu_flags.cache_clear()
    cpu_features._cpu_native_bf16.cache_clear()
    assert reads == []
    for _ in range(3):
        assert cpu_features.native_bf16("cpu")
    assert reads == [1]


def test_cuda_asks_torch_and_other_devices_are_not_native(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert cpu_features.native_bf16("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert not cpu_features.native_bf16("cuda:0")
    assert not cpu_features.native_bf16("meta")


def test_flag_reader_parses_x86_and_arm_cpuinfo(tmp_path, monkeypatch):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx512_bf16 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    monkeypatch.setattr(cpu_features, "_CPUINFO", x86)
    assert cpu_features._read_cpu_flags() == {"fpu", "avx512_bf16", "amx_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    monkeypatch.setattr(cpu_features, "_CPUINFO", arm)
    assert "bf16" in cpu_features._read_cpu_flags()
    monkeypatch.setattr(cpu_features, "_CPUINFO", tmp_path / "missing")
    assert cpu_features._read_cpu_flags() == frozenset()
