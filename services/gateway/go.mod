module github.com/sand-boxer/sandboxer/services/gateway

go 1.26.0
