# Two commands for an operator: `make run` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= conf/appliance.toml
PYTEST_ARGS ?=

.PHONY: run test fuzz lint imports venv build-deps system-deps clean

# The C extension (appliance/native) is built by pip from setup.py: a change to its source
# reinstalls. Its build needs libsrtp2's headers (build-deps); without them pip still
# installs, and the workers say they run the pure-Python packet path.
NATIVE_SRC := setup.py $(wildcard appliance/native/*.c)

$(STAMP): pyproject.toml $(NATIVE_SRC) | build-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

# What building the package needs beyond gcc and the Python headers (on every machine here).
build-deps:
	@missing=""; \
	pkg-config --exists libsrtp2 2>/dev/null || missing="$$missing libsrtp2-dev"; \
	command -v pkg-config >/dev/null || missing="$$missing pkg-config"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		( $$SUDO apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing ) || \
		echo "could not install$$missing: the native packet loop will not be built;" \
		     "the appliance runs on the pure-Python packet path"; \
	fi

# Debian packages the tests drive as real peers: sipp (sip-tester), Chromium and Firefox ESR,
# ffmpeg, ip, nft, coturn (the TURN server of tests/e2e/test_turn.py, which starts its own;
# the service Debian enables on install, with its open default config, is stopped).
system-deps:
	@missing=""; \
	command -v sipp >/dev/null || missing="$$missing sip-tester"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v firefox-esr >/dev/null || missing="$$missing firefox-esr"; \
	command -v nft >/dev/null || missing="$$missing nftables"; \
	command -v ffprobe >/dev/null || missing="$$missing ffmpeg"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v turnserver >/dev/null || missing="$$missing coturn"; \
	command -v janus >/dev/null || missing="$$missing janus"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing && \
		case "$$missing" in *coturn*) \
			$$SUDO systemctl disable --now coturn >/dev/null 2>&1 || true;; esac; \
		case "$$missing" in *janus*) \
			$$SUDO systemctl disable --now janus >/dev/null 2>&1 || true;; esac; \
	fi

run: venv
	$(BIN)/appliance demo --config $(CONFIG)

lint: venv
	$(BIN)/ruff check .

# The package map (README "Packages") as the code has it: imports between packages, and
# any import cycle or import the layers forbid (exit status 1 then).
imports: venv
	$(BIN)/python tools/imports.py --units --check

# Every test runs inside a fresh network namespace that has only loopback: nothing a test
# does can send a packet outside 127.0.0.0/8.
# Then the media end-to-end tests once more on the pure-Python packet path (media.native_loop
# = false: the reference and the fallback of a box where the extension did not build);
# `make test-python-path SUITE=tests` runs the whole suite that way.
test: venv system-deps lint
	tests/in-loopback-netns.sh $(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-python-path

PYTHON_PATH_SUITE ?= tests/e2e/test_voice.py tests/e2e/test_video.py tests/e2e/test_full_call.py
test-python-path: venv system-deps
	APPLIANCE_TEST_NATIVE_LOOP=0 tests/in-loopback-netns.sh $(BIN)/python -m pytest \
		$(or $(SUITE),$(PYTHON_PATH_SUITE)) $(PYTEST_ARGS)

# The hostile-network fuzzers at full scale (>= 10^5 WSS frames, >= 10^6 SIP datagrams
# against a live call); `make test` runs the same tests at a small scale.
fuzz: venv system-deps
	APPLIANCE_FUZZ_SCALE=full tests/in-loopback-netns.sh $(BIN)/python -m pytest -m fuzz \
		-p no:cacheprovider -o addopts="" --timeout=3600 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data build *.egg-info
	rm -f appliance/native/*.so
