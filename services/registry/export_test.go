package registry

import "time"

// RetryDelay exposes the back-off between destroy attempts to the tests.
func (r *Registry) RetryDelay(failed int) time.Duration { return r.retryDelay(failed) }
