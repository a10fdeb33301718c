# fulfil — the two commands: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVICES := order-intake inventory shipping notifications kpi
EDITABLES := -e shared $(foreach s,$(SERVICES),-e services/$(s))

.PHONY: run test lint bench venv lock clean browser

# The environment is (re)built whenever a dependency list changes.
$(STAMP): constraints.txt requirements-dev.txt shared/pyproject.toml $(foreach s,$(SERVICES),services/$(s)/pyproject.toml)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements-dev.txt $(EDITABLES)
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/fulfil dev

# Two steps: the many tests that mostly wait on the broker and databases run on two workers;
# then the multi-process and fault tests (marked slow), alone, one after another, since they
# measure recovery in bounded time and two stacks on two cores would measure the machine.
# Exit 5 is pytest's "nothing collected", for a PYTEST_ARGS that selects from one step only.
PYTEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The dashboard test drives Debian's headless Chromium; install it where we may (root with apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium for the dashboard test"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	      || echo "could not install chromium: the dashboard browser test will skip"; \
	  else echo "chromium is not installed and cannot be installed here: the dashboard browser test will skip"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy -p fulfil $(foreach s,$(SERVICES),-p $(subst -,_,$(s)))

bench: $(STAMP)
	$(BIN)/python -m tests.bench

# Re-pin every dependency to what is installed now (after a deliberate upgrade).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean:
	rm -rf $(VENV) .fulfil
