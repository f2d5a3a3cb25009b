// Package catalogfs is the catalog shipped inside the binary: a copy of
// the repository's extensions/*.yaml manifests and profiles/*.yaml
// profiles, which `sandboxer up` serves when it is started outside a
// clone (where no extensions/ or profiles/ directory is) and no
// --extensions or --profiles says where the catalog is.
//
// The copy is generated: after changing a shipped manifest or profile, run
// go generate ./internal/catalogfs in cmd/sandboxer. A test fails while
// the copy differs from the repository's files.
package catalogfs

import "embed"

//go:generate go run gen.go

// FS holds the shipped catalog: the manifests under [Extensions], the
// profiles under [Profiles].
//
//go:embed extensions/*.yaml profiles/*.yaml
var FS embed.FS

// The directories of FS.
const (
	Extensions = "extensions"
	Profiles   = "profiles"
)
