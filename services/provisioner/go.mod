module github.com/sand-boxer/sandboxer/services/provisioner

go 1.26.0
