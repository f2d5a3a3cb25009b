package gateway

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// requestHash identifies a request's content for Idempotency-Key reuse.
// encoding/json writes map keys sorted, so equal requests hash equal.
func requestHash(req api.CreateRequest) string {
	b, _ := json.Marshal(req) // strings and maps of strings: cannot fail
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// idemRecord is the value of an Idempotency-Key in its bucket.
type idemRecord struct {
	SandboxID   string `json:"sandbox_id"`
	RequestHash string `json:"request_hash"`
}

// idemClaim is an Idempotency-Key this request wrote.
type idemClaim struct {
	kv  jetstream.KeyValue
	key string
	rev uint64
}

// release drops the claim, unless it changed since, so the key can be
// used again after a request that did not happen. A nil claim is a no-op.
func (c *idemClaim) release(ctx context.Context) {
	if c == nil {
		return
	}
	_ = c.kv.Delete(ctx, c.key, jetstream.LastRevision(c.rev))
}

// idemBucketKey is hex SHA-256 of consumer NUL key: keys are per consumer,
// and any header value maps to a valid bucket key.
func idemBucketKey(consumer, key string) string {
	sum := sha256.Sum256([]byte(consumer + "\x00" + key))
	return hex.EncodeToString(sum[:])
}

// claim records that key stands for sandbox id. When the key already
// stands for a sandbox, it returns that sandbox's record instead; for a
// different request, a 422. A concurrent request with the same key that
// has not recorded its sandbox yet is waited for, up to IdempotencyWait.
func (g *Gateway) claim(ctx context.Context, st *state, c caller, key, hash, id string) (*idemClaim, *sandbox.Record, *api.Problem) {
	k := idemBucketKey(c.Consumer, key)
	val, _ := json.Marshal(idemRecord{SandboxID: id, RequestHash: hash})
	deadline := time.Now().Add(g.opts.IdempotencyWait)
	const attempts = 3
	for range attempts {
		rev, err := st.idem.Create(ctx, k, val)
		if err == nil {
			return &idemClaim{kv: st.idem, key: k, rev: rev}, nil, nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			g.log.ErrorContext(ctx, "recording idempotency key", "err", err)
			return nil, nil, newProblem(http.StatusServiceUnavailable, "cannot record the Idempotency-Key right now")
		}
		rec, p := g.awaitIdempotent(ctx, st, k, hash, deadline)
		if p != nil || rec != nil {
			return nil, rec, p
		}
		// The other request gave the key up: try to claim it again.
	}
	return nil, nil, g.inProgress()
}

// awaitIdempotent waits for the sandbox an existing Idempotency-Key stands
// for to be recorded. It returns (nil, nil) when the key disappears.
func (g *Gateway) awaitIdempotent(ctx context.Context, st *state, k, hash string, deadline time.Time) (*sandbox.Record, *api.Problem) {
	const poll = 25 * time.Millisecond
	for {
		e, err := st.idem.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil, nil
		}
		if err != nil {
			g.log.ErrorContext(ctx, "reading idempotency key", "err", err)
			return nil, newProblem(http.StatusServiceUnavailable, "cannot read the Idempotency-Key right now")
		}
		var ir idemRecord
		if err := json.Unmarshal(e.Value(), &ir); err != nil {
			return nil, newProblem(http.StatusInternalServerError, "undecodable Idempotency-Key record")
		}
		if ir.RequestHash != hash {
			return nil, newProblem(http.StatusUnprocessableEntity, "idempotency key reused with a different request",
				extension.FieldError{Field: "header." + api.HeaderIdempotencyKey, Detail: "already used for a different request"})
		}
		rec, _, err := getRecord(ctx, st, ir.SandboxID)
		if err != nil && !errors.Is(err, errNotFound) {
			g.log.ErrorContext(ctx, "reading sandbox", "sandbox", ir.SandboxID, "err", err)
			return nil, newProblem(http.StatusServiceUnavailable, "cannot read sandboxes right now")
		}
		if rec != nil {
			return rec, nil
		}
		// A key older than any request's writes whose sandbox has no
		// record was abandoned: its request ended (or its gateway died)
		// before recording the sandbox, and so before publishing a
		// command, which follows the record. It is taken over: deleted at
		// the revision read, then claimed again by the caller.
		if time.Since(e.Created()) > g.abandonedAfter() {
			err := st.idem.Delete(ctx, k, jetstream.LastRevision(e.Revision()))
			switch {
			case err == nil:
				g.log.WarnContext(ctx, "taking over an abandoned Idempotency-Key", "sandbox", ir.SandboxID, "claimed", e.Created())
				return nil, nil
			case errors.Is(err, jetstream.ErrKeyRevisionMismatch):
				// Another request took it over first: read it again.
				continue
			default:
				g.log.ErrorContext(ctx, "taking over an Idempotency-Key", "err", err)
				return nil, newProblem(http.StatusServiceUnavailable, "cannot record the Idempotency-Key right now")
			}
		}
		if !time.Now().Add(poll).Before(deadline) {
			return nil, g.inProgress()
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, g.inProgress()
		case <-t.C:
		}
	}
}

// abandonedAfter is how old an Idempotency-Key with no recorded sandbox
// must be to be abandoned: twice the bound of a request's writes
// (WriteTimeout), which the request that claimed it cannot outlast.
func (g *Gateway) abandonedAfter() time.Duration { return 2 * g.opts.WriteTimeout }

func (g *Gateway) inProgress() *api.Problem {
	return newProblem(http.StatusConflict, "a request with this Idempotency-Key is still in progress; retry later")
}
