# Weir — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
JOBS ?= 2

.PHONY: deps build run test lint bench clean-demo

## Install what is missing on a fresh machine (redis-server, wrk/nginx for benches, toolchain parts).
deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build -j$(JOBS) --workspace --bins

## Demo origin on 127.0.0.1:3000, Weir on 127.0.0.1:8080 (admin 127.0.0.1:9901). Ctrl-C stops both.
run: build
	@scripts/run-demo.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy -j$(JOBS) --workspace --all-targets -- -D warnings

## Everything CI runs: format, lints, build, unit + end-to-end tests (real processes, real Redis).
test: deps lint
	$(CARGO) build -j$(JOBS) --workspace --bins
	$(CARGO) test -j$(JOBS) --workspace

## Load benchmark (release build, wrk, nginx): see bench/README.md.
bench: deps
	WITH_BENCH_TOOLS=1 scripts/install-deps.sh
	bench/run.sh
