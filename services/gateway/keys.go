package gateway

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/apikey"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// MaxKeyLifetime bounds the expires_in of a key.
const MaxKeyLifetime = 10 * 365 * 24 * time.Hour

// apiKey is the API view of a key at now: never its token.
func apiKey(k apikey.Key, now time.Time) api.APIKey {
	scopes := []string{}
	for _, s := range k.Grants() {
		scopes = append(scopes, string(s))
	}
	return api.APIKey{
		ID: k.ID, Consumer: k.Consumer, Scopes: scopes, Name: k.Name, CreatedAt: k.CreatedAt,
		ExpiresAt: k.ExpiresAt, Expired: k.Expired(now),
	}
}

// issueKey handles POST /v1/keys (admin): body api.KeyRequest, answer 201
// with the key and its token, shown this once.
func (g *Gateway) issueKey(w http.ResponseWriter, r *http.Request, _ caller) {
	var req api.KeyRequest
	if p := g.decodeBody(w, r, 64<<10, &req); p != nil {
		g.writeProblem(w, r, p)
		return
	}
	spec := apikey.Spec{Consumer: req.Consumer, Name: req.Name}
	var errs []extension.FieldError
	if err := event.CheckName("consumer", req.Consumer); err != nil {
		errs = append(errs, extension.FieldError{Field: "consumer", Detail: err.Error()})
	}
	for i, s := range req.Scopes {
		sc, err := apikey.ParseScope(s)
		if err != nil {
			errs = append(errs, extension.FieldError{Field: "scopes[" + strconv.Itoa(i) + "]", Detail: clipQuoted(err.Error(), s)})
			continue
		}
		spec.Scopes = append(spec.Scopes, sc)
	}
	if req.ExpiresIn != "" {
		d, err := time.ParseDuration(req.ExpiresIn)
		switch {
		case err != nil:
			errs = append(errs, extension.FieldError{Field: "expires_in", Detail: fmt.Sprintf("want a duration such as 720h, got %s", strconv.Quote(clip(req.ExpiresIn)))})
		case d <= 0 || d > MaxKeyLifetime:
			errs = append(errs, extension.FieldError{Field: "expires_in", Detail: fmt.Sprintf("want more than 0 and at most %s", MaxKeyLifetime)})
		default:
			spec.ExpiresAt = g.opts.Now().Add(d)
		}
	}
	if len(req.Name) > apikey.MaxNameLen {
		errs = append(errs, extension.FieldError{Field: "name", Detail: fmt.Sprintf("at most %d bytes", apikey.MaxNameLen)})
	}
	if len(errs) > 0 {
		g.writeProblem(w, r, newProblem(http.StatusUnprocessableEntity, "invalid key request", errs...))
		return
	}
	tok, k, err := g.store.IssueKey(r.Context(), spec)
	switch {
	case errors.Is(err, apikey.ErrInvalidSpec):
		// Every field but the name's characters was checked above.
		g.writeProblem(w, r, newProblem(http.StatusUnprocessableEntity, "invalid key request", extension.FieldError{Field: "name", Detail: err.Error()}))
		return
	case err != nil:
		g.log.Error("issuing api key", "err", err)
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "cannot issue api keys right now"))
		return
	}
	w.Header().Set("Location", "/v1/keys/"+k.ID)
	writeJSON(w, http.StatusCreated, api.IssuedKey{Token: tok, APIKey: apiKey(k, g.opts.Now())})
}

// listKeys handles GET /v1/keys[?consumer=] (admin): the keys, never their
// tokens.
func (g *Gateway) listKeys(w http.ResponseWriter, r *http.Request, _ caller) {
	q := r.URL.Query()
	if len(q["consumer"]) > 1 {
		g.writeProblem(w, r, newProblem(http.StatusBadRequest, "invalid query", extension.FieldError{Field: "consumer", Detail: "give it once"}))
		return
	}
	who := q.Get("consumer")
	if who != "" {
		if err := event.CheckName("consumer", who); err != nil {
			g.writeProblem(w, r, newProblem(http.StatusBadRequest, "invalid query", extension.FieldError{Field: "consumer", Detail: err.Error()}))
			return
		}
	}
	keys, err := g.store.List(r.Context(), who)
	if err != nil {
		g.log.Error("listing api keys", "err", err)
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "cannot list api keys right now"))
		return
	}
	out := api.KeyList{Keys: make([]api.APIKey, len(keys))}
	now := g.opts.Now()
	for i, k := range keys {
		out.Keys[i] = apiKey(k, now)
	}
	writeJSON(w, http.StatusOK, out)
}

// revokeKey handles DELETE /v1/keys/{id} (admin): the key stops working
// at once on this gateway, and within KeyCacheTTL on the others. The
// answer is the key revoked.
func (g *Gateway) revokeKey(w http.ResponseWriter, r *http.Request, _ caller) {
	id := r.PathValue("id")
	if !event.ValidName(id) {
		g.writeProblem(w, r, newProblem(http.StatusNotFound, "no such api key"))
		return
	}
	k, err := g.store.RevokeID(r.Context(), id)
	switch {
	case errors.Is(err, apikey.ErrUnknown):
		g.writeProblem(w, r, newProblem(http.StatusNotFound, "no such api key"))
		return
	case err != nil:
		g.log.Error("revoking api key", "key", id, "err", err)
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "cannot revoke api keys right now"))
		return
	}
	g.keys.forget(k.ID)
	writeJSON(w, http.StatusOK, apiKey(k, g.opts.Now()))
}
