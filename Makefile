# make all    : the whole pipeline on CONFIG (default: the embedded CPU default)
# make test   : the test suite
# make smoke  : the whole pipeline on configs/smoke.yaml (about a minute)
# make install-envs : the optional environments (TextWorld, ScienceWorld; the latter needs Java)
CONFIG ?= configs/default.yaml
PY     := .venv/bin/python
STAMP  := .venv/.installed
ENVS   := .venv/.installed-envs
# A config on TextWorld or ScienceWorld installs the optional environments first.
NEEDS  := $(STAMP) $(if $(shell grep -sE '^ +name: *(textworld|scienceworld)' $(CONFIG)),$(ENVS))

.PHONY: install install-envs synth sft bopo eval all smoke test clean

install: $(STAMP)
$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

install-envs: $(ENVS)
$(ENVS): requirements-envs.txt $(STAMP)
	@command -v java >/dev/null || echo "note: no java on PATH: ScienceWorld will not run (its tests skip). Install a Java runtime, e.g. sudo apt-get install default-jre-headless"
	$(PY) -m pip install -q -r requirements-envs.txt
	touch $(ENVS)

synth: $(NEEDS)
	$(PY) synthesize.py --config $(CONFIG)
sft: $(NEEDS)
	$(PY) train_sft.py --config $(CONFIG)
bopo: $(NEEDS)
	$(PY) train_bopo.py --config $(CONFIG)
eval: $(NEEDS)
	$(PY) evaluate.py --config $(CONFIG)

all: synth sft bopo eval

smoke:
	$(MAKE) all CONFIG=configs/smoke.yaml

test: $(STAMP) $(ENVS)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
