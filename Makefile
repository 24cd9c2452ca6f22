# make all    : the whole pipeline on CONFIG (default: the embedded CPU default)
# make test   : the test suite
# make smoke  : the whole pipeline on configs/smoke.yaml (about a minute)
CONFIG ?= configs/default.yaml
PY     := .venv/bin/python
STAMP  := .venv/.installed

.PHONY: install synth sft bopo eval all smoke test clean

install: $(STAMP)
$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

synth: $(STAMP)
	$(PY) synthesize.py --config $(CONFIG)
sft: $(STAMP)
	$(PY) train_sft.py --config $(CONFIG)
bopo: $(STAMP)
	$(PY) train_bopo.py --config $(CONFIG)
eval: $(STAMP)
	$(PY) evaluate.py --config $(CONFIG)

all: synth sft bopo eval

smoke:
	$(MAKE) all CONFIG=configs/smoke.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
