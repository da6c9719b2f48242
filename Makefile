# Two entry points: `make run` (main job on the embedded model) and `make test`.
# Both create .venv on first use and reuse it after.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.genfast-installed

.PHONY: run test lint train-mini train-backbones bench browser demo

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

# the backbone minis (assets/genfast-{dit,lamamba,ascan}-class, genfast-ascan-t2i) and the AsCAN control
# (outputs/): one recipe each, hours on a 2-core CPU; rerunning a line resumes it from .genfast-train/
train-backbones: $(STAMP)
	$(VENV)/bin/genfast train-class --model dit --params 2343606 --half --out assets/genfast-dit-class --work-dir .genfast-train/genfast-dit-class
	$(VENV)/bin/genfast train-class --model lamamba-mini --half --out assets/genfast-lamamba-class --work-dir .genfast-train/genfast-lamamba-class
	$(VENV)/bin/genfast train-class --model ascan-mini --half --out assets/genfast-ascan-class --work-dir .genfast-train/genfast-ascan-class
	$(VENV)/bin/genfast train-class --model ascan-mini-symmetric --half --out outputs/genfast-ascan-symmetric-class --work-dir .genfast-train/genfast-ascan-symmetric-class
	$(VENV)/bin/genfast train-t2i --model ascan-t2i-mini --half --out assets/genfast-ascan-t2i --work-dir .genfast-train/genfast-ascan-t2i

bench: $(STAMP)
	$(PY) bench/mini_quality.py
