package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	cloudevents "github.com/cloudevents/sdk-go/v2/event"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Client talks to a gateway. It is safe for concurrent use.
type Client struct {
	base  string
	token string
	hc    *http.Client
}

// NewClient returns a client for the gateway at baseURL authenticating
// with the bearer token. A nil hc uses a client without a global timeout
// (event streams are long); every call is bounded by its context.
func NewClient(baseURL, token string, hc *http.Client) *Client {
	if hc == nil {
		hc = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, Proxy: http.ProxyFromEnvironment}}
	}
	return &Client{base: strings.TrimRight(baseURL, "/"), token: token, hc: hc}
}

func (c *Client) do(ctx context.Context, method, path string, hdr http.Header, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("encoding request: %w", err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return fmt.Errorf("building request: %w", err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeProblem(resp)
	}
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decoding %s %s response: %w", method, path, err)
	}
	// Read to EOF so the connection goes back to the pool.
	_, _ = io.Copy(io.Discard, resp.Body)
	return nil
}

func decodeProblem(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var p Problem
	if err := json.Unmarshal(b, &p); err != nil || p.Title == "" {
		return &Problem{Title: http.StatusText(resp.StatusCode), Status: resp.StatusCode, Detail: strings.TrimSpace(string(b))}
	}
	if p.Status == 0 {
		p.Status = resp.StatusCode
	}
	return &p
}

// StatusOf returns the HTTP status of an error from the client, or 0.
func StatusOf(err error) int {
	var p *Problem
	if errors.As(err, &p) {
		return p.Status
	}
	return 0
}

// Create asks for a sandbox. With a non-empty idempotencyKey, repeating the
// call returns the same sandbox.
func (c *Client) Create(ctx context.Context, req CreateRequest, idempotencyKey string) (*Sandbox, error) {
	var h http.Header
	if idempotencyKey != "" {
		h = http.Header{HeaderIdempotencyKey: {idempotencyKey}}
	}
	var s Sandbox
	if err := c.do(ctx, http.MethodPost, "/v1/sandboxes", h, req, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// Get returns one sandbox.
func (c *Client) Get(ctx context.Context, id string) (*Sandbox, error) {
	var s Sandbox
	if err := c.do(ctx, http.MethodGet, "/v1/sandboxes/"+url.PathEscape(id), nil, nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// ListFilter narrows a listing. Labels are k=v pairs that must all match.
type ListFilter struct {
	State   string
	Profile string
	Labels  []string
	// Consumer narrows an admin's listing to one consumer's sandboxes. A
	// consumer's own listing holds only its own whatever this says.
	Consumer string
}

// List returns every sandbox the caller may see that f matches, in id
// order, following the pages of GET /v1/sandboxes at their largest size.
// No sandbox is listed twice; one created or deleted while it reads may
// or may not be.
func (c *Client) List(ctx context.Context, f ListFilter) ([]Sandbox, error) {
	out := []Sandbox{}
	after := ""
	for {
		page, err := c.ListPage(ctx, f, MaxPageSize, after)
		if err != nil {
			return nil, err
		}
		out = append(out, page.Sandboxes...)
		if page.Next == "" {
			return out, nil
		}
		if page.Next <= after {
			return nil, fmt.Errorf("listing sandboxes: next page %q does not follow %q", page.Next, after)
		}
		after = page.Next
	}
}

// ListPage returns one page of the sandboxes the caller may see that f
// matches: at most limit (0 for the gateway's default, [DefaultPageSize];
// at most [MaxPageSize]) in id order, after the sandbox id after ("" for
// the first page). Pass the page's Next as after to read the next one; it
// is empty on the last page.
func (c *Client) ListPage(ctx context.Context, f ListFilter, limit int, after string) (SandboxList, error) {
	q := url.Values{}
	if f.State != "" {
		q.Set("state", f.State)
	}
	if f.Profile != "" {
		q.Set("profile", f.Profile)
	}
	for _, l := range f.Labels {
		q.Add("label", l)
	}
	if f.Consumer != "" {
		q.Set("consumer", f.Consumer)
	}
	if limit != 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	if after != "" {
		q.Set("after", after)
	}
	path := "/v1/sandboxes"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var out SandboxList
	if err := c.do(ctx, http.MethodGet, path, nil, nil, &out); err != nil {
		return SandboxList{}, err
	}
	return out, nil
}

// Destroy asks for a sandbox to be destroyed.
func (c *Client) Destroy(ctx context.Context, id string) (*Sandbox, error) {
	var s Sandbox
	if err := c.do(ctx, http.MethodDelete, "/v1/sandboxes/"+url.PathEscape(id), nil, nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// Profiles lists the profiles.
func (c *Client) Profiles(ctx context.Context) (*ProfileList, error) {
	var out ProfileList
	if err := c.do(ctx, http.MethodGet, "/v1/profiles", nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Extensions lists the extensions.
func (c *Client) Extensions(ctx context.Context) (*ExtensionList, error) {
	var out ExtensionList
	if err := c.do(ctx, http.MethodGet, "/v1/extensions", nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Workers lists the worker pools: per backend its live workers and queue.
func (c *Client) Workers(ctx context.Context) (*WorkerList, error) {
	var out WorkerList
	if err := c.do(ctx, http.MethodGet, "/v1/workers", nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// ErrStop, returned by an Events callback, ends the stream without error.
var ErrStop = errors.New("stop")

// Events streams the lifecycle events of a sandbox, oldest first, calling
// fn for each. With follow it keeps streaming until ctx ends or fn returns
// [ErrStop]; without, it returns after the events so far.
func (c *Client) Events(ctx context.Context, id string, follow bool, fn func(StreamEvent) error) error {
	path := "/v1/sandboxes/" + url.PathEscape(id) + "/events?follow=" + strconv.FormatBool(follow)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return fmt.Errorf("building request: %w", err)
	}
	req.Header.Set("Accept", "text/event-stream")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeProblem(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	var cur StreamEvent
	var data strings.Builder
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if data.Len() == 0 {
				continue
			}
			var e cloudevents.Event
			if err := json.Unmarshal([]byte(data.String()), &e); err != nil {
				return fmt.Errorf("decoding event stream: %w", err)
			}
			cur.Event = &e
			if err := fn(cur); err != nil {
				if errors.Is(err, ErrStop) {
					return nil
				}
				return err
			}
			cur = StreamEvent{}
			data.Reset()
		case strings.HasPrefix(line, ":"):
		case strings.HasPrefix(line, "id:"):
			cur.Seq, _ = strconv.ParseUint(strings.TrimSpace(line[3:]), 10, 64)
		case strings.HasPrefix(line, "event:"):
			cur.Type = strings.TrimSpace(line[6:])
		case strings.HasPrefix(line, "data:"):
			if data.Len() > 0 {
				data.WriteByte('\n')
			}
			data.WriteString(strings.TrimPrefix(line[5:], " "))
		}
	}
	if err := sc.Err(); err != nil && ctx.Err() == nil {
		return fmt.Errorf("reading event stream: %w", err)
	}
	return ctx.Err()
}

// Wait follows a sandbox's events until one enters a state until accepts,
// calling onState (if not nil) for each state seen, and returns the sandbox
// as it is then.
func (c *Client) Wait(ctx context.Context, id string, until func(event.State) bool, onState func(event.State, *event.Event)) (*Sandbox, error) {
	if s, err := c.Get(ctx, id); err != nil {
		return nil, err
	} else if until(s.State) {
		return s, nil
	}
	var (
		reached bool
		state   event.State
	)
	err := c.Events(ctx, id, true, func(se StreamEvent) error {
		st, ok := event.StateOf(event.Type(se.Event.Type()))
		if !ok {
			return nil
		}
		if onState != nil {
			onState(st, se.Event)
		}
		if until(st) {
			reached, state = true, st
			return ErrStop
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if !reached {
		return nil, fmt.Errorf("waiting for sandbox %s: stream ended", id)
	}
	// The event can arrive before the inventory applies it: read until
	// the record shows the state too, for a bounded while.
	const poll, attempts = 20 * time.Millisecond, 250
	for i := 0; ; i++ {
		s, err := c.Get(ctx, id)
		if err != nil || s.State.Rank() >= state.Rank() || i == attempts {
			return s, err
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return s, nil
		case <-t.C:
		}
	}
}

// CreditBalance returns the account of consumer; empty means the caller's
// own. Only an admin key reads another consumer's account.
func (c *Client) CreditBalance(ctx context.Context, consumer string) (*CreditBalance, error) {
	path := "/v1/credits/balance"
	if consumer != "" {
		path += "?" + url.Values{"consumer": {consumer}}.Encode()
	}
	var out CreditBalance
	if err := c.do(ctx, http.MethodGet, path, nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Grant adds credit to an account. It needs an admin key.
func (c *Client) Grant(ctx context.Context, req GrantRequest) (*GrantResult, error) {
	var out GrantResult
	if err := c.do(ctx, http.MethodPost, "/v1/credits/grants", nil, req, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Ledger returns the ledger entries q selects, in sequence order.
func (c *Client) Ledger(ctx context.Context, q LedgerQuery) (*Ledger, error) {
	v := url.Values{}
	if q.Consumer != "" {
		v.Set("consumer", q.Consumer)
	}
	if !q.Since.IsZero() {
		v.Set("since", q.Since.UTC().Format(time.RFC3339Nano))
	}
	path := "/v1/credits/ledger"
	if len(v) > 0 {
		path += "?" + v.Encode()
	}
	var out Ledger
	if err := c.do(ctx, http.MethodGet, path, nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Usage returns the usage records q selects, oldest first.
func (c *Client) Usage(ctx context.Context, q UsageQuery) (*UsageList, error) {
	v := url.Values{}
	if q.Consumer != "" {
		v.Set("consumer", q.Consumer)
	}
	if !q.From.IsZero() {
		v.Set("from", q.From.UTC().Format(time.RFC3339Nano))
	}
	if !q.To.IsZero() {
		v.Set("to", q.To.UTC().Format(time.RFC3339Nano))
	}
	path := "/v1/credits/usage"
	if len(v) > 0 {
		path += "?" + v.Encode()
	}
	var out UsageList
	if err := c.do(ctx, http.MethodGet, path, nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// IssueKey issues an API key; it needs an admin key. The token in the
// answer is shown this once.
func (c *Client) IssueKey(ctx context.Context, req KeyRequest) (*IssuedKey, error) {
	var out IssuedKey
	if err := c.do(ctx, http.MethodPost, "/v1/keys", nil, req, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Keys lists the API keys of consumer, or every consumer's when it is
// empty; it needs an admin key.
func (c *Client) Keys(ctx context.Context, consumer string) (*KeyList, error) {
	path := "/v1/keys"
	if consumer != "" {
		path += "?" + url.Values{"consumer": {consumer}}.Encode()
	}
	var out KeyList
	if err := c.do(ctx, http.MethodGet, path, nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// RevokeKey revokes the API key id and returns it; it needs an admin key.
func (c *Client) RevokeKey(ctx context.Context, id string) (*APIKey, error) {
	var out APIKey
	if err := c.do(ctx, http.MethodDelete, "/v1/keys/"+url.PathEscape(id), nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
