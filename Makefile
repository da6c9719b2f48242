# Two entry points: `make run` (main job on the embedded model) and `make test`.
# Both create .venv on first use and reuse it after.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.genfast-installed

.PHONY: run test lint train-mini bench browser demo

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: these wheels lie on this machine's disk (pip finds them offline)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,faces]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/genfast compare --out outputs/compare

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# the demo's browser test drives Debian's chromium; installed with apt when missing and we are root (CI is)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$$GENFAST_CHROMIUM" ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null; } || \
	  echo "no chromium and no root apt-get: the browser tests skip (fail under GENFAST_REQUIRE_BROWSER=1)"

demo: $(STAMP)
	$(VENV)/bin/genfast demo

lint: $(STAMP)
	$(VENV)/bin/ruff check genfast tests bench

train-mini: $(STAMP)
	$(VENV)/bin/genfast train-mini

bench: $(STAMP)
	$(PY) bench/mini_quality.py
