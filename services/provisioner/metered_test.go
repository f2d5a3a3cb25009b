package provisioner_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// meteredEcho is echo with a price list: 3 units a second, and a meter
// that bills 7 units a started minute.
type meteredEcho struct{ *echo.Echo }

func (meteredEcho) EstimateCost(_ context.Context, _ extension.Profile, d time.Duration) (extension.MeterQuote, error) {
	return extension.MeterQuote{Amount: 3 * int64(d/time.Second), Duration: d, Breakdown: []string{"3/s"}}, nil
}

func (meteredEcho) MeterActual(_ context.Context, _ extension.Handle, u extension.Usage) (extension.MeterReading, error) {
	mins := int64(u.DestroyedAt.Sub(u.ReadyAt)/time.Minute) + 1
	return extension.MeterReading{Amount: 7 * mins, Quantity: mins, Unit: "minute"}, nil
}

var _ extension.Metered = meteredEcho{}

func TestMeteredPoolQuotesAndMeters(t *testing.T) {
	t.Parallel()
	m := echo.Manifest("metered")
	m.Capabilities.PricingModel = extension.PricingMetered
	e := newEnv(t, m)
	reg := extension.NewRegistry(extension.Info{Handler: echo.Handler, New: func() extension.Extension { return meteredEcho{echo.New()} }})
	e.start(t, reg, "metered", "w1")

	nc := e.srv.ConnAs(t, auth.Identity{Role: auth.RoleMetering}) // who asks for quotes
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Asked as metering asks: bus.Call.
	q, err := bus.Call[event.QuoteReply](ctx, nc, event.QuoteSubject("metered"), event.QuoteRequest{Profile: "metered", DurationSeconds: 600})
	if err != nil {
		t.Fatal(err)
	}
	if q.Error != "" || q.Amount != 1800 {
		t.Fatalf("quote = %+v, want 1800 for 600s at 3/s", q)
	}
	_, err = bus.Call[event.QuoteReply](ctx, nc, event.QuoteSubject("metered"), event.QuoteRequest{Profile: "nope", DurationSeconds: 1})
	var se *bus.ServiceError
	if !errors.As(err, &se) || se.Code != "400" || !strings.Contains(se.Description, "nope") {
		t.Fatalf("quote of an unknown profile: %v; want a 400 refusal naming the profile", err)
	}
	// An asker of an earlier version reads the refusal from the body.
	req, _ := json.Marshal(event.QuoteRequest{Profile: "nope", DurationSeconds: 1})
	msg, err := nc.RequestWithContext(ctx, event.QuoteSubject("metered"), req)
	if err != nil {
		t.Fatal(err)
	}
	var old event.QuoteReply
	if err := json.Unmarshal(msg.Data, &old); err != nil || old.Error != se.Description {
		t.Fatalf("refusal body = %+v, %v; want the error %q", old, err, se.Description)
	}

	id := sandbox.NewID()
	e.publishCreate(t, "metered", id, nil)
	e.awaitEvent(t, id, event.StateReady)
	// The worker reads when the sandbox became ready from its ready
	// event; no inventory record is needed.
	e.publishDestroy(t, "metered", id)
	seen := e.awaitEvent(t, id, event.StateDestroyed)
	var d event.Destroyed
	if err := event.DataAs(seen[len(seen)-1], &d); err != nil {
		t.Fatal(err)
	}
	if d.Meter == nil || d.Meter.Amount != 7 || d.Meter.Unit != "minute" {
		t.Fatalf("destroyed meter = %+v, want 7 for one started minute", d.Meter)
	}
}
