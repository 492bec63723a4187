# The two commands of the README. Both build .venv first (scripts/setup.sh, idempotent).
PY := .venv/bin/python
export LITELLM_LOCAL_MODEL_COST_MAP ?= True
# Use the benchmark data beside the repo when it is there (machines without a dataset hub).
export TRPROMPT_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

.PHONY: setup demo test
setup:
	./scripts/setup.sh

## The main job on the embedded default model.
demo: setup
	$(PY) -m trprompt_dspy demo $(DEMO_ARGS)

## The test suite (what .ci/run calls).
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=25
