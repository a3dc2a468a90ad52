# mod_wsgi_rs — run `make help` for the targets.
SHELL := /bin/bash
APXS ?= apxs
PYTHON ?= /usr/bin/python3
CARGO ?= cargo
export PYO3_PYTHON := $(PYTHON)
export APXS

APT_PACKAGES := apache2 apache2-dev python3-dev python3-venv libclang-dev clang curl
TEST_USERS := bob joe
SO_RELEASE := target/release/libmod_wsgi_rs.so
SO_DEBUG := target/debug/libmod_wsgi_rs.so
DEMO_ROOT ?= /tmp/mod_wsgi_rs-demo
DEMO_PORT ?= 8080

.PHONY: help build deps users install demo test unit integration lint clean bench fuzz

help: ## Show this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

build: ## Build the module (release): target/release/libmod_wsgi_rs.so
	$(CARGO) build --release
	@echo "built $(SO_RELEASE)"

deps: ## Install missing Debian packages and create the test users (needs root)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing packages: $$missing — run as root or: apt-get install $$missing" >&2; exit 1; fi; \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install a Rust toolchain (1.85 or newer)" >&2; exit 1; }
	@$(MAKE) --no-print-directory users

users: ## Create the test users bob and joe if missing (needs root; skipped otherwise)
	@if [ "$$(id -u)" = 0 ]; then \
	  for u in $(TEST_USERS); do id -u $$u >/dev/null 2>&1 || useradd --create-home --shell /usr/sbin/nologin $$u; done; \
	else echo "NOTE: not root, test users not created; tests that need them will say SKIPPED"; fi

install: build ## Install like apxs -i: the .so into LIBEXECDIR, wsgi_rs.load/.conf into mods-available
	@if [ -e /etc/apache2/mods-enabled/wsgi.load ]; then \
	  echo "Debian's mod_wsgi is enabled (mods-enabled/wsgi.load) and uses the same directives: run 'a2dismod wsgi' first." >&2; exit 1; fi
	install -D -m 0644 $(SO_RELEASE) $$($(APXS) -q LIBEXECDIR)/mod_wsgi_rs.so
	install -D -m 0644 apache-conf/wsgi_rs.load /etc/apache2/mods-available/wsgi_rs.load
	install -D -m 0644 apache-conf/wsgi_rs.conf /etc/apache2/mods-available/wsgi_rs.conf
	@echo "installed; enable with: a2enmod wsgi_rs && systemctl restart apache2"

demo: deps build ## Serve apache-conf/examples on 127.0.0.1:8080 in the foreground (Ctrl-C stops)
	@bash apache-conf/demo/run-demo.sh "$(CURDIR)/$(SO_RELEASE)" "$(DEMO_ROOT)" "$(DEMO_PORT)"

test: deps ## Build, then run the unit and integration tests (integration needs apache2; root for setuid tests)
	$(CARGO) build
	$(CARGO) test --no-fail-fast -- --test-threads=4

bench: deps ## Release build, then mod_wsgi_rs vs Debian's mod_wsgi, A B A B (BENCH_QUICK=1: ~1 min; see bench/bench.py)
	$(CARGO) build --release
	$(PYTHON) bench/bench.py

fuzz: ## Randomised robustness tests, not in CI: FUZZ_SECONDS per target (default 10), FUZZ_SEED=0x… replays a run
	FUZZ_SECONDS=$${FUZZ_SECONDS:-10} $(CARGO) test --release --lib fuzz_tests::fuzz_ -- --ignored --nocapture

lint: ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

clean: ## Remove build output
	$(CARGO) clean
