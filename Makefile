# vpr_rerank_ros: `make demo` and `make test` are all a newcomer needs; both set up .venv first.
# `make setup` is idempotent: it reinstalls dependencies only when a requirements file changed and
# the package only when its sources changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS_STAMP := $(VENV)/.deps-installed
PKG_STAMP  := $(VENV)/.package-installed
PKG_SOURCES := setup.py setup.cfg package.xml resource/vpr_rerank_ros \
               $(shell find vpr_rerank_ros launch config -type f -name '*.py' -o -type f -name '*.yaml' 2>/dev/null)

# What the ROS tests need: the venv as the ament prefix (package share files, message packages),
# discovery on this host only, a random domain per run and rcl's logs inside the work tree.
export AMENT_PREFIX_PATH := $(abspath $(VENV))
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_HOME := $(abspath .ros_home)
export ROS_DOMAIN_ID ?= $(shell $(PYTHON) -c 'import random; print(random.randint(1, 101))')

.PHONY: setup test demo clean

setup: $(PKG_STAMP)

$(DEPS_STAMP): requirements.txt requirements-ros.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-r requirements.txt -r requirements-ros.txt -r requirements-dev.txt
	touch $@

$(PKG_STAMP): $(DEPS_STAMP) $(PKG_SOURCES)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation .
	touch $@

test: setup
	$(BIN)/python -m pytest

# The pipeline on a seeded synthetic town: map, retrieval, then the vpr_localizer node on a drive bag by live
# replay (/clock, use_sim_time) once per training-free re-ranker, with the ROS environment exported above.
demo: setup
	$(BIN)/vpr-demo --out demo_output

clean:
	rm -rf $(VENV) build *.egg-info .ros_home .pytest_cache .hypothesis
