"""Find or fetch the ONNX Runtime C API headers the plugin EP is built against (build-time only, used by setup.py).

No PyPI package ships ORT's C headers. Lookup order: ``$MAIA_ORT_INCLUDE`` (a directory holding
``onnxruntime_ep_c_api.h``), the cache ``.cache/ort-headers/<version>`` in the source tree, a system
``/usr/include/onnxruntime`` that has the plugin-EP header, then Debian unstable's ``libonnxruntime-dev`` at the
pinned version, fetched with ``apt-get download`` under an apt configuration of our own (own sources list, state
and cache directories in a temporary folder; nothing in /etc is touched) and unpacked with ``dpkg-deb -x``.
The headers are Expat/MIT licensed; the library does not link libonnxruntime.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ORT_API_VERSION = 23  # the C API version runtime/ep is written for (GetApi is called with this, never the newest)
DEBIAN_PACKAGE = "libonnxruntime-dev"
DEBIAN_VERSION = "1.23.2+dfsg-6.1"
HEADER_VERSION = "1.23.2"
# When sid moves past the pinned version, add a snapshot.debian.org line of a date that still has it.
APT_SOURCES = ("deb http://deb.debian.org/debian sid main",)
REQUIRED = ("onnxruntime_c_api.h", "onnxruntime_ep_c_api.h")


class HeaderError(RuntimeError):
    """The ORT headers could not be found or fetched."""


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED)


def _api_version(directory: Path) -> int:
    for line in (directory / "onnxruntime_c_api.h").read_text(errors="replace").splitlines():
        if line.startswith("#define ORT_API_VERSION"):
            return int(line.split()[2])
    return 0


def _apt(args: list[str], root: Path, source: str) -> None:
    (root / "sources.list").write_text(source + "\n")
    for sub in ("lists/partial", "cache/archives/partial", "state"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "state" / "status").touch()
    options = [
        f"-oDir::Etc::sourcelist={root / 'sources.list'}", "-oDir::Etc::sourceparts=-",
        f"-oDir::State={root / 'state'}", f"-oDir::State::Lists={root / 'lists'}",
        f"-oDir::State::status={root / 'state' / 'status'}", f"-oDir::Cache={root / 'cache'}",
        "-oDebug::NoLocking=1", "-oAcquire::Check-Valid-Until=false",
    ]
    if os.geteuid() == 0:
        options.append("-oAPT::Sandbox::User=root")  # the _apt user cannot write into our temporary folder
    subprocess.run(["apt-get", *options, *args], cwd=root, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=600)


def fetch_debian(dest: Path) -> Path:
    """Download ``libonnxruntime-dev=DEBIAN_VERSION`` and unpack its headers into ``dest``."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise HeaderError("apt-get/dpkg-deb not found: set MAIA_ORT_INCLUDE to a folder with the ORT 1.23 C headers")
    errors = []
    for source in APT_SOURCES:
        with tempfile.TemporaryDirectory(prefix="maia-ort-apt-") as tmp:
            root = Path(tmp)
            try:
                _apt(["update"], root, source)
                _apt(["download", f"{DEBIAN_PACKAGE}={DEBIAN_VERSION}"], root, source)
                debs = list(root.glob(f"{DEBIAN_PACKAGE}_*.deb"))
                if not debs:
                    raise HeaderError("apt-get download produced no .deb")
                subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root / "x")], check=True, timeout=120)
            except (subprocess.SubprocessError, HeaderError) as exc:
                stderr = getattr(exc, "stderr", b"") or b""
                errors.append(f"{source}: {exc} {stderr.decode(errors='replace').strip()[-300:]}")
                continue
            found = root / "x" / "usr" / "include" / "onnxruntime"
            if not _complete(found):
                errors.append(f"{source}: package lacks {REQUIRED}")
                continue
            staging = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(found, staging)
            shutil.rmtree(dest, ignore_errors=True)
            staging.rename(dest)  # a complete folder or none: an interrupted fetch never leaves half the headers
            return dest
    raise HeaderError("could not fetch the ORT headers: " + "; ".join(errors)
                      + " (set MAIA_ORT_INCLUDE to a folder with the ORT 1.23 C headers)")


def find_headers(source_root: Path) -> Path:
    """The include directory to build the EP with (see the module docstring for the lookup order)."""
    override = os.environ.get("MAIA_ORT_INCLUDE")
    if override:
        path = Path(override)
        if not _complete(path):
            raise HeaderError(f"MAIA_ORT_INCLUDE={override} lacks {', '.join(REQUIRED)}")
        return path
    cache = source_root / ".cache" / "ort-headers" / HEADER_VERSION
    if _complete(cache):
        return cache
    system = Path("/usr/include/onnxruntime")
    if _complete(system) and _api_version(system) >= ORT_API_VERSION:
        return system
    cache.parent.mkdir(parents=True, exist_ok=True)
    return fetch_debian(cache)
