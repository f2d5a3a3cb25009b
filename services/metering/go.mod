module github.com/sand-boxer/sandboxer/services/metering

go 1.26.0

require github.com/sand-boxer/sandboxer/pkg v0.0.0

replace github.com/sand-boxer/sandboxer/pkg => ../../pkg
