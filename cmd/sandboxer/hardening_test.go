package main

import (
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/credits"
)

// TestHTTPServerLimits: the gateway's server bounds headers, the reading
// of a request and the writing of an answer (event streams lift the
// latter; reading is bounded until the body is read only), and idle
// connections.
func TestHTTPServerLimits(t *testing.T) {
	hs := newHTTPServer(http.NotFoundHandler())
	for name, d := range map[string]time.Duration{
		"ReadHeaderTimeout": hs.ReadHeaderTimeout, "ReadTimeout": hs.ReadTimeout,
		"WriteTimeout": hs.WriteTimeout, "IdleTimeout": hs.IdleTimeout,
	} {
		if d <= 0 {
			t.Errorf("%s is not set", name)
		}
	}
	if hs.ReadHeaderTimeout > hs.ReadTimeout || hs.MaxHeaderBytes <= 0 || hs.MaxHeaderBytes > 1<<20 {
		t.Errorf("server limits %+v", hs)
	}
}

// TestGrantOverflow: a grant that would take a balance beyond what an
// account holds is a 422 naming the limit, through the whole system, and
// the balance does not move.
func TestGrantOverflow(t *testing.T) {
	cs := startCreditsSystem(t, nil)
	ctx := testContext(t)
	if _, err := cs.admin.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: credits.MaxBalance, ID: "all"}); err != nil {
		t.Fatal(err)
	}
	_, err := cs.admin.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: 1, ID: "more"})
	var p *api.Problem
	if !asProblem(err, &p) || p.Status != http.StatusUnprocessableEntity || !strings.Contains(p.Detail, strconv.FormatInt(credits.MaxBalance, 10)) {
		t.Fatalf("a grant beyond the limit: %v, want 422 naming %d", err, credits.MaxBalance)
	}
	b, err := cs.admin.CreditBalance(ctx, "dev")
	if err != nil || b.Balance != credits.MaxBalance {
		t.Fatalf("balance %+v, %v; want %d", b, err, credits.MaxBalance)
	}
	out, err := cs.cli(t, "credits", "grant", "dev", "1")
	if api.StatusOf(err) != http.StatusUnprocessableEntity {
		t.Fatalf("credits grant beyond the limit: %v\n%s", err, out)
	}
}
