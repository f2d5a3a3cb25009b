module github.com/sand-boxer/sandboxer/cmd/sandboxer

go 1.26.0
