package metering

import (
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// TypeAccrual is the internal timer of a running sandbox's accrual, fired
// by its schedule on the timers stream. It is not on the metering stream.
const TypeAccrual event.Type = "dev.sandboxer.credits.accrual.v1"

// kindOf is the metering event kind of a ledger entry kind.
func kindOf(k credits.EntryKind) credits.Kind {
	switch k {
	case credits.EntryGrant:
		return credits.KindGranted
	case credits.EntryHold, credits.EntryExtend:
		return credits.KindReserved
	case credits.EntryDebit:
		return credits.KindDebited
	case credits.EntryRefund:
		return credits.KindRefunded
	case credits.EntryRelease:
		return credits.KindReleased
	case credits.EntryExpire:
		return credits.KindExpired
	}
	return ""
}

// Accrual is the data of a [TypeAccrual] tick.
type Accrual struct {
	Consumer string `json:"consumer"`
	Sandbox  string `json:"sandbox_id"`
}

func usageKey(consumer, sb string) string { return "usage." + consumer + "." + sb }
func accountKey(consumer string) string   { return "account." + consumer }

// holdStoreKey is the credits key of the open hold of sandbox sb.
func holdStoreKey(consumer, sb string) string { return "hold." + consumer + "." + sb }
