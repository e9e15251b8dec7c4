"""Build step of maia-onnx: the Maia ONNX Runtime plugin EP, one C++17 shared library (runtime/ep).

All metadata lives in setup.cfg; this file only adds the build of ``maia_onnx/runtime/ep/libmaia_ep.so``
against ONNX Runtime's C API headers (found or fetched by runtime/ep/ort_headers.py; no libonnxruntime link).
A failed EP build leaves a working install (maia_onnx.runtime falls back to the Python shim) unless
``MAIA_REQUIRE_EP=1`` (set by scripts/test.sh), which makes it fatal.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EP = "runtime/ep"
LIBRARY = "libmaia_ep"
REQUIRED = os.environ.get("MAIA_REQUIRE_EP") == "1"


def _ort_headers():
    spec = importlib.util.spec_from_file_location("_maia_ort_headers", ROOT / EP / "ort_headers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildMaiaEp(build_ext):
    """build_ext for a plain shared library: fetch the ORT headers, name the output libmaia_ep.so."""

    def get_ext_filename(self, fullname):
        parts = fullname.split(".")
        if parts[-1] == LIBRARY:
            return os.path.join(*parts[:-1], LIBRARY + ".so")
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        try:
            ext.include_dirs.append(str(_ort_headers().find_headers(ROOT)))
        except Exception as exc:  # noqa: BLE001 - no headers: keep the install, unless CI requires the EP
            if REQUIRED:
                raise
            self.warn(f"Maia plugin EP not built ({exc}); maia_onnx.runtime uses the Python shim")
            return
        super().build_extension(ext)  # compile errors: setuptools warns and skips an optional extension


setup(
    ext_modules=[
        Extension(
            f"maia_onnx.runtime.ep.{LIBRARY}",
            sources=[f"{EP}/maia_ep.cc", f"{EP}/engine.cc", f"{EP}/capability.cc", f"{EP}/fake_quant.cc",
                     f"{EP}/program_writer.cc"],
            depends=[f"{EP}/maia_ep.h", f"{EP}/json.h", f"{EP}/proto.h"],
            extra_compile_args=["-std=c++17", "-O3", "-fvisibility=hidden"],  # -O3: the fake-quant loop vectorizes
            extra_link_args=["-s"],  # no debug symbols: the library ships in the wheel
            libraries=["dl"],
            language="c++",
            optional=not REQUIRED,
        )
    ],
    cmdclass={"build_ext": BuildMaiaEp},
)
