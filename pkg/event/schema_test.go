package event_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/internal/schematest"
)

// schemaDir holds one JSON Schema per event data payload, named after the
// event type.
const schemaDir = "../../schemas"

func schemaPath(t event.Type) string { return filepath.Join(schemaDir, string(t)+".json") }

// payloads maps every event type to a fully populated value of its data.
func payloads() map[event.Type]any {
	at := time.Date(2025, 6, 1, 12, 0, 0, 123456789, time.UTC)
	ref := event.Ref{SandboxID: "sbx-0123456789abcdefghijklmnop", Consumer: "team-a", Profile: "compose-dev", Extension: "compose-ssh", Host: "build-1.example.com",
		Request: &event.Origin{Source: "/team-a/ci", ID: "build-42"}}
	handle := event.Handle{SandboxID: ref.SandboxID, Host: ref.Host, Data: map[string]string{"project": "sbx-0123", "dir": "/srv/sandboxes/sbx-0123"}}
	return map[event.Type]any{
		event.TypeCreate: event.Create{
			Ref: ref, Inputs: map[string]string{"repo": "https://example.com/r.git", "branch": "main"},
			Labels: map[string]string{"team": "a", "example.com/owner": "ops-1"}, TTLSeconds: 3600,
			RequestedAt: at, Hold: "hold-sbx-0123", RecordSeq: 41,
		},
		event.TypeRequested: event.Requested{
			Ref: ref, Inputs: map[string]string{"repo": "https://example.com/r.git", "branch": "main"},
			Labels: map[string]string{"team": "a", "example.com/owner": "ops-1"}, TTLSeconds: 3600,
			RequestedAt: at, Hold: "hold-sbx-0123", Trace: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
		},
		event.TypeDestroy:      event.Destroy{Ref: ref, Reason: event.ReasonCreditsExhausted, RequestedBy: "metering", RequestedAt: at, Attempt: 2},
		event.TypeProvisioning: event.Provisioning{Ref: ref, Worker: "provisioner-7f9c", Attempt: 2},
		event.TypeReady: event.Ready{
			Ref: ref, Handle: handle,
			Reachability: event.Reachability{SSH: "dev@build-1.example.com:2222", RemoteDir: "/srv/sandboxes/sbx-0123", Host: ref.Host,
				ComposeProject: "sbx-0123", Ports: map[string]string{"web": "127.0.0.1:40001"}},
			TTLSeconds: 3600, ReadyAt: at, ExpiresAt: at.Add(time.Hour), Hold: ref.SandboxID,
		},
		event.TypeFailed:     event.Failed{Ref: ref, Phase: "wait_ready", Reason: "ssh: connection refused", Handle: &handle},
		event.TypeDestroying: event.Destroying{Ref: ref, Reason: event.ReasonExpired, Attempt: 1, Error: "tearing down sbx-0123: ssh: connection refused", Deliveries: 5},
		event.TypeDestroyed: event.Destroyed{Ref: ref, Reason: event.ReasonRequested,
			Cleanup: event.CleanupReport{Removed: []string{"container sbx-0123-app-1", "dir /srv/sandboxes/sbx-0123"}, AlreadyGone: true},
			Meter:   &event.MeterReading{Amount: 1250, Quantity: 125, Unit: "second", Breakdown: []string{"125 s at 10/s"}},
			ReadyAt: at.Add(-125 * time.Second)},
		event.TypeRejected: event.Rejected{Ref: ref, Code: "insufficient_credits", Reason: "balance 10 below quote 250"},
		event.TypeExpired:  event.Expired{Ref: ref, Reason: event.ReasonExpired, ExpiredAt: at},
		event.TypeOrphaned: event.Orphaned{Ref: ref, Reason: string(event.StateDestroyed), Handle: handle,
			Held: []string{"dir:/srv/sandboxes/sbx-0123", "container:sbx-0123-app-1"}, HeldSince: at, Worker: "provisioner-7f9c"},
		event.TypeExpiry: event.Expiry{Ref: ref, ExpiresAt: at},
		event.TypeRetry:  event.Retry{Ref: ref, Reason: event.ReasonRequested, Attempt: 3, RetryAt: at},
		event.TypeRequestCreate: event.CreateRequest{Profile: "compose-dev", Inputs: map[string]string{"repo": "https://example.com/r.git"},
			Labels: map[string]string{"team": "a"}, TTL: "30m"},
		event.TypeRequestDestroy: event.DestroyRequest{SandboxID: ref.SandboxID},
		event.TypeRequestGet:     event.GetRequest{SandboxID: ref.SandboxID},
	}
}

// allTypes is every event type the package declares.
func allTypes() []event.Type {
	out := []event.Type{event.TypeCreate, event.TypeDestroy, event.TypeExpiry, event.TypeRetry, event.TypeRequestCreate, event.TypeRequestDestroy, event.TypeRequestGet}
	for _, s := range event.States {
		if t := event.LifecycleType(s); t != "" {
			out = append(out, t)
		}
	}
	return out
}

// eventFamilies are the type prefixes package event owns. Services own
// others (dev.sandboxer.credits.* is metering's) and test their schemas.
var eventFamilies = []string{"dev.sandboxer.command.", "dev.sandboxer.sandbox.", "dev.sandboxer.timer.", "dev.sandboxer.request."}

func TestEverySchemaHasAType(t *testing.T) {
	t.Parallel()
	var files []string
	for _, fam := range eventFamilies {
		f, err := filepath.Glob(filepath.Join(schemaDir, fam+"*.json"))
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f...)
	}
	types := allTypes()
	for _, f := range files {
		name := event.Type(strings.TrimSuffix(filepath.Base(f), ".json"))
		if !slices.Contains(types, name) {
			t.Errorf("%s describes no event type of package event", f)
		}
	}
	payloads := payloads()
	for _, typ := range types {
		if _, err := os.Stat(schemaPath(typ)); err != nil {
			t.Errorf("event type %s has no schema: %v", typ, err)
		}
		if _, ok := payloads[typ]; !ok {
			t.Errorf("event type %s has no test payload", typ)
		}
	}
}

// TestPayloadSchemas validates the data of events built with event.New
// from every payload type, fully populated, against its schema, and
// checks each schema's shape against the Go type, so drift in either
// direction fails.
func TestPayloadSchemas(t *testing.T) {
	t.Parallel()
	for typ, data := range payloads() {
		t.Run(string(typ), func(t *testing.T) {
			t.Parallel()
			schematest.FullyPopulated(t, data)
			schematest.CheckShape(t, schemaPath(typ), reflect.TypeOf(data))
			s := schematest.Compile(t, schemaPath(typ))
			e, err := event.New(typ, "sandboxer/test", "sbx-0123", "sbx-0123."+string(typ), data)
			if err != nil {
				t.Fatal(err)
			}
			if err := schematest.ValidateJSON(s, e.Data()); err != nil {
				t.Errorf("event data fails its schema:\n%s\n%v", e.Data(), err)
			}

			// The minimal form (optional fields absent) is valid too.
			minimal := reflect.New(reflect.TypeOf(data)).Elem()
			full := reflect.ValueOf(data)
			for _, f := range schematest.JSONFields(reflect.TypeOf(data)) {
				if !f.Optional {
					setJSONField(minimal, full, f.Name)
				}
			}
			if err := schematest.Validate(s, minimal.Interface()); err != nil {
				t.Errorf("minimal data fails its schema:\n%+v\n%v", minimal.Interface(), err)
			}
		})
	}
}

// setJSONField copies the field with JSON name from src to dst, looking
// into embedded structs.
func setJSONField(dst, src reflect.Value, name string) {
	for i := 0; i < dst.NumField(); i++ {
		f := dst.Type().Field(i)
		if f.Anonymous && f.Type.Kind() == reflect.Struct {
			setJSONField(dst.Field(i), src.Field(i), name)
			continue
		}
		if n, _, _ := strings.Cut(f.Tag.Get("json"), ","); n == name {
			dst.Field(i).Set(src.Field(i))
		}
	}
}

// TestPayloadSchemasReject proves the schemas can fail: unknown fields,
// missing required fields, invalid names and wrong types are refused.
func TestPayloadSchemasReject(t *testing.T) {
	t.Parallel()
	valid, err := json.Marshal(payloads()[event.TypeReady])
	if err != nil {
		t.Fatal(err)
	}
	s := schematest.Compile(t, schemaPath(event.TypeReady))
	cases := []struct {
		name   string
		mutate func(m map[string]any)
	}{
		{"unknown top-level field", func(m map[string]any) { m["surprise"] = 1 }},
		{"unknown handle field", func(m map[string]any) { m["handle"].(map[string]any)["extra"] = "x" }},
		{"unknown reachability field", func(m map[string]any) { m["reachability"].(map[string]any)["extra"] = "x" }},
		{"missing sandbox_id", func(m map[string]any) { delete(m, "sandbox_id") }},
		{"missing ready_at", func(m map[string]any) { delete(m, "ready_at") }},
		{"invalid sandbox id", func(m map[string]any) { m["sandbox_id"] = "Bad.ID" }},
		{"invalid extension name", func(m map[string]any) { m["extension"] = "-x" }},
		{"ttl as string", func(m map[string]any) { m["ttl_seconds"] = "3600" }},
		{"zero ttl", func(m map[string]any) { m["ttl_seconds"] = 0 }},
		{"time not RFC 3339", func(m map[string]any) { m["ready_at"] = "June 1st" }},
		{"port map value not string", func(m map[string]any) { m["reachability"].(map[string]any)["ports"] = map[string]any{"web": 80} }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var m map[string]any
			if err := json.Unmarshal(valid, &m); err != nil {
				t.Fatal(err)
			}
			c.mutate(m)
			if err := schematest.Validate(s, m); err == nil {
				t.Errorf("schema accepted %v", m)
			}
		})
	}
}
