package gateway

import (
	"encoding/json"
	"fmt"
	"net/http"
	"runtime/debug"
	"strconv"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/apikey"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/services/gateway/console"
	"github.com/sand-boxer/sandboxer/services/gateway/openapi"
)

// routes builds the API. Every path also has a method-less fallback, so a
// wrong method gets a 405 problem rather than the mux's plain text.
func (g *Gateway) routes() http.Handler { return g.serve(g.mux().ServeMux) }

// mux registers every route of the API on a new mux, which remembers the
// patterns (the OpenAPI document has an operation for each: a test checks).
func (g *Gateway) mux() *routeMux {
	// The scope each endpoint needs (apikey.Scope): admin keys have
	// every one.
	const (
		read    = apikey.ScopeRead
		create  = apikey.ScopeCreate
		destroy = apikey.ScopeDestroy
		credits = apikey.ScopeCredits
		admin   = apikey.ScopeAdmin
	)
	mux := &routeMux{ServeMux: http.NewServeMux()}
	paths := []struct {
		path    string
		methods map[string]http.Handler
	}{
		{"/healthz", map[string]http.Handler{"GET": http.HandlerFunc(g.healthz)}},
		{"/readyz", map[string]http.Handler{"GET": http.HandlerFunc(g.readyz)}},
		{"/metrics", map[string]http.Handler{"GET": http.HandlerFunc(g.serveMetrics)}}, // Prometheus, public
		{"/v1/sandboxes", map[string]http.Handler{"POST": g.authed(create, g.create), "GET": g.authed(read, g.list)}},
		{"/v1/sandboxes/{id}", map[string]http.Handler{"GET": g.authed(read, g.get), "DELETE": g.authed(destroy, g.destroy)}},
		{"/v1/sandboxes/{id}/events", map[string]http.Handler{"GET": g.authed(read, g.events)}},
		{"/v1/profiles", map[string]http.Handler{"GET": g.authed(read, g.profiles)}},
		{"/v1/extensions", map[string]http.Handler{"GET": g.authed(read, g.extensions)}},
		{"/v1/credits/balance", map[string]http.Handler{"GET": g.authed(credits, g.creditBalance)}},
		{"/v1/credits/grants", map[string]http.Handler{"POST": g.authed(admin, g.creditGrant)}},
		{"/v1/credits/ledger", map[string]http.Handler{"GET": g.authed(credits, g.creditLedger)}},
		{"/v1/credits/usage", map[string]http.Handler{"GET": g.authed(credits, g.creditUsage)}},
		{"/v1/workers", map[string]http.Handler{"GET": g.authed(read, g.workerPools)}},
		{"/v1/keys", map[string]http.Handler{"POST": g.authed(admin, g.issueKey), "GET": g.authed(admin, g.listKeys)}},
		{"/v1/keys/{id}", map[string]http.Handler{"DELETE": g.authed(admin, g.revokeKey)}},
		{openapi.Path, map[string]http.Handler{"GET": openapi.Handler()}}, // the API's OpenAPI document, public
	}
	for _, p := range paths {
		allow := ""
		for _, m := range []string{"GET", "POST", "DELETE"} {
			h, ok := p.methods[m]
			if !ok {
				continue
			}
			mux.Handle(m+" "+p.path, h)
			if allow != "" {
				allow += ", "
			}
			allow += m
			if m == "GET" {
				allow += ", HEAD"
			}
		}
		mux.HandleFunc(p.path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			g.writeProblem(w, r, newProblem(http.StatusMethodNotAllowed, r.Method+" is not allowed here (allowed: "+allow+")"))
		})
	}
	mux.Handle(console.Prefix, console.Handler()) // the web console: public assets, every API call with the user's key
	mux.Handle(console.Prefix+"/", console.Handler())
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		g.writeProblem(w, r, newProblem(http.StatusNotFound, "no such endpoint"))
	})
	return mux
}

// routeMux is a ServeMux that remembers its patterns, in the order they
// were registered.
type routeMux struct {
	*http.ServeMux
	patterns []string
}

func (m *routeMux) Handle(pattern string, h http.Handler) {
	m.ServeMux.Handle(pattern, h)
	m.patterns = append(m.patterns, pattern)
}

func (m *routeMux) HandleFunc(pattern string, h func(http.ResponseWriter, *http.Request)) {
	m.Handle(pattern, http.HandlerFunc(h))
}

// serve wraps every request in an OpenTelemetry server span (continuing a
// trace the client propagated) and turns a panic into a 500 problem.
func (g *Gateway) serve(mux *http.ServeMux) http.Handler {
	prop := otel.GetTextMapPropagator
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := prop().Extract(r.Context(), propagation.HeaderCarrier(r.Header))
		ctx, span := g.tracer.Start(ctx, r.Method,
			trace.WithSpanKind(trace.SpanKindServer),
			trace.WithAttributes(
				attribute.String("http.request.method", r.Method),
				attribute.String("url.path", r.URL.Path),
			))
		defer span.End()
		sw := &statusWriter{ResponseWriter: w}
		r = r.WithContext(ctx)
		defer g.countRequest(r, sw, time.Now()) // after the recovery below has answered
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				g.log.ErrorContext(r.Context(), "handler panicked", "path", r.URL.Path, "panic", p, "stack", string(debug.Stack()))
				span.SetStatus(codes.Error, fmt.Sprint(p))
				if sw.status == 0 {
					g.writeProblem(sw, r, newProblem(http.StatusInternalServerError, "internal error"))
				}
			}
		}()
		mux.ServeHTTP(sw, r)
		if r.Pattern != "" {
			span.SetName(r.Pattern)
			span.SetAttributes(attribute.String("http.route", r.Pattern))
		}
		status := sw.status
		if status == 0 {
			status = http.StatusOK
		}
		span.SetAttributes(attribute.Int("http.response.status_code", status))
		if status >= 500 {
			span.SetStatus(codes.Error, http.StatusText(status))
		}
	})
}

// statusWriter records the status of a response. It unwraps for
// http.ResponseController, so event streams can flush through it.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (s *statusWriter) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// Bounds of what a problem quotes: whatever of a request its detail or a
// field error repeats is cut there, so an answer never echoes a large
// input whole (each check clips the values it quotes; this is the net).
const (
	maxProblemDetail = 1024
	maxProblemField  = 128
)

// newProblem returns a problem with the standard title of status, its
// detail and field errors clipped.
func newProblem(status int, detail string, errs ...extension.FieldError) *api.Problem {
	for i := range errs {
		errs[i].Field = clipTo(errs[i].Field, maxProblemField)
		errs[i].Detail = clipTo(errs[i].Detail, maxProblemDetail)
	}
	return &api.Problem{Title: http.StatusText(status), Status: status, Detail: clipTo(detail, maxProblemDetail), Errors: errs}
}

// writeProblem answers with p as application/problem+json. A 503 carries
// Retry-After; a 401 carries the Bearer challenge.
func (g *Gateway) writeProblem(w http.ResponseWriter, r *http.Request, p *api.Problem) {
	h := w.Header()
	h.Set("Content-Type", api.ContentTypeProblem)
	h.Set("Cache-Control", "no-store")
	switch p.Status {
	case http.StatusServiceUnavailable:
		h.Set("Retry-After", strconv.Itoa(max(1, int(g.opts.RetryAfter.Seconds()))))
	case http.StatusUnauthorized:
		h.Set("WWW-Authenticate", `Bearer realm="sandboxer"`)
	}
	if p.Status >= 500 {
		g.log.WarnContext(r.Context(), "request failed", "method", r.Method, "path", r.URL.Path, "status", p.Status, "detail", p.Detail)
	}
	w.WriteHeader(p.Status)
	_ = json.NewEncoder(w).Encode(p)
}

// writeJSON answers with v as application/json.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// profiles lists the catalog's profiles. Only admins see where they were
// loaded from and the backend configuration they carry.
func (g *Gateway) profiles(w http.ResponseWriter, _ *http.Request, c caller) {
	list := g.opts.Catalog.Current().ProfileList()
	if !c.admin() {
		for i, p := range list {
			cp := *p
			cp.File, cp.Config = "", extension.Config{}
			list[i] = &cp
		}
	}
	writeJSON(w, http.StatusOK, api.ProfileList{Profiles: list})
}

// extensions lists the catalog's extensions. Only admins see where they
// were loaded from and the backend configuration they carry.
func (g *Gateway) extensions(w http.ResponseWriter, _ *http.Request, c caller) {
	list := g.opts.Catalog.Current().ExtensionList()
	if !c.admin() {
		for i, m := range list {
			cp := *m
			cp.File, cp.Config = "", extension.Config{}
			list[i] = &cp
		}
	}
	writeJSON(w, http.StatusOK, api.ExtensionList{Extensions: list})
}
