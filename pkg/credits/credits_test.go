package credits_test

import (
	"errors"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/credits"
)

// TestErrorUnwrap: a refusal metering answered with wraps the sentinel of
// its code, and only that one.
func TestErrorUnwrap(t *testing.T) {
	t.Parallel()
	sentinels := []error{credits.ErrInsufficientCredits, credits.ErrHoldClosed, credits.ErrNoPrice, credits.ErrInvalidRequest}
	for _, tc := range []struct {
		code string
		want error
	}{
		{credits.CodeInsufficientCredits, credits.ErrInsufficientCredits},
		{credits.CodeHoldClosed, credits.ErrHoldClosed},
		{credits.CodeNoPrice, credits.ErrNoPrice},
		{credits.CodeInvalidRequest, credits.ErrInvalidRequest},
		{credits.CodeInternal, nil},
	} {
		t.Run(tc.code, func(t *testing.T) {
			t.Parallel()
			err := error(&credits.Error{Code: tc.code, Detail: "d"})
			for _, s := range sentinels {
				if got := errors.Is(err, s); got != (s == tc.want) {
					t.Errorf("errors.Is(%v, %v) = %v", err, s, got)
				}
			}
			if !strings.Contains(err.Error(), tc.code) {
				t.Errorf("%q does not say its code", err.Error())
			}
		})
	}
}

// TestNoServerLinked: the contract builds without nats-server, so the
// gateway's HTTP types, the CLI and billing consumers that import it link
// no server.
func TestNoServerLinked(t *testing.T) {
	t.Parallel()
	// The go command that runs this test.
	out, err := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v: %s", err, out)
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, "github.com/nats-io/nats-server") || strings.HasPrefix(p, "github.com/sand-boxer/sandboxer/services/") {
			t.Errorf("pkg/credits depends on %s", p)
		}
	}
}
