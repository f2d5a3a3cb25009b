package event

import (
	"fmt"
	"strings"
)

// Stream names and the subjects they capture.
const (
	StreamCommands  = "SANDBOXER_COMMANDS"
	StreamLifecycle = "SANDBOXER_LIFECYCLE"
	StreamMetering  = "SANDBOXER_METERING"
	StreamDLQ       = "SANDBOXER_DLQ"
	StreamTimers    = "SANDBOXER_TIMERS"

	SubjectCommands  = "sandboxer.cmd.>"
	SubjectLifecycle = "sandboxer.evt.>"
	SubjectMetering  = "sandboxer.meter.>"
	SubjectDLQ       = "sandboxer.dlq.>"
	SubjectTimers    = "sandboxer.timer.>"
)

// Command verbs, the fourth token of a command subject and the last of a
// request subject. A request may also read one sandbox (VerbGet).
const (
	VerbCreate  = "create"
	VerbDestroy = "destroy"
	VerbGet     = "get"
)

// Unrouted stands in for the extension token of a lifecycle subject when a
// request was refused before any extension was chosen (an unknown profile,
// a malformed request event). It is not a [ValidName], so no extension can
// be called that.
const Unrouted = "_"

// CommandSubject is sandboxer.cmd.<extension>.<verb>.<consumer>.<sandbox>.
// The extension comes first, so a pool's durable filters on it; the
// consumer comes before the sandbox, so permissions can scope by tenant.
func CommandSubject(extension, verb, consumer, sandbox string) string {
	return "sandboxer.cmd." + extension + "." + verb + "." + consumer + "." + sandbox
}

// CommandSubject is the subject of the verb command for the sandbox r
// names.
func (r Ref) CommandSubject(verb string) string {
	return CommandSubject(r.Extension, verb, r.Consumer, r.SandboxID)
}

// HostCommandSubject is
// sandboxer.cmd.<extension>.<verb>.<consumer>.<sandbox>.<host>: a command
// bound to the workers of one placement host, for a backend whose
// sandboxes live on the machine of the worker that made them
// (placement: host). It has one token more than [CommandSubject]'s
// unplaced form, so the two forms never match the same filter of five
// tokens after the root: a pool's unplaced durable and each host's
// durable share the work-queue stream without overlapping. An empty host
// is the unplaced form.
func HostCommandSubject(extension, verb, consumer, sandbox, host string) string {
	if host == "" {
		return CommandSubject(extension, verb, consumer, sandbox)
	}
	return CommandSubject(extension, verb, consumer, sandbox) + "." + host
}

// HostCommandSubject is the subject of the verb command for the sandbox r
// names bound to host ("": unplaced, any worker of the pool). Every
// publisher that knows where a sandbox was placed builds its destroy
// with it; one that does not publishes unplaced, and the worker that
// takes it forwards it to the sandbox's host.
func (r Ref) HostCommandSubject(verb, host string) string {
	return HostCommandSubject(r.Extension, verb, r.Consumer, r.SandboxID, host)
}

// CommandFilter matches every command of one extension, unplaced or bound
// to any host: sandboxer.cmd.<extension>.>. It is the filter of the one
// durable of a pool whose workers all reach every sandbox
// (placement: shared).
func CommandFilter(extension string) string { return "sandboxer.cmd." + extension + ".>" }

// UnplacedCommandFilter matches the unplaced commands of one extension
// only: sandboxer.cmd.<extension>.*.*.*. It is the filter of the durable
// every worker of a placement: host pool shares.
func UnplacedCommandFilter(extension string) string { return "sandboxer.cmd." + extension + ".*.*.*" }

// HostCommandFilter matches the commands of one extension bound to host:
// sandboxer.cmd.<extension>.*.*.*.<host>, the filter of that host's
// durable.
func HostCommandFilter(extension, host string) string {
	return "sandboxer.cmd." + extension + ".*.*.*." + host
}

// LifecycleSubject is sandboxer.evt.<consumer>.<extension>.<sandbox>.<state>.
// The consumer comes first, so a tenant's permissions can be one subject
// (sandboxer.evt.<consumer>.>); the extension second, so a provisioner
// pool's can be too (sandboxer.evt.*.<extension>.>).
func LifecycleSubject(consumer, extension, sandbox string, s State) string {
	return "sandboxer.evt." + consumer + "." + extension + "." + sandbox + "." + string(s)
}

// LifecycleSubject is the subject announcing state s of the sandbox r
// names.
func (r Ref) LifecycleSubject(s State) string {
	return LifecycleSubject(r.Consumer, r.Extension, r.SandboxID, s)
}

// StateFilter matches every lifecycle event announcing state s, of any
// sandbox: sandboxer.evt.*.*.*.<state>.
func StateFilter(s State) string { return "sandboxer.evt.*.*.*." + string(s) }

// SandboxFilter matches every lifecycle event of one sandbox, whatever its
// consumer and extension: sandboxer.evt.*.*.<sandbox>.*.
func SandboxFilter(sandbox string) string { return "sandboxer.evt.*.*." + sandbox + ".*" }

// ExtensionSandboxFilter matches every lifecycle event of one sandbox of
// one extension, whatever its consumer: sandboxer.evt.*.<extension>.<sandbox>.*.
// A provisioner pool may read it, and reads it for a sandbox its backend
// holds but whose consumer it does not know.
func ExtensionSandboxFilter(extension, sandbox string) string {
	return "sandboxer.evt.*." + extension + "." + sandbox + ".*"
}

// RefFilter matches every lifecycle event of the sandbox r names:
// sandboxer.evt.<consumer>.<extension>.<sandbox>.*.
func (r Ref) RefFilter() string {
	return "sandboxer.evt." + r.Consumer + "." + r.Extension + "." + r.SandboxID + ".*"
}

// ConsumerLifecycleFilter matches every lifecycle event of one consumer's
// sandboxes: sandboxer.evt.<consumer>.>. A tenant may read exactly this.
func ConsumerLifecycleFilter(consumer string) string { return "sandboxer.evt." + consumer + ".>" }

// ExtensionLifecycleFilter matches every lifecycle event of one
// extension's sandboxes: sandboxer.evt.*.<extension>.>. A provisioner pool
// may read exactly this.
func ExtensionLifecycleFilter(extension string) string { return "sandboxer.evt.*." + extension + ".>" }

// Request subjects: where a tenant asks for a sandbox with an event.
const (
	// SubjectRequests matches every request subject.
	SubjectRequests = "sandboxer.req.>"
	// RequestFilter matches every request subject, token by token: what
	// the gateways' intake subscribes to.
	RequestFilter = "sandboxer.req.*.*"
)

// RequestSubject is sandboxer.req.<consumer>.<verb>: where consumer asks
// for a create or a destroy, or reads one of its sandboxes. Permissions let a tenant publish under its
// own name only, so the subject, never the payload, says who asks.
func RequestSubject(consumer, verb string) string {
	return "sandboxer.req." + consumer + "." + verb
}

// MeteringFilter matches every metering event of one consumer:
// sandboxer.meter.<consumer>.>.
func MeteringFilter(consumer string) string { return "sandboxer.meter." + consumer + ".>" }

// MeteringSubject is sandboxer.meter.<consumer>.<kind>.
func MeteringSubject(consumer, kind string) string {
	return "sandboxer.meter." + consumer + "." + kind
}

// DLQSubject is sandboxer.dlq.<stream>.<consumer>, where poison messages of
// a durable consumer are parked with the reason.
func DLQSubject(stream, consumer string) string {
	return "sandboxer.dlq." + stream + "." + consumer
}

// ExpiryScheduleSubject holds the one pending expiry schedule of a sandbox:
// sandboxer.timer.schedule.<sandbox>. Publishing to it again replaces the
// schedule; purging it cancels the schedule.
func ExpiryScheduleSubject(sandbox string) string { return "sandboxer.timer.schedule." + sandbox }

// ExpiryFireSubject is where a schedule delivers when it fires:
// sandboxer.timer.fire.<sandbox>.
func ExpiryFireSubject(sandbox string) string { return "sandboxer.timer.fire." + sandbox }

// ExpiryFireFilter matches every fired expiry.
const ExpiryFireFilter = "sandboxer.timer.fire.>"

// Request-reply subjects answered by services.
const (
	// SubjectCatalog is answered by the registry with the catalog.
	SubjectCatalog = "sandboxer.rpc.registry.catalog"
	// SubjectWorkers is answered by the registry with the live workers.
	SubjectWorkers = "sandboxer.rpc.registry.workers"
	// SubjectSandboxes is answered by the registry with sandboxes of its
	// index, folded from the lifecycle stream.
	SubjectSandboxes = "sandboxer.rpc.registry.sandboxes"

	// SubjectMeteringHold is answered by metering: admission's quote and
	// credit hold for one sandbox.
	SubjectMeteringHold = "sandboxer.rpc.metering.hold"
	// SubjectMeteringGrant is answered by metering: add credit to an
	// account.
	SubjectMeteringGrant = "sandboxer.rpc.metering.grant"
	// SubjectMeteringBalance is answered by metering with an account's
	// balance, holds and grants.
	SubjectMeteringBalance = "sandboxer.rpc.metering.balance"
	// SubjectMeteringLedger is answered by metering with an account's
	// ledger entries.
	SubjectMeteringLedger = "sandboxer.rpc.metering.ledger"
	// SubjectMeteringUsage is answered by metering with usage records.
	SubjectMeteringUsage = "sandboxer.rpc.metering.usage"
)

// QuoteSubject is sandboxer.rpc.quote.<extension>, answered by the workers
// of a metered extension with the backend's own price ([QuoteRequest]).
func QuoteSubject(extension string) string { return "sandboxer.rpc.quote." + extension }

// AccrualScheduleSubject holds the repeating accrual schedule of a running
// sandbox: sandboxer.timer.accrue.<sandbox>. Purging it stops accrual.
func AccrualScheduleSubject(sandbox string) string { return "sandboxer.timer.accrue." + sandbox }

// AccrualFireSubject is where an accrual schedule delivers each tick:
// sandboxer.timer.accrual.<sandbox>.
func AccrualFireSubject(sandbox string) string { return "sandboxer.timer.accrual." + sandbox }

// AccrualFireFilter matches every fired accrual tick.
const AccrualFireFilter = "sandboxer.timer.accrual.>"

// RetryScheduleSubject holds the one pending destroy retry of a sandbox
// whose teardown failed: sandboxer.timer.retry.<sandbox>. Publishing to it
// again replaces the schedule.
func RetryScheduleSubject(sandbox string) string { return "sandboxer.timer.retry." + sandbox }

// RetryFireSubject is where a destroy retry delivers when it fires:
// sandboxer.timer.redestroy.<sandbox>.
func RetryFireSubject(sandbox string) string { return "sandboxer.timer.redestroy." + sandbox }

// RetryFireFilter matches every fired destroy retry.
const RetryFireFilter = "sandboxer.timer.redestroy.>"

// HoldDeadlineScheduleSubject holds the deadline of an admitted credit
// hold: sandboxer.timer.hold.<sandbox>. Metering sets it at admission and
// purges it when the hold settles.
func HoldDeadlineScheduleSubject(sandbox string) string { return "sandboxer.timer.hold." + sandbox }

// HoldDeadlineFireSubject is where a hold's deadline delivers when it
// fires: sandboxer.timer.hold-due.<sandbox>.
func HoldDeadlineFireSubject(sandbox string) string { return "sandboxer.timer.hold-due." + sandbox }

// HoldDeadlineFireFilter matches every fired hold deadline.
const HoldDeadlineFireFilter = "sandboxer.timer.hold-due.>"

// CommandRef is what a command subject names. Host is the placement
// host of a host-bound command, "" for an unplaced one.
type CommandRef struct {
	Extension, Verb, Consumer, Sandbox, Host string
}

// ParseCommandSubject splits
// sandboxer.cmd.<extension>.<verb>.<consumer>.<sandbox> and its
// host-bound form, with .<host> after the sandbox.
func ParseCommandSubject(subject string) (CommandRef, error) {
	t := strings.Split(subject, ".")
	if (len(t) != 6 && len(t) != 7) || t[0] != "sandboxer" || t[1] != "cmd" {
		return CommandRef{}, fmt.Errorf("not a command subject: %q", subject)
	}
	if t[3] != VerbCreate && t[3] != VerbDestroy {
		return CommandRef{}, fmt.Errorf("unknown command verb %q in %q", t[3], subject)
	}
	c := CommandRef{Extension: t[2], Verb: t[3], Consumer: t[4], Sandbox: t[5]}
	if len(t) == 7 {
		if err := CheckName("host", t[6]); err != nil {
			return CommandRef{}, fmt.Errorf("command subject %q: %w", subject, err)
		}
		c.Host = t[6]
	}
	return c, nil
}

// Matches reports whether r names the sandbox of ref: the payload of a
// command must agree with its subject, which permissions vouch for.
func (c CommandRef) Matches(ref Ref) bool {
	return c.Extension == ref.Extension && c.Consumer == ref.Consumer && c.Sandbox == ref.SandboxID
}

// LifecycleRef is what a lifecycle subject names.
type LifecycleRef struct {
	Consumer, Extension, Sandbox string
	State                        State
}

// ParseLifecycleSubject splits
// sandboxer.evt.<consumer>.<extension>.<sandbox>.<state>.
func ParseLifecycleSubject(subject string) (LifecycleRef, error) {
	t := strings.Split(subject, ".")
	if len(t) != 6 || t[0] != "sandboxer" || t[1] != "evt" {
		return LifecycleRef{}, fmt.Errorf("not a lifecycle subject: %q", subject)
	}
	s := State(t[5])
	if !s.Valid() {
		return LifecycleRef{}, fmt.Errorf("unknown state %q in %q", t[5], subject)
	}
	return LifecycleRef{Consumer: t[2], Extension: t[3], Sandbox: t[4], State: s}, nil
}

// Matches reports whether the lifecycle subject l names the sandbox of
// ref: a consumer of lifecycle events trusts the subject, which
// permissions vouch for, and refuses a payload that disagrees with it.
func (l LifecycleRef) Matches(ref Ref) bool {
	return l.Consumer == ref.Consumer && l.Extension == ref.Extension && l.Sandbox == ref.SandboxID
}

// RequestRef is what a request subject names.
type RequestRef struct {
	Consumer, Verb string
}

// ParseRequestSubject splits sandboxer.req.<consumer>.<verb>.
func ParseRequestSubject(subject string) (RequestRef, error) {
	t := strings.Split(subject, ".")
	if len(t) != 4 || t[0] != "sandboxer" || t[1] != "req" {
		return RequestRef{}, fmt.Errorf("not a request subject: %q", subject)
	}
	if t[3] != VerbCreate && t[3] != VerbDestroy && t[3] != VerbGet {
		return RequestRef{}, fmt.Errorf("unknown request verb %q in %q", t[3], subject)
	}
	if err := CheckName("consumer", t[2]); err != nil {
		return RequestRef{}, fmt.Errorf("request subject %q: %w", subject, err)
	}
	return RequestRef{Consumer: t[2], Verb: t[3]}, nil
}
