# sand-boxer. `make up` runs the control plane on this machine; `make test`
# tests every module. go.work ties the modules, and `go test ./...` does not
# cross module boundaries, so targets enumerate them.

MODULES := pkg services/gateway services/provisioner services/metering services/registry cmd/sandboxer examples/bus-request examples/billing-consumer deploy/chaos deploy/kubernetes
# Every module must stand alone, as a fresh clone of one builds it: vet,
# test and lint run each module with the workspace off (replace directives
# tie it to its siblings).
NOWORK  := GOWORK=off
# The contract packages, which services, the CLI and clients link to speak
# to sand-boxer, and package bus: none of them may link nats-server (only
# pkg/bus/embedded and pkg/natstest do). Relative to pkg/.
CONTRACTS := ./event ./api ./bus ./bus/rpc $(if $(wildcard pkg/credits),./credits)
BIN     := bin/sandboxer
GO      ?= go
TESTFLAGS ?= -count=1 -timeout 10m

.PHONY: all build up test race e2e bench bench-go lint fmt vet tidy contracts clean

all: lint test

build:
	$(GO) build -o $(BIN) ./cmd/sandboxer

# Runs every service in one process on an embedded NATS server.
up: build
	./$(BIN) up $(UP_FLAGS)

# The console test drives a headless Chromium: installed from Debian's
# packages when missing (a no-op when it is there).
test: vet
	@sh .ci/install-console.sh
	@sh .ci/install-metrics.sh
	@set -e; for m in $(MODULES); do \
		echo "== go test $$m"; \
		(cd $$m && $(NOWORK) $(GO) test $(TESTFLAGS) ./...); \
	done

# The same tests under the race detector.
race:
	@sh .ci/install-console.sh
	@sh .ci/install-metrics.sh
	@set -e; for m in $(MODULES); do \
		echo "== go test -race $$m"; \
		(cd $$m && $(NOWORK) $(GO) test -race $(TESTFLAGS) ./...); \
	done

# End-to-end tests against a real sshd and the Docker engine. They fail,
# never skip, when either is missing (.ci/install-e2e.sh installs them).
e2e: build
	sh .ci/install-e2e.sh
	@echo "== e2e: backends against a real sshd and Docker engine"
	cd pkg && $(GO) test -tags e2e -count=1 -timeout 20m ./sshx/... ./extension/composessh/... ./extension/vmpacker/...
	@echo "== e2e: through the gateway"
	cd cmd/sandboxer && $(GO) test -tags e2e -count=1 -timeout 20m -run 'E2E' -v ./...

bench: build
	./$(BIN) bench --quick

# Go micro-benchmarks of the hot paths (event encode/decode, input
# validation, ledger fold, metering changes), for benchstat:
#   make bench-go > new.txt; benchstat old.txt new.txt
BENCHCOUNT ?= 6
bench-go:
	cd pkg && $(GO) test -run '^$$' -bench . -benchmem -count $(BENCHCOUNT) ./event/ ./extension/
	cd services/metering && $(GO) test -run '^$$' -bench . -benchmem -count $(BENCHCOUNT) .
	cd services/gateway && $(GO) test -run '^$$' -bench InventoryPage -benchmem -count $(BENCHCOUNT) .

vet:
	@set -e; for m in $(MODULES); do (cd $$m && $(NOWORK) $(GO) vet ./...); done

# vet, then per module with the workspace off: it builds, and go.mod and
# go.sum are tidy; gofmt; the contract packages link no nats-server.
lint: vet
	@set -e; for m in $(MODULES); do \
		(cd $$m && $(NOWORK) $(GO) build -o /dev/null ./... && \
		 if ! $(NOWORK) $(GO) mod tidy -diff >/dev/null; then echo "$$m: go mod tidy needed"; exit 1; fi); \
	done
	@out=$$(gofmt -l $(MODULES)); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	@$(MAKE) --no-print-directory contracts

contracts:
	@deps=$$(cd pkg && $(NOWORK) $(GO) list -deps $(CONTRACTS) | grep '^github.com/nats-io/nats-server' || true); \
	if [ -n "$$deps" ]; then echo "contract packages ($(CONTRACTS)) link nats-server:"; echo "$$deps"; exit 1; fi

fmt:
	gofmt -w $(MODULES)

tidy:
	@set -e; for m in $(MODULES); do (cd $$m && $(NOWORK) $(GO) mod tidy); done

clean:
	rm -rf bin

# The three-node cluster of deploy/compose: make cluster-up, cluster-down.
include deploy/compose/cluster.mk
