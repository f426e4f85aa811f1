"""Build heron: the Python packages `heron` and `heron_kernels` plus the compiled `heron._C`.

Compiled sources are listed once, in csrc/SOURCES (CMakeLists.txt reads the same file).

Environment switches:
  HERON_BUILD_CUDA=auto|1|0   build the CUDA sources (auto: when nvcc and a CUDA torch are present)
  HERON_BUILD_EXT=1|0         build heron._C at all (0: pure-Python install; the torch reference
                              and Triton paths still work)
  HERON_CPU_ARCH_FLAGS="..."  extra flags for the C++ CPU sources (default none: the kernels
                              carry AVX2 clones chosen at run time)

Install with `pip install --no-build-isolation -e .` so the build uses the torch already installed
(an isolated build would fetch a different torch).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def read_sources() -> dict[str, list[str]]:
    """csrc/SOURCES as {kind: [path relative to the repository root]}."""
    sources: dict[str, list[str]] = {}
    for line in (CSRC / "SOURCES").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            kind, path = line.split()
            sources.setdefault(kind, []).append(f"csrc/{path}")
    return sources


def want_cuda() -> bool:
    switch = os.environ.get("HERON_BUILD_CUDA", "auto").lower()
    if switch in ("0", "false", "no", "off"):
        return False
    import torch

    have = torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    )
    if switch in ("1", "true", "yes", "on"):
        if not have:
            sys.exit(
                "HERON_BUILD_CUDA=1 but this torch has no CUDA build "
                f"(torch.version.cuda={torch.version.cuda}) or nvcc is not found"
            )
        return True
    return bool(have)


def extensions() -> tuple[list, dict]:
    if os.environ.get("HERON_BUILD_EXT", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = read_sources()
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    cxx_flags += os.environ.get("HERON_CPU_ARCH_FLAGS", "").split()
    common = dict(include_dirs=[str(CSRC)], extra_link_args=["-fopenmp"])
    if want_cuda():
        ext = CUDAExtension(
            "heron._C",
            sources=sources["core"] + sources["aten"] + sources["cuda"] + sources.get("cuda_aten", []),
            define_macros=[("HERON_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            **common,
        )
    else:
        ext = CppExtension(
            "heron._C",
            sources=sources["core"] + sources["aten"],
            extra_compile_args={"cxx": cxx_flags},
            **common,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extensions()

# Every subpackage (heron.sfl, heron.models, heron.flower, ...) must be listed for a non-editable install.
# heron.flower.app holds only data (the Flower app's pyproject.toml); listed so setuptools ships it as such.
PACKAGES = [f"heron.{p}" for p in find_packages("python/heron")] + ["heron", "heron_kernels", "heron.flower.app"]

setup(
    package_dir={"heron": "python/heron", "heron_kernels": "python/heron_kernels"},
    packages=PACKAGES,
    package_data={"heron.flower.app": ["pyproject.toml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
