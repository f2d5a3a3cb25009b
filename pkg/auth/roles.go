// Package auth is who may do what on sand-boxer's bus. It uses NATS's
// decentralized authentication: an operator, a system account and one
// application account, SANDBOXER, whose users are signed JSON Web Tokens
// carrying their permissions. Every process and every client is one such
// user, with the permissions of its role and nothing more ([Identity]);
// [Authority] keeps the keys, issues standard .creds files, revokes users
// while the cluster runs, and writes what a nats-server needs to trust
// them.
//
// The package knows subjects, streams and buckets (packages event and
// bus) and nothing of the services. It must never import a service.
package auth

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/nats-io/jwt/v2"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Role is what a user of the bus is for.
type Role string

// Roles.
const (
	// RoleAdmin may do anything in the account: setup, operators' tools.
	RoleAdmin Role = "admin"
	// RoleGateway is a gateway process: the only publisher of create and
	// destroy commands from requests.
	RoleGateway Role = "gateway"
	// RoleRegistry is a registry process: the catalog, the inventory and
	// the expiry schedules.
	RoleRegistry Role = "registry"
	// RoleMetering is a metering process: the only writer of the credits
	// bucket (accounts, holds, usage records and the ledger) and of the
	// metering stream.
	RoleMetering Role = "metering"
	// RoleProvisioner is a worker of one extension's pool.
	RoleProvisioner Role = "provisioner"
	// RoleTenant is an API consumer that talks on the bus.
	RoleTenant Role = "tenant"
	// RoleBilling reads the metering stream through its own durable.
	RoleBilling Role = "billing"
)

// Roles lists every role.
var Roles = []Role{RoleAdmin, RoleGateway, RoleRegistry, RoleMetering, RoleProvisioner, RoleTenant, RoleBilling}

// DefaultBilling is the name of the billing identity `sandboxer up`
// writes: its user is "billing" and so is its durable.
const DefaultBilling = "billing"

// Identity is one user of the bus: a role, and for the roles that need
// one, what it is scoped to.
type Identity struct {
	Role Role `json:"role"`
	// Extension is a provisioner's extension.
	Extension string `json:"extension,omitempty"`
	// Host is a provisioner's placement host, for a pool whose sandboxes
	// live on their worker's machine (capabilities.locality: host): it
	// may take the commands bound to that host and no other's. Empty is
	// [DefaultHost].
	Host string `json:"host,omitempty"`
	// Consumer is a tenant's consumer name.
	Consumer string `json:"consumer,omitempty"`
	// Billing names a billing reader, and its durable; empty is
	// [DefaultBilling].
	Billing string `json:"billing,omitempty"`
}

// Validate reports what is wrong with id: an unknown role, a missing or
// invalid scope, or a scope the role does not take.
func (id Identity) Validate() error {
	if !slices.Contains(Roles, id.Role) {
		return fmt.Errorf("unknown role %q (known: %s)", id.Role, joinRoles())
	}
	var errs []error
	need := func(field, v string, wanted bool) {
		switch {
		case wanted && v == "":
			errs = append(errs, fmt.Errorf("role %s needs --%s", id.Role, field))
		case wanted:
			if err := event.CheckName(field, v); err != nil {
				errs = append(errs, err)
			}
		case v != "":
			errs = append(errs, fmt.Errorf("role %s takes no --%s", id.Role, field))
		}
	}
	need("extension", id.Extension, id.Role == RoleProvisioner)
	if id.Host != "" {
		need("host", id.Host, id.Role == RoleProvisioner)
	}
	need("consumer", id.Consumer, id.Role == RoleTenant)
	if id.Role == RoleBilling {
		if id.Billing != "" {
			if err := event.CheckName("billing name", id.Billing); err != nil {
				errs = append(errs, err)
			}
		}
	} else if id.Billing != "" {
		errs = append(errs, fmt.Errorf("role %s takes no billing name", id.Role))
	}
	return errors.Join(errs...)
}

func joinRoles() string {
	s := make([]string, len(Roles))
	for i, r := range Roles {
		s[i] = string(r)
	}
	return strings.Join(s, ", ")
}

// DefaultHost is the placement host of a provisioner identity that names
// none, and of a worker started without --host: the default manifest's
// one host.
const DefaultHost = "localhost"

// PlacementHost is a provisioner's placement host: Host, or [DefaultHost].
func (id Identity) PlacementHost() string {
	if id.Host == "" {
		return DefaultHost
	}
	return id.Host
}

// UserName is the name of id's user, unique per identity and safe as a
// subject token: admin, gateway, registry, metering,
// provisioner-<extension> (provisioner-<extension>@<host> for a host
// other than the default), tenant-<consumer>, billing or billing-<name>.
// It is the user JWT's name.
func (id Identity) UserName() string {
	switch id.Role {
	case RoleProvisioner:
		if id.Host != "" && id.Host != DefaultHost {
			return "provisioner-" + id.Extension + "@" + id.Host
		}
		return "provisioner-" + id.Extension
	case RoleTenant:
		return "tenant-" + id.Consumer
	case RoleBilling:
		if id.Billing == "" || id.Billing == DefaultBilling {
			return DefaultBilling
		}
		return "billing-" + id.Billing
	}
	return string(id.Role)
}

// InboxPrefix is where id's replies arrive: _INBOX.<user name>. A user may
// subscribe to its own inboxes only, so no one reads another's replies;
// clients set it as their connection's inbox prefix
// (nats.CustomInboxPrefix).
func (id Identity) InboxPrefix() string { return InboxPrefix(id.UserName()) }

// InboxPrefix is the inbox prefix of the user called name.
func InboxPrefix(name string) string { return "_INBOX." + name }

// BillingDurable is the durable consumer of a billing identity on the
// metering stream: its user name.
func (id Identity) BillingDurable() string { return id.UserName() }

// Tags are the JWT tags of id's user, which say its role and scope to
// anyone reading the credentials (`nats` CLI, `sandboxer creds ls`).
func (id Identity) Tags() []string {
	t := []string{"role:" + string(id.Role)}
	switch id.Role {
	case RoleProvisioner:
		t = append(t, "extension:"+id.Extension)
		if id.Host != "" && id.Host != DefaultHost {
			t = append(t, "host:"+id.Host)
		}
	case RoleTenant:
		t = append(t, "consumer:"+id.Consumer)
	case RoleBilling:
		t = append(t, "durable:"+id.BillingDurable())
	}
	return t
}

// IdentityFromTags reads an identity back from a user JWT's tags.
func IdentityFromTags(tags []string) (Identity, error) {
	var id Identity
	for _, t := range tags {
		k, v, _ := strings.Cut(t, ":")
		switch k {
		case "role":
			id.Role = Role(v)
		case "extension":
			id.Extension = v
		case "host":
			id.Host = v
		case "consumer":
			id.Consumer = v
		case "durable":
			if v != DefaultBilling {
				id.Billing = strings.TrimPrefix(v, "billing-")
			}
		}
	}
	return id, id.Validate()
}

// Permissions are exactly what id may publish and subscribe to. Every
// list is an allow list: anything it does not name is refused by the
// server with a permissions violation. A publish deny list takes back
// what a wildcard allows too much of (the services' durables beside the
// gateway's ordered consumers).
func (id Identity) Permissions() jwt.Permissions {
	if id.Role == RoleAdmin {
		return jwt.Permissions{Pub: jwt.Permission{Allow: []string{">"}}, Sub: jwt.Permission{Allow: []string{">"}}}
	}
	p := &perms{}
	p.sub(id.InboxPrefix() + ".>")
	const (
		cmds  = event.StreamCommands
		life  = event.StreamLifecycle
		meter = event.StreamMetering
		tmrs  = event.StreamTimers
	)
	switch id.Role {
	case RoleGateway:
		p.jsInfo()
		// Commands from requests: the only publisher of creates.
		p.pub("sandboxer.cmd.*."+event.VerbCreate+".*.*", "sandboxer.cmd.*."+event.VerbDestroy+".*.*")
		// A sandbox's record is its lifecycle events: the gateway writes
		// its first (requested), a rejection when its command could not
		// be published, and the claim of a re-driven destroy attempt
		// (destroying), each guarded by the sandbox's last event.
		p.pub(event.StateFilter(event.StateRequested), event.StateFilter(event.StateRejected), event.StateFilter(event.StateDestroying))
		p.kvRead(bus.BucketCatalog, bus.BucketWorkers, bus.BucketIdempotency, bus.BucketAPIKeys)
		p.kvWatch(bus.BucketCatalog, bus.BucketWorkers)
		p.kvWrite(bus.BucketIdempotency, ">")
		// API keys over the admin API (POST and DELETE /v1/keys): the
		// gateway already decides who is an admin on its own API.
		p.kvWrite(bus.BucketAPIKeys, ">")
		// Event streams (SSE) read one sandbox through an ordered
		// consumer, and the listings fold the whole stream through one.
		p.streamInfo(life)
		p.ordered(life, bus.DurableRegistry, bus.DurableMetering)
		// A sandbox's record: its events in one batched direct get (the
		// request form), its state the last of them.
		p.directGet(life, "")
		p.pub("$JS.API.CONSUMER.INFO." + cmds + ".*")
		p.pub("sandboxer.rpc.metering.*", "sandboxer.rpc.registry.*")
		p.serve(event.RequestFilter)
	case RoleRegistry:
		p.jsInfo()
		p.kvRead(bus.BucketCatalog, bus.BucketWorkers)
		p.kvWatch(bus.BucketCatalog, bus.BucketWorkers)
		p.kvWrite(bus.BucketCatalog, ">")
		p.streamInfo(life, tmrs)
		p.durable(life, bus.DurableRegistry)
		// Its index of every sandbox folds the whole lifecycle stream
		// through an ordered consumer; never metering's durable.
		p.ordered(life, bus.DurableMetering)
		p.durable(tmrs, bus.DurableRegistryTimers)
		// Expiry schedules and destroy retries.
		// (cancelled by a marker on the same subjects: bus.CancelSchedule;
		// no purge, which would reach every subject of the stream).
		p.pub("sandboxer.timer.schedule.*", "sandboxer.timer.retry.*")
		p.pub(event.StateFilter(event.StateExpired), "sandboxer.cmd.*."+event.VerbDestroy+".*.*")
		// The reconciler fails a create past its deadline, and a retry or
		// re-drive claims its destroy attempt (destroying), guarded on the
		// sandbox's last event, which it reads (its events in one batched
		// direct get).
		p.pub(event.StateFilter(event.StateFailed), event.StateFilter(event.StateDestroying))
		p.directGet(life, "")
		p.pub(event.DLQSubject(life, bus.DurableRegistry), event.DLQSubject(tmrs, bus.DurableRegistryTimers))
		p.serve("sandboxer.rpc.registry.>")
	case RoleMetering:
		p.jsInfo()
		p.kvRead(bus.BucketCatalog, bus.BucketCredits)
		// What a commit is decided on is read from the leader.
		p.msgGet(bus.KVStream(bus.BucketCredits))
		p.kvWatch(bus.BucketCatalog, bus.BucketCredits)
		// Accounts, holds, usage records and the ledger, committed
		// together in atomic batches: only metering writes them.
		p.kvWrite(bus.BucketCredits, ">")
		p.streamInfo(life, tmrs)
		p.durable(life, bus.DurableMetering)
		p.durable(tmrs, bus.DurableMeteringAccrual)
		p.directGet(life, event.SubjectLifecycle)
		p.pub(event.SubjectMetering, "sandboxer.timer.accrue.*", "sandboxer.timer.hold.*", "sandboxer.cmd.*."+event.VerbDestroy+".*.*")
		// A hold whose create never came is rejected, guarded on the
		// sandbox having no event at all.
		p.pub(event.StateFilter(event.StateRejected))
		p.pub("sandboxer.rpc.quote.*")
		p.pub(event.DLQSubject(life, bus.DurableMetering), event.DLQSubject(tmrs, bus.DurableMeteringAccrual))
		p.serve("sandboxer.rpc.metering.>")
	case RoleProvisioner:
		ext := id.Extension
		// The pool's unplaced commands, and those bound to its own host
		// (a pool of locality: host; the durable exists only for such a
		// pool's hosts).
		p.durable(cmds, bus.DurableProvisioner(ext))
		p.durable(cmds, bus.DurableProvisionerHost(ext, id.PlacementHost()))
		// Its backend's sandboxes' states, and orphaned for what the
		// backend left that no live record owns.
		for _, s := range []event.State{event.StateProvisioning, event.StateReady, event.StateFailed, event.StateDestroying, event.StateDestroyed, event.StateOrphaned} {
			p.pub(event.LifecycleSubject("*", ext, "*", s))
		}
		// Destroys, unplaced (a create that failed before it was placed)
		// and bound to a host (its own failed creates, and an unplaced
		// destroy forwarded to the host its sandbox lives on).
		p.pub("sandboxer.cmd."+ext+"."+event.VerbDestroy+".*.*", "sandboxer.cmd."+ext+"."+event.VerbDestroy+".*.*.*")
		p.directGet(life, event.ExtensionLifecycleFilter(ext))
		p.sub(event.ExtensionLifecycleFilter(ext))
		p.streamInfo(bus.KVStream(bus.BucketWorkers))
		p.kvWrite(bus.BucketWorkers, ext+".*")
		// The catalog, without a consumer: direct gets and the bucket's
		// own subjects for changes.
		p.directGet(bus.KVStream(bus.BucketCatalog), "")
		p.sub("$KV." + bus.BucketCatalog + ".>")
		p.pub(event.DLQSubject(cmds, bus.DurableProvisioner(ext)), event.DLQSubject(cmds, bus.DurableProvisionerHost(ext, id.PlacementHost())))
		// Whether a host has a live worker, when a destroy is forwarded
		// there: the heartbeats (what GET /v1/workers shows any key).
		p.directGet(bus.KVStream(bus.BucketWorkers), "")
		p.serve(event.QuoteSubject(ext))
	case RoleTenant:
		// A tenant sends requests (the gateway reads a sandbox for it:
		// sandboxer.req.<c>.get) and listens; it sends nothing to
		// JetStream itself. JetStream answers an API request (a direct
		// get, a pull) on whatever reply subject the request names, with
		// the server's own rights, and a stream capturing that subject
		// would store the answer: a tenant with a direct get could write
		// into a bucket.
		c := id.Consumer
		p.pub(event.RequestSubject(c, "*"))
		p.sub(event.ConsumerLifecycleFilter(c), event.MeteringFilter(c))
	case RoleBilling:
		p.streamInfo(meter)
		p.durable(meter, id.BillingDurable())
		p.pub(fmt.Sprintf("$JS.API.CONSUMER.RESET.%s.%s", meter, id.BillingDurable()))
	}
	return p.permissions()
}

// perms collects allow lists, and the publications they allow that are
// denied after all.
type perms struct {
	pubs, subs, denies []string
}

func (p *perms) pub(s ...string)  { p.pubs = append(p.pubs, s...) }
func (p *perms) sub(s ...string)  { p.subs = append(p.subs, s...) }
func (p *perms) deny(s ...string) { p.denies = append(p.denies, s...) }

// jsInfo lets a service ask for the account's JetStream information.
func (p *perms) jsInfo() { p.pub("$JS.API.INFO") }

// streamInfo lets a user look streams up (jetstream.Stream, KeyValue).
func (p *perms) streamInfo(streams ...string) {
	for _, s := range streams {
		p.pub("$JS.API.STREAM.INFO." + s)
	}
}

// directGet lets a user read messages of stream by subject: filter limits
// the subjects (the subject-in-API form of a direct get, which the server
// matches against permissions); "" allows every subject of the stream,
// batches included.
func (p *perms) directGet(stream, filter string) {
	if filter == "" {
		p.pub("$JS.API.DIRECT.GET."+stream, "$JS.API.DIRECT.GET."+stream+".>")
		return
	}
	p.pub("$JS.API.DIRECT.GET." + stream + "." + filter)
}

// durable lets a user pull from and acknowledge one existing durable
// consumer, in both the v1 and the v2 ack subject forms, and nothing else:
// no creation, no deletion.
func (p *perms) durable(stream, name string) {
	p.pub(
		"$JS.API.CONSUMER.INFO."+stream+"."+name,
		"$JS.API.CONSUMER.MSG.NEXT."+stream+"."+name,
		"$JS.ACK."+stream+"."+name+".>",
		"$JS.ACK.*.*."+stream+"."+name+".>",
	)
}

// ephemeral lets a service create, read and remove consumers of its own on
// stream: ordered push consumers for watches. They have no acks to send.
func (p *perms) ephemeral(stream string) {
	p.pub(
		"$JS.API.CONSUMER.CREATE."+stream, "$JS.API.CONSUMER.CREATE."+stream+".>",
		"$JS.API.CONSUMER.DELETE."+stream+".*",
		"$JS.API.CONSUMER.INFO."+stream+".*",
		"$JS.API.CONSUMER.MSG.NEXT."+stream+".*",
		"$JS.FC."+stream+".>", "$JS.FC.*.*."+stream+".>",
	)
}

// ordered lets a service create, read and remove ordered pull consumers of
// its own on stream (the jetstream package's, which name themselves in the
// subject and send no flow control): event streams. durables are the
// design's durable consumers of stream, which setup declares and their
// services own: the user may not redefine, delete or pull from them, nor
// create a consumer through the unnamed endpoint, whose name is in the
// request body where permissions cannot see it.
func (p *perms) ordered(stream string, durables ...string) {
	p.pub(
		"$JS.API.CONSUMER.CREATE."+stream+".>",
		"$JS.API.CONSUMER.DELETE."+stream+".*",
		"$JS.API.CONSUMER.INFO."+stream+".*",
		"$JS.API.CONSUMER.MSG.NEXT."+stream+".*",
	)
	for _, d := range durables {
		// Create, delete (and info) naming d, creates naming d with a
		// filter, and pulls.
		p.deny("$JS.API.CONSUMER.*."+stream+"."+d, "$JS.API.CONSUMER.CREATE."+stream+"."+d+".>",
			"$JS.API.CONSUMER.MSG.NEXT."+stream+"."+d)
	}
}

// kvRead lets a user open buckets and read keys.
func (p *perms) kvRead(buckets ...string) {
	for _, b := range buckets {
		p.streamInfo(bus.KVStream(b))
		p.directGet(bus.KVStream(b), "")
	}
}

// msgGet lets a user read streams' messages from their leaders
// ($JS.API.STREAM.MSG.GET), which a follower never answers.
func (p *perms) msgGet(streams ...string) {
	for _, s := range streams {
		p.pub("$JS.API.STREAM.MSG.GET." + s)
	}
}

// kvWatch lets a user watch and list buckets (ordered push consumers).
func (p *perms) kvWatch(buckets ...string) {
	for _, b := range buckets {
		p.ephemeral(bus.KVStream(b))
	}
}

// kvWrite lets a user put, create, update and delete keys matching keys
// in bucket.
func (p *perms) kvWrite(bucket, keys string) { p.pub("$KV." + bucket + "." + keys) }

// serve lets a service answer requests on subject: subscribe (queue
// groups included), answer micro discovery, and reply to inboxes. Replies
// go to inboxes only, never to whatever reply subject a request names:
// NATS's response permission would let a requester point the answer at
// any subject (a bucket's key, a stream's API), and the server would
// publish it with the service's rights.
func (p *perms) serve(subject string) {
	p.sub(subject, "$SRV.>")
	p.pub("_INBOX.>")
}

func (p *perms) permissions() jwt.Permissions {
	out := jwt.Permissions{
		Pub: jwt.Permission{Allow: dedupe(p.pubs), Deny: dedupe(p.denies)},
		Sub: jwt.Permission{Allow: dedupe(p.subs)},
	}
	if len(out.Pub.Allow) == 0 {
		// An empty allow list allows everything: deny instead.
		out.Pub.Deny = []string{">"}
	}
	return out
}

func dedupe(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return slices.Compact(out)
}
