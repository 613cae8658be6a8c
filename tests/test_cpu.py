"""optimize/cpu.py: the CPU's instruction sets, which decide the INT8 kernels ONNX Runtime runs."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from optimize import cpu
from optimize.precision.build import saturation_warnings
from optimize.recipe import Int8Variant, PrecisionSection, Recipe


@pytest.mark.parametrize(
    ("features", "kind"),
    [
        (["avx", "avx2", "fma"], "avx2-u8s8-saturating"),
        (["avx2", "avx512f", "avx512bw"], "avx512bw-u8s8-saturating"),
        (["avx2", "avx_vnni"], "avx-vnni"),
        (["avx2", "avx512f", "avx512bw", "avx512_vnni"], "avx512-vnni"),
        (["avx2", "avx512_vnni", "amx_tile", "amx_int8"], "amx"),
        (["asimd", "asimddp"], "arm-dotprod"),
        (["asimd", "asimddp", "i8mm"], "arm-i8mm"),
        ([], "unknown"),
    ],
)
def test_int8_dot_product_kind_and_saturation(features: list[str], kind: str) -> None:
    assert cpu.int8_dot(features) == kind
    assert cpu.saturating({"int8_dot": kind}) == kind.endswith("-saturating")


def test_linux_flags_are_read_from_the_first_cores_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512_vnni\n\nprocessor\t: 1\nflags\t: fpu\n")
    real = cpu.Path
    monkeypatch.setattr(cpu, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    assert cpu._linux_flags() == {"fpu", "sse4_2", "avx", "avx2", "fma", "avx512_vnni"}


def test_this_machine_is_recorded_with_its_kernel_relevant_features() -> None:
    isa = cpu.isa()
    assert isa["arch"] == platform.machine().lower()
    assert set(isa["features"]) <= set(cpu.X86_FEATURES) | set(cpu.ARM_FEATURES)
    assert isa["int8_dot"] == (cpu.int8_dot(isa["features"]) if isa["features"] else "unknown")
    if platform.system() == "Linux" and isa["arch"] == "x86_64":
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        assert ("avx2" in isa["features"]) == (" avx2" in flags)
    assert cpu.describe(isa).startswith(f"{isa['arch']} (") and isa["int8_dot"] in cpu.describe(isa)
    assert cpu.describe(None).startswith("not recorded")


def _recipe_with(*variants: dict) -> Recipe:
    class Stub:  # only the precision section is read
        precision = PrecisionSection(variants=[Int8Variant(**v) for v in variants])

    return Stub()  # type: ignore[return-value]


def test_a_saturating_cpu_warns_about_8_bit_weights_only() -> None:
    dyn = {"name": "dyn", "kind": "int8", "backend": "onnxruntime-dynamic"}
    recipe = _recipe_with(
        dyn,
        {**dyn, "name": "dyn7", "reduce_range": True},
        {**dyn, "name": "dynu8", "weight_type": "uint8"},
        {"name": "trt", "kind": "int8", "backend": "modelopt", "calibration": "c"},
    )
    avx2 = {"arch": "x86_64", "features": ["avx2"], "int8_dot": "avx2-u8s8-saturating"}
    warnings = saturation_warnings(recipe, avx2)
    assert len(warnings) == 1 and warnings[0].startswith("precision.variants[0] (dyn):")
    assert "reduce_range: true" in warnings[0]
    assert saturation_warnings(recipe, {**avx2, "int8_dot": "avx512-vnni"}) == []
