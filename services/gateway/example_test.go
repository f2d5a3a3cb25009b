package gateway_test

import (
	"context"
	"fmt"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

// The default resolver sends each profile to its extension and spreads the
// sandboxes over the extension's hosts.
func ExampleStaticResolver() {
	m := &extension.Manifest{Name: "compose", Hosts: []string{"build-1", "build-2"}}
	p := &extension.Profile{Slug: "web", Extension: "compose"}
	var r gateway.StaticResolver
	for range 3 {
		rt, _ := r.Resolve(context.Background(), gateway.RouteRequest{Profile: p, Manifest: m})
		fmt.Println(rt.Extension, rt.Host)
	}
	// Output:
	// compose build-1
	// compose build-2
	// compose build-1
}

// An admitter refuses a sandbox by wrapping ErrInsufficientCredits: the
// gateway answers 402 and publishes the rejection.
func ExampleAdmitterFunc() {
	balance := map[string]int64{"alice": 100}
	admit := gateway.AdmitterFunc(func(_ context.Context, req gateway.AdmitRequest) (string, error) {
		if balance[req.Consumer] <= 0 {
			return "", fmt.Errorf("consumer %s: %w", req.Consumer, gateway.ErrInsufficientCredits)
		}
		return "hold-" + req.SandboxID, nil
	})
	hold, err := admit.Admit(context.Background(), gateway.AdmitRequest{SandboxID: "sbx-1", Consumer: "alice"})
	fmt.Println(hold, err)
	_, err = admit.Admit(context.Background(), gateway.AdmitRequest{SandboxID: "sbx-2", Consumer: "bob"})
	fmt.Println(err)
	// Output:
	// hold-sbx-1 <nil>
	// consumer bob: insufficient credits
}
