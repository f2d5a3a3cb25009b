package metering_test

import (
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/services/metering"
)

// TestGrantBeyondMaxBalance: a grant that would take a balance beyond
// MaxBalance is refused as an invalid request naming the limit, and
// changes nothing: the balance never wraps around.
func TestGrantBeyondMaxBalance(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{})
	ctx := testCtx(t)
	const c = "rich"
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: c, Amount: credits.MaxBalance - 1, ID: "most"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: c, Amount: 1, ID: "last"}); err != nil {
		t.Fatalf("a grant up to MaxBalance: %v", err)
	}
	for _, amount := range []int64{1, credits.MaxBalance} {
		_, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: c, Amount: amount})
		if !errors.Is(err, credits.ErrInvalidRequest) || !strings.Contains(err.Error(), strconv.FormatInt(credits.MaxBalance, 10)) {
			t.Fatalf("a grant of %d beyond MaxBalance: %v, want an invalid request naming %d", amount, err, credits.MaxBalance)
		}
	}
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: c, Amount: credits.MaxBalance + 1}); !errors.Is(err, credits.ErrInvalidRequest) {
		t.Fatalf("a grant larger than MaxBalance: %v", err)
	}
	s := e.snap(t, c)
	checkInvariants(t, s)
	if s.acct.Balance != credits.MaxBalance || len(s.entries) != 2 {
		t.Fatalf("balance %d in %d entries, want %d in 2", s.acct.Balance, len(s.entries), credits.MaxBalance)
	}
}
