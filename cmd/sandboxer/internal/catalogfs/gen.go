//go:build ignore

// gen copies the repository's shipped manifests and profiles into this
// package, replacing what was there: go generate runs it.
package main

import (
	"log"
	"os"
	"path/filepath"
)

func main() {
	for _, dir := range []string{"extensions", "profiles"} {
		old, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
		if err != nil {
			log.Fatal(err)
		}
		for _, f := range old {
			if err := os.Remove(f); err != nil {
				log.Fatal(err)
			}
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			log.Fatal(err)
		}
		src, err := filepath.Glob(filepath.Join("..", "..", "..", "..", dir, "*.yaml"))
		if err != nil {
			log.Fatal(err)
		}
		if len(src) == 0 {
			log.Fatalf("no %s/*.yaml in the repository", dir)
		}
		for _, f := range src {
			b, err := os.ReadFile(f)
			if err != nil {
				log.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, filepath.Base(f)), b, 0o644); err != nil {
				log.Fatal(err)
			}
		}
	}
}
