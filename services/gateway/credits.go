package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// Credits is what the credits API (/v1/credits/...) reads and writes: the
// metering service's accounts, behind its client. The gateway checks who
// may ask for what; Credits only answers.
//
// An error wrapping [ErrInvalidRequest] is answered 422 with its message;
// any other error 503.
type Credits interface {
	// Balance returns consumer's account.
	Balance(ctx context.Context, consumer string) (api.CreditBalance, error)
	// Grant adds credit to r.Consumer's account.
	Grant(ctx context.Context, r api.GrantRequest) (api.GrantResult, error)
	// Ledger returns every ledger entry q selects; q.Consumer is set.
	Ledger(ctx context.Context, q api.LedgerQuery) (api.Ledger, error)
	// Usage returns the usage records q selects; an empty q.Consumer
	// means every consumer's.
	Usage(ctx context.Context, q api.UsageQuery) (api.UsageList, error)
}

// ErrInvalidRequest is wrapped by a [Credits] backend that refuses a
// request as malformed. The gateway answers 422 with the error's message.
// It is the credits contract's [credits.ErrInvalidRequest], which
// metering's refusals wrap.
var ErrInvalidRequest = credits.ErrInvalidRequest

// creditsBackend returns the Credits option, or answers 503 and nil.
func (g *Gateway) creditsBackend(w http.ResponseWriter, r *http.Request) Credits {
	if g.opts.Credits == nil {
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "credits are not served by this gateway"))
		return nil
	}
	return g.opts.Credits
}

// creditsFailed answers an error of the Credits backend.
func (g *Gateway) creditsFailed(w http.ResponseWriter, r *http.Request, what string, err error) {
	if errors.Is(err, ErrInvalidRequest) {
		g.writeProblem(w, r, newProblem(http.StatusUnprocessableEntity, err.Error()))
		return
	}
	g.log.ErrorContext(r.Context(), what, "err", err)
	g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "cannot "+what+" right now"))
}

// accountOf returns the consumer a credits read is about: the query's
// consumer parameter, or the caller's own. A consumer key asking for
// another account gets 403; an invalid name 400.
func accountOf(r *http.Request, c caller, defaultOwn bool) (string, *api.Problem) {
	q := r.URL.Query()
	if len(q["consumer"]) > 1 {
		return "", newProblem(http.StatusBadRequest, "invalid query", extension.FieldError{Field: "consumer", Detail: "give it once"})
	}
	who := q.Get("consumer")
	if who == "" {
		if defaultOwn || !c.admin() {
			return c.Consumer, nil
		}
		return "", nil
	}
	if err := event.CheckName("consumer", who); err != nil {
		return "", newProblem(http.StatusBadRequest, "invalid query", extension.FieldError{Field: "consumer", Detail: err.Error()})
	}
	if !c.owns(who) {
		return "", newProblem(http.StatusForbidden, "a consumer key reads only its own account")
	}
	return who, nil
}

// queryTime parses an optional RFC 3339 time parameter.
func queryTime(r *http.Request, name string) (time.Time, *api.Problem) {
	vs := r.URL.Query()[name]
	if len(vs) == 0 || vs[0] == "" {
		return time.Time{}, nil
	}
	bad := func(d string) *api.Problem {
		return newProblem(http.StatusBadRequest, "invalid query", extension.FieldError{Field: name, Detail: d})
	}
	if len(vs) > 1 {
		return time.Time{}, bad("give it once")
	}
	t, err := time.Parse(time.RFC3339Nano, vs[0])
	if err != nil {
		return time.Time{}, bad(fmt.Sprintf("want an RFC 3339 time such as 2025-01-02T15:04:05Z, got %q", clip(vs[0])))
	}
	return t, nil
}

// creditBalance handles GET /v1/credits/balance[?consumer=].
func (g *Gateway) creditBalance(w http.ResponseWriter, r *http.Request, c caller) {
	who, p := accountOf(r, c, true)
	if p != nil {
		g.writeProblem(w, r, p)
		return
	}
	cr := g.creditsBackend(w, r)
	if cr == nil {
		return
	}
	b, err := cr.Balance(r.Context(), who)
	if err != nil {
		g.creditsFailed(w, r, "read balances", err)
		return
	}
	writeJSON(w, http.StatusOK, b)
}

// creditGrant handles POST /v1/credits/grants: admin keys only. A new
// grant answers 201, a repeated grant id 200.
func (g *Gateway) creditGrant(w http.ResponseWriter, r *http.Request, c caller) {
	if !c.admin() {
		g.writeProblem(w, r, newProblem(http.StatusForbidden, "granting credit needs an admin key"))
		return
	}
	var req api.GrantRequest
	if p := g.decodeBody(w, r, 64<<10, &req); p != nil {
		g.writeProblem(w, r, p)
		return
	}
	var errs []extension.FieldError
	if err := event.CheckName("consumer", req.Consumer); err != nil {
		errs = append(errs, extension.FieldError{Field: "consumer", Detail: err.Error()})
	}
	if req.Amount <= 0 {
		errs = append(errs, extension.FieldError{Field: "amount", Detail: "want a positive integer of credit minor units"})
	}
	if req.Priority < 0 || req.Priority > 1000 {
		errs = append(errs, extension.FieldError{Field: "priority", Detail: "want 0 to 1000"})
	}
	if !req.ExpiresAt.IsZero() && !req.ExpiresAt.After(g.opts.Now()) {
		errs = append(errs, extension.FieldError{Field: "expires_at", Detail: "already past"})
	}
	if req.ID != "" {
		if err := event.CheckName("grant id", req.ID); err != nil {
			errs = append(errs, extension.FieldError{Field: "id", Detail: err.Error()})
		}
	}
	if len(errs) > 0 {
		g.writeProblem(w, r, newProblem(http.StatusUnprocessableEntity, "invalid grant", errs...))
		return
	}
	cr := g.creditsBackend(w, r)
	if cr == nil {
		return
	}
	res, err := cr.Grant(r.Context(), req)
	if err != nil {
		g.creditsFailed(w, r, "grant credit", err)
		return
	}
	status := http.StatusCreated
	if res.Duplicate {
		status = http.StatusOK
	}
	writeJSON(w, status, res)
}

// creditLedger handles GET /v1/credits/ledger[?consumer=][&since=].
func (g *Gateway) creditLedger(w http.ResponseWriter, r *http.Request, c caller) {
	who, p := accountOf(r, c, true)
	if p != nil {
		g.writeProblem(w, r, p)
		return
	}
	since, p := queryTime(r, "since")
	if p != nil {
		g.writeProblem(w, r, p)
		return
	}
	cr := g.creditsBackend(w, r)
	if cr == nil {
		return
	}
	l, err := cr.Ledger(r.Context(), api.LedgerQuery{Consumer: who, Since: since})
	if err != nil {
		g.creditsFailed(w, r, "read ledgers", err)
		return
	}
	if l.Entries == nil {
		l.Entries = []api.LedgerEntry{}
	}
	writeJSON(w, http.StatusOK, l)
}

// creditUsage handles GET /v1/credits/usage[?consumer=][&from=][&to=]. A
// consumer key sees its own records; an admin key every consumer's unless
// it names one.
func (g *Gateway) creditUsage(w http.ResponseWriter, r *http.Request, c caller) {
	who, p := accountOf(r, c, false)
	if p != nil {
		g.writeProblem(w, r, p)
		return
	}
	from, p := queryTime(r, "from")
	if p != nil {
		g.writeProblem(w, r, p)
		return
	}
	to, p := queryTime(r, "to")
	if p != nil {
		g.writeProblem(w, r, p)
		return
	}
	if !from.IsZero() && !to.IsZero() && !to.After(from) {
		g.writeProblem(w, r, newProblem(http.StatusBadRequest, "invalid query", extension.FieldError{Field: "to", Detail: "must be after from"}))
		return
	}
	cr := g.creditsBackend(w, r)
	if cr == nil {
		return
	}
	u, err := cr.Usage(r.Context(), api.UsageQuery{Consumer: who, From: from, To: to})
	if err != nil {
		g.creditsFailed(w, r, "read usage", err)
		return
	}
	if u.Records == nil {
		u.Records = []api.UsageRecord{}
	}
	writeJSON(w, http.StatusOK, u)
}
