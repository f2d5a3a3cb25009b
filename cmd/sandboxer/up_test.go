package main

import "testing"

// TestExtensionSpellings: every --extension takes local and ext.local
// alike, and keeps each extension once.
func TestExtensionSpellings(t *testing.T) {
	for _, path := range [][]string{{"up"}, {"serve", "provisioner"}} {
		root := newRoot()
		cmd, rest, err := root.Find(append(path, "--extension", "ext.local", "--extension", "local", "--extension", "ext.saas-stub"))
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.ParseFlags(rest); err != nil {
			t.Fatalf("%s: %v", cmd.CommandPath(), err)
		}
		got := cmd.Flags().Lookup("extension").Value.String()
		if got != "[local,saas-stub]" {
			t.Errorf("%s --extension ext.local --extension local --extension ext.saas-stub: %s, want [local,saas-stub]", cmd.CommandPath(), got)
		}
		if err := cmd.Flags().Set("extension", "ext."); err == nil {
			t.Errorf("%s: --extension ext. accepted", cmd.CommandPath())
		}
	}
}
