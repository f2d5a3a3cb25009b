package auth_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

const (
	cmds  = event.StreamCommands
	life  = event.StreamLifecycle
	meter = event.StreamMetering
	dlq   = event.StreamDLQ
	tmrs  = event.StreamTimers
)

// ledger is the credits bucket's stream, the ledger's, which no durable
// reads.
var ledger = bus.KVStream(bus.BucketCredits)

// TestConnect: the server lets in the authority's users, and no one else.
func TestConnect(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	refused := func(t *testing.T, opts ...nats.Option) {
		t.Helper()
		nc, err := nats.Connect(srv.ClientURL(), append(opts, nats.NoReconnect())...)
		if err == nil {
			nc.Close()
			t.Fatal("connected")
		}
		if !errors.Is(err, nats.ErrAuthorization) && !strings.Contains(strings.ToLower(err.Error()), "authorization violation") {
			t.Fatalf("refused with %v, want an authorization violation", err)
		}
	}
	t.Run("anonymous refused", func(t *testing.T) {
		t.Parallel()
		refused(t)
	})
	t.Run("credentials of another authority refused", func(t *testing.T) {
		t.Parallel()
		other, err := auth.Open(t.TempDir() + "/other")
		if err != nil {
			t.Fatal(err)
		}
		creds, _, err := other.Issue(admin, auth.IssueOptions{Unlisted: true})
		if err != nil {
			t.Fatal(err)
		}
		opts, err := auth.ConnectOptions(creds)
		if err != nil {
			t.Fatal(err)
		}
		// The server cannot resolve the other authority's account: it
		// never lets the client in (nor tells it why before the
		// client's connect timeout).
		nc, err := nats.Connect(srv.ClientURL(), append(opts, nats.NoReconnect())...)
		if err == nil {
			nc.Close()
			t.Fatal("connected")
		}
	})
	t.Run("a user of the account signed by a key it does not trust refused", func(t *testing.T) {
		t.Parallel()
		forger, err := nkeys.CreateAccount()
		if err != nil {
			t.Fatal(err)
		}
		ukp, err := nkeys.CreateUser()
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := ukp.PublicKey()
		uc := jwt.NewUserClaims(pub)
		uc.Name = "admin"
		uc.IssuerAccount = srv.Auth.AccountPublicKey()
		uc.Permissions = admin.Permissions()
		token, err := uc.Encode(forger)
		if err != nil {
			t.Fatal(err)
		}
		seed, _ := ukp.Seed()
		refused(t, nats.UserJWTAndSeed(token, string(seed)))
	})
	t.Run("a user's JWT with another user's seed refused", func(t *testing.T) {
		t.Parallel()
		a, b := srv.Creds(t, dev), srv.Creds(t, admin)
		token, err := jwt.ParseDecoratedJWT(b)
		if err != nil {
			t.Fatal(err)
		}
		kp, err := jwt.ParseDecoratedUserNKey(a)
		if err != nil {
			t.Fatal(err)
		}
		seed, _ := kp.Seed()
		refused(t, nats.UserJWTAndSeed(token, string(seed)))
	})
	t.Run("the system user sees none of the account's streams", func(t *testing.T) {
		t.Parallel()
		opts, err := auth.ConnectOptions(srv.Auth.SystemCreds())
		if err != nil {
			t.Fatal(err)
		}
		nc, err := nats.Connect(srv.ClientURL(), opts...)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		m, err := nc.Request("$JS.API.STREAM.INFO."+cmds, nil, refusalWait)
		if err != nil {
			return // no JetStream in the system account at all
		}
		var r struct {
			Error  *struct{ Description string } `json:"error"`
			Config *struct{ Name string }        `json:"config"`
		}
		if err := json.Unmarshal(m.Data, &r); err != nil {
			t.Fatalf("answer %q: %v", m.Data, err)
		}
		if r.Error == nil || r.Config != nil {
			t.Fatalf("the system user read %s: %s", cmds, m.Data)
		}
	})
	// Every identity gets in, with room in the server's control line
	// (4 KiB by default) for a client name: a user's JWT travels in its
	// CONNECT, and the gateway's is the longest (about 3.9 KiB, leaving
	// about 130 bytes).
	name := strings.Repeat("n", 100)
	for _, id := range []auth.Identity{admin, gateway, registry, metering, local, saas, dev, billing,
		{Role: auth.RoleProvisioner, Extension: strings.Repeat("x", 63)}, {Role: auth.RoleBilling, Billing: "audit"}} {
		t.Run(id.UserName()+" connects", func(t *testing.T) {
			t.Parallel()
			opts, err := auth.ConnectOptions(srv.Creds(t, id))
			if err != nil {
				t.Fatal(err)
			}
			nc, err := nats.Connect(srv.ClientURL(), append(opts, nats.Name(name), nats.NoReconnect())...)
			if err != nil {
				t.Fatalf("connecting with a %d-byte client name: %v", len(name), err)
			}
			defer nc.Close()
			if err := nc.Flush(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestPermissions is the table of identity × action: every refusal is
// the server's permissions violation with nothing done, every allowance
// works.
func TestPermissions(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.runRows(t, permissionRows(t))
}

func permissionRows(t *testing.T) []row {
	var rows []row
	// What no tenant, worker or billing reader may do.
	for _, who := range []auth.Identity{dev, local, billing} {
		rows = append(rows,
			refuse(who, "publishes a saas-stub create command", jsPublish(cmds, createCommand(t, "saas-stub", "dev"))),
			refuse(who, "forges another consumer's saas-stub ready event", jsPublish(life, readyEvent(t, "other", "saas-stub"))),
			refuse(who, "forges another consumer's saas-stub destroyed event with a meter amount", jsPublish(life, destroyedEvent(t, "other", "saas-stub", 1_000_000))),
			refuse(who, "requests a grant", grant()),
			refuse(who, "deletes the dead-letter stream", deleteStream(dlq)),
			refuse(who, "raises the commands stream's replicas", updateStream(cmds, moreReplicas)),
			refuse(who, "makes the commands stream keep less", updateStream(cmds, keepLess)),
			refuse(who, "creates a stream", createStream()),
		)
		for _, b := range []string{bus.BucketCredits, bus.BucketCatalog, bus.BucketAPIKeys} {
			rows = append(rows,
				refuse(who, "publishes a "+b+" key", kvPublish(b, uid("key"))),
				// The KeyValue API stops at opening the bucket: the
				// identity may not even look it up.
				refuse(who, "puts a "+b+" key with KeyValue", kvPut(b, uid("key")).refusedAt("$JS.API.STREAM.INFO."+bus.KVStream(b))),
			)
		}
	}

	// Tenant dev.
	rows = append(rows,
		refuse(dev, "asks for another consumer", askFor("other")),
		allow(dev, "asks for itself", askFor("dev")),
		refuse(dev, "publishes a destroy command", jsPublish(cmds, destroyCommand(t, "local", "dev"))),
		refuse(dev, "publishes a metering event", jsPublish(meter, meterEvent("dev", "grant"))),
		refuse(dev, "subscribes to another tenant's events", subscribe(event.ConsumerLifecycleFilter("other"), readyEvent(t, "other", "local").Subject)),
		refuse(dev, "subscribes to every lifecycle event", subscribe(event.SubjectLifecycle, readyEvent(t, "other", "local").Subject)),
		refuse(dev, "subscribes to another tenant's metering events", subscribe(event.MeteringFilter("other"), event.MeteringSubject("other", "debit"))),
		refuse(dev, "subscribes to every metering event", subscribe(event.SubjectMetering, event.MeteringSubject("other", "debit"))),
		refuse(dev, "reads another tenant's events", directGet(life, event.ConsumerLifecycleFilter("other"), readyEvent(t, "other", "local"))),
		refuse(dev, "reads every tenant's events", directGet(life, "sandboxer.evt.*.>", readyEvent(t, "other", "local"))),
		refuse(dev, "reads another tenant's metering events", directGet(meter, event.MeteringFilter("other"), meterEvent("other", "debit"))),
		refuse(dev, "reads by a direct get naming the subject in the body", request("$JS.API.DIRECT.GET."+life,
			`{"last_by_subj":"sandboxer.evt.other.>"}`, nil)),
		refuse(dev, "reads its own subjects by sequence", request("$JS.API.DIRECT.GET."+life+"."+event.ConsumerLifecycleFilter("dev"), `{"seq":1}`, nil)),
		refuse(dev, "subscribes to every inbox", subscribe("_INBOX.>", "_INBOX.gateway."+uid("reply"))),
		refuse(dev, "subscribes to another tenant's inbox", subscribe("_INBOX.tenant-other.>", "_INBOX.tenant-other."+uid("reply"))),
		refuse(dev, "subscribes to the gateway's inbox", subscribe("_INBOX.gateway.>", "_INBOX.gateway."+uid("reply"))),
		allow(dev, "subscribes to its own events", subscribe(event.ConsumerLifecycleFilter("dev"), readyEvent(t, "dev", "local").Subject)),
		allow(dev, "subscribes to its own metering events", subscribe(event.MeteringFilter("dev"), event.MeteringSubject("dev", "debit"))),
		// A tenant sends nothing to JetStream: it asks the gateway
		// (sandboxer.req.dev.get) and listens.
		refuse(dev, "reads its own event with a direct get", ownGet(life, readyEvent(t, "dev", "local"))),
		refuse(dev, "reads its own metering event with a direct get", ownGet(meter, meterEvent("dev", uid("kind")))),
		refuse(dev, "creates a consumer of its own events", createConsumer(
			"$JS.API.CONSUMER.CREATE."+life+".dev-reader."+event.ConsumerLifecycleFilter("dev"), life, "dev-reader",
			jetstream.ConsumerConfig{Name: "dev-reader", FilterSubject: event.ConsumerLifecycleFilter("dev"), AckPolicy: jetstream.AckNonePolicy})),
	)

	// Provisioners: local's worker, and saas-stub's for what a worker may
	// do for its own backend only.
	localDurable, saasDurable := bus.DurableProvisioner("local"), bus.DurableProvisioner("saas-stub")
	// orphanedEvent announces a leftover of extension's sandbox, its
	// consumer unknown (the sandbox has no event).
	orphanedEvent := func(extension string) *nats.Msg {
		id := uid("sbx")
		ref := event.Ref{SandboxID: id, Consumer: event.Unrouted, Profile: event.Unrouted, Extension: extension}
		return encode(t, event.LifecycleSubject(event.Unrouted, extension, id, event.StateOrphaned), event.TypeOrphaned, id+".orphaned.0",
			event.Orphaned{Ref: ref, Reason: event.ReasonNoEvents, Handle: event.Handle{SandboxID: id, Host: "localhost"}, Worker: "w1"})
	}
	rows = append(rows,
		allow(local, "announces an orphan of its own backend", jsPublish(life, orphanedEvent("local"))),
		refuse(local, "announces an orphan of saas-stub's", jsPublish(life, orphanedEvent("saas-stub"))),
		refuse(local, "subscribes to saas-stub's commands", subscribe(event.CommandFilter("saas-stub"), destroyCommand(t, "saas-stub", "dev").Subject)),
		refuse(local, "subscribes to its own commands, which come through its durable", subscribe(event.CommandFilter("local"), destroyCommand(t, "local", "dev").Subject)),
		refuse(local, "pulls saas-stub's durable", pull(cmds, saasDurable)),
		refuse(local, "fetches from saas-stub's durable with jetstream", fetch(cmds, saasDurable).withEffect(delivered(cmds, saasDurable))),
		refuse(local, "publishes a metering event", jsPublish(meter, meterEvent("dev", "debit"))),
		refuse(local, "publishes saas-stub's ready event", jsPublish(life, readyEvent(t, "dev", "saas-stub"))),
		allow(local, "publishes its own backend's ready event", jsPublish(life, readyEvent(t, "dev", "local"))),
		allow(local, "publishes its own backend's destroyed event with a meter", jsPublish(life, destroyedEvent(t, "dev", "local", 0))),
		refuse(local, "publishes saas-stub's destroy command", jsPublish(cmds, destroyCommand(t, "saas-stub", "dev"))),
		allow(local, "publishes its own destroy command", jsPublish(cmds, destroyCommand(t, "local", "dev"))),
		allow(local, "forwards its own destroy command to a host", jsPublish(cmds, onHost(destroyCommand(t, "local", "dev"), "host-a"))),
		refuse(local, "forwards saas-stub's destroy command to a host", jsPublish(cmds, onHost(destroyCommand(t, "saas-stub", "dev"), "host-a"))),
		refuse(local, "publishes its own create command bound to a host", jsPublish(cmds, onHost(createCommand(t, "local", "dev"), "host-a"))),
		refuse(local, "publishes its own create command", jsPublish(cmds, createCommand(t, "local", "dev"))),
		allow(local, "writes its heartbeat", kvPublish(bus.BucketWorkers, "local."+uid("w"))),
		refuse(local, "writes saas-stub's heartbeat", kvPublish(bus.BucketWorkers, "saas-stub."+uid("w"))),
		allow(local, "reads a catalog key", ownGet(bus.KVStream(bus.BucketCatalog), &nats.Msg{Subject: "$KV." + bus.BucketCatalog + "." + uid("key"), Data: []byte(`{"ok":1}`)})),
		allow(local, "subscribes to catalog changes", subscribe("$KV."+bus.BucketCatalog+".>", "$KV."+bus.BucketCatalog+"."+uid("key"))),
		allow(local, "subscribes to its backend's events", subscribe(event.ExtensionLifecycleFilter("local"), readyEvent(t, "dev", "local").Subject)),
		refuse(local, "subscribes to saas-stub's events", subscribe(event.ExtensionLifecycleFilter("saas-stub"), readyEvent(t, "dev", "saas-stub").Subject)),
		refuse(local, "reads saas-stub's events", directGet(life, event.ExtensionLifecycleFilter("saas-stub"), readyEvent(t, "dev", "saas-stub"))),
		refuse(local, "updates the workers bucket", updateStream(bus.KVStream(bus.BucketWorkers), keepLess)),
		refuse(local, "deletes its durable", jsAPI("$JS.API.CONSUMER.DELETE."+cmds+"."+localDurable, nil, consumerChanged(cmds, localDurable))),
		createDurable(local, cmds, "sandboxer.cmd."+uid("ext")+".>"),
		refuse(local, "creates a durable through the legacy endpoint", legacyDurable()),
		refuse(local, "creates an unnamed consumer", createConsumer("$JS.API.CONSUMER.CREATE."+dlq, dlq, "", jetstream.ConsumerConfig{AckPolicy: jetstream.AckNonePolicy}).
			withEffect(consumerCount(dlq))),
		refuse(local, "creates a consumer of its backend's events", namedEphemeral(life, event.ExtensionLifecycleFilter("local"))),
		refuse(local, "watches the catalog with a consumer", namedEphemeral(bus.KVStream(bus.BucketCatalog), "$KV."+bus.BucketCatalog+".>")),
		refuse(local, "opens an ordered consumer", action{
			refusal: `Publish to "$JS.API.CONSUMER.CREATE.` + life + ".",
			do: func(ctx context.Context, p *probe) error {
				oc, err := p.js.OrderedConsumer(ctx, life, jetstream.OrderedConsumerConfig{FilterSubjects: []string{event.ExtensionLifecycleFilter("local")}})
				if err != nil {
					return err
				}
				_, err = oc.Next(jetstream.FetchContext(ctx))
				return err
			},
		}),
		refuse(saas, "publishes its own backend's create command", jsPublish(cmds, createCommand(t, "saas-stub", "dev"))),
		// Its job: a worker announces every consumer's sandboxes of its
		// backend, meter included.
		allow(saas, "publishes its own backend's destroyed event for any consumer, with a meter", jsPublish(life, destroyedEvent(t, "other", "saas-stub", 42))),
		refuse(saas, "forges local's destroyed event", jsPublish(life, destroyedEvent(t, "other", "local", 42))),
	)

	// Billing readers write nothing and read through their durable only.
	rows = append(rows,
		refuse(billing, "publishes a metering event", jsPublish(meter, meterEvent("dev", "debit"))),
		refuse(billing, "publishes a dead letter", jsPublish(dlq, &nats.Msg{Subject: event.DLQSubject(cmds, localDurable), Data: []byte("{}")})),
		refuse(billing, "schedules a timer", jsPublish(tmrs, &nats.Msg{Subject: event.ExpiryScheduleSubject(uid("sbx")), Data: []byte("{}")})),
		refuse(billing, "asks for a sandbox", askFor("dev")),
		refuse(billing, "asks for a balance", request(event.SubjectMeteringBalance, `{"consumer":"dev"}`, nil)),
		refuse(billing, "asks for the catalog", request(event.SubjectCatalog, `{}`, nil)),
		refuse(billing, "publishes a workers key", kvPublish(bus.BucketWorkers, "local."+uid("w"))),
		refuse(billing, "publishes an idempotency key", kvPublish(bus.BucketIdempotency, uid("key"))),
		refuse(billing, "subscribes to the metering stream's subjects", subscribe(event.SubjectMetering, event.MeteringSubject("dev", "debit"))),
		refuse(billing, "makes the metering stream keep less", updateStream(meter, keepLess)),
		refuse(billing, "deletes its durable", jsAPI("$JS.API.CONSUMER.DELETE."+meter+"."+billing.BillingDurable(), nil, consumerChanged(meter, billing.BillingDurable()))),
		refuse(billing, "redefines its durable", jsAPI("$JS.API.CONSUMER.CREATE."+meter+"."+billing.BillingDurable(),
			consumerConfig(meter, jetstream.ConsumerConfig{Durable: billing.BillingDurable(), FilterSubject: event.MeteringFilter("dev"), AckPolicy: jetstream.AckExplicitPolicy}),
			consumerChanged(meter, billing.BillingDurable()))),
		createDurable(billing, meter, event.MeteringFilter("dev")),
	)

	// Services: their jobs, and never the topology.
	rows = append(rows,
		allow(gateway, "publishes a create command", jsPublish(cmds, createCommand(t, "local", "dev"))),
		allow(gateway, "reads events through an ordered consumer", orderedRead(readyEvent(t, "dev", "local"))),
		allow(gateway, "reads a pool's queue depth", jsAPI("$JS.API.CONSUMER.INFO."+cmds+"."+localDurable, nil, nil)),
		refuse(gateway, "makes the lifecycle stream keep less", updateStream(life, keepLess)),
		refuse(gateway, "makes the catalog bucket keep less", updateStream(bus.KVStream(bus.BucketCatalog), keepLess)),
		// A sandbox's record is its events: the gateway writes the first,
		// a rejection and a re-drive's claim, and nothing a worker does.
		allow(gateway, "records a requested sandbox", jsPublish(life, requestedEvent(t, "dev", "local"))),
		allow(gateway, "claims a destroy attempt", jsPublish(life, destroyingEvent(t, "dev", "local"))),
		refuse(gateway, "announces a ready sandbox", jsPublish(life, readyEvent(t, "dev", "local"))),
		refuse(gateway, "fails a sandbox", jsPublish(life, failedEvent(t, "dev", "local"))),
		allow(gateway, "reads a sandbox's events in one batched direct get", batchedGet()),
		refuse(gateway, "creates a stream", createStream()),
		refuse(gateway, "creates a stream with jetstream", action{
			refusal: `Publish to "$JS.API.STREAM.CREATE.GATEWAY_STREAM"`,
			do: func(ctx context.Context, p *probe) error {
				_, err := p.js.CreateStream(ctx, jetstream.StreamConfig{Name: "GATEWAY_STREAM", Subjects: []string{"gateway.>"}})
				return err
			},
			effect: streamExists("GATEWAY_STREAM"),
		}),
		refuse(gateway, "deletes the lifecycle stream", deleteStream(life)),
		refuse(gateway, "deletes the registry's durable", jsAPI("$JS.API.CONSUMER.DELETE."+life+"."+bus.DurableRegistry, nil, consumerChanged(life, bus.DurableRegistry))),
		refuse(gateway, "redefines metering's durable", jsAPI("$JS.API.CONSUMER.CREATE."+life+"."+bus.DurableMetering,
			consumerConfig(life, jetstream.ConsumerConfig{Durable: bus.DurableMetering, FilterSubject: "sandboxer.evt.nobody.>", AckPolicy: jetstream.AckExplicitPolicy}),
			consumerChanged(life, bus.DurableMetering))),
		refuse(gateway, "redefines the registry's durable with a filter in the subject", jsAPI("$JS.API.CONSUMER.CREATE."+life+"."+bus.DurableRegistry+".sandboxer.evt.nobody.>",
			consumerConfig(life, jetstream.ConsumerConfig{Durable: bus.DurableRegistry, FilterSubject: "sandboxer.evt.nobody.>", AckPolicy: jetstream.AckExplicitPolicy}),
			consumerChanged(life, bus.DurableRegistry))),
		refuse(gateway, "redefines metering's durable through the unnamed endpoint", jsAPI("$JS.API.CONSUMER.CREATE."+life,
			consumerConfig(life, jetstream.ConsumerConfig{Name: bus.DurableMetering, FilterSubject: "sandboxer.evt.nobody.>", AckPolicy: jetstream.AckExplicitPolicy}),
			consumerChanged(life, bus.DurableMetering))),
		refuse(gateway, "pulls metering's durable", pull(life, bus.DurableMetering)),
		allow(gateway, "puts an apikeys key with KeyValue", kvPut(bus.BucketAPIKeys, uid("key"))),
		refuse(gateway, "publishes a credits key", kvPublish(bus.BucketCredits, uid("key"))),
		refuse(gateway, "publishes a metering event", jsPublish(meter, meterEvent("dev", "debit"))),

		allow(registry, "publishes a catalog key", kvPublish(bus.BucketCatalog, uid("key"))),
		refuse(registry, "makes the timers stream keep less", updateStream(tmrs, keepLess)),
		refuse(registry, "makes the catalog bucket keep less", updateStream(bus.KVStream(bus.BucketCatalog), keepLess)),
		refuse(registry, "creates a stream", createStream()),
		refuse(registry, "purges the lifecycle stream", jsAPI("$JS.API.STREAM.PURGE."+life, nil, streamMsgGone(life, func(p *probe) uint64 { return p.lifeSeq }))),
		refuse(registry, "purges a schedule off the timers stream", purgeTimer()),
		refuse(metering, "purges a schedule off the timers stream", purgeTimer()),
		allow(registry, "cancels an expiry schedule", jsPublish(tmrs, cancelMarker(event.ExpiryScheduleSubject(uid("sbx"))))),
		refuse(metering, "cancels an expiry schedule", jsPublish(tmrs, cancelMarker(event.ExpiryScheduleSubject(uid("sbx"))))),
		allow(metering, "cancels an accrual schedule", jsPublish(tmrs, cancelMarker(event.AccrualScheduleSubject(uid("sbx"))))),
		refuse(registry, "cancels an accrual schedule", jsPublish(tmrs, cancelMarker(event.AccrualScheduleSubject(uid("sbx"))))),
		refuse(registry, "publishes a credits key", kvPublish(bus.BucketCredits, uid("key"))),
		refuse(registry, "publishes a metering event", jsPublish(meter, meterEvent("dev", "debit"))),
		allow(registry, "folds the lifecycle stream through an ordered consumer", orderedRead(readyEvent(t, "dev", "local"))),
		refuse(registry, "pulls metering's durable", pull(life, bus.DurableMetering)),
		allow(registry, "claims a destroy attempt", jsPublish(life, destroyingEvent(t, "dev", "local"))),
		allow(registry, "reads a sandbox's events in one batched direct get", batchedGet()),
		refuse(registry, "records a requested sandbox", jsPublish(life, requestedEvent(t, "dev", "local"))),
		allow(registry, "schedules a destroy retry", jsPublish(tmrs, &nats.Msg{Subject: event.RetryScheduleSubject(uid("sbx")), Data: []byte("{}")})),
		refuse(registry, "schedules a hold deadline", jsPublish(tmrs, &nats.Msg{Subject: event.HoldDeadlineScheduleSubject(uid("sbx")), Data: []byte("{}")})),
		allow(registry, "fails a sandbox past its deadline", jsPublish(life, failedEvent(t, "dev", "local"))),
		refuse(registry, "announces a ready sandbox", jsPublish(life, readyEvent(t, "dev", "local"))),

		allow(metering, "puts a credits key with KeyValue", kvPut(bus.BucketCredits, uid("key"))),
		allow(metering, "publishes a metering event", jsPublish(meter, meterEvent("dev", "debit"))),
		refuse(metering, "makes the credits bucket keep less", updateStream(bus.KVStream(bus.BucketCredits), keepLess)),
		refuse(metering, "makes the metering stream keep less", updateStream(meter, keepLess)),
		refuse(metering, "creates a stream", createStream()),
		allow(metering, "writes a ledger entry", kvPublish(bus.BucketCredits, bus.LedgerPrefix+uid("dev")+".grant.g1")),
		refuse(metering, "deletes the credits bucket, the ledger's", deleteStream(bus.KVStream(bus.BucketCredits))),
		refuse(metering, "puts a catalog key with KeyValue", kvPut(bus.BucketCatalog, uid("key"))),
		allow(metering, "schedules a hold deadline", jsPublish(tmrs, &nats.Msg{Subject: event.HoldDeadlineScheduleSubject(uid("sbx")), Data: []byte("{}")})),
		refuse(metering, "schedules a destroy retry", jsPublish(tmrs, &nats.Msg{Subject: event.RetryScheduleSubject(uid("sbx")), Data: []byte("{}")})),
		refuse(metering, "fails a sandbox", jsPublish(life, failedEvent(t, "dev", "local"))),
		allow(metering, "rejects a sandbox whose hold's deadline passed", jsPublish(life, rejectedEvent(t, "dev", "local"))),
		refuse(registry, "rejects a sandbox", jsPublish(life, rejectedEvent(t, "dev", "local"))),

		refuse(local, "makes the lifecycle stream keep less", updateStream(life, keepLess)),
	)
	return rows
}

// withEffect is a with effect instead of its own.
func (a action) withEffect(effect func(ctx context.Context, p *probe) (bool, error)) action {
	a.effect = effect
	return a
}

// ownGet is [directGet] of m's own subject: nothing else can be its last
// message.
func ownGet(stream string, m *nats.Msg) action { return directGet(stream, m.Subject, m) }

// createDurable: who creates a durable on stream with the jetstream API,
// filtered on filter (which no other durable of a work-queue stream
// holds, so the server would take it).
func createDurable(who auth.Identity, stream, filter string) row {
	name := uid("durable")
	return refuse(who, "creates a durable on "+stream, action{
		refusal: pubRefusal("$JS.API.CONSUMER.CREATE." + stream + "." + name + "." + filter),
		do: func(ctx context.Context, p *probe) error {
			_, err := p.js.CreateOrUpdateConsumer(ctx, stream, jetstream.ConsumerConfig{Durable: name, FilterSubject: filter, AckPolicy: jetstream.AckExplicitPolicy})
			return err
		},
		effect: consumerExists(stream, name),
	})
}

// legacyDurable creates a durable on the commands stream through
// $JS.API.CONSUMER.DURABLE.CREATE, filtered on commands of an extension
// no other durable takes.
func legacyDurable() action {
	name := uid("durable")
	return createConsumer("$JS.API.CONSUMER.DURABLE.CREATE."+cmds+"."+name, cmds, name,
		jetstream.ConsumerConfig{Durable: name, FilterSubject: event.CommandFilter(uid("ext")), AckPolicy: jetstream.AckExplicitPolicy})
}

// namedEphemeral creates an ephemeral consumer on stream named in the
// subject, as ordered consumers do.
func namedEphemeral(stream, filter string) action {
	name := uid("ephemeral")
	return createConsumer("$JS.API.CONSUMER.CREATE."+stream+"."+name+"."+filter, stream, name,
		jetstream.ConsumerConfig{Name: name, FilterSubject: filter, AckPolicy: jetstream.AckNonePolicy, InactiveThreshold: time.Minute})
}

// orderedRead reads m back through an ordered consumer on the lifecycle
// stream, as the gateway's event streams do; setup publishes it.
func orderedRead(m *nats.Msg) action {
	return action{
		setup: func(ctx context.Context, p *probe) error {
			_, err := p.env.js.PublishMsg(ctx, m)
			return err
		},
		do: func(ctx context.Context, p *probe) error {
			oc, err := p.js.OrderedConsumer(ctx, life, jetstream.OrderedConsumerConfig{FilterSubjects: []string{m.Subject}})
			if err != nil {
				return err
			}
			got, err := oc.Next(jetstream.FetchContext(ctx))
			if err != nil {
				return err
			}
			if got.Subject() != m.Subject {
				return fmt.Errorf("read %s, want %s", got.Subject(), m.Subject)
			}
			return nil
		},
	}
}

// TestAdmin: the admin may do what the table refuses the others, one row
// per family, so the refusals are the permissions' and not a broken
// server's.
func TestAdmin(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.runRows(t, []row{
		allow(admin, "publishes a saas-stub create command", jsPublish(cmds, createCommand(t, "saas-stub", "dev"))),
		allow(admin, "publishes another consumer's destroyed event with a meter amount", jsPublish(life, destroyedEvent(t, "other", "saas-stub", 1_000_000))),
		allow(admin, "publishes a metering event", jsPublish(meter, meterEvent("dev", "debit"))),
		allow(admin, "publishes a credits key", kvPublish(bus.BucketCredits, uid("key"))),
		allow(admin, "puts an apikeys key with KeyValue", kvPut(bus.BucketAPIKeys, uid("key"))),
		allow(admin, "requests a grant", grant()),
		allow(admin, "asks for another consumer", askFor("other")),
		allow(admin, "updates the commands stream", updateStream(cmds, func(c *jetstream.StreamConfig) { c.Description = "updated by the admin" })),
		allow(admin, "deletes the dead-letter stream", deleteStream(dlq)),
		allow(admin, "creates a stream", createStream()),
		allow(admin, "creates a durable through the legacy endpoint", legacyDurable()),
		allow(admin, "creates an unnamed consumer", createConsumer("$JS.API.CONSUMER.CREATE."+ledger, ledger, "",
			jetstream.ConsumerConfig{AckPolicy: jetstream.AckNonePolicy, InactiveThreshold: time.Minute}).withEffect(consumerCount(ledger))),
		allow(admin, "deletes the registry's durable", jsAPI("$JS.API.CONSUMER.DELETE."+life+"."+bus.DurableRegistry, nil, consumerChanged(life, bus.DurableRegistry))),
		allow(admin, "pulls metering's durable", pull(life, bus.DurableMetering)),
		allow(admin, "fetches and acks saas-stub's command", fetch(cmds, bus.DurableProvisioner("saas-stub"))),
		allow(admin, "acks with the v2 ack form", ackWithV2(meter, auditDurable)),
		allow(admin, "resets the billing durable", jsAPI("$JS.API.CONSUMER.RESET."+meter+"."+billing.BillingDurable(), nil, nil)),
		allow(admin, "subscribes to saas-stub's commands", subscribe(event.CommandFilter("saas-stub"), destroyCommand(t, "saas-stub", "dev").Subject)),
		allow(admin, "subscribes to every inbox", subscribe("_INBOX.>", "_INBOX.gateway."+uid("reply"))),
		allow(admin, "reads another tenant's events", otherTenantGet(life)),
		allow(admin, "reads another tenant's metering events", otherTenantGet(meter)),
	})
}

// otherTenantGet is a [directGet] of a fresh consumer's events (or
// metering events) on stream, which only that consumer's message matches.
func otherTenantGet(stream string) action {
	consumer := uid("tenant")
	if stream == meter {
		return directGet(stream, event.MeteringFilter(consumer), meterEvent(consumer, "debit"))
	}
	return directGet(stream, event.ConsumerLifecycleFilter(consumer),
		&nats.Msg{Subject: event.LifecycleSubject(consumer, "local", uid("sbx"), event.StateReady), Data: []byte(`{"ready":1}`)})
}

// ackWithV2 pulls one message of durable on stream as the admin and acks
// it as the row's identity in the v2 form: the form the server would take
// from a forger.
func ackWithV2(stream, durable string) action {
	var reply string
	return action{
		setup: func(ctx context.Context, p *probe) error {
			c, err := p.env.js.Consumer(ctx, stream, durable)
			if err != nil {
				return err
			}
			m, err := c.Next(jetstream.FetchContext(ctx))
			if err != nil {
				return err
			}
			md, err := m.Metadata()
			if err != nil {
				return err
			}
			p.seq, reply = md.Sequence.Stream, m.Reply()
			return nil
		},
		do: func(ctx context.Context, p *probe) error {
			if err := p.nc.Publish(ackV2(p.srv.Auth.AccountPublicKey(), reply), []byte("+ACK")); err != nil {
				return err
			}
			return p.nc.FlushWithContext(ctx)
		},
		effect: func(ctx context.Context, p *probe) (bool, error) {
			info, err := consumerInfo(ctx, p.env, stream, durable)
			if err != nil {
				return false, err
			}
			return info.AckFloor.Stream >= p.seq, nil
		},
	}
}

// TestProvisionerDurable: a worker pulls and acks its own pool's
// commands, and cannot touch another pool's.
func TestProvisionerDurable(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	localDurable, saasDurable := bus.DurableProvisioner("local"), bus.DurableProvisioner("saas-stub")

	t.Run("provisioner-local pulls and double-acks its own command, which leaves the work queue", func(t *testing.T) {
		t.Parallel()
		ctx := testCtx(t)
		m := createCommand(t, "local", "dev")
		ack, err := e.js.PublishMsg(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		js := e.srv.JetStreamAs(t, local)
		c, err := js.Consumer(ctx, cmds, localDurable)
		if err != nil {
			t.Fatal(err)
		}
		got, err := c.Next(jetstream.FetchContext(ctx))
		if err != nil {
			t.Fatal(err)
		}
		if got.Subject() != m.Subject {
			t.Fatalf("pulled %s, want %s", got.Subject(), m.Subject)
		}
		if err := got.DoubleAck(ctx); err != nil {
			t.Fatalf("double ack: %v", err)
		}
		s, err := e.js.Stream(ctx, cmds)
		if err != nil {
			t.Fatal(err)
		}
		await(t, effectWait, "the acked command to leave the work queue", func() (bool, string) {
			_, err := s.GetMsg(ctx, ack.Sequence)
			return errors.Is(err, jetstream.ErrMsgNotFound), fmt.Sprint(err)
		})
		info, err := consumerInfo(ctx, e, cmds, localDurable)
		if err != nil {
			t.Fatal(err)
		}
		if info.NumPending != 0 || info.NumAckPending != 0 {
			t.Fatalf("pending %d, ack pending %d after the ack", info.NumPending, info.NumAckPending)
		}
	})

	// In order: saas-stub's fixture command, undelivered, then delivered
	// to the admin and unacknowledged.
	t.Run("another pool's durable", func(t *testing.T) {
		t.Parallel()
		t.Run("provisioner-local pulls it", func(t *testing.T) {
			e.run(t, refuse(local, "pulls saas-stub's durable", pull(cmds, saasDurable)))
		})
		t.Run("provisioner-local reads its info", func(t *testing.T) {
			e.run(t, refuse(local, "reads saas-stub's durable", request("$JS.API.CONSUMER.INFO."+cmds+"."+saasDurable, "", nil)))
		})
		ctx := testCtx(t)
		c, err := e.js.Consumer(ctx, cmds, saasDurable)
		if err != nil {
			t.Fatal(err)
		}
		m, err := c.Next(jetstream.FetchContext(ctx))
		if err != nil {
			t.Fatal(err)
		}
		md, err := m.Metadata()
		if err != nil {
			t.Fatal(err)
		}
		if md.Sequence.Stream != e.cmdSeq {
			t.Fatalf("the admin pulled %d, want the fixture %d", md.Sequence.Stream, e.cmdSeq)
		}
		// Any ack, nak or term of it moves the durable off this state.
		snap, err := consumerInfo(ctx, e, cmds, saasDurable)
		if err != nil {
			t.Fatal(err)
		}
		if snap.NumAckPending != 1 {
			t.Fatalf("ack pending %d, want the admin's 1", snap.NumAckPending)
		}
		acked := func(ctx context.Context, p *probe) (bool, error) {
			info, err := consumerInfo(ctx, p.env, cmds, saasDurable)
			if err != nil {
				return false, err
			}
			return info.NumAckPending != snap.NumAckPending || info.NumPending != snap.NumPending ||
				info.AckFloor != snap.AckFloor || info.NumRedelivered != snap.NumRedelivered, nil
		}
		v1, v2 := m.Reply(), ackV2(e.srv.Auth.AccountPublicKey(), m.Reply())
		if !strings.HasPrefix(v1, "$JS.ACK."+cmds+"."+saasDurable+".") {
			t.Fatalf("reply %s is not a v1 ack subject", v1)
		}
		for _, body := range []string{"+ACK", "+TERM", "-NAK"} {
			t.Run("provisioner-local acks it "+body+" in the v1 form", func(t *testing.T) {
				e.run(t, refuse(local, "acks saas-stub's command "+body, publish(&nats.Msg{Subject: v1, Data: []byte(body)}, acked)))
			})
		}
		t.Run("provisioner-local acks it in the v2 form", func(t *testing.T) {
			e.run(t, refuse(local, "acks saas-stub's command in the v2 form", publish(&nats.Msg{Subject: v2, Data: []byte("+ACK")}, acked)))
		})
		// The v2 subject was one the server takes: the admin's ack of it
		// is the effect the refusal kept from happening.
		t.Run("admin acks it in the v2 form", func(t *testing.T) {
			e.run(t, allow(admin, "acks saas-stub's command in the v2 form", publish(&nats.Msg{Subject: v2, Data: []byte("+ACK")}, acked)))
		})
	})
}

// TestBillingDurable: a billing reader reads, acks and rewinds its own
// durable, and no other.
func TestBillingDurable(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	own := billing.BillingDurable()

	t.Run("billing fetches, acks and resets its own durable", func(t *testing.T) {
		t.Parallel()
		ctx := testCtx(t)
		for range 2 {
			if _, err := e.js.PublishMsg(ctx, meterEvent("dev", "debit")); err != nil {
				t.Fatal(err)
			}
		}
		nc := e.srv.ConnAs(t, billing)
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		c, err := js.Consumer(ctx, meter, own)
		if err != nil {
			t.Fatal(err)
		}
		var seqs []uint64
		for range 3 { // the fixture and the two above
			m, err := c.Next(jetstream.FetchContext(ctx))
			if err != nil {
				t.Fatal(err)
			}
			md, err := m.Metadata()
			if err != nil {
				t.Fatal(err)
			}
			seqs = append(seqs, md.Sequence.Stream)
			if err := m.DoubleAck(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if seqs[0] != e.meterSeq {
			t.Fatalf("first read %d, want the fixture %d", seqs[0], e.meterSeq)
		}
		info, err := consumerInfo(ctx, e, meter, own)
		if err != nil {
			t.Fatal(err)
		}
		if info.AckFloor.Stream != seqs[2] || info.NumPending != 0 {
			t.Fatalf("ack floor %d, pending %d; want %d, 0", info.AckFloor.Stream, info.NumPending, seqs[2])
		}
		reply, err := nc.RequestWithContext(ctx, "$JS.API.CONSUMER.RESET."+meter+"."+own, fmt.Appendf(nil, `{"seq":%d}`, seqs[0]))
		if err != nil {
			t.Fatal(err)
		}
		var r struct {
			Error    *struct{ Description string } `json:"error"`
			ResetSeq uint64                        `json:"reset_seq"`
		}
		if err := json.Unmarshal(reply.Data, &r); err != nil {
			t.Fatal(err)
		}
		if r.Error != nil {
			t.Fatalf("reset refused: %s", r.Error.Description)
		}
		m, err := c.Next(jetstream.FetchContext(ctx))
		if err != nil {
			t.Fatal(err)
		}
		md, err := m.Metadata()
		if err != nil {
			t.Fatal(err)
		}
		if md.Sequence.Stream != seqs[0] {
			t.Fatalf("after the reset read %d, want %d again", md.Sequence.Stream, seqs[0])
		}
		if err := m.DoubleAck(ctx); err != nil {
			t.Fatal(err)
		}
	})
	e.runRows(t, []row{
		refuse(billing, "pulls another billing durable", pull(meter, auditDurable)),
		refuse(billing, "fetches from another billing durable with jetstream", fetch(meter, auditDurable).withEffect(delivered(meter, auditDurable))),
		refuse(billing, "resets another billing durable", jsAPI("$JS.API.CONSUMER.RESET."+meter+"."+auditDurable, nil, delivered(meter, auditDurable))),
		refuse(billing, "pulls metering's durable", pull(life, bus.DurableMetering)),
		refuse(billing, "pulls saas-stub's durable", pull(cmds, bus.DurableProvisioner("saas-stub"))),
	})
}

// TestRevocation: a revoked user is cut off at once and kept out; the
// identity's other users are not.
func TestRevocation(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	ctx := testCtx(t)
	leaver := auth.Identity{Role: auth.RoleTenant, Consumer: "leaver"}
	revoked, user, err := srv.Auth.Issue(leaver, auth.IssueOptions{Note: "to be revoked"})
	if err != nil {
		t.Fatal(err)
	}
	kept, _, err := srv.Auth.Issue(leaver, auth.IssueOptions{Note: "kept"})
	if err != nil {
		t.Fatal(err)
	}
	type conn struct {
		nc           *nats.Conn
		closed, lost chan struct{}
		errs         chan error
	}
	dial := func(creds []byte) *conn {
		t.Helper()
		opts, err := auth.ConnectOptions(creds)
		if err != nil {
			t.Fatal(err)
		}
		c := &conn{closed: make(chan struct{}), lost: make(chan struct{}, 1), errs: make(chan error, 8)}
		c.nc, err = nats.Connect(srv.ClientURL(), append(opts, nats.NoReconnect(),
			nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
				select {
				case c.errs <- err:
				default:
				}
			}),
			nats.ClosedHandler(func(*nats.Conn) { close(c.closed) }),
			nats.DisconnectErrHandler(func(*nats.Conn, error) {
				select {
				case c.lost <- struct{}{}:
				default:
				}
			}))...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.nc.Close)
		return c
	}
	gone, stays := dial(revoked), dial(kept)

	sys, err := auth.ConnectOptions(srv.Auth.SystemCreds())
	if err != nil {
		t.Fatal(err)
	}
	sysc, err := nats.Connect(srv.ClientURL(), sys...)
	if err != nil {
		t.Fatal(err)
	}
	defer sysc.Close()
	token, err := srv.Auth.Revoke(user.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := auth.Push(ctx, sysc, token); err != nil {
		t.Fatal(err)
	}
	select {
	case <-gone.closed:
	case <-time.After(refusalWait):
		t.Fatalf("the revoked user's connection is still open after %s", refusalWait)
	}
	select {
	case err := <-gone.errs:
		if !errors.Is(err, nats.ErrAuthRevoked) {
			t.Fatalf("the server closed the revoked connection with %v, want %v", err, nats.ErrAuthRevoked)
		}
	default:
		if err := gone.nc.LastError(); !errors.Is(err, nats.ErrAuthRevoked) {
			t.Fatalf("the server closed the revoked connection with %v, want %v", err, nats.ErrAuthRevoked)
		}
	}

	opts, err := auth.ConnectOptions(revoked)
	if err != nil {
		t.Fatal(err)
	}
	if nc, err := nats.Connect(srv.ClientURL(), append(opts, nats.NoReconnect())...); err == nil {
		nc.Close()
		t.Fatal("the revoked user connected again")
	} else if !errors.Is(err, nats.ErrAuthorization) && !strings.Contains(strings.ToLower(err.Error()), "authorization violation") {
		t.Fatalf("reconnecting refused with %v, want an authorization violation", err)
	}

	// The other user of the identity is untouched: connected, never
	// disconnected, and its requests arrive.
	watcher := srv.Conn(t)
	sub, err := watcher.SubscribeSync(event.RequestSubject("leaver", event.VerbCreate))
	if err != nil {
		t.Fatal(err)
	}
	if err := watcher.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := stays.nc.Publish(event.RequestSubject("leaver", event.VerbCreate), []byte("{}")); err != nil {
		t.Fatal(err)
	}
	if err := stays.nc.FlushWithContext(ctx); err != nil {
		t.Fatalf("the identity's other user: %v", err)
	}
	if _, err := sub.NextMsgWithContext(ctx); err != nil {
		t.Fatalf("the other user's request did not arrive: %v", err)
	}
	select {
	case <-stays.lost:
		t.Fatal("the identity's other user was disconnected")
	default:
	}
	if !stays.nc.IsConnected() {
		t.Fatal("the identity's other user is not connected")
	}
	if !srv.Auth.IsRevoked(user.PublicKey) {
		t.Fatal("IsRevoked says no")
	}
}

// TestReplies: a service answers requests in the requester's inbox only.
// A tenant pointing a request's reply subject at a bucket key or a stream
// API does not make the gateway write there with the gateway's rights.
func TestReplies(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// A stand-in for the gateway's request intake, under the gateway's
	// identity: it answers every request event, as the intake does.
	gw, gv := e.srv.ConnRefusable(t, gateway)
	if _, err := gw.QueueSubscribe(event.RequestFilter, "gateway", func(m *nats.Msg) {
		_ = m.RespondMsg(&nats.Msg{Subject: m.Reply, Header: nats.Header{"Content-Type": []string{"application/json"}},
			Data: []byte(`{"problem":{"status":400,"title":"stand-in"}}`)})
	}); err != nil {
		t.Fatal(err)
	}
	if err := gw.Flush(); err != nil {
		t.Fatal(err)
	}

	t.Run("tenant-dev gets its answer in its inbox", func(t *testing.T) {
		t.Parallel()
		nc := e.srv.ConnAs(t, dev)
		m, err := nc.RequestWithContext(testCtx(t), event.RequestSubject("dev", event.VerbCreate), []byte("{}"))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(m.Data), "stand-in") {
			t.Fatalf("answer %q", m.Data)
		}
	})
	credits := "$KV." + bus.BucketCredits + "." + uid("key")
	for _, c := range []struct {
		name, reply string
		effect      func(ctx context.Context, p *probe) (bool, error)
	}{
		{"onto another consumer's credits key", credits, keyWritten(bus.BucketCredits, strings.TrimPrefix(credits, "$KV."+bus.BucketCredits+"."))},
		{"onto the lifecycle stream's purge API", "$JS.API.STREAM.PURGE." + life, streamMsgGone(life, func(p *probe) uint64 { return p.lifeSeq })},
		{"onto the metering stream", event.MeteringSubject("other", uid("debit")), nil},
	} {
		if c.effect == nil {
			c.effect = stored(meter, c.reply, nil)
		}
		t.Run("tenant-dev points the answer "+c.name, func(t *testing.T) {
			t.Parallel()
			nc := e.srv.ConnAs(t, dev) // its own publish is allowed
			if err := nc.PublishRequest(event.RequestSubject("dev", event.VerbCreate), c.reply, []byte("{}")); err != nil {
				t.Fatal(err)
			}
			if !gv.Await("Permissions Violation for "+pubRefusal(c.reply), refusalWait) {
				t.Fatalf("the gateway was not refused its answer on %s (violations: %v)", c.reply, gv.Errors())
			}
			ok, err := c.effect(testCtx(t), &probe{env: e})
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				t.Fatal("the answer took effect")
			}
		})
	}

	// JetStream's own answers are another matter: the server sends a
	// direct get's answer (or a pull's messages) to whatever reply subject
	// the request names, with no permission check, and a stream
	// capturing that subject stores it. Permissions cannot say which
	// reply subjects a user may name. A tenant may send no JetStream
	// request at all, so it cannot do this.
	t.Run("tenant-dev cannot point a direct get's answer onto another consumer's credits key", func(t *testing.T) {
		t.Parallel()
		ctx := testCtx(t)
		m := readyEvent(t, "dev", "local")
		if _, err := e.js.PublishMsg(ctx, m); err != nil {
			t.Fatal(err)
		}
		key := uid("key")
		nc, v := e.srv.ConnRefusable(t, dev)
		if err := nc.PublishRequest("$JS.API.DIRECT.GET."+life+"."+m.Subject, "$KV."+bus.BucketCredits+"."+key, nil); err != nil {
			t.Fatal(err)
		}
		if !v.Await("Permissions Violation for Publish to \"$JS.API.DIRECT.GET."+life, 10*time.Second) {
			t.Fatal("the direct get was not refused")
		}
		if ok, err := keyWritten(bus.BucketCredits, key)(ctx, &probe{env: e}); err != nil || ok {
			t.Fatalf("credits key %s written (%v)", key, err)
		}
	})
	// The roles that pull from a durable still can: the operator's
	// provisioner machines and billing systems are trusted with it until
	// they get accounts of their own. This row shows the server still
	// does it.
	t.Run("provisioner-local points its pull's answer onto a credits key (known gap)", func(t *testing.T) {
		t.Parallel()
		ctx := testCtx(t)
		key := uid("key")
		nc := e.srv.ConnAs(t, local)
		if err := nc.PublishRequest("$JS.API.CONSUMER.MSG.NEXT."+cmds+"."+bus.DurableProvisioner("local"), "$KV."+bus.BucketCredits+"."+key,
			[]byte(`{"batch":1,"no_wait":true}`)); err != nil {
			t.Fatal(err)
		}
		if err := nc.FlushWithContext(ctx); err != nil {
			t.Fatal(err)
		}
		written := keyWritten(bus.BucketCredits, key)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); <-tick.C {
			ok, err := written(ctx, &probe{env: e})
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				t.Skipf("KNOWN GAP (nats-server, not permissions): the server stored provisioner-local's pull answer as %s key %s; "+
					"pools and billing readers need accounts of their own to close it", bus.BucketCredits, key)
			}
		}
	})
}

// requestedEvent is a requested event of consumer's sandbox on
// extension, as the gateway records one.
func requestedEvent(t testing.TB, consumer, extension string) *nats.Msg {
	t.Helper()
	id := uid("sbx")
	ref := event.Ref{SandboxID: id, Consumer: consumer, Profile: extension, Extension: extension}
	return encode(t, event.LifecycleSubject(consumer, extension, id, event.StateRequested), event.TypeRequested, id+".requested",
		event.Requested{Ref: ref, RequestedAt: time.Now().UTC()})
}

// destroyingEvent is a destroying event of consumer's sandbox on
// extension claiming destroy attempt 1, as a re-drive announces one.
func destroyingEvent(t testing.TB, consumer, extension string) *nats.Msg {
	t.Helper()
	id := uid("sbx")
	ref := event.Ref{SandboxID: id, Consumer: consumer, Profile: extension, Extension: extension}
	return encode(t, event.LifecycleSubject(consumer, extension, id, event.StateDestroying), event.TypeDestroying, event.DestroyingID(id, 1),
		event.Destroying{Ref: ref, Reason: event.ReasonRequested, Attempt: 1})
}

// batchedGet reads the lifecycle stream's first message by a batched
// direct get, the request form that names no subject, as a sandbox's
// record is read.
func batchedGet() action {
	return request("$JS.API.DIRECT.GET."+life, `{"seq":1,"next_by_subj":"sandboxer.evt.>","batch":1}`, nil)
}

// failedEvent is a failed event of consumer's sandbox on extension, as
// the registry's reconciler announces one past its deadline.
func failedEvent(t testing.TB, consumer, extension string) *nats.Msg {
	t.Helper()
	id := uid("sbx")
	ref := event.Ref{SandboxID: id, Consumer: consumer, Profile: extension, Extension: extension}
	return encode(t, event.LifecycleSubject(consumer, extension, id, event.StateFailed), event.TypeFailed, id+".failed",
		event.Failed{Ref: ref, Phase: "provision", Reason: "past its deadline"})
}

// rejectedEvent is a rejected event of consumer's sandbox on extension,
// as metering announces one when a hold's deadline passed.
func rejectedEvent(t testing.TB, consumer, extension string) *nats.Msg {
	t.Helper()
	id := uid("sbx")
	ref := event.Ref{SandboxID: id, Consumer: consumer, Profile: extension, Extension: extension}
	return encode(t, event.LifecycleSubject(consumer, extension, id, event.StateRejected), event.TypeRejected, id+".rejected",
		event.Rejected{Ref: ref, Code: "hold_expired", Reason: "no create command within the hold's deadline"})
}

// onHost moves command m to its host-bound subject, bound to host.
func onHost(m *nats.Msg, host string) *nats.Msg {
	m.Subject += "." + host
	return m
}
