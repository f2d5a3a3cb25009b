// Package kubernetes holds no code. Its tests check the manifests beside it:
// every YAML document decodes strictly into its Kubernetes API type (a
// misspelt field fails), the kustomization builds, and the manifests keep
// the invariants the README promises (probes, drains, budgets, security,
// one ScaledObject per pool on its own durable).
package kubernetes
