package apikey_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/pkg/apikey"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// stores are the store of the admin, who writes, and of the gateway's
// identity, who reads: looking up and listing need nothing the gateway
// may not do. kv is the admin's bucket, for planting keys.
func stores(t *testing.T) (admin, gateway *apikey.Store, kv jetstream.KeyValue) {
	t.Helper()
	srv := natstest.Start(t)
	ctx := testCtx(t)
	kv, err := srv.JetStream(t).KeyValue(ctx, bus.BucketAPIKeys)
	if err != nil {
		t.Fatal(err)
	}
	gwNC := srv.ConnAs(t, auth.Identity{Role: auth.RoleGateway})
	gwJS, err := jetstream.New(gwNC)
	if err != nil {
		t.Fatal(err)
	}
	gwKV, err := gwJS.KeyValue(ctx, bus.BucketAPIKeys)
	if err != nil {
		t.Fatal(err)
	}
	return apikey.NewStore(kv).WithConn(srv.Conn(t)), apikey.NewStore(gwKV).WithConn(gwNC), kv
}

func TestIssueLookupScopes(t *testing.T) {
	t.Parallel()
	s, gw, _ := stores(t)
	ctx := testCtx(t)
	exp := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	tok, k, err := s.IssueKey(ctx, apikey.Spec{Consumer: "team-a", Scopes: []apikey.Scope{apikey.ScopeCreate, apikey.ScopeRead, apikey.ScopeRead}, Name: "ci", ExpiresAt: exp})
	if err != nil {
		t.Fatal(err)
	}
	if k.ID == "" || !slices.Equal(k.Scopes, []apikey.Scope{apikey.ScopeRead, apikey.ScopeCreate}) || !k.ExpiresAt.Equal(exp) {
		t.Fatalf("issued %+v", k)
	}
	got, err := gw.Lookup(ctx, tok)
	if err != nil || got.ID != k.ID || got.Consumer != "team-a" {
		t.Fatalf("lookup: %+v, %v", got, err)
	}
	for sc, want := range map[apikey.Scope]bool{apikey.ScopeRead: true, apikey.ScopeCreate: true, apikey.ScopeDestroy: false, apikey.ScopeCredits: false, apikey.ScopeAdmin: false} {
		if got.Allows(sc) != want {
			t.Errorf("a read+create key allows %s: %v", sc, !want)
		}
	}
	if !got.Expired(exp) || got.Expired(exp.Add(-time.Second)) {
		t.Errorf("expiry at %s not judged right", exp)
	}
	// Roles of the first version, and Issue's.
	admin := apikey.Key{Role: apikey.RoleAdmin}
	consumer := apikey.Key{Role: apikey.RoleConsumer}
	if !admin.Allows(apikey.ScopeAdmin) || !admin.Allows(apikey.ScopeDestroy) || consumer.Allows(apikey.ScopeAdmin) || !consumer.Allows(apikey.ScopeCredits) {
		t.Errorf("role scopes: admin %v, consumer %v", admin.Grants(), consumer.Grants())
	}
	for _, bad := range []apikey.Spec{
		{Consumer: "no.dots"},
		{Consumer: "a", Scopes: []apikey.Scope{"root"}},
		{Consumer: "a", ExpiresAt: time.Now().Add(-time.Minute)},
		{Consumer: "a", Name: "line\nbreak"},
	} {
		if _, _, err := s.IssueKey(ctx, bad); err == nil {
			t.Errorf("issued %+v", bad)
		}
	}
	if _, err := gw.Lookup(ctx, "sbx_nope"); !errors.Is(err, apikey.ErrUnknown) {
		t.Errorf("unknown token: %v", err)
	}
}

func TestExpiredLookup(t *testing.T) {
	t.Parallel()
	s, gw, kv := stores(t)
	ctx := testCtx(t)
	tok, _, err := s.IssueKey(ctx, apikey.Spec{Consumer: "a", ExpiresAt: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gw.Lookup(ctx, tok); err != nil {
		t.Fatal(err)
	}
	// A key stored with an expiry that passed (as it will).
	past := fmt.Sprintf(`{"id":"kold","consumer":"a","scopes":["read"],"created_at":"2020-01-01T00:00:00Z","expires_at":"%s"}`, time.Now().Add(-time.Second).UTC().Format(time.RFC3339Nano))
	if _, err := kv.Put(ctx, apikey.Hash("sbx_expired"), []byte(past)); err != nil {
		t.Fatal(err)
	}
	if k, err := gw.Lookup(ctx, "sbx_expired"); !errors.Is(err, apikey.ErrExpired) || !errors.Is(err, apikey.ErrUnknown) || k.ID != "kold" {
		t.Fatalf("expired key: %+v, %v", k, err)
	}
}

func TestListAndRevokeByID(t *testing.T) {
	t.Parallel()
	s, gw, kv := stores(t)
	ctx := testCtx(t)

	// More keys than one direct get returns, so the scan pages.
	const n = 300
	var tokens []string
	ids := map[string]string{} // id -> consumer
	for i := range n {
		c := "a"
		if i%3 == 0 {
			c = "b"
		}
		tok, k, err := s.IssueKey(ctx, apikey.Spec{Consumer: c})
		if err != nil {
			t.Fatal(err)
		}
		tokens = append(tokens, tok)
		ids[k.ID] = c
	}
	// A key of the first version: a role, no id.
	if _, err := kv.Put(ctx, apikey.Hash("sbx_legacy"), []byte(`{"consumer":"b","role":"consumer","name":"old","created_at":"2020-01-01T00:00:00Z"}`)); err != nil {
		t.Fatal(err)
	}
	all, err := gw.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != n+1 {
		t.Fatalf("listed %d keys, want %d", len(all), n+1)
	}
	bs, err := gw.List(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	var legacy apikey.Key
	for _, k := range bs {
		if k.Consumer != "b" {
			t.Fatalf("consumer b's list holds %+v", k)
		}
		if k.Name == "old" {
			legacy = k
		}
	}
	if len(bs) != n/3+1 || legacy.ID == "" || bs[0].ID != legacy.ID {
		t.Fatalf("b's keys: %d, legacy %+v first %+v", len(bs), legacy, bs[0])
	}
	if lk, err := gw.Lookup(ctx, "sbx_legacy"); err != nil || lk.ID != legacy.ID {
		t.Fatalf("legacy lookup: %+v %v", lk, err)
	}

	// Revoke by id: a new key, and the legacy one.
	first, err := gw.Lookup(ctx, tokens[1])
	if err != nil {
		t.Fatal(err)
	}
	adminStore := s
	for _, id := range []string{first.ID, legacy.ID} {
		k, err := adminStore.RevokeID(ctx, id)
		if err != nil || k.ID != id {
			t.Fatalf("revoking %s: %+v, %v", id, k, err)
		}
	}
	for _, tok := range []string{tokens[1], "sbx_legacy"} {
		if _, err := gw.Lookup(ctx, tok); !errors.Is(err, apikey.ErrUnknown) {
			t.Fatalf("revoked key still looks up: %v", err)
		}
	}
	if _, err := adminStore.RevokeID(ctx, first.ID); !errors.Is(err, apikey.ErrUnknown) {
		t.Fatalf("revoking twice: %v", err)
	}
	if all, err = gw.List(ctx, ""); err != nil || len(all) != n-1 {
		t.Fatalf("after two revocations: %d keys, %v", len(all), err)
	}
	if _, err := apikey.NewStore(kv).List(ctx, ""); err == nil {
		t.Fatal("a store without a connection listed keys")
	}
}
