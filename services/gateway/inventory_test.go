package gateway

import (
	"fmt"
	"io"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

func testInventory() *inventory {
	return newInventory(nil, sandbox.DefaultRetention, slog.New(slog.NewTextHandler(io.Discard, nil)))
}

func pageIDs(recs []*sandbox.Record) []string {
	out := []string{}
	for _, r := range recs {
		out = append(out, r.ID)
	}
	return out
}

// TestInventoryIndex checks that pages follow the inventory's puts in any
// order: inserts, replacements, deletions and stale revisions.
func TestInventoryIndex(t *testing.T) {
	t.Parallel()
	v := testInventory()
	rec := func(id string, st event.State) *sandbox.Record {
		return &sandbox.Record{ID: id, Consumer: "alice", Extension: "echo", State: st}
	}
	for i, id := range []string{"c", "a", "e", "b", "d"} {
		v.put(id, rec(id, event.StateRequested), uint64(i+1))
	}
	v.put("b", rec("b", event.StateReady), 10)
	v.put("d", nil, 11)                           // removed: nothing of it is kept
	v.put("a", rec("a", event.StateDestroyed), 1) // older than its create
	v.put("f", nil, 12)                           // deletion of a sandbox never seen
	bobs := rec("bb", event.StateRequested)
	bobs.Consumer = "bob"
	v.put("bb", bobs, 13)
	v.put("ba", &sandbox.Record{ID: "ba", Consumer: "carol", State: event.StateReady}, 14)
	v.put("ba", &sandbox.Record{ID: "ba", Consumer: "bob", State: event.StateReady}, 15)
	v.put("z", &sandbox.Record{ID: "z", Consumer: "dave", State: event.StateReady}, 16)
	v.put("z", nil, 17)

	for _, id := range []string{"d", "f", "z"} {
		if _, ok := v.recs[id]; ok {
			t.Errorf("removed sandbox %s still held", id)
		}
	}

	cases := []struct {
		name      string
		f         listFilter
		after     string
		limit     int
		want      []string
		wantMore  bool
		wantState event.State // of the first record
	}{
		{"all", listFilter{}, "", 10, []string{"a", "b", "ba", "bb", "c", "e"}, false, event.StateRequested},
		{"first page", listFilter{}, "", 2, []string{"a", "b"}, true, event.StateRequested},
		{"next page", listFilter{}, "bb", 2, []string{"c", "e"}, false, event.StateRequested},
		{"after a deleted id", listFilter{}, "d", 2, []string{"e"}, false, event.StateRequested},
		{"after an id never seen", listFilter{}, "bc", 1, []string{"c"}, true, event.StateRequested},
		{"after the last", listFilter{}, "e", 2, []string{}, false, ""},
		{"replaced record", listFilter{State: event.StateReady, Consumer: "alice"}, "", 2, []string{"b"}, false, event.StateReady},
		{"filter fills the page", listFilter{State: event.StateRequested}, "", 2, []string{"a", "bb"}, true, event.StateRequested},
		{"one consumer's", listFilter{Consumer: "alice"}, "a", 2, []string{"b", "c"}, true, event.StateReady},
		{"another consumer's", listFilter{Consumer: "bob"}, "", 5, []string{"ba", "bb"}, false, event.StateReady},
		{"a consumer's after another's id", listFilter{Consumer: "bob"}, "b", 1, []string{"ba"}, true, event.StateReady},
		{"a consumer with none left", listFilter{Consumer: "carol"}, "", 5, []string{}, false, ""},
		{"a consumer whose only one is deleted", listFilter{Consumer: "dave"}, "", 5, []string{}, false, ""},
	}
	if _, ok := v.byConsumer["carol"]; ok {
		t.Error("carol, who has no sandbox left, keeps an index")
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, more := v.page(tc.f, tc.after, tc.limit)
			if !slices.Equal(pageIDs(got), tc.want) || more != tc.wantMore {
				t.Fatalf("page = %v, more %v; want %v, more %v", pageIDs(got), more, tc.want, tc.wantMore)
			}
			if len(got) > 0 && got[0].State != tc.wantState {
				t.Fatalf("first record in state %s, want %s", got[0].State, tc.wantState)
			}
		})
	}
}

// BenchmarkInventoryPage measures the selection of one page of 100 among
// 10,000 sandboxes of 100 consumers: an admin's first page, a page deep
// into the listing, one consumer's first page, and a filter 1 in 100
// matches.
func BenchmarkInventoryPage(b *testing.B) {
	v := testInventory()
	ids := make([]string, 10_000)
	t0 := time.Now()
	for i := range ids {
		ids[i] = sandbox.NewID()
		st := event.StateReady
		if i%100 == 7 {
			st = event.StateFailed
		}
		v.put(ids[i], &sandbox.Record{ID: ids[i], Consumer: fmt.Sprintf("c%02d", i%100), Profile: "echo", Extension: "echo",
			State: st, Labels: map[string]string{"team": "a"}, CreatedAt: t0}, uint64(i+1))
	}
	slices.Sort(ids)
	for _, bc := range []struct {
		name  string
		f     listFilter
		after string
	}{
		{"first", listFilter{}, ""},
		{"deep", listFilter{}, ids[9000]},
		{"consumer", listFilter{Consumer: "c42"}, ""},
		{"rare", listFilter{State: event.StateFailed}, ""},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if got, _ := v.page(bc.f, bc.after, 100); len(got) != 100 {
					b.Fatalf("page of %d", len(got))
				}
			}
		})
	}
}
