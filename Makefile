# byol: `make demo` and `make test` do all set-up on a fresh Debian 12 machine.
SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))

# scripts/setup writes .env.mk (LIBTORCH_USE_PYTORCH, the venv's python first on
# PATH, the ONNX Runtime library); make remakes it when missing and restarts.
$(ROOT)/.env.mk: $(ROOT)/scripts/setup
	@bash $(ROOT)/scripts/setup
-include $(ROOT)/.env.mk

CARGO ?= cargo
FMNIST ?= /usr/share/datasets/fashion-mnist
TOOLS := $(ROOT)/target/release/byol-tools
BYOL := $(ROOT)/target/release/byol

.PHONY: setup build demo compare test bench fmt clippy device tensorboard

setup:
	@bash $(ROOT)/scripts/setup

build: setup
	$(CARGO) build --release --workspace --bins

demo: build
	@bash $(ROOT)/scripts/demo

# What a GPU machine runs (scripts/device_checks), built and stripped into
# target/device/; see scripts/device_prepare.
device: setup
	@bash $(ROOT)/scripts/device_prepare

# byol vs a plain PyTorch BYOL script, same epochs and data (after `make demo`).
compare: build
	@bash $(ROOT)/scripts/compare

test: build
	@bash $(ROOT)/scripts/setup_tracking
	$(CARGO) test --release --workspace

# TensorBoard (pinned, in .venv-tracking) on the runs' logs: http://127.0.0.1:6006
tensorboard:
	@bash $(ROOT)/scripts/setup_tracking
	$(ROOT)/.venv-tracking/bin/tensorboard --logdir $(ROOT)/runs --host 127.0.0.1 --port 6006

bench: build
	@bash $(ROOT)/scripts/bench

fmt:
	$(CARGO) fmt --all

clippy: setup
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
