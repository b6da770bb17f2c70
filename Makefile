# kvmfs: `make demo` and `make test` are all a newcomer types (see README.md).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.kvmfs-installed
NATIVE  := $(wildcard native/*.c native/*.h patches/*.patch) native/build.py tools/build-unicorn
SO      := kvmfs/.native-built
MNT     ?= mnt

.PHONY: all demo test test-fast bench mount umount deps clean guests

all: $(SO)

# System packages (libfuse for fusepy, fuse3 for /dev/fuse tools, binutils for
# the guests, cmake for unicorn), then a venv with the package installed
# editable, linked against unicorn built from source with patches/ (the Python
# binding of unicorn is only the benchmarks' "unicorn alone" anchor).
$(STAMP): pyproject.toml setup.py
	@tools/install-deps
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing kvmfs into $(VENV) ..."
	@$(PY) -m pip install -qq --upgrade pip setuptools wheel "cffi>=1.15" unicorn==2.1.4 fusepy==3.0.1 pytest
	@PY=$(PY) tools/build-unicorn
	@KVMFS_NATIVE_BY_MAKE=1 $(PY) -m pip install -qq --no-build-isolation -e .
	@touch $@

deps: $(STAMP)

# The native module, rebuilt whenever a C source or header changes: objects in
# build/native, the one module kvmfs/_kvmfs_native.abi3.so.
$(SO): $(STAMP) $(NATIVE)
	@PY=$(PY) tools/build-unicorn
	@$(PY) native/build.py
	@touch $@

# The guest images (guests/*.S -> build/guests/*.bin), reassembled when a source changes.
guests: $(STAMP)
	@$(PY) -m kvmfs.guests

demo: $(SO) guests
	@$(PY) tools/demo.py

test: $(SO) guests
	@$(PY) -m pytest -q tests

test-fast: $(SO) guests
	@$(PY) -m pytest -q tests/t0_abi.py tests/t1_native_mmu.py tests/t2_vm.py tests/t3_vcpu.py

bench: $(SO)
	@$(PY) tools/bench.py $(BENCH_ARGS)

mount: $(SO)
	@mkdir -p $(MNT)
	@$(VENV)/bin/kvmfs mount $(MNT) --log kvmfs.log

umount:
	@$(VENV)/bin/kvmfs umount $(MNT)

clean:
	rm -rf build kvmfs/_kvmfs_native.* kvmfs/*.so native/*.o $(SO) *.egg-info
