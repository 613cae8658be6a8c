"""The CPU's instruction sets that decide which kernels ONNX Runtime and torch run: recorded in the manifest,
and part of the stage-cache key of every unit whose result depends on them (INT8 builds, CPU accuracy,
benchmarks). Read from /proc/cpuinfo or sysctl; no library import."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

# The flags that change which matrix kernels run (x86: Linux /proc/cpuinfo names; arm: its `Features` names).
X86_FEATURES = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "fphp", "sve", "sve2")
# macOS names the same things differently: sysctl key -> our name
_DARWIN_KEYS = {
    "hw.optional.avx2_0": "avx2",
    "hw.optional.avx512f": "avx512f",
    "hw.optional.avx512bw": "avx512bw",
    "hw.optional.avx512vl": "avx512vl",
    "hw.optional.avx512vnni": "avx512_vnni",
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_FP16": "fphp",
    "hw.optional.neon": "asimd",
}


def int8_dot(features: list[str] | tuple[str, ...]) -> str:
    """The INT8 dot-product instructions ONNX Runtime's MLAS picks on a CPU with these features, and what that
    means for accuracy. Without VNNI, x86 multiplies u8 by s8 with `vpmaddubsw`, whose int16 sums saturate:
    8-bit weights (reduce_range off) can lose accuracy there that a VNNI or AMX CPU does not."""
    have = set(features)
    if "amx_int8" in have:
        return "amx"
    if "avx512_vnni" in have:
        return "avx512-vnni"
    if "avx_vnni" in have:
        return "avx-vnni"
    if "avx512bw" in have:
        return "avx512bw-u8s8-saturating"
    if "avx2" in have:
        return "avx2-u8s8-saturating"
    if "i8mm" in have:
        return "arm-i8mm"
    if "asimddp" in have:
        return "arm-dotprod"
    if "asimd" in have:
        return "arm-neon"
    return "unknown"


def saturating(isa_record: dict[str, Any]) -> bool:
    """Whether this CPU's INT8 kernels saturate u8×s8 sums (x86 without VNNI or AMX)."""
    return str(isa_record.get("int8_dot", "")).endswith("-saturating")


def _linux_flags() -> set[str]:
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break  # every core of one machine has the same flags
    return flags


def _darwin_flags() -> set[str]:
    out = subprocess.run(["sysctl", *_DARWIN_KEYS], capture_output=True, text=True, timeout=10).stdout
    flags = set()
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if value.strip() == "1" and key.strip() in _DARWIN_KEYS:
            flags.add(_DARWIN_KEYS[key.strip()])
    return flags


@functools.lru_cache(maxsize=1)
def isa() -> dict[str, Any]:
    """This CPU's architecture, the kernel-relevant features it has, and its INT8 dot-product kind, e.g.
    `{"arch": "x86_64", "features": ["avx", "avx2", ...], "int8_dot": "avx2-u8s8-saturating"}`."""
    arch = platform.machine().lower()
    try:
        flags = _darwin_flags() if platform.system() == "Darwin" else _linux_flags()
    except (OSError, subprocess.SubprocessError):
        flags = set()
    known = ARM_FEATURES if arch in ("aarch64", "arm64") else X86_FEATURES
    features = [f for f in known if f in flags]
    return {"arch": arch, "features": features, "int8_dot": int8_dot(features) if features else "unknown"}


def describe(isa_record: dict[str, Any] | None) -> str:
    """One line for reports: `x86_64 (sse4_2 avx avx2 fma f16c); INT8 dot products: avx2-u8s8-saturating`."""
    if not isa_record:
        return "not recorded (a run from before optimize recorded it)"
    features = " ".join(isa_record.get("features", [])) or "none known"
    return f"{isa_record.get('arch')} ({features}); INT8 dot products: {isa_record.get('int8_dot')}"
