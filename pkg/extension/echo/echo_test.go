package echo_test

import (
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/conformance"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
)

func TestConformance(t *testing.T) {
	conformance.Run(t, conformance.Harness{
		New:     func(t *testing.T) extension.Extension { return echo.New() },
		Profile: extension.Profile{Slug: "echo", Extension: "echo"},
		Host:    "localhost",
		Instances: func(t *testing.T, ext extension.Extension, id string) int {
			return ext.(*echo.Echo).Instances(id)
		},
	})
}
