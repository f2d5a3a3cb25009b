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

// Command verbs, the fourth token of a command subject.
const (
	VerbCreate  = "create"
	VerbDestroy = "destroy"
)

// CommandSubject is sandboxer.cmd.<extension>.<verb>.<sandbox>.
func CommandSubject(extension, verb, sandbox string) string {
	return "sandboxer.cmd." + extension + "." + verb + "." + sandbox
}

// CommandFilter is the filter of the durable consumer shared by every worker
// of one extension: sandboxer.cmd.<extension>.>.
func CommandFilter(extension string) string { return "sandboxer.cmd." + extension + ".>" }

// LifecycleSubject is sandboxer.evt.<extension>.<sandbox>.<state>.
func LifecycleSubject(extension, sandbox string, s State) string {
	return "sandboxer.evt." + extension + "." + sandbox + "." + string(s)
}

// StateFilter matches every lifecycle event announcing state s, of any
// sandbox: sandboxer.evt.*.*.<state>.
func StateFilter(s State) string { return "sandboxer.evt.*.*." + string(s) }

// SandboxFilter matches every lifecycle event of one sandbox, whatever its
// extension: sandboxer.evt.*.<sandbox>.*.
func SandboxFilter(sandbox string) string { return "sandboxer.evt.*." + sandbox + ".*" }

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

// CommandRef is what a command subject names.
type CommandRef struct {
	Extension, Verb, Sandbox string
}

// ParseCommandSubject splits sandboxer.cmd.<extension>.<verb>.<sandbox>.
func ParseCommandSubject(subject string) (CommandRef, error) {
	t := strings.Split(subject, ".")
	if len(t) != 5 || t[0] != "sandboxer" || t[1] != "cmd" {
		return CommandRef{}, fmt.Errorf("not a command subject: %q", subject)
	}
	if t[3] != VerbCreate && t[3] != VerbDestroy {
		return CommandRef{}, fmt.Errorf("unknown command verb %q in %q", t[3], subject)
	}
	return CommandRef{Extension: t[2], Verb: t[3], Sandbox: t[4]}, nil
}

// LifecycleRef is what a lifecycle subject names.
type LifecycleRef struct {
	Extension, Sandbox string
	State              State
}

// ParseLifecycleSubject splits sandboxer.evt.<extension>.<sandbox>.<state>.
func ParseLifecycleSubject(subject string) (LifecycleRef, error) {
	t := strings.Split(subject, ".")
	if len(t) != 5 || t[0] != "sandboxer" || t[1] != "evt" {
		return LifecycleRef{}, fmt.Errorf("not a lifecycle subject: %q", subject)
	}
	s := State(t[4])
	if !s.Valid() {
		return LifecycleRef{}, fmt.Errorf("unknown state %q in %q", t[4], subject)
	}
	return LifecycleRef{Extension: t[2], Sandbox: t[3], State: s}, nil
}
