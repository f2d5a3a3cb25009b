package event_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// headerText renders h one "name: value" per line, the form FuzzDecode
// reads its headers from.
func headerText(h nats.Header) string {
	var b strings.Builder
	for k, vs := range h {
		for _, v := range vs {
			b.WriteString(k + ": " + v + "\n")
		}
	}
	return b.String()
}

func parseHeaderText(s string) nats.Header {
	h := nats.Header{}
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		h[k] = append(h[k], strings.TrimPrefix(v, " "))
	}
	return h
}

// FuzzDecode feeds Decode arbitrary headers and bodies. It must never
// panic; an error must wrap ErrMalformed and come without an event; an
// event must be valid and survive Encode and Decode again unchanged.
// Seeds are added here and kept in testdata/fuzz/FuzzDecode.
func FuzzDecode(f *testing.F) {
	valid := encode(f, fullEvent(f))
	f.Add(headerText(valid.Header), valid.Data)
	f.Add("", []byte(`{"specversion":"1.0","id":"1","source":"s","type":"t.v1","subject":"x","data":{"a":1}}`))
	f.Add("content-type: application/cloudevents+json\n", []byte(`{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"AAE="}`))
	f.Add("content-type: application/cloudevents+json; charset=utf-8\n", []byte(`{"specversion":"1.0","id":"1","source":"s","type":"t","myext":"v","time":"2025-01-01T00:00:00+01:00"}`))
	f.Add("ce-specversion: 1.0\nce-id: %C3%A9\nce-source: s\nce-type: t\nce-subject: a%20b\nContent-Type: text/plain\n", []byte("hi"))
	f.Add("ce-specversion: 1.0\nce-id: 1\nce-source: s\nce-type: t\nce-time: 2025-01-01T00:00:00Z\nce-xyz: %FF\n", []byte(nil))
	f.Add("ce-specversion: 0.3\nce-id: 1\n", []byte("{}"))
	f.Add("ce-specversion: 1.0\nce-id: %4\n", []byte(""))
	f.Add("traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n", []byte(`{"specversion":"1.0","id":"1","source":"s","type":"t"}`))
	f.Add("", []byte(`null`))
	f.Add("", []byte(`{"specversion":"1.0","id":"1","source":"s","type":"t","num":1.5,"flag":true,"n":3}`))

	f.Fuzz(func(t *testing.T, headers string, body []byte) {
		h := parseHeaderText(headers)
		_, e, err := event.Decode(context.Background(), h, body)
		if err != nil {
			if !errors.Is(err, event.ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			if e != nil {
				t.Fatalf("event returned with error %v", err)
			}
			return
		}
		if e == nil {
			t.Fatal("no event and no error")
		}
		if verr := e.Validate(); verr != nil {
			t.Fatalf("Decode returned an invalid event: %v\n%s", verr, e)
		}
		msg, err := event.Encode(context.Background(), "sandboxer.evt.x.y.ready", e)
		if err != nil {
			t.Fatalf("a decoded event does not encode: %v\n%s", err, e)
		}
		_, again, err := event.Decode(context.Background(), msg.Header, msg.Data)
		if err != nil {
			t.Fatalf("re-decoding an encoded event: %v\nheaders %v", err, msg.Header)
		}
		sameEvent(t, e, again)
	})
}
