# Two commands matter: `make demo` runs the whole job on real weights and text,
# `make test` runs the test suite. Both create .venv from requirements.txt first.
PY     := .venv/bin/python
STAMP  := .venv/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# Reinstall only when the pins change; the stamp records a finished install.
$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

# The whole job on the real 270M and Gutenberg text, CPU only (see demo.py); writes out/demo/.
demo: setup
	$(PY) demo.py

bench: setup
	$(PY) bench.py

clean:
	rm -rf out .pytest_cache
