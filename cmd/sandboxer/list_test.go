package main

import (
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/api"
)

// TestListLimit lists three sandboxes (saas ones a consumer without
// credit gets rejected: records without a workspace) whole and by
// --limit.
func TestListLimit(t *testing.T) {
	cs := startCreditsSystem(t, nil)
	ctx := testContext(t)
	var ids []string
	for range 3 {
		_, err := cs.dev.Create(ctx, api.CreateRequest{Profile: "saas"}, "")
		var p *api.Problem
		if api.StatusOf(err) != http.StatusPaymentRequired || !asProblem(err, &p) {
			t.Fatalf("create without credit: %v, want 402", err)
		}
		ids = append(ids, strings.TrimPrefix(p.Instance, "/v1/sandboxes/"))
	}
	slices.Sort(ids)

	listed := func(args ...string) api.SandboxList {
		t.Helper()
		var l api.SandboxList
		if err := json.Unmarshal([]byte(cs.mustCLI(t, append([]string{"list", "-o", "json"}, args...)...)), &l); err != nil {
			t.Fatal(err)
		}
		return l
	}
	idsOf := func(l api.SandboxList) []string {
		var out []string
		for _, s := range l.Sandboxes {
			out = append(out, s.ID)
		}
		return out
	}
	if l := listed(); !slices.Equal(idsOf(l), ids) || l.Next != "" {
		t.Fatalf("list: %v next %q, want %v", idsOf(l), l.Next, ids)
	}
	if l := listed("--limit", "2"); !slices.Equal(idsOf(l), ids[:2]) || l.Next != ids[1] {
		t.Fatalf("list --limit 2: %v next %q, want %v next %s", idsOf(l), l.Next, ids[:2], ids[1])
	}
	if out := cs.mustCLI(t, "list", "--limit", "1"); strings.Count(out, "\n") != 2 || !strings.Contains(out, ids[0]) {
		t.Fatalf("list --limit 1 prints\n%s\nwant a header and %s", out, ids[0])
	}
	for _, bad := range []string{"-1", "1001"} {
		var ee *exitError
		if _, err := cs.cli(t, "list", "--limit", bad); !errors.As(err, &ee) || ee.code != 2 {
			t.Fatalf("list --limit %s: %v, want a usage error", bad, err)
		}
	}
}
