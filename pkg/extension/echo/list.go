package echo

import (
	"context"
	"maps"
	"slices"

	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// List returns the sandboxes in memory, in id order. Echo keeps no time:
// Since is zero.
func (e *Echo) List(ctx context.Context) ([]extension.Held, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]extension.Held, 0, len(e.sandboxes))
	for _, id := range slices.Sorted(maps.Keys(e.sandboxes)) {
		out = append(out, extension.Held{Handle: e.sandboxes[id], Resources: []string{"echo:" + id}})
	}
	return out, nil
}

var _ extension.Lister = (*Echo)(nil)
