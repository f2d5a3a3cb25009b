package event

// QuoteRequest asks a metered extension's workers for the backend's own
// price of running a sandbox of Profile for DurationSeconds, on
// [QuoteSubject]. Metering sends it; the provisioner answers it with
// extension.Metered.EstimateCost, so metering never links backend code.
type QuoteRequest struct {
	// Profile is the profile slug.
	Profile string `json:"profile"`
	// DurationSeconds is the duration to price, at least 0.
	DurationSeconds int64 `json:"duration_seconds"`
}

// QuoteReply answers a [QuoteRequest]: an amount and its breakdown, or an
// error. Amounts are integers in the credit minor unit.
type QuoteReply struct {
	// Amount is the price in credit minor units.
	Amount int64 `json:"amount"`
	// Breakdown explains the amount, line by line.
	Breakdown []string `json:"breakdown,omitempty"`
	// Error, when set, says why no quote could be given; Amount is then
	// meaningless.
	Error string `json:"error,omitempty"`
}
