module github.com/sand-boxer/sandboxer/cmd/sandboxer

go 1.26.0

require (
	github.com/sand-boxer/sandboxer/pkg v0.0.0
	github.com/sand-boxer/sandboxer/services/gateway v0.0.0
	github.com/sand-boxer/sandboxer/services/metering v0.0.0
	github.com/sand-boxer/sandboxer/services/provisioner v0.0.0
	github.com/sand-boxer/sandboxer/services/registry v0.0.0
)

replace github.com/sand-boxer/sandboxer/pkg => ../../pkg

replace github.com/sand-boxer/sandboxer/services/gateway => ../../services/gateway

replace github.com/sand-boxer/sandboxer/services/provisioner => ../../services/provisioner

replace github.com/sand-boxer/sandboxer/services/metering => ../../services/metering

replace github.com/sand-boxer/sandboxer/services/registry => ../../services/registry
