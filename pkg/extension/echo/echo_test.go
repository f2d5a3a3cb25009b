package echo_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/conformance"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
)

func TestConformance(t *testing.T) {
	conformance.Run(t, conformance.Harness{
		New:     func(t *testing.T) extension.Extension { return echo.New() },
		Profile: extension.Profile{Slug: "echo", Extension: "echo"},
		Host:    "localhost",
		Instances: func(t *testing.T, ext extension.Extension, id string) int {
			return ext.(*echo.Echo).Instances(id)
		},
	})
}

const delayed = `name: echo
handler: echo
capabilities:
  isolation_levels: [process]
  pricing_model: self-hosted
config:
  delay: 1h
`

// TestConfigDelay: config.delay holds every Provision until its context
// ends; a request's delay input wins over it.
func TestConfigDelay(t *testing.T) {
	t.Parallel()
	m, ps := extension.ParseManifest("ext.echo.yaml", []byte(delayed))
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	reg := extension.NewRegistry(echo.Info)
	ext, err := reg.Open(context.Background(), m, extension.Env{})
	if err != nil {
		t.Fatal(err)
	}
	if ps := ext.(extension.ManifestChecker).CheckManifest(m); ps != nil {
		t.Fatalf("CheckManifest: %v", ps)
	}
	in := extension.Inputs{extension.InputSandboxID: "sbx-delayed"}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := ext.Provision(ctx, extension.Profile{}, in, "")
		done <- err
	}()
	cancel() // however soon: the hour never passes
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Provision with an hour's delay, cancelled: %v, want context.Canceled", err)
	}
	in = extension.Inputs{extension.InputSandboxID: "sbx-at-once", "delay": "0s"}
	if _, err := ext.Provision(context.Background(), extension.Profile{}, in, ""); err != nil {
		t.Fatalf("Provision with delay input 0s: %v", err)
	}
}

func TestConfigDecodedStrictly(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, config, path, msg string
	}{
		{"unknown key", "config:\n  delay: 1s\n  colour: red\n", "config.colour", `unknown field "colour"`},
		{"not a duration", "config:\n  delay: soon\n", "config.delay", `invalid duration "soon"`},
		{"negative", "config:\n  delay: -1s\n", "config.delay", "must not be negative"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			head, _, _ := strings.Cut(delayed, "config:")
			m, ps := extension.ParseManifest("ext.echo.yaml", []byte(head+tc.config))
			if len(ps) > 0 {
				t.Fatal(ps)
			}
			got := echo.New().CheckManifest(m)
			if len(got) != 1 || got[0].Path != tc.path || !strings.Contains(got[0].Message, tc.msg) {
				t.Fatalf("CheckManifest = %v, want one problem at %s saying %q", got, tc.path, tc.msg)
			}
			if _, err := extension.NewRegistry(echo.Info).Open(context.Background(), m, extension.Env{}); err == nil {
				t.Error("Open configured a backend from a bad config")
			}
		})
	}
}

// TestFailTeardown: a sandbox provisioned with fail_teardown n fails its
// first n teardowns, then is torn down; one without it at once.
func TestFailTeardown(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	e := echo.New()
	if ferrs := func() extension.FieldErrors {
		_, fe := echo.Manifest("echo").ValidateInputs(nil, map[string]string{"fail_teardown": "101"})
		return fe
	}(); ferrs == nil {
		t.Error("fail_teardown 101 validated, want at most 100")
	}
	h, err := e.Provision(ctx, extension.Profile{}, extension.Inputs{extension.InputSandboxID: "sbx-stubborn", "fail_teardown": "2"}, "")
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 2; i++ {
		if _, err := e.Teardown(ctx, h); err == nil {
			t.Fatalf("teardown %d succeeded, want it to fail", i)
		}
		if got := e.FailedTeardowns("sbx-stubborn"); got != i {
			t.Errorf("after teardown %d: %d failed", i, got)
		}
		if e.Instances("sbx-stubborn") != 1 {
			t.Fatalf("a failed teardown removed the sandbox")
		}
	}
	rep, err := e.Teardown(ctx, h)
	if err != nil || len(rep.Removed) != 1 || e.Instances("sbx-stubborn") != 0 || e.FailedTeardowns("sbx-stubborn") != 0 {
		t.Fatalf("third teardown: %+v, %v; instances %d", rep, err, e.Instances("sbx-stubborn"))
	}
	plain, err := e.Provision(ctx, extension.Profile{}, extension.Inputs{extension.InputSandboxID: "sbx-plain"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Teardown(ctx, plain); err != nil {
		t.Fatalf("teardown without fail_teardown: %v", err)
	}
}
