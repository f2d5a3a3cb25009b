// Package credits is the credits contract of sand-boxer: what the metering
// service answers over NATS request-reply and publishes on the metering
// stream, for every party that talks to it: the gateway (admission and the
// credits API), the CLI and billing consumers. It holds the ledger entry,
// the grant, the usage record and the notice as they travel; the requests,
// replies and error codes of the sandboxer-metering micro service; and the
// client that calls it ([Client]).
//
// Amounts are int64 counts of the credit minor unit, the smallest amount the
// ledger records. sand-boxer never divides a minor unit: prices are integers
// per second or per started minute, so every charge is an integer.
//
// The package owns no state and runs nothing: the metering service
// (services/metering) implements the contract. It must never import a
// service, nor nats-server (contract packages build without it).
package credits

import "errors"

// ErrInsufficientCredits is wrapped by every refusal for lack of credit: a
// hold larger than the available balance.
var ErrInsufficientCredits = errors.New("insufficient credits")

// ErrHoldClosed is wrapped when admission is asked again for a sandbox
// whose hold was already settled or released.
var ErrHoldClosed = errors.New("hold already closed")

// ErrInvalidRequest is wrapped by the client when metering refused a
// request as malformed.
var ErrInvalidRequest = errors.New("invalid request")

// ErrNoPrice is wrapped when a sandbox cannot be priced: an unknown profile
// or extension, or a metered backend that gave no quote.
var ErrNoPrice = errors.New("no price")

// Error codes of the request-reply API ([ErrorReply.Code]).
const (
	CodeInsufficientCredits = "insufficient_credits"
	CodeHoldClosed          = "hold_closed"
	CodeNoPrice             = "no_price"
	CodeInvalidRequest      = "invalid_request"
	CodeInternal            = "internal"
)
