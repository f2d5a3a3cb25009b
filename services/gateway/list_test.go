package gateway_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

func TestListPages(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice, bob, root := e.client("alice"), e.client("bob"), e.client("root")
	var alices, teamA, bobs []string
	for i := range 7 {
		team := "a"
		if i%2 == 1 {
			team = "b"
		}
		sb, err := alice.Create(ctx, api.CreateRequest{Profile: "echo", Labels: map[string]string{"team": team}}, "")
		if err != nil {
			t.Fatal(err)
		}
		alices = append(alices, sb.ID)
		if team == "a" {
			teamA = append(teamA, sb.ID)
		}
	}
	for range 3 {
		sb, err := bob.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
		if err != nil {
			t.Fatal(err)
		}
		bobs = append(bobs, sb.ID)
	}
	sorted := func(ids ...[]string) []string { return slices.Sorted(slices.Values(slices.Concat(ids...))) }

	// pages reads every page of a listing, checking that each but the
	// last is full and names its last sandbox as next.
	pages := func(t *testing.T, c *api.Client, f api.ListFilter, limit int, after string) (ids []string, n int) {
		t.Helper()
		for {
			p, err := c.ListPage(ctx, f, limit, after)
			if err != nil {
				t.Fatal(err)
			}
			n++
			for _, s := range p.Sandboxes {
				ids = append(ids, s.ID)
			}
			if p.Next == "" {
				if len(p.Sandboxes) > limit {
					t.Fatalf("last page of %d, limit %d", len(p.Sandboxes), limit)
				}
				return ids, n
			}
			if len(p.Sandboxes) != limit || p.Next != p.Sandboxes[limit-1].ID {
				t.Fatalf("page of %d with next %q, want %d ending with next", len(p.Sandboxes), p.Next, limit)
			}
			if n > 100 {
				t.Fatal("listing does not end")
			}
			after = p.Next
		}
	}
	cases := []struct {
		name      string
		client    *api.Client
		filter    api.ListFilter
		limit     int
		after     string
		want      []string
		wantPages int
	}{
		{"own, by 3", alice, api.ListFilter{}, 3, "", sorted(alices), 3},
		{"own, one page exactly", alice, api.ListFilter{}, 7, "", sorted(alices), 1},
		{"own, one short of a page", alice, api.ListFilter{}, 6, "", sorted(alices), 2},
		{"own, by 1", bob, api.ListFilter{}, 1, "", sorted(bobs), 3},
		{"filter across pages", alice, api.ListFilter{Labels: []string{"team=a"}}, 2, "", sorted(teamA), 2},
		{"filter and state", alice, api.ListFilter{State: "requested", Labels: []string{"team=a"}}, 3, "", sorted(teamA), 2},
		{"another's listing", bob, api.ListFilter{Consumer: "alice"}, 2, "", nil, 1},
		{"own after another's id", bob, api.ListFilter{}, 1, sorted(alices)[0], sorted(bobs), 3},
		{"after an id not in the listing", alice, api.ListFilter{}, 3, "sbx-0", sorted(alices), 3},
		{"after every id", alice, api.ListFilter{}, 3, "sbx-zzz", nil, 1},
		{"admin, everyone's", root, api.ListFilter{}, 4, "", sorted(alices, bobs), 3},
		{"admin, one consumer's", root, api.ListFilter{Consumer: "bob"}, 2, "", sorted(bobs), 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, n := pages(t, tc.client, tc.filter, tc.limit, tc.after)
			if !slices.Equal(got, tc.want) || n != tc.wantPages {
				t.Fatalf("%d pages of %v, want %d of %v", n, got, tc.wantPages, tc.want)
			}
		})
	}

	t.Run("next absent on the last page", func(t *testing.T) {
		t.Parallel()
		for _, q := range []string{"?limit=7", "?limit=3&after=" + sorted(alices)[3], "?consumer=bob"} {
			r := e.do(t, http.MethodGet, "/v1/sandboxes"+q, "alice", "", nil)
			var body map[string]json.RawMessage
			mustUnmarshal(t, r.Body, &body)
			if _, ok := body["next"]; r.Status != http.StatusOK || ok || body["sandboxes"] == nil {
				t.Fatalf("%s: %d %s", q, r.Status, r.Body)
			}
		}
	})

	t.Run("bad parameters", func(t *testing.T) {
		t.Parallel()
		for _, bad := range []struct{ query, field string }{
			{"limit=0", "limit"}, {"limit=-1", "limit"}, {"limit=1001", "limit"}, {"limit=ten", "limit"},
			{"limit=1.5", "limit"}, {"limit=99999999999999999999", "limit"},
			{"after=SBX-1", "after"}, {"after=" + url.QueryEscape("../x"), "after"}, {"after=" + strings.Repeat("a", 64), "after"},
		} {
			r := e.do(t, http.MethodGet, "/v1/sandboxes?"+bad.query, "alice", "", nil)
			if r.Status != http.StatusBadRequest || !slices.Contains(fields(r.Problem), bad.field) {
				t.Fatalf("%s: %d %s", bad.query, r.Status, r.Body)
			}
		}
		if r := e.do(t, http.MethodGet, "/v1/sandboxes?limit=0&after=-x", "alice", "", nil); !slices.Equal(fields(r.Problem), []string{"limit", "after"}) {
			t.Fatalf("both bad: fields %v", fields(r.Problem))
		}
	})
}

// TestListDefaultAndMaxPage puts more sandboxes than the largest page
// straight on the lifecycle stream (as the gateway and workers record
// them): a listing
// without limit answers the default page, and the client's List follows
// the pages to every sandbox.
func TestListDefaultAndMaxPage(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	const n = api.MaxPageSize + 1
	ids := make([]string, n)
	recs := make([]*sandbox.Record, n)
	now := time.Now().UTC()
	for i := range ids {
		ids[i] = fmt.Sprintf("sbx-%05d", n-i) // written out of id order
		recs[i] = &sandbox.Record{ID: ids[i], Consumer: "carol", Profile: "echo", Extension: "echo", State: event.StateReady, CreatedAt: now, UpdatedAt: now}
	}
	e.seed(t, recs...)
	slices.Sort(ids)
	carol := e.client("carol")
	var (
		all []api.Sandbox
		err error
	)
	await(t, "the listing to hold every sandbox", func() bool {
		if all, err = carol.List(ctx, api.ListFilter{}); err != nil {
			t.Fatal(err)
		}
		return len(all) == n
	})
	got := make([]string, len(all))
	for i, s := range all {
		got[i] = s.ID
	}
	if !slices.Equal(got, ids) {
		t.Fatalf("List is not every sandbox once in id order: %v...", got[:5])
	}

	var page api.SandboxList
	r := e.do(t, http.MethodGet, "/v1/sandboxes", "carol", "", nil)
	mustUnmarshal(t, r.Body, &page)
	if len(page.Sandboxes) != api.DefaultPageSize || page.Next != ids[api.DefaultPageSize-1] {
		t.Fatalf("default page: %d sandboxes, next %q", len(page.Sandboxes), page.Next)
	}
	if page, err = carol.ListPage(ctx, api.ListFilter{}, api.MaxPageSize, ""); err != nil || len(page.Sandboxes) != api.MaxPageSize || page.Next != ids[n-2] {
		t.Fatalf("largest page: %d sandboxes, next %q, err %v", len(page.Sandboxes), page.Next, err)
	}
	if page, err = carol.ListPage(ctx, api.ListFilter{}, 0, page.Next); err != nil || len(page.Sandboxes) != 1 || page.Sandboxes[0].ID != ids[n-1] || page.Next != "" {
		t.Fatalf("last page: %+v, err %v", page, err)
	}
}
