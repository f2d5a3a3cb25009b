//go:build e2e

package sshx_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/sand-boxer/sandboxer/pkg/sshx"
	"github.com/sand-boxer/sandboxer/pkg/sshx/sshtest"
)

// TestE2ESpanPerCommand: every remote command runs in a client span of
// its own, a child of the caller's, that names the program, the target
// and how it ended, and holds none of its arguments (which may carry
// credentials) nor anything it wrote.
func TestE2ESpanPerCommand(t *testing.T) {
	srv := sshtest.Start(t, sshtest.Options{})
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	prev := otel.GetTracerProvider()
	otel.SetTracerProvider(tp)
	t.Cleanup(func() {
		otel.SetTracerProvider(prev)
		_ = tp.Shutdown(context.Background())
	})

	var p sshx.Pool
	t.Cleanup(func() { _ = p.Close() })
	ctx, parent := tp.Tracer("test").Start(ctxFor(t, 30*time.Second), "caller")
	const secret = "hunter2-s3cr3t"
	if _, err := p.Run(ctx, srv.Config(), "true", "--token="+secret); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if _, err := p.Run(ctx, srv.Config(), "sh", "-c", "echo "+secret+" >&2; exit 3"); err == nil {
		t.Fatal("Run of a failing command: no error")
	}
	parent.End()

	var runs []sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		if strings.HasPrefix(s.Name(), "ssh ") {
			runs = append(runs, s)
		}
	}
	if len(runs) != 2 {
		t.Fatalf("%d ssh spans, want one per command", len(runs))
	}
	want := []struct {
		name   string
		exit   int64
		failed bool
	}{{"ssh true", 0, false}, {"ssh sh", 3, true}}
	for i, s := range runs {
		w := want[i]
		if s.Name() != w.name || s.Parent().SpanID() != parent.SpanContext().SpanID() {
			t.Errorf("span %d: %q, parent %s; want %q under the caller's", i, s.Name(), s.Parent().SpanID(), w.name)
		}
		attrs := map[string]string{}
		for _, kv := range s.Attributes() {
			attrs[string(kv.Key)] = kv.Value.Emit()
		}
		if attrs["process.exit.code"] != itoa(int(w.exit)) || attrs["server.address"] != srv.Config().Target.Host {
			t.Errorf("%s: attributes %v, want exit code %d and the target", s.Name(), attrs, w.exit)
		}
		if (s.Status().Code == codes.Error) != w.failed {
			t.Errorf("%s: status %v", s.Name(), s.Status())
		}
		for k, v := range attrs {
			if strings.Contains(v, secret) {
				t.Errorf("%s: attribute %s holds an argument: %q", s.Name(), k, v)
			}
		}
		if strings.Contains(s.Status().Description, secret) || len(s.Events()) > 0 {
			t.Errorf("%s: status %q, events %v: what the command wrote is in the span", s.Name(), s.Status().Description, s.Events())
		}
	}
}
