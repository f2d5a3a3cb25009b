package extension

import (
	"context"
	"time"
)

// Lister is implemented by backends that can say what they hold: every
// sandbox of which something exists on the backend right now (a
// workspace, a compose project, a session), whether or not a live record
// still owns it. The provisioner's orphan reconciler lists each pool's
// backend and tears down what no live record owns.
//
// List returns one [Held] per sandbox, partial attempts included, with a
// handle Teardown accepts. It lists only what this configured backend
// made (its own base directory, its own state), never another
// extension's, and honours ctx. An error means the listing is
// incomplete: nothing it returned may be taken as all there is.
type Lister interface {
	List(ctx context.Context) ([]Held, error)
}

// Held is what a backend holds of one sandbox.
type Held struct {
	// Handle is what Teardown needs to remove it: at least the sandbox
	// id it is keyed by and the host it is on, as a partial handle.
	Handle Handle
	// Resources names what is held, as a CleanupReport names what it
	// removed ("dir:/srv/sbx-1", "container:sbx-1-web-1").
	Resources []string
	// Since is when the backend made the oldest of it, by the clock of
	// the machine holding it; zero when the backend cannot tell.
	Since time.Time
}
