package provisioner

import (
	"context"
	"errors"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// What giving up on a command means. The router calls these when a
// command's last allowed delivery failed ([bus.Message.OnExhausted]) and
// publishes what they return before it writes the dead letter: the dead
// letter is for an operator, but the sandbox must not be left as the
// failure found it.

// createExhausted fails a sandbox whose create ran out of deliveries: a
// failed event with the reason (phase provision) and a destroy command, as
// any failed create gets, so that teardown runs and metering releases the
// hold. A create that ended after all (the sandbox moved past
// provisioning, a redelivery raced this one) needs nothing.
func (pl *pool) createExhausted(ctx context.Context, c event.Create, err error) ([]bus.Out, error) {
	st, lerr := pl.latest(ctx, c.Ref)
	if lerr != nil {
		return nil, lerr
	}
	if st.Rank() > event.StateProvisioning.Rank() {
		return nil, nil
	}
	return pl.failed(ctx, c, "provision", nil, err)
}

// maxErrorLen bounds the error a teardown failure reports.
const maxErrorLen = 1000

// destroyExhausted reports a teardown that failed on every delivery of its
// destroy command: a destroying event of its own id with the error and the
// attempt, which keeps the sandbox destroying with the reason on its
// record, and from which the registry schedules the next attempt. A
// sandbox that ended meanwhile needs nothing.
func (pl *pool) destroyExhausted(ctx context.Context, m *bus.Message, d event.Destroy, err error) ([]bus.Out, error) {
	st, lerr := pl.latest(ctx, d.Ref)
	if lerr != nil {
		return nil, lerr
	}
	if st.Terminal() {
		return nil, nil
	}
	cause := err
	var xerr *bus.ExhaustedError
	if errors.As(err, &xerr) {
		cause = xerr.Err
	}
	msg := cause.Error()
	if len(msg) > maxErrorLen {
		msg = msg[:maxErrorLen]
	}
	out, err := pl.lifecycleWithID(event.StateDestroying, d.Ref, event.TeardownFailedID(d.SandboxID, d.Attempt), event.Destroying{
		Ref: d.Ref, Reason: d.Reason, Attempt: d.Attempt, Error: msg, Deliveries: int(m.Delivered),
	})
	if err != nil {
		return nil, err
	}
	pl.log.WarnContext(ctx, "teardown failed on every delivery", "sandbox", d.SandboxID, "attempt", d.Attempt,
		"deliveries", m.Delivered, "err", cause)
	return []bus.Out{out}, nil
}
