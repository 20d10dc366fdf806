# The agent: build, run, test, benchmark.
#
#   make run     install what is missing, build, serve examples/hello at http://127.0.0.1:8080
#   make test    the whole test suite (real nginx, real agent, real workers)
#   make bench   the benchmark against nginx+gunicorn and nginx+uWSGI
#   make bench-spawn   its spawn and memory part alone (hello world and examples/django)
#   make fuzz    the engine's wire parsers and the status socket's request parser under libFuzzer (FUZZ_SECONDS each)
#   make shared-state  serve examples/shared-state (4 workers, a redis-server) at http://127.0.0.1:8080
#   make multi-host    examples/multi-host: a load balancer and HOSTS hosts in network namespaces
#   make test-scale    only the tests of shared state, several hosts and the Prometheus rules
#   make prometheus-check  promtool on examples/prometheus: the scrape configuration, the rules, their unit tests
#
# Everything Python lives in a virtualenv ($(VENV)); the nginx module is built
# against the system nginx's own source and configure flags (nginx-dev).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HOST_PYTHON ?= python3
# redis-server: the examples' store; prometheus: promtool, which checks and
# unit-tests examples/prometheus; iproute2: `ip netns` for examples/multi-host; curl: a real
# client of server-sent events.
APT_PACKAGES := nginx nginx-dev build-essential clang python3 python3-venv python3-dev wrk chromium chromium-driver \
	redis-server prometheus iproute2 curl nodejs
PIP_PACKAGES := setuptools wheel 'cffi>=1.15' psutil msgpack pyyaml pytest pytest-timeout ruff mypy types-PyYAML types-psutil prometheus_client selenium hypothesis atheris websockets
NGINX_SRC := /usr/share/nginx/src
MODULE := build/ngx_http_agent_module.so
MODULE_SRC := nginx-module/config $(wildcard nginx-module/*.c nginx-module/*.h) \
	csrc/fastpath.h csrc/records.c csrc/wire.h
NATIVE_SRC := $(wildcard csrc/*.c csrc/*.h) csrc/native_build.py
RUN_PORT ?= 8080
RUN_DIR ?= /tmp/agent-demo
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 60
FUZZERS := fuzz_frame fuzz_records fuzz_http_head
PY_FUZZERS := fuzz_status_request
FUZZ_FLAGS := -g -O1 -Wall -Wextra -Werror -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
STATE_DIR ?= /tmp/agent-shared-state
# The apps' interpreter: its virtualenvs must be readable by the workers'
# users (a python under /root is not).
APP_PYTHON ?= /usr/bin/python3
HOSTS ?= 2
SCALE_TESTS := tests/scale tests/integration/test_shared_state.py tests/integration/test_prometheus.py

.PHONY: all deps system-deps python-deps build native module run shared-state multi-host prometheus-check django-venv flask-venv asgi-venv \
	test test-scale lint sanitize fuzz bench bench-spawn clean

all: build

# -- dependencies ------------------------------------------------------------

deps: system-deps python-deps

# Installs the Debian packages that are missing (needs root), or names them.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages: $$missing (run 'make deps' as root, or apt-get install them)"; exit 1; fi; \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

python-deps: $(VENV)/.deps-done

# Made again when this Makefile changes (its package list may have grown).
$(VENV)/.deps-done: Makefile
	@command -v $(HOST_PYTHON) >/dev/null || { echo "no $(HOST_PYTHON) found: run 'make deps' as root"; exit 1; }
	test -x $(PY) || $(HOST_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_PACKAGES)
	touch $@

# -- build -------------------------------------------------------------------

build: native module

native: python-deps agent/.native-built

agent/.native-built: $(NATIVE_SRC) setup.py
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

module: system-deps $(MODULE)

$(MODULE): $(MODULE_SRC)
	@test -d $(NGINX_SRC) || { echo "nginx sources not found at $(NGINX_SRC): install nginx-dev ('make deps')"; exit 1; }
	rm -rf build/nginx && mkdir -p build && cp -r $(NGINX_SRC) build/nginx
	cd build/nginx && source ./conf_flags && \
		AGENT_CORE_PYTHON="$(abspath $(PY))" ./configure "$${NGX_CONF_FLAGS[@]}" \
			--add-dynamic-module=$(CURDIR)/nginx-module > configure.log 2>&1 \
		|| { tail -20 configure.log; exit 1; }
	$(MAKE) -s -C build/nginx -f objs/Makefile modules > build/nginx-make.log 2>&1 || { tail -40 build/nginx-make.log; exit 1; }
	cp build/nginx/objs/ngx_http_agent_module.so $@

# -- run ---------------------------------------------------------------------

# Serves a copy of examples/hello: the workers run as an unprivileged user,
# who may not be able to read a checkout under /root. mkdir without -p: a
# directory another user made in between is refused, not used.
run: deps build
	rm -rf $(RUN_DIR) && mkdir -m 0755 $(RUN_DIR) && cp -r examples/hello $(RUN_DIR)/hello && chmod -R a+rX $(RUN_DIR)
	$(PY) -m agent.cli serve $(RUN_DIR)/hello --port $(RUN_PORT) --min-instances 2

# examples/django's virtualenv, which its integration test serves it with.
django-venv: build/django-venv/.done

build/django-venv/.done: examples/django/requirements.txt examples/django/make-venv.sh examples/make-venv.sh
	rm -rf build/django-venv
	examples/django/make-venv.sh build/django-venv
	touch $@

# examples/flask-threads' virtualenv, which its integration test serves it with.
flask-venv: build/flask-venv/.done

build/flask-venv/.done: examples/flask-threads/requirements.txt examples/flask-threads/make-venv.sh examples/make-venv.sh
	rm -rf build/flask-venv
	examples/flask-threads/make-venv.sh build/flask-venv
	touch $@

# examples/asgi's virtualenv (Starlette), which its integration test serves it with.
asgi-venv: build/asgi-venv/.done

build/asgi-venv/.done: examples/asgi/requirements.txt examples/asgi/make-venv.sh examples/make-venv.sh
	rm -rf build/asgi-venv
	examples/asgi/make-venv.sh build/asgi-venv
	touch $@

# Serves a copy of examples/shared-state with 4 workers, under an app
# virtualenv with the redis client (from PyPI) and a redis-server on a Unix
# socket in STATE_DIR, without persistence; Ctrl-C stops both.
shared-state: deps build
	rm -rf $(STATE_DIR) && mkdir -m 0755 $(STATE_DIR) && cp -r examples/shared-state $(STATE_DIR)/app
	$(APP_PYTHON) -m venv $(STATE_DIR)/venv
	$(STATE_DIR)/venv/bin/python -m pip install -q --disable-pip-version-check -r examples/shared-state/requirements.txt
	chmod -R a+rX $(STATE_DIR)
	redis-server --port 0 --unixsocket $(STATE_DIR)/redis.sock --unixsocketperm 777 --save '' --appendonly no \
		--dir $(STATE_DIR) --logfile $(STATE_DIR)/redis.log & redis=$$!; trap 'kill $$redis 2>/dev/null; wait $$redis' EXIT; \
	$(PY) -m agent.cli serve $(STATE_DIR)/app --port $(RUN_PORT) --python $(STATE_DIR)/venv/bin/python \
		--env REDIS_URL=unix://$(STATE_DIR)/redis.sock --min-instances 4 --max-instances 4 --prestart on

# A load balancer in front of HOSTS hosts, each nginx with the agent, in
# network namespaces on 198.18.0.0/15 (docs/scaling.md); Ctrl-C removes it all.
multi-host: deps build
	$(PY) examples/multi-host/cluster.py --hosts $(HOSTS)

# examples/prometheus is configuration for Prometheus: checking it is running it.
prometheus-check: system-deps
	cd examples/prometheus && promtool check config prometheus.yml && promtool check rules rules.yml alerts.yml \
		&& promtool test rules rules_test.yml

# -- checks ------------------------------------------------------------------

test: deps build django-venv flask-venv asgi-venv
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Part of `make test` too; this runs them alone (about a minute).
test-scale: deps build
	$(PY) -m pytest $(SCALE_TESTS) $(PYTEST_ARGS)

lint: python-deps
	$(PY) -m ruff check agent tests bench examples
	$(PY) -m mypy agent

# The suite against an ASan/UBSan build of the C extension, less the tests
# that drive no C path of their own: the dashboard in a browser, the
# Prometheus rules, the benchmark's harness, and the example apps (Django,
# Flask, Starlette, shared state, several hosts), whose requests take the
# paths the other tests take. SANITIZE_SKIP= runs them all.
SANITIZE_SKIP ?= tests/integration/test_dashboard.py tests/integration/test_prometheus.py \
	tests/integration/test_bench_stacks.py tests/unit/bench tests/integration/test_django_example.py \
	tests/integration/test_flask_threads.py tests/integration/test_asgi_faults.py \
	tests/integration/test_shared_state.py tests/scale
sanitize: deps module django-venv flask-venv asgi-venv
	AGENT_SANITIZE=1 $(PY) setup.py -q build_ext --inplace --force
	rm -f agent/.native-built
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:quarantine_size_mb=1 LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		$(PY) -m pytest tests $(SANITIZE_SKIP:%=--ignore=%) $(PYTEST_ARGS)

# Each harness runs FUZZ_SECONDS on a copy of its seed corpus (the repo's
# stays as committed); a crash or a failed check fails the target and
# leaves the input in build/fuzz/<harness>-crash-*.
fuzz: system-deps python-deps
	@mkdir -p build/fuzz
	@for f in $(FUZZERS); do \
		clang $(FUZZ_FLAGS) -Icsrc tests/fuzz/$$f.c csrc/frame.c csrc/records.c csrc/http_head.c -o build/fuzz/$$f || exit 1; \
		rm -rf build/fuzz/$$f-corpus && cp -r tests/fuzz/corpus/$$f build/fuzz/$$f-corpus; \
		echo "fuzzing $$f for $(FUZZ_SECONDS) s"; \
		build/fuzz/$$f -max_total_time=$(FUZZ_SECONDS) -dict=tests/fuzz/$$f.dict -print_final_stats=1 \
			-artifact_prefix=build/fuzz/$$f- build/fuzz/$$f-corpus > build/fuzz/$$f.log 2>&1 \
			|| { tail -40 build/fuzz/$$f.log; echo "$$f failed: see build/fuzz/$$f.log"; exit 1; }; \
		grep -E '^stat::number_of_executed_units' build/fuzz/$$f.log; \
	done
	@for f in $(PY_FUZZERS); do \
		rm -rf build/fuzz/$$f-corpus && cp -r tests/fuzz/corpus/$$f build/fuzz/$$f-corpus; \
		echo "fuzzing $$f for $(FUZZ_SECONDS) s"; \
		$(PY) tests/fuzz/$$f.py -max_total_time=$(FUZZ_SECONDS) -dict=tests/fuzz/$$f.dict -print_final_stats=1 \
			-artifact_prefix=build/fuzz/$$f- build/fuzz/$$f-corpus > build/fuzz/$$f.log 2>&1 \
			|| { grep -v '^INFO: Instrumenting' build/fuzz/$$f.log | tail -40; echo "$$f failed: see build/fuzz/$$f.log"; exit 1; }; \
		grep -E '^stat::number_of_executed_units' build/fuzz/$$f.log; \
	done

bench: deps build
	$(PY) bench/run.py

bench-spawn: deps build
	$(PY) bench/run.py --only spawn,memory

clean:
	rm -rf build agent/_native*.so agent/_native.c agent/.native-built *.egg-info
