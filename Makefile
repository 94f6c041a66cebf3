# vpr_rerank_ros: `make demo` and `make test` are all a newcomer needs; both set up .venv first.
# `make setup` is idempotent: it reinstalls dependencies only when a requirements file changed and
# the package only when its sources changed. On a machine with an NVIDIA driver (nvidia-smi answers), or with
# `GPU=1`, it installs the CUDA builds of torch and faiss (requirements-gpu.txt) instead of the CPU ones;
# `GPU=0` forces the CPU builds.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PKG_STAMP  := $(VENV)/.package-installed
GPU ?= $(shell nvidia-smi >/dev/null 2>&1 && echo 1 || echo 0)
DEPS_STAMP := $(VENV)/.deps-installed-gpu$(GPU)
PKG_SOURCES := setup.py setup.cfg package.xml resource/vpr_rerank_ros \
               $(shell find vpr_rerank_ros launch config -type f -name "*.py" -o -type f -name "*.yaml" -o -type f -name "*.xml" 2>/dev/null)

# What the ROS tests need: the venv as the ament prefix (package share files, message packages),
# discovery on this host only, a random domain per run and rcl's logs inside the work tree.
export AMENT_PREFIX_PATH := $(abspath $(VENV))
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_HOME := $(abspath .ros_home)
export ROS_DOMAIN_ID ?= $(shell $(PYTHON) -c 'import random; print(random.randint(1, 101))')

.PHONY: setup test demo bench clean

setup: $(PKG_STAMP)

$(DEPS_STAMP): requirements.txt requirements-ros.txt requirements-dev.txt requirements-gpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.deps-installed-gpu*
ifeq ($(GPU),1)
	$(BIN)/python -m pip uninstall --quiet --yes faiss-cpu torch
	grep -v -E '^(torch|faiss-cpu)==' requirements.txt > $(VENV)/requirements-without-cpu-builds.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-gpu.txt \
		-r $(VENV)/requirements-without-cpu-builds.txt -r requirements-ros.txt -r requirements-dev.txt
else
	$(BIN)/python -m pip uninstall --quiet --yes faiss-gpu-cu12
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-r requirements.txt -r requirements-ros.txt -r requirements-dev.txt
endif
	touch $@

$(PKG_STAMP): $(DEPS_STAMP) $(PKG_SOURCES)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation .
	touch $@

test: setup
	$(BIN)/python -m pytest

# The pipeline on a seeded synthetic town: map, retrieval, then the vpr_localizer node on a drive bag by live
# replay (/clock, use_sim_time) once per training-free re-ranker, with the ROS environment exported above.
# Its output is also saved in demo_output/demo.log after a line saying when and where it ran (as benchmarks/run.sh
# stamps its outputs); `benchmarks/readme_performance.py --demo` puts its tables into README.md.
demo: SHELL := /bin/bash
demo: .SHELLFLAGS := -o pipefail -c
demo: setup
	mkdir -p demo_output
	{ where=$$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1); \
	  echo "measured $$(date -u +%Y-%m-%d) on $${where:-an unknown machine}, $$(nproc) CPU cores"; \
	  PYTHONUNBUFFERED=1 $(BIN)/vpr-demo --out demo_output; } | tee demo_output/demo.log

# The CPU benchmarks (long: the million-image map takes most of the time), their outputs saved
# in benchmarks/results/ and README.md's performance section regenerated from them.
bench: setup
	benchmarks/run.sh cpu

clean:
	rm -rf $(VENV) build *.egg-info .ros_home .pytest_cache .hypothesis
