// Package conformance is the test suite every extension passes. An
// extension's tests call [Run] with a way to make a configured backend and
// a way to see what exists of a sandbox on the backend, so every assertion
// is about the real backend, not about what the code under test says.
// Cases for an optional interface ([extension.Lister]) skip a backend
// that does not implement it.
package conformance

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// Open checks m with the backend of info as the catalog does at start-up,
// opens it as a provisioner does (with a temporary data directory), and
// closes it in t.Cleanup: the New of a [Harness], or a backend for any
// other test.
func Open(t testing.TB, info extension.Info, m *extension.Manifest) extension.Extension {
	t.Helper()
	reg := extension.NewRegistry(info)
	if ps := (&extension.Catalog{Extensions: map[string]*extension.Manifest{m.Name: m}}).Check(reg); len(ps) > 0 {
		t.Fatalf("manifest %s: %v", m.Name, ps)
	}
	ext, err := reg.Open(context.Background(), m, extension.Env{DataDir: t.TempDir()})
	if err != nil {
		t.Fatalf("opening %s: %v", m.Name, err)
	}
	t.Cleanup(func() { _ = extension.Close(ext) })
	return ext
}

// Harness adapts one backend to the suite.
type Harness struct {
	// New returns a configured backend. It is called once per subtest.
	New func(t *testing.T) extension.Extension
	// Profile and Inputs make a sandbox that must become ready. The suite
	// sets the sandbox_id input itself.
	Profile extension.Profile
	Inputs  extension.Inputs
	// Host is passed to Provision.
	Host string
	// Instances counts what exists of a sandbox on the backend (directories,
	// containers, records), observed independently of the backend's own
	// answers where possible.
	Instances func(t *testing.T, ext extension.Extension, sandboxID string) int
	// Timeout bounds each call. Default 2 minutes.
	Timeout time.Duration
}

// NewSandboxID returns a fresh, valid sandbox id for tests.
func NewSandboxID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "conf-" + hex.EncodeToString(b)
}

func (h Harness) inputs(id string) extension.Inputs {
	in := extension.Inputs{}
	for k, v := range h.Inputs {
		in[k] = v
	}
	in[extension.InputSandboxID] = id
	return in
}

func (h Harness) ctx(t *testing.T) context.Context {
	d := h.Timeout
	if d <= 0 {
		d = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// Run runs the suite.
func Run(t *testing.T, h Harness) {
	t.Run("ProvisionReadyTeardown", func(t *testing.T) { provisionReadyTeardown(t, h) })
	t.Run("ProvisionTwiceIsOneSandbox", func(t *testing.T) { provisionTwice(t, h) })
	t.Run("ConcurrentProvisionIsOneSandbox", func(t *testing.T) { concurrentProvision(t, h) })
	t.Run("TeardownOfPartialHandle", func(t *testing.T) { teardownPartial(t, h) })
	t.Run("TeardownTwice", func(t *testing.T) { teardownTwice(t, h) })
	t.Run("CancelledProvision", func(t *testing.T) { cancelled(t, h) })
	t.Run("ListHoldsWhatItMade", func(t *testing.T) { list(t, h) })
}

func provisionReadyTeardown(t *testing.T, h Harness) {
	ext := h.New(t)
	ctx := h.ctx(t)
	id := NewSandboxID()
	hd, err := ext.Provision(ctx, h.Profile, h.inputs(id), h.Host)
	if err != nil {
		t.Fatalf("Provision: %v", err)
	}
	t.Cleanup(func() { _, _ = ext.Teardown(context.Background(), hd) })
	if hd.SandboxID != id {
		t.Errorf("handle sandbox_id = %q, want %q", hd.SandboxID, id)
	}
	if hd.Host == "" {
		t.Error("handle host is empty")
	}
	r, err := ext.WaitReady(ctx, hd)
	if err != nil {
		t.Fatalf("WaitReady: %v", err)
	}
	if r.Host == "" {
		t.Error("reachability host is empty")
	}
	if n := h.Instances(t, ext, id); n != 1 {
		t.Fatalf("after ready, backend holds %d instances of the sandbox, want 1", n)
	}
	rep, err := ext.Teardown(ctx, hd)
	if err != nil {
		t.Fatalf("Teardown: %v", err)
	}
	if len(rep.Removed) == 0 || rep.AlreadyGone {
		t.Errorf("teardown report %+v lists nothing removed", rep)
	}
	if n := h.Instances(t, ext, id); n != 0 {
		t.Fatalf("after teardown, backend holds %d instances, want 0", n)
	}
}

func provisionTwice(t *testing.T, h Harness) {
	ext := h.New(t)
	ctx := h.ctx(t)
	id := NewSandboxID()
	first, err := ext.Provision(ctx, h.Profile, h.inputs(id), h.Host)
	if err != nil {
		t.Fatalf("first Provision: %v", err)
	}
	t.Cleanup(func() { _, _ = ext.Teardown(context.Background(), first) })
	second, err := ext.Provision(ctx, h.Profile, h.inputs(id), h.Host)
	if err != nil {
		t.Fatalf("second Provision: %v", err)
	}
	if first.SandboxID != second.SandboxID || first.Host != second.Host {
		t.Errorf("second Provision returned %+v, first %+v", second, first)
	}
	if n := h.Instances(t, ext, id); n != 1 {
		t.Fatalf("after two Provisions, backend holds %d instances, want 1", n)
	}
	if _, err := ext.WaitReady(ctx, second); err != nil {
		t.Fatalf("WaitReady after second Provision: %v", err)
	}
	if _, err := ext.Teardown(ctx, second); err != nil {
		t.Fatalf("Teardown: %v", err)
	}
	if n := h.Instances(t, ext, id); n != 0 {
		t.Fatalf("after teardown, backend holds %d instances, want 0", n)
	}
}

func concurrentProvision(t *testing.T, h Harness) {
	ext := h.New(t)
	ctx := h.ctx(t)
	id := NewSandboxID()
	const n = 3
	var (
		wg      sync.WaitGroup
		handles [n]extension.Handle
		errs    [n]error
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			handles[i], errs[i] = ext.Provision(ctx, h.Profile, h.inputs(id), h.Host)
		}()
	}
	wg.Wait()
	t.Cleanup(func() { _, _ = ext.Teardown(context.Background(), handles[0]) })
	ok := 0
	for i := range n {
		if errs[i] == nil {
			ok++
		}
	}
	if ok == 0 {
		t.Fatalf("no concurrent Provision succeeded: %v", errs)
	}
	// A loser may fail, but a retry must find the winner's sandbox.
	hd, err := ext.Provision(ctx, h.Profile, h.inputs(id), h.Host)
	if err != nil {
		t.Fatalf("Provision after concurrent ones: %v", err)
	}
	if _, err := ext.WaitReady(ctx, hd); err != nil {
		t.Fatalf("WaitReady: %v", err)
	}
	if got := h.Instances(t, ext, id); got != 1 {
		t.Fatalf("after %d concurrent Provisions, backend holds %d instances, want 1", n, got)
	}
	if _, err := ext.Teardown(ctx, hd); err != nil {
		t.Fatalf("Teardown: %v", err)
	}
	if got := h.Instances(t, ext, id); got != 0 {
		t.Fatalf("after teardown, backend holds %d instances, want 0", got)
	}
}

func teardownPartial(t *testing.T, h Harness) {
	ext := h.New(t)
	ctx := h.ctx(t)
	id := NewSandboxID()
	host := h.Host
	if host == "" {
		host = "localhost"
	}
	// A handle for a sandbox that was never made: what a worker has when a
	// destroy arrives for a create that failed before Provision returned.
	rep, err := ext.Teardown(ctx, extension.Handle{SandboxID: id, Host: host})
	if err != nil {
		t.Fatalf("Teardown of a never-provisioned handle: %v", err)
	}
	if len(rep.Removed) != 0 {
		t.Errorf("teardown of nothing removed %v", rep.Removed)
	}
	// A handle that lost its extension data: Teardown must still find
	// the sandbox by id and host.
	full, err := ext.Provision(ctx, h.Profile, h.inputs(id), h.Host)
	if err != nil {
		t.Fatalf("Provision: %v", err)
	}
	t.Cleanup(func() { _, _ = ext.Teardown(context.Background(), full) })
	if _, err := ext.Teardown(ctx, extension.Handle{SandboxID: full.SandboxID, Host: full.Host}); err != nil {
		t.Fatalf("Teardown with a partial handle: %v", err)
	}
	if n := h.Instances(t, ext, id); n != 0 {
		t.Fatalf("after teardown with a partial handle, backend holds %d instances, want 0", n)
	}
}

func teardownTwice(t *testing.T, h Harness) {
	ext := h.New(t)
	ctx := h.ctx(t)
	id := NewSandboxID()
	hd, err := ext.Provision(ctx, h.Profile, h.inputs(id), h.Host)
	if err != nil {
		t.Fatalf("Provision: %v", err)
	}
	if _, err := ext.Teardown(ctx, hd); err != nil {
		t.Fatalf("first Teardown: %v", err)
	}
	rep, err := ext.Teardown(ctx, hd)
	if err != nil {
		t.Fatalf("second Teardown of an already-removed sandbox: %v", err)
	}
	if len(rep.Removed) != 0 {
		t.Errorf("second teardown removed %v again", rep.Removed)
	}
}

func cancelled(t *testing.T, h Harness) {
	ext := h.New(t)
	id := NewSandboxID()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	hd, err := ext.Provision(ctx, h.Profile, h.inputs(id), h.Host)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Provision with a cancelled context returned %v, want context.Canceled", err)
	}
	if hd.SandboxID == "" {
		hd = extension.Handle{SandboxID: id, Host: h.Host}
	}
	if _, err := ext.WaitReady(ctx, hd); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitReady with a cancelled context returned %v, want context.Canceled", err)
	}
	if _, err := ext.Teardown(ctx, hd); !errors.Is(err, context.Canceled) {
		t.Errorf("Teardown with a cancelled context returned %v, want context.Canceled", err)
	}
	live := h.ctx(t)
	if _, err := ext.Teardown(live, hd); err != nil {
		t.Fatalf("Teardown after a cancelled Provision: %v", err)
	}
	if n := h.Instances(t, ext, id); n != 0 {
		t.Fatalf("after a cancelled Provision and teardown, backend holds %d instances, want 0", n)
	}
}

// list: a Lister lists a sandbox it made, once, on the host it was placed
// on, with a handle Teardown accepts; once torn down through that handle,
// the sandbox is gone from the backend and from the list.
func list(t *testing.T, h Harness) {
	ext := h.New(t)
	l, ok := ext.(extension.Lister)
	if !ok {
		t.Skipf("%T is not an extension.Lister", ext)
	}
	ctx := h.ctx(t)
	id := NewSandboxID()
	start := time.Now()
	hd, err := ext.Provision(ctx, h.Profile, h.inputs(id), h.Host)
	if err != nil {
		t.Fatalf("Provision: %v", err)
	}
	t.Cleanup(func() { _, _ = ext.Teardown(context.Background(), hd) })
	if _, err := ext.WaitReady(ctx, hd); err != nil {
		t.Fatalf("WaitReady: %v", err)
	}
	held := listed(ctx, t, l, id)
	if len(held) != 1 {
		t.Fatalf("List holds %d entries for the sandbox, want 1: %+v", len(held), held)
	}
	got := held[0]
	if got.Handle.Host != hd.Host {
		t.Errorf("List places the sandbox on %q, Provision on %q", got.Handle.Host, hd.Host)
	}
	if len(got.Resources) == 0 {
		t.Error("List names nothing the backend holds of the sandbox")
	}
	// Since is by the holding machine's clock (whole seconds, perhaps):
	// within a minute of this test's.
	if !got.Since.IsZero() && (got.Since.Before(start.Add(-time.Minute)) || got.Since.After(time.Now().Add(time.Minute))) {
		t.Errorf("List says the sandbox was made at %s; it was made after %s", got.Since, start)
	}
	rep, err := ext.Teardown(ctx, got.Handle)
	if err != nil {
		t.Fatalf("Teardown of the listed handle: %v", err)
	}
	if len(rep.Removed) == 0 {
		t.Errorf("teardown of the listed handle reports nothing removed: %+v", rep)
	}
	if n := h.Instances(t, ext, id); n != 0 {
		t.Fatalf("after teardown of the listed handle, backend holds %d instances, want 0", n)
	}
	if held := listed(ctx, t, l, id); len(held) != 0 {
		t.Fatalf("after teardown, List still holds %+v", held)
	}
	cctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.List(cctx); !errors.Is(err, context.Canceled) {
		t.Errorf("List with a cancelled context returned %v, want context.Canceled", err)
	}
}

// listed is what l lists of sandbox id; every entry must have a handle
// keyed by its sandbox and placed on a host.
func listed(ctx context.Context, t *testing.T, l extension.Lister, id string) []extension.Held {
	t.Helper()
	all, err := l.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	var out []extension.Held
	for _, hd := range all {
		if hd.Handle.SandboxID == "" || hd.Handle.Host == "" {
			t.Errorf("List returned a handle without sandbox id or host: %+v", hd)
		}
		if hd.Handle.SandboxID == id {
			out = append(out, hd)
		}
	}
	return out
}
