package extension

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// Catalog is the validated set of extensions and the profiles bound to
// them.
type Catalog struct {
	Extensions map[string]*Manifest `json:"extensions"`
	Profiles   map[string]*Profile  `json:"profiles"`
}

// ErrNotFound is wrapped by lookups of unknown names.
var ErrNotFound = errors.New("not found")

// Extension returns the manifest named name.
func (c *Catalog) Extension(name string) (*Manifest, error) {
	if m, ok := c.Extensions[name]; ok {
		return m, nil
	}
	return nil, fmt.Errorf("extension %q: %w", name, ErrNotFound)
}

// Profile returns the profile with slug.
func (c *Catalog) Profile(slug string) (*Profile, error) {
	if p, ok := c.Profiles[slug]; ok {
		return p, nil
	}
	return nil, fmt.Errorf("profile %q: %w", slug, ErrNotFound)
}

// ExtensionList returns the manifests sorted by name.
func (c *Catalog) ExtensionList() []*Manifest {
	out := make([]*Manifest, 0, len(c.Extensions))
	for _, k := range slices.Sorted(maps.Keys(c.Extensions)) {
		out = append(out, c.Extensions[k])
	}
	return out
}

// ProfileList returns the profiles sorted by slug.
func (c *Catalog) ProfileList() []*Profile {
	out := make([]*Profile, 0, len(c.Profiles))
	for _, k := range slices.Sorted(maps.Keys(c.Profiles)) {
		out = append(out, c.Profiles[k])
	}
	return out
}

// LoadCatalog reads every ext.*.yaml in extDir and profile.*.yaml in
// profileDir, checks each file and the bindings between them, and returns
// every problem found in every file at once. With a registry, each
// manifest's handler must be registered and may check its manifest.
func LoadCatalog(extDir, profileDir string, reg *Registry) (*Catalog, Problems) {
	return LoadCatalogDirs(CatalogDir{Path: extDir}, CatalogDir{Path: profileDir}, reg)
}

// LoadCatalogDirs is [LoadCatalog] on directories of any file system: the
// manifests are the ext.*.yaml files of ext, the profiles the
// profile.*.yaml files of profiles.
func LoadCatalogDirs(ext, profiles CatalogDir, reg *Registry) (*Catalog, Problems) {
	c := &Catalog{Extensions: map[string]*Manifest{}, Profiles: map[string]*Profile{}}
	var ps Problems
	extFiles, err := ext.list("ext.")
	if err != nil {
		ps = append(ps, Problem{File: ext.Path, Message: err.Error()})
	}
	for _, f := range extFiles {
		m, mps := loadFile(ext, f, ParseManifest)
		ps = append(ps, mps...)
		if m == nil || m.Name == "" {
			continue
		}
		if prev, dup := c.Extensions[m.Name]; dup {
			ps = append(ps, m.problemAt("name", "extension %q already declared in %s", m.Name, prev.File))
			continue
		}
		c.Extensions[m.Name] = m
	}
	profFiles, err := profiles.list("profile.")
	if err != nil {
		ps = append(ps, Problem{File: profiles.Path, Message: err.Error()})
	}
	for _, f := range profFiles {
		p, pps := loadFile(profiles, f, ParseProfile)
		ps = append(ps, pps...)
		if p == nil || p.Slug == "" {
			continue
		}
		if prev, dup := c.Profiles[p.Slug]; dup {
			ps = append(ps, p.problemAt("slug", "profile %q already declared in %s", p.Slug, prev.File))
			continue
		}
		c.Profiles[p.Slug] = p
	}
	ps = append(ps, c.Check(reg)...)
	if len(extFiles) == 0 && err == nil {
		ps = append(ps, Problem{File: ext.Path, Message: "no ext.<name>.yaml manifests found"})
	}
	return c, ps
}

// Check verifies the bindings between profiles and extensions and, with a
// registry, that every handler is linked. It is what LoadCatalog runs after
// loading the files, exposed for catalogs built in code.
func (c *Catalog) Check(reg *Registry) Problems {
	var ps Problems
	for _, m := range c.ExtensionList() {
		if reg == nil {
			continue
		}
		info, err := reg.Lookup(m.Handler)
		if err != nil {
			ps = append(ps, m.problemAt("handler", "%v", err))
			continue
		}
		if mc, ok := info.New().(ManifestChecker); ok {
			for _, p := range mc.CheckManifest(m) {
				if p.File == "" {
					p.File = m.File
				}
				ps = append(ps, p)
			}
		}
	}
	for _, p := range c.ProfileList() {
		for i, name := range p.ExtensionNames() {
			path := "extension"
			if len(p.Candidates) > 0 {
				path = fmt.Sprintf("candidates[%d].extension", i)
			}
			if name == "" {
				continue
			}
			m, ok := c.Extensions[name]
			if !ok {
				ps = append(ps, p.problemAt(path, "unknown extension %q (known: %s)", name, strings.Join(slices.Sorted(maps.Keys(c.Extensions)), ", ")))
				continue
			}
			if p.Isolation != "" && !slices.Contains(m.Capabilities.IsolationLevels, p.Isolation) {
				ps = append(ps, p.problemAt("isolation", "extension %q does not offer isolation %q (offers %v)", m.Name, p.Isolation, m.Capabilities.IsolationLevels))
			}
			for _, k := range slices.Sorted(maps.Keys(p.Inputs)) {
				spec, ok := m.Inputs[k]
				if !ok {
					ps = append(ps, p.problemAt("inputs."+k, "extension %q has no input %q", m.Name, k))
					continue
				}
				if err := spec.validate(p.Inputs[k]); err != nil {
					ps = append(ps, p.problemAt("inputs."+k, "%v", err))
				} else if spec.Format == FormatRepo {
					// A default the backend's repo policy refuses would
					// fail every request that takes it.
					if err := m.Repo.Check(p.Inputs[k]); err != nil {
						ps = append(ps, p.problemAt("inputs."+k, "extension %q's repo policy refuses it: %v", m.Name, err))
					}
				}
			}
		}
	}
	return ps
}
