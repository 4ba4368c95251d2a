# Two commands do all the set-up on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
STAMP := .make/installed

.PHONY: install demo world figures claims test bench clean chromium

# torch first, pinned: a plain "torch" pulls several GB of CUDA wheels on these CPU machines.
$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_PIN)
	$(PYTHON) -m pip install -e ".[dev]"
	@if $(PYTHON) -c "import torchvision" 2>/dev/null; then \
	  echo "torchvision is installed and breaks transformers/diffusers on CPU machines: pip uninstall torchvision"; exit 1; fi
	mkdir -p .make && touch $(STAMP)

install: $(STAMP)

# The main job: GA vs FTTP on a world concept from the world MLLM (built if not cached), traced and
# evaluated; writes runs/demo/report.html + summary.txt, then checks in a headless Chromium that
# every figure of the report rendered (screenshot: runs/demo/report.png).
demo: $(STAMP) chromium
	unlearn demo --out runs/demo
	$(PYTHON) tools/check_report.py runs/demo/report.html

# Every paper figure and table (figures/*.py): runs what runs/figures lacks on the world, writes
# figures/out/<name>.{html,png,json}. The full set takes a few hours on 2 cores; each script alone is
# resumable.
figures: $(STAMP) chromium
	@set -e; for script in figures/fig*.py figures/table*.py; do echo "== $$script"; $(PYTHON) $$script --quiet; done

# The paper's qualitative claims, checked on the world: a verdict per claim with its numbers.
claims: $(STAMP)
	unlearn claims --json runs/claims/verdicts.json

# The whole concept world (MLLM, classifier, SD) and its quality-gate report.
world: $(STAMP)
	unlearn world build
	unlearn world check

# PNG export of the knowtrace plots (kaleido 1.x) drives a Chromium. Install one if there is none
# (apt-get; as root, else with sudo -n); without one, say how to get it and stop.
chromium:
	@if [ -n "$$BROWSER_PATH" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || command -v google-chrome >/dev/null 2>&1; then exit 0; fi; \
	echo "installing chromium (kaleido needs it for PNG export of the knowtrace plots) ..."; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	if ! { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }; then \
	  echo "make: could not install chromium with apt-get. PNG export needs a Chrome/Chromium: install one" \
	       "(Debian/Ubuntu: apt-get install -y chromium) or point BROWSER_PATH at its binary, then run make test again." >&2; \
	  exit 1; fi

# KNOWTRACE_REQUIRE_PNG=1: the PNG export tests fail instead of skipping when they cannot export
# then the notebooks, executed top to bottom on the world (nbmake; they are stored without outputs)
test: $(STAMP) chromium
	KNOWTRACE_REQUIRE_PNG=1 $(PYTHON) -m pytest -x -q
	$(PYTHON) -m pytest -q --nbmake notebooks/ -p no:cacheprovider

bench: $(STAMP)
	$(PYTHON) benchmarks/world_build.py

clean:
	rm -rf .make build *.egg-info .pytest_cache
