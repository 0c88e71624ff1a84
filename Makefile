# The two set-up commands: `make demo` (optimize the bundled default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,tvm,train]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/onnxpress inspect models/cnn_mnist.onnx
	$(BIN)/onnxpress optimize models/cnn_mnist.onnx -o out/cnn_mnist.opt.onnx \
		--calibration models/data/cnn_mnist_calib.npz --report out/cnn_mnist.report.json
	$(BIN)/python models/evaluate.py out/cnn_mnist.opt.onnx

test: $(STAMP)
	$(BIN)/python -m pytest tests

# lint-imports reads packages from disk, and onnxpress.passes lives in passes/: it runs on a
# copy of the tree laid out as installed (build/lint-imports/onnxpress/passes).
LINT_TREE := build/lint-imports

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check onnxpress passes tests tools models
	$(BIN)/mypy
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)
	cp -r onnxpress $(LINT_TREE)/onnxpress && cp -r passes $(LINT_TREE)/onnxpress/passes
	cd $(LINT_TREE) && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports $(CURDIR)/pyproject.toml

check: test lint

clean:
	rm -rf out build *.egg-info .pytest_cache .mypy_cache .ruff_cache
