package bus

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
)

// legacyBucketLedger is the bucket the ledger had to itself before it
// moved into the credits bucket (under [LedgerPrefix]), where one atomic
// batch commits it with its account.
const legacyBucketLedger = "ledger"

// migrateLedger moves the ledger of the previous version into the credits
// bucket: every entry of the ledger bucket is created under
// ledger.<its key> unless it is there already, with the same value (any
// other value is an error, and nothing is deleted); once every entry is
// there, the ledger bucket is deleted. An entry the previous version had
// committed in an account's outbox but not yet written is written by
// metering when it next loads the account, into the credits bucket. A
// run that finds no ledger bucket does nothing.
//
// It runs with metering stopped (sandboxer up runs it before starting the
// services; on a cluster, stop them for the setup that upgrades).
func migrateLedger(ctx context.Context, js jetstream.JetStream) (*Change, error) {
	old, err := js.KeyValue(ctx, legacyBucketLedger)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("migrating the ledger: opening bucket %s: %w", legacyBucketLedger, err)
	}
	credits, err := js.KeyValue(ctx, BucketCredits)
	if err != nil {
		return nil, fmt.Errorf("migrating the ledger: opening bucket %s: %w", BucketCredits, err)
	}
	keys, err := old.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("migrating the ledger: listing %s: %w", legacyBucketLedger, err)
	}
	var moved, there int
	for key := range keys.Keys() {
		e, err := old.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("migrating the ledger: reading %s: %w", key, err)
		}
		_, err = KVWrite(ctx, js, BucketCredits, LedgerPrefix+key, e.Value(), 0, 0)
		switch {
		case err == nil:
			moved++
			continue
		case !errors.Is(err, jetstream.ErrKeyExists):
			return nil, fmt.Errorf("migrating the ledger: %w", err)
		}
		have, err := credits.Get(ctx, LedgerPrefix+key)
		if err != nil {
			return nil, fmt.Errorf("migrating the ledger: reading %s%s: %w", LedgerPrefix, key, err)
		}
		if !bytes.Equal(have.Value(), e.Value()) {
			return nil, fmt.Errorf("migrating the ledger: %s%s holds another entry than %s/%s; nothing deleted", LedgerPrefix, key, legacyBucketLedger, key)
		}
		there++
	}
	if err := js.DeleteKeyValue(ctx, legacyBucketLedger); err != nil {
		return nil, fmt.Errorf("migrating the ledger: deleting bucket %s once copied: %w", legacyBucketLedger, err)
	}
	return &Change{Kind: "migration", Name: legacyBucketLedger, Action: ActionUpdated,
		Detail: fmt.Sprintf("%d ledger entries moved into %s under %s (%d already there); bucket %s deleted", moved, BucketCredits, LedgerPrefix, there, legacyBucketLedger)}, nil
}
