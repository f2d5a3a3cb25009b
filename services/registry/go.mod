module github.com/sand-boxer/sandboxer/services/registry

go 1.26.0
