# sand-boxer as a cluster on the local Docker engine (deploy/compose):
# three NATS JetStream nodes, setup at three replicas, every service twice.
# Included from the main Makefile; deploy/compose/README.md says more.
#
#   make cluster-up      build, write deploy/compose/state/, start, print how to use it
#   make cluster-down    stop; remove the containers, the network and the volumes
#   make cluster-clean   cluster-down, then remove state/, build/ and the images
#   make cluster-logs    follow the logs (CLUSTER_SERVICES='gateway-1 n1': only those)
#   make cluster-ps      the containers
#   make chaos           cluster-up, the chaos suite (deploy/chaos), cluster-down

GO  ?= go
BIN ?= bin/sandboxer
CLUSTER_DIR   := deploy/compose
CLUSTER_BUILD := $(CLUSTER_DIR)/build
CLUSTER_SH     = CLI=$(abspath $(BIN)) sh $(CLUSTER_DIR)/cluster.sh

.PHONY: cluster-up cluster-down cluster-clean cluster-logs cluster-ps cluster-build chaos

# The static binaries of the images: sandboxer, and nats-server from the
# Go module pkg/ requires. The host's CLI, bin/sandboxer, is the same
# sandboxer build (one compile; what the CLI and the services speak agrees).
cluster-build:
	@test -x /bin/busybox || { echo "cluster-build: needs Debian's busybox-static (/bin/busybox) for the NATS image's health check"; exit 1; }
	@mkdir -p $(dir $(BIN)) $(CLUSTER_BUILD)/sandboxer/empty $(CLUSTER_BUILD)/nats/empty
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w' -o $(CLUSTER_BUILD)/sandboxer/sandboxer ./cmd/sandboxer
	cp $(CLUSTER_BUILD)/sandboxer/sandboxer $(BIN).new && mv -f $(BIN).new $(BIN)
	cd pkg && CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w' -o $(abspath $(CLUSTER_BUILD))/nats/nats-server github.com/nats-io/nats-server/v2
	cp /bin/busybox $(CLUSTER_BUILD)/nats/busybox
	@command -v prometheus >/dev/null || { echo "cluster-build: needs Debian's prometheus (sh .ci/install-metrics.sh installs it)"; exit 1; }
	@mkdir -p $(CLUSTER_BUILD)/prometheus/empty $(CLUSTER_BUILD)/prometheus/lib $(CLUSTER_BUILD)/prometheus/lib64
	cp $$(command -v prometheus) $(CLUSTER_BUILD)/prometheus/prometheus
	@# Its shared libraries (libc, the loader), at the paths it asks for.
	@ldd $$(command -v prometheus) | awk '/=> \//{print $$3} /^\t\/lib64/{print $$1}' | while read -r lib; do \
		mkdir -p $(CLUSTER_BUILD)/prometheus$$(dirname $$lib); cp -L $$lib $(CLUSTER_BUILD)/prometheus$$lib; done

cluster-up: cluster-build
	@$(CLUSTER_SH) up

cluster-down:
	@$(CLUSTER_SH) down

cluster-clean:
	@$(CLUSTER_SH) clean

cluster-logs:
	@$(CLUSTER_SH) logs $(CLUSTER_SERVICES)

cluster-ps:
	@$(CLUSTER_SH) ps

# The chaos suite (deploy/chaos): sandbox lifecycles through both gateways
# while it kills, partitions, pauses and restarts the cluster's containers,
# then its checks; the table goes to stdout and to $(CHAOS_REPORT), and
# when it fails every container's log to $(CHAOS_LOGS). It
# needs cluster-up first, which it runs in its recipe rather than as a
# prerequisite so that the cluster comes down whatever happened, a failed
# start included; the exit status is the suite's (or cluster-up's). The
# program stops by itself within 15 minutes. CHAOS_FLAGS passes flags to
# it (go run ./deploy/chaos --help).
CHAOS_REPORT ?= $(CLUSTER_BUILD)/chaos-report.txt
CHAOS_LOGS   ?= $(CLUSTER_BUILD)/chaos-logs.txt
CHAOS_FLAGS  ?=
chaos:
	@status=0; \
	$(MAKE) --no-print-directory cluster-up && \
	$(GO) build -o $(CLUSTER_BUILD)/chaos ./deploy/chaos && \
	$(GO) build -o $(CLUSTER_BUILD)/billing-consumer ./examples/billing-consumer && \
	$(CLUSTER_BUILD)/chaos --state $(CLUSTER_DIR)/state --extensions extensions \
		--billing-consumer $(CLUSTER_BUILD)/billing-consumer --report $(CHAOS_REPORT) $(CHAOS_FLAGS) || status=$$?; \
	if [ $$status -ne 0 ]; then $(CLUSTER_SH) dump $(abspath $(CHAOS_LOGS)) && echo "== chaos: every container's log in $(CHAOS_LOGS)"; fi; \
	echo "== chaos: exit status $$status; make cluster-down"; \
	$(CLUSTER_SH) down; exit $$status
