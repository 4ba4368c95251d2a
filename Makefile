# Two commands do all the set-up on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
STAMP := .make/installed

.PHONY: install demo test bench clean

# torch first, pinned: a plain "torch" pulls several GB of CUDA wheels on these CPU machines.
$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_PIN)
	$(PYTHON) -m pip install -e ".[dev]"
	@if $(PYTHON) -c "import torchvision" 2>/dev/null; then \
	  echo "torchvision is installed and breaks transformers/diffusers on CPU machines: pip uninstall torchvision"; exit 1; fi
	mkdir -p .make && touch $(STAMP)

install: $(STAMP)

# The main job: build the concept world if it is not cached, then print its quality report.
demo: $(STAMP)
	unlearn world build
	unlearn world check

test: $(STAMP)
	$(PYTHON) -m pytest -x -q

bench: $(STAMP)
	$(PYTHON) benchmarks/world_build.py

clean:
	rm -rf .make build *.egg-info .pytest_cache
