# Weir — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
JOBS ?= 2

.PHONY: deps build plugins run test lint bench bench-gate soak clean-demo
PLUGINS := catalog tenant-key llm-cost fixtures
WEIR = $${CARGO_TARGET_DIR:-target}/debug/weir

## Install what is missing on a fresh machine (redis-server, wrk/nginx for benches, toolchain parts).
deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build -j$(JOBS) --workspace --bins

## The example plugins and test fixtures, as components in plugins/NAME.wasm.
plugins: build
	@for p in $(PLUGINS); do $(WEIR) plugin build plugins/$$p -o plugins/$$p.wasm || exit 1; done

## Demo origin on 127.0.0.1:3000, Weir on 127.0.0.1:8080 (admin 127.0.0.1:9901). Ctrl-C stops both.
run: plugins
	@scripts/run-demo.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy -j$(JOBS) --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all --check --manifest-path plugins/Cargo.toml
	$(CARGO) clippy -j$(JOBS) --manifest-path plugins/Cargo.toml --target wasm32-unknown-unknown --release -- -D warnings

## Everything CI runs: format, lints, build, unit + end-to-end tests (real processes, real Redis).
test: deps lint plugins
	$(CARGO) test -j$(JOBS) --workspace

## The reliability soak's long profiles: one Redis for 30 min (WEIR_SOAK_SECS), then a Redis
## Cluster with failovers for 10 min (WEIR_SOAK_CLUSTER_SECS); WEIR_SOAK_SEED replays a schedule.
## Faults under load, invariants checked, figures printed. `make test` runs a 60-second profile.
soak: deps plugins
	WEIR_SOAK_SECS=$${WEIR_SOAK_SECS:-1800} WEIR_SOAK_CLUSTER_SECS=$${WEIR_SOAK_CLUSTER_SECS:-600} \
	  WEIR_SOAK_INSTANCES=$${WEIR_SOAK_INSTANCES:-3} \
	  $(CARGO) test -j$(JOBS) --test soak -- --include-ignored --test-threads 1 --nocapture

## Load benchmark (release build, wrk, nginx): see bench/README.md.
bench: deps plugins
	WITH_BENCH_TOOLS=1 scripts/install-deps.sh
	bench/run.sh

## Instruction-count gate (valgrind --tool=callgrind, release build) against bench/baseline.json.
bench-gate: deps
	WITH_GATE_TOOLS=1 scripts/install-deps.sh
	$(CARGO) build --release -j$(JOBS) -p weir --bin weir --bin weir-bench-static
	python3 bench/gate.py
