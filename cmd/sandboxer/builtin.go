package main

import (
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/composessh"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
	"github.com/sand-boxer/sandboxer/pkg/extension/saasstub"
	"github.com/sand-boxer/sandboxer/pkg/extension/vmpacker"
)

// builtinExtensions are the backends this binary links, in one place. The
// echo backend is not among them: it is linked only into tests and the
// benchmark.
func builtinExtensions() []extension.Info {
	return []extension.Info{
		local.Info,
		composessh.Info,
		vmpacker.Info,
		saasstub.Info,
	}
}
