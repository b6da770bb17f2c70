# kvmfs: `make demo` and `make test` are all a newcomer types (see README.md).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.kvmfs-installed
NATIVE  := $(wildcard native/*.c native/*.h patches/*.patch) native/build.py scripts/build-unicorn
SO      := kvmfs/.native-built
MNT     ?= mnt

.PHONY: all launch demo test test-fast test-asan fuzz bench mount umount deps clean guests

all: $(SO) launch

# System packages (libfuse for fusepy, fuse3 for /dev/fuse tools, binutils for
# the guests, cmake for unicorn), then a venv with the package installed
# editable, linked against unicorn built from source with patches/ (the Python
# binding of unicorn is only the benchmarks' "unicorn alone" anchor).
$(STAMP): pyproject.toml setup.py
	@scripts/install-deps
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing kvmfs into $(VENV) ..."
	@$(PY) -m pip install -qq --upgrade pip setuptools wheel "cffi>=1.15" unicorn==2.1.4 fusepy==3.0.1 pytest
	@PY=$(PY) scripts/build-unicorn
	@KVMFS_NATIVE_BY_MAKE=1 $(PY) -m pip install -qq --no-build-isolation -e .
	@touch $@

deps: $(STAMP)

# The native module, rebuilt whenever a C source or header changes: objects in
# build/native, the one module kvmfs/_kvmfs_native.abi3.so.
$(SO): $(STAMP) $(NATIVE)
	@PY=$(PY) scripts/build-unicorn
	@$(PY) native/build.py
	@touch $@

# The launchers of `kvmfs run` (launch/build.py: build/launch/), rebuilt when stale.
launch: $(STAMP)
	@$(PY) launch/build.py

# The guest images (kvmfs/guests/*.S -> build/guests/*.bin), reassembled when a source changes.
guests: $(STAMP)
	@$(PY) -m kvmfs.guests

demo: $(SO) launch guests
	@$(PY) tools/demo.py

test: $(SO) launch guests
	@$(PY) -m pytest -q tests

# Stateful fuzzing of a private mount (ioctls, files, text commands, forks, races);
# `make test` runs 20 s of it.  FUZZ_SECONDS=600 FUZZ_ARGS="--seed 7".
fuzz: $(SO) launch guests
	@$(PY) tests/fuzz/fuzz.py --seconds $(or $(FUZZ_SECONDS),300) $(FUZZ_ARGS)

test-fast: $(SO) guests
	@$(PY) -m pytest -q tests/t0_abi.py tests/t1_native_mmu.py tests/t2_vm.py tests/t3_vcpu.py

# The native and mount layers with the module built with ASan and UBSan
# (build/asan).  It is put in front of the normal one for the run only (the
# interpreter's own suffix is looked up before .abi3.so) and removed after.
# Python itself is not instrumented: libasan is preloaded into the Python
# processes only (native/asan/sitecustomize.py), leak checks are off
# (CPython's allocations at exit are not ours); any report fails the target.
ASAN_TESTS := tests/t1_native_mmu.py tests/t2_vm.py tests/t3_vcpu.py tests/t4_fs.py \
	tests/t4_mmu.py tests/t4_dirty_log.py tests/t4_conformance.py tests/t6_smm.py
ASAN_DIR := $(CURDIR)/build/asan
test-asan: $(SO) launch guests
	@test -f "$$(gcc -print-file-name=libasan.so)" || \
		{ echo "test-asan: gcc has no libasan (Debian: apt-get install libasan8)"; exit 1; }
	@KVMFS_SANITIZE=1 $(PY) native/build.py
	@ext=$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))'); \
	rm -rf $(ASAN_DIR)/reports; mkdir -p $(ASAN_DIR)/reports; \
	trap 'rm -f kvmfs/_kvmfs_native'$$ext EXIT; \
	cp $(ASAN_DIR)/kvmfs/_kvmfs_native.abi3.so kvmfs/_kvmfs_native$$ext; \
	export KVMFS_ASAN_LIB=$$(gcc -print-file-name=libasan.so) \
		PYTHONPATH=$(CURDIR)/native/asan$${PYTHONPATH:+:$$PYTHONPATH} \
		ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:log_path=$(ASAN_DIR)/reports/asan \
		UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$(ASAN_DIR)/reports/ubsan; \
	$(PY) -c 'import sys, kvmfs._kvmfs_native as m; sys.exit(not m.__file__.endswith(sys.argv[1]))' "$$ext" || \
		{ echo "test-asan: the sanitized module was not the one imported"; exit 1; }; \
	$(PY) -m pytest -q -p no:cacheprovider $(ASAN_TESTS); rc=$$?; \
	if ls $(ASAN_DIR)/reports/* >/dev/null 2>&1; then cat $(ASAN_DIR)/reports/*; rc=1; fi; \
	exit $$rc

bench: $(SO) launch
	@$(PY) bench/bench.py $(BENCH_ARGS)

mount: $(SO) launch
	@mkdir -p $(MNT)
	@$(VENV)/bin/kvmfs mount $(MNT) --log kvmfs.log

umount:
	@$(VENV)/bin/kvmfs umount $(MNT)

clean:
	rm -rf build kvmfs/_kvmfs_native.* kvmfs/*.so native/*.o $(SO) *.egg-info
