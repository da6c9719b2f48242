# Two entry points: `make run` (main job on the embedded model) and `make test`.
# Both create .venv on first use and reuse it after.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.genfast-installed

.PHONY: run test lint train-mini train-backbones train-bits bits bench browser demo

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

# issue 19's two families at 0.5M / 1M / 2M parameters, one budget (1,000 steps of 64; the tokenizer 800 of 32):
# the VAR 2M is the embedded assets/genfast-var-mini, the others go to outputs/bits/ (about an hour on a
# 2-core CPU; a line already done is skipped, an interrupted one resumes from .genfast-train/)
BITS_RUN := --steps 1000 --half --quiet
VAR_TOK := .genfast-train/genfast-var-mini/tokenizer
train-bits: $(STAMP)
	test -d assets/genfast-var-mini || $(VENV)/bin/genfast train-var --size 2M --tokenizer-steps 800 $(BITS_RUN) --out assets/genfast-var-mini --work-dir .genfast-train/genfast-var-mini
	for s in 0.5M 1M; do test -d outputs/bits/var-$$s || $(VENV)/bin/genfast train-var --size $$s --tokenizer $(VAR_TOK) $(BITS_RUN) --out outputs/bits/var-$$s --work-dir .genfast-train/var-$$s || exit 1; done
	for p in 0.5M:500000 1M:1000000 2M:2000000; do test -d outputs/bits/dit-$${p%%:*} || $(VENV)/bin/genfast train-class --model dit --params $${p#*:} $(BITS_RUN) --out outputs/bits/dit-$${p%%:*} --work-dir .genfast-train/dit-$${p%%:*} || exit 1; done

# issue 19's figures (docs/bits): the sweep, the loss ablation, the long diffusion W4 QAT, the summary
BITS_MODELS := --var var-0.5M=outputs/bits/var-0.5M var-1M=outputs/bits/var-1M var-2M=assets/genfast-var-mini --dit dit-0.5M=outputs/bits/dit-0.5M dit-1M=outputs/bits/dit-1M dit-2M=outputs/bits/dit-2M --num-images 96 --out docs/bits
bits: train-bits
	$(VENV)/bin/genfast sweep-bits $(BITS_MODELS) --bits 16 8 6 4 3 2 --kinds int fp --modes ptq
	$(VENV)/bin/genfast sweep-bits $(BITS_MODELS) --bits 8 6 4 3 2 --kinds int --modes qat --qat-steps 60
	$(PY) bench/bits.py --part ablation --var assets/genfast-var-mini --format int3 --steps 150 --num-images 96 --out docs/bits/ablation
	$(VENV)/bin/genfast sweep-bits --dit dit-2M=outputs/bits/dit-2M --bits 6 --kinds int --modes ptq --num-images 96 --out docs/bits/dit-w4-long
	$(VENV)/bin/genfast sweep-bits --dit dit-2M=outputs/bits/dit-2M --bits 4 --kinds int --modes qat --qat-steps 400 --num-images 96 --out docs/bits/dit-w4-long
	$(PY) bench/bits.py --part summary --sweep docs/bits
	$(VENV)/bin/genfast sweep-bits $(subst --num-images 96 --out docs/bits,--num-images 480 --out docs/bits/precise,$(BITS_MODELS)) --bits 16 4 3 --kinds int fp --modes ptq
	$(PY) bench/bits.py --part summary --sweep docs/bits/precise

bench: $(STAMP)
	$(PY) bench/mini_quality.py
