package gateway

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/pkg/workers"
)

// Load is the gateway's view of where sandboxes live, read from its fold
// of the lifecycle stream. It is eventually consistent: a sandbox another
// gateway recorded a moment ago may not be counted yet.
type Load interface {
	// Live counts the live sandboxes of an extension (every state but
	// destroyed and rejected), in all and per host.
	Live(extension string) (total int, perHost map[string]int)
	// ConsecutiveFailures counts the extension's latest provisioning
	// outcomes at or after since, newest first, up to the first success:
	// a sandbox that became ready is a success, one that failed before
	// ready a failure.
	ConsecutiveFailures(extension string, since time.Time) int
	// Has reports whether the sandbox is in the view.
	Has(id string) bool
}

// Liveness lists the live workers of an extension; [*workers.Cache] is
// one.
type Liveness interface {
	List(extension string) []workers.Heartbeat
}

// CapacityResolver routes a sandbox to the first of its profile's
// extensions (the one it binds, or its candidates in order) that has room
// and is healthy, and places it on that extension's least loaded host.
//
// Room: the extension's live sandboxes are fewer than its manifest's
// capacity.max_sandboxes, and the host has fewer than capacity.per_host
// (zero: unbounded). Live sandboxes come from [RouteRequest.Load] plus the
// routes this resolver made that the load does not show yet, so one
// gateway never overshoots a capacity. Several gateways can: each counts
// the others' sandboxes only once they are recorded, so together they can
// exceed a capacity by the creates in flight between them (milliseconds'
// worth); the capacity is a soft limit across gateways.
//
// Healthy: with Liveness set, the extension has at least one live worker;
// and its last FailureThreshold provisioning outcomes within FailureWindow
// were not all failures. A candidate that is unhealthy is passed over for
// the next one with room; when no candidate with room is healthy, the
// first with room is used anyway, since its command waits in the work
// queue until workers return. When no candidate has room, the sandbox is
// rejected with [ErrNoRoute].
//
// The zero value is ready to use and safe for concurrent use; set the
// fields before the first Resolve.
type CapacityResolver struct {
	// Liveness, when set, marks extensions without live workers as
	// failing. Default nil: worker liveness is not checked.
	Liveness Liveness
	// FailureThreshold is how many consecutive failures mark an extension
	// failing. Default 3.
	FailureThreshold int
	// FailureWindow is how far back failures count. Default 5m.
	FailureWindow time.Duration
	// PendingTTL is how long a route counts before the load shows its
	// sandbox; a route whose sandbox never got recorded stops counting
	// then. Default 30s.
	PendingTTL time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time

	mu      sync.Mutex
	pending map[string]pendingRoute // sandbox id -> route not yet in the load
	seq     uint64
	last    map[string]uint64 // "<extension>\x00<host>" -> seq of its last pick
}

type pendingRoute struct {
	route Route
	at    time.Time
}

// Resolve picks the extension and host of a sandbox as the type's doc
// says. Without a Load in req, it counts only its own routes.
func (r *CapacityResolver) Resolve(_ context.Context, req RouteRequest) (Route, error) {
	cands := req.Candidates
	if len(cands) == 0 && req.Manifest != nil {
		cands = []*extension.Manifest{req.Manifest}
	}
	if req.Profile == nil || len(cands) == 0 {
		return Route{}, fmt.Errorf("resolving route: %w: profile and manifest are required", ErrNoRoute)
	}
	now := r.now()
	threshold := r.FailureThreshold
	if threshold <= 0 {
		threshold = 3
	}
	window := r.FailureWindow
	if window <= 0 {
		window = 5 * time.Minute
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	r.prune(req.Load, now)
	var (
		fallback *Route
		why      []string
	)
	for _, m := range cands {
		host, full := r.place(req.Load, m)
		if full != "" {
			why = append(why, full)
			continue
		}
		rt := Route{Extension: m.Name, Host: host}
		if sick := r.failing(req.Load, m.Name, now.Add(-window), threshold); sick != "" {
			why = append(why, sick)
			if fallback == nil {
				fallback = &rt
			}
			continue
		}
		return r.pick(req.SandboxID, rt, now), nil
	}
	if fallback != nil {
		return r.pick(req.SandboxID, *fallback, now), nil
	}
	return Route{}, fmt.Errorf("resolving route: %w: %s", ErrNoRoute, strings.Join(why, "; "))
}

// place returns the least loaded host of m with room, or why there is
// none.
func (r *CapacityResolver) place(load Load, m *extension.Manifest) (host, full string) {
	total, perHost := 0, map[string]int{}
	if load != nil {
		total, perHost = load.Live(m.Name)
		perHost = cloneCounts(perHost)
	}
	for _, p := range r.pending {
		if p.route.Extension == m.Name {
			total++
			perHost[p.route.Host]++
		}
	}
	if c := m.Capacity.MaxSandboxes; c > 0 && total >= c {
		return "", fmt.Sprintf("extension %s is full (%d of %d sandboxes)", m.Name, total, c)
	}
	best, bestN, bestSeq := "", 0, uint64(0)
	for _, h := range m.HostList() {
		n := perHost[h]
		if c := m.Capacity.PerHost; c > 0 && n >= c {
			continue
		}
		seq := r.last[m.Name+"\x00"+h]
		if best == "" || n < bestN || (n == bestN && seq < bestSeq) {
			best, bestN, bestSeq = h, n, seq
		}
	}
	if best == "" {
		return "", fmt.Sprintf("every host of extension %s is full (%d per host)", m.Name, m.Capacity.PerHost)
	}
	return best, ""
}

// failing says why an extension counts as failing, or "".
func (r *CapacityResolver) failing(load Load, name string, since time.Time, threshold int) string {
	if r.Liveness != nil && len(r.Liveness.List(name)) == 0 {
		return fmt.Sprintf("extension %s has no live workers", name)
	}
	if load != nil {
		if n := load.ConsecutiveFailures(name, since); n >= threshold {
			return fmt.Sprintf("extension %s failed its last %d sandboxes", name, n)
		}
	}
	return ""
}

// pick records a route as pending and as its host's latest pick.
func (r *CapacityResolver) pick(id string, rt Route, now time.Time) Route {
	if r.pending == nil {
		r.pending = map[string]pendingRoute{}
		r.last = map[string]uint64{}
	}
	if id != "" {
		r.pending[id] = pendingRoute{route: rt, at: now}
	}
	r.seq++
	r.last[rt.Extension+"\x00"+rt.Host] = r.seq
	return rt
}

// prune forgets pending routes the load shows, or that are too old.
func (r *CapacityResolver) prune(load Load, now time.Time) {
	ttl := r.PendingTTL
	if ttl <= 0 {
		ttl = 30 * time.Second
	}
	for id, p := range r.pending {
		if now.Sub(p.at) > ttl || (load != nil && load.Has(id)) {
			delete(r.pending, id)
		}
	}
}

func (r *CapacityResolver) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

func cloneCounts(m map[string]int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// extLoad is what the resolver reads of one extension, kept up to date
// as records change, so a route costs the same however many sandboxes the
// bucket holds.
type extLoad struct {
	total   int
	perHost map[string]int
	// outcomes are the latest provisioning outcomes, newest first, at most
	// maxOutcomes.
	outcomes []outcome
}

type outcome struct {
	at     time.Time
	failed bool
}

// maxOutcomes bounds the outcomes remembered per extension: more than any
// sensible FailureThreshold.
const maxOutcomes = 32

// outcomeOf returns a record's provisioning outcome: ready (a success) or
// failed before ready.
func outcomeOf(r *sandbox.Record) (outcome, bool) {
	if r == nil {
		return outcome{}, false
	}
	if !r.ReadyAt.IsZero() {
		return outcome{at: r.ReadyAt}, true
	}
	for _, t := range r.History {
		if t.State == event.StateFailed {
			return outcome{at: t.At, failed: true}, true
		}
	}
	return outcome{}, false
}

// account moves the counts from the old version of a record to the new
// one. Either may be nil. The caller holds v.mu.
func (v *inventory) account(old, cur *sandbox.Record) {
	load := func(ext string) *extLoad {
		l := v.loads[ext]
		if l == nil {
			l = &extLoad{perHost: map[string]int{}}
			v.loads[ext] = l
		}
		return l
	}
	if old != nil {
		v.byState[old.State]--
		delete(v.transient, old.ID)
	}
	if cur != nil {
		v.byState[cur.State]++
		if transient(cur.State) {
			v.transient[cur.ID] = cur
		}
	}
	if old != nil && !old.State.Terminal() {
		l := load(old.Extension)
		l.total--
		if l.perHost[old.Host]--; l.perHost[old.Host] <= 0 {
			delete(l.perHost, old.Host)
		}
	}
	if cur != nil && !cur.State.Terminal() {
		l := load(cur.Extension)
		l.total++
		l.perHost[cur.Host]++
	}
	if _, had := outcomeOf(old); had || cur == nil {
		return
	}
	if o, ok := outcomeOf(cur); ok {
		l := load(cur.Extension)
		i, _ := slices.BinarySearchFunc(l.outcomes, o, func(a, b outcome) int { return b.at.Compare(a.at) })
		l.outcomes = slices.Insert(l.outcomes, i, o)
		if len(l.outcomes) > maxOutcomes {
			l.outcomes = l.outcomes[:maxOutcomes]
		}
	}
}

// Live counts the live sandboxes of extension.
func (v *inventory) Live(extension string) (int, map[string]int) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	l := v.loads[extension]
	if l == nil {
		return 0, map[string]int{}
	}
	return l.total, cloneCounts(l.perHost)
}

// ConsecutiveFailures counts the extension's latest failures before ready
// since the given time, up to its latest success (at most maxOutcomes).
func (v *inventory) ConsecutiveFailures(extension string, since time.Time) int {
	v.mu.RLock()
	defer v.mu.RUnlock()
	l := v.loads[extension]
	if l == nil {
		return 0
	}
	n := 0
	for _, o := range l.outcomes {
		if o.at.Before(since) || !o.failed {
			break
		}
		n++
	}
	return n
}

// Has reports whether the view holds sandbox id.
func (v *inventory) Has(id string) bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	e, ok := v.recs[id]
	return ok && e.rec != nil
}

var (
	_ Resolver = (*CapacityResolver)(nil)
	_ Load     = (*inventory)(nil)
	_ Liveness = (*workers.Cache)(nil)
)
