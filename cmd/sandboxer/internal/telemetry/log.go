package telemetry

import (
	"context"
	"fmt"
	"io"
	"log/slog"

	"go.opentelemetry.io/otel/trace"
)

// Log formats of [NewLogger].
const (
	LogText = "text"
	LogJSON = "json"
)

// NewLogger returns a logger writing records at level and above to w, as
// logfmt-style text (format "text", slog's TextHandler) or one JSON
// object per line ("json", slog's JSONHandler). Every record logged with
// a context whose span is valid carries that span's trace_id and span_id
// ([TraceHandler]).
func NewLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: l}
	var h slog.Handler
	switch format {
	case LogText, "":
		h = slog.NewTextHandler(w, opts)
	case LogJSON:
		h = slog.NewJSONHandler(w, opts)
	default:
		return nil, fmt.Errorf("log format %q: want %s or %s", format, LogText, LogJSON)
	}
	return slog.New(TraceHandler{h}), nil
}

// TraceHandler adds to every record logged with a context that carries a
// valid span the span's trace_id and span_id, so that a line can be found
// from its trace and a trace from its line. Log with the context of the
// work the line is about (log.InfoContext(ctx, ...)).
type TraceHandler struct{ slog.Handler }

// Handle adds the trace attributes and hands the record on.
func (h TraceHandler) Handle(ctx context.Context, r slog.Record) error {
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		r.AddAttrs(slog.String("trace_id", sc.TraceID().String()), slog.String("span_id", sc.SpanID().String()))
	}
	return h.Handler.Handle(ctx, r)
}

// WithAttrs keeps the trace attributes on the derived handler.
func (h TraceHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return TraceHandler{h.Handler.WithAttrs(attrs)}
}

// WithGroup keeps the trace attributes on the derived handler (inside
// the group).
func (h TraceHandler) WithGroup(name string) slog.Handler {
	return TraceHandler{h.Handler.WithGroup(name)}
}

var _ slog.Handler = TraceHandler{}
