package extension_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/composessh"
	"github.com/sand-boxer/sandboxer/pkg/extension/conformance"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
	"github.com/sand-boxer/sandboxer/pkg/extension/saasstub"
	"github.com/sand-boxer/sandboxer/pkg/extension/vmpacker"
)

// TestShippedBackendsList: every backend this repository ships says what
// it holds, so the orphan reconciler covers each of them.
func TestShippedBackendsList(t *testing.T) {
	t.Parallel()
	for _, info := range []extension.Info{local.Info, composessh.Info, vmpacker.Info, saasstub.Info, echo.Info} {
		if _, ok := info.New().(extension.Lister); !ok {
			t.Errorf("backend %s is not an extension.Lister", info.Handler)
		}
	}
}

// notLister is echo without its List: a backend with only the three
// methods.
type notLister struct{ e *echo.Echo }

func (n notLister) Provision(ctx context.Context, p extension.Profile, in extension.Inputs, host string) (extension.Handle, error) {
	return n.e.Provision(ctx, p, in, host)
}

func (n notLister) WaitReady(ctx context.Context, h extension.Handle) (extension.Reachability, error) {
	return n.e.WaitReady(ctx, h)
}

func (n notLister) Teardown(ctx context.Context, h extension.Handle) (extension.CleanupReport, error) {
	return n.e.Teardown(ctx, h)
}

// TestConformanceOfNonLister: a backend without the optional interface
// passes the suite; the Lister case skips it.
func TestConformanceOfNonLister(t *testing.T) {
	t.Parallel()
	conformance.Run(t, conformance.Harness{
		New:     func(t *testing.T) extension.Extension { return notLister{echo.New()} },
		Profile: extension.Profile{Slug: "echo", Extension: "echo"},
		Host:    "localhost",
		Instances: func(t *testing.T, ext extension.Extension, id string) int {
			return ext.(notLister).e.Instances(id)
		},
	})
}

// A provisioner finds the optional interface by type assertion and tears
// down what no live record owns.
func ExampleLister() {
	ctx := context.Background()
	var ext extension.Extension = echo.New()
	if _, err := ext.Provision(ctx, extension.Profile{}, extension.Inputs{extension.InputSandboxID: "sbx-1"}, ""); err != nil {
		fmt.Println(err)
		return
	}
	l, ok := ext.(extension.Lister)
	if !ok {
		return // the backend cannot say what it holds
	}
	held, err := l.List(ctx)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, h := range held {
		fmt.Println(h.Handle.SandboxID, h.Handle.Host, h.Resources)
		rep, _ := ext.Teardown(ctx, h.Handle)
		fmt.Println("removed", rep.Removed)
	}
	// Output:
	// sbx-1 localhost [echo:sbx-1]
	// removed [echo:sbx-1]
}
