module github.com/sand-boxer/sandboxer/services/metering

go 1.26.0
