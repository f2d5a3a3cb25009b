package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/pkg/workers"
)

// CatalogRequest is the body of a catalog request. It has no fields yet:
// an empty body or {} asks for the whole catalog.
type CatalogRequest struct{}

// WorkersRequest is the body of a workers request. An empty body asks for
// every worker.
type WorkersRequest struct {
	// Extension, when set, keeps only that extension's workers.
	Extension string `json:"extension,omitempty"`
}

// WorkersReply answers a workers request.
type WorkersReply struct {
	// Workers are the live workers, sorted by extension then worker.
	Workers []workers.Heartbeat `json:"workers"`
}

// SandboxesRequest is the body of a sandboxes request: a page of the
// registry's index, in id order. Empty fields match everything.
type SandboxesRequest struct {
	// ID, when set, asks for that one sandbox.
	ID string `json:"id,omitempty"`
	// Consumer keeps only that consumer's sandboxes.
	Consumer string `json:"consumer,omitempty"`
	// State keeps only the sandboxes in that state.
	State event.State `json:"state,omitempty"`
	// After starts the page after that id.
	After string `json:"after,omitempty"`
	// Limit bounds the page: default and most [MaxSandboxesPage].
	Limit int `json:"limit,omitempty"`
}

// MaxSandboxesPage is the most sandboxes one answer holds.
const MaxSandboxesPage = 1000

// SandboxesReply answers a sandboxes request.
type SandboxesReply struct {
	// Sandboxes are the records, in id order.
	Sandboxes []*sandbox.Record `json:"sandboxes"`
	// Next is the After of the next page; empty on the last.
	Next string `json:"next,omitempty"`
}

// serve starts the micro service answering catalog and worker requests.
// Every registry instance joins the same queue group, so each request gets
// one answer.
func (r *Registry) serve() (micro.Service, error) {
	svc, err := micro.AddService(r.opts.NC, micro.Config{
		Name:        ServiceName,
		Version:     ServiceVersion,
		Description: "sand-boxer catalog, worker liveness and the index of sandboxes",
		ErrorHandler: func(_ micro.Service, err *micro.NATSError) {
			r.log.Warn("request service error", "subject", err.Subject, "err", err.Description)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("starting request service: %w", err)
	}
	for _, ep := range []struct {
		name, subject string
		h             micro.HandlerFunc
	}{
		{"catalog", event.SubjectCatalog, r.handleCatalog},
		{"workers", event.SubjectWorkers, r.handleWorkers},
		{"sandboxes", event.SubjectSandboxes, r.handleSandboxes},
	} {
		if err := svc.AddEndpoint(ep.name, ep.h, micro.WithEndpointSubject(ep.subject)); err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("adding endpoint %s: %w", ep.name, err)
		}
	}
	return svc, nil
}

// handleCatalog answers with the catalog loaded at start, as JSON
// ([extension.Catalog]).
func (r *Registry) handleCatalog(req micro.Request) {
	_, span := bus.StartAnswer(context.Background(), req.Subject(), nats.Header(req.Headers()))
	defer span.End()
	var body CatalogRequest
	if err := decodeRequest(req.Data(), &body); err != nil {
		_ = req.Error("400", err.Error(), nil)
		return
	}
	_ = req.Respond(r.catalogJSON)
}

// handleWorkers answers with the live workers ([WorkersReply]).
func (r *Registry) handleWorkers(req micro.Request) {
	_, span := bus.StartAnswer(context.Background(), req.Subject(), nats.Header(req.Headers()))
	defer span.End()
	var body WorkersRequest
	if err := decodeRequest(req.Data(), &body); err != nil {
		_ = req.Error("400", err.Error(), nil)
		return
	}
	if body.Extension != "" {
		if err := event.CheckName("extension name", body.Extension); err != nil {
			_ = req.Error("400", err.Error(), nil)
			return
		}
	}
	_ = req.RespondJSON(WorkersReply{Workers: r.workers.List(body.Extension)})
}

// handleSandboxes answers with a page of the index ([SandboxesReply]):
// the sandboxes it holds, but those that ended longer than the retention
// ago.
func (r *Registry) handleSandboxes(req micro.Request) {
	_, span := bus.StartAnswer(context.Background(), req.Subject(), nats.Header(req.Headers()))
	defer span.End()
	var body SandboxesRequest
	if err := decodeRequest(req.Data(), &body); err != nil {
		_ = req.Error("400", err.Error(), nil)
		return
	}
	if body.Limit <= 0 || body.Limit > MaxSandboxesPage {
		body.Limit = MaxSandboxesPage
	}
	now := time.Now()
	reply := SandboxesReply{Sandboxes: []*sandbox.Record{}}
	for _, rec := range r.index.all() {
		switch {
		case body.ID != "" && rec.ID != body.ID,
			body.Consumer != "" && rec.Consumer != body.Consumer,
			body.State != "" && rec.State != body.State,
			body.After != "" && rec.ID <= body.After,
			!rec.Listed(now, r.opts.Retention):
			continue
		}
		if len(reply.Sandboxes) == body.Limit {
			reply.Next = reply.Sandboxes[len(reply.Sandboxes)-1].ID
			break
		}
		reply.Sandboxes = append(reply.Sandboxes, rec)
	}
	_ = req.RespondJSON(reply)
}

// FetchSandboxes asks a running registry for a page of its index of
// sandboxes. ctx bounds the wait.
func FetchSandboxes(ctx context.Context, nc *nats.Conn, q SandboxesRequest) (*SandboxesReply, error) {
	reply, err := bus.Call[SandboxesReply](ctx, nc, event.SubjectSandboxes, q)
	if err != nil {
		return nil, fmt.Errorf("fetching sandboxes: %w", err)
	}
	return &reply, nil
}

// decodeRequest decodes a JSON request body strictly; an empty body is the
// zero request.
func decodeRequest(data []byte, v any) error {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decoding request: %w", err)
	}
	if dec.More() {
		return errors.New("decoding request: trailing content")
	}
	return nil
}

// FetchCatalog asks a running registry for its catalog over NATS
// request-reply. ctx must carry a deadline or be cancellable: it bounds
// the wait for an answer.
func FetchCatalog(ctx context.Context, nc *nats.Conn) (*extension.Catalog, error) {
	c, err := bus.Call[extension.Catalog](ctx, nc, event.SubjectCatalog, CatalogRequest{})
	if err != nil {
		return nil, fmt.Errorf("fetching catalog: %w", err)
	}
	return &c, nil
}

// FetchWorkers asks a running registry for the live workers, of one
// extension or of all when extension is empty. ctx bounds the wait.
func FetchWorkers(ctx context.Context, nc *nats.Conn, extension string) ([]workers.Heartbeat, error) {
	reply, err := bus.Call[WorkersReply](ctx, nc, event.SubjectWorkers, WorkersRequest{Extension: extension})
	if err != nil {
		return nil, fmt.Errorf("fetching workers: %w", err)
	}
	return reply.Workers, nil
}

// ServiceError is an error a registry answered a request with: a code
// ("400") and a description.
type ServiceError = bus.ServiceError
