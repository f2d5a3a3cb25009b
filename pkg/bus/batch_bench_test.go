package bus_test

import (
	"fmt"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// BenchmarkCommit is what one account commit of three keys (a ledger
// entry, a hold, the account) costs the writer, sequentially: as one
// atomic batch on a stream of one replica on file storage (the server
// stages the batch in a file store of its own, written synchronously), on
// memory storage (staged in memory, as on a replicated stream), and as
// three plain publishes awaited together (the previous version's outbox
// writes, which are not atomic).
func BenchmarkCommit(b *testing.B) {
	srv := natstest.Start(b)
	js := srv.JetStream(b)
	ctx := testCtx(b)
	for _, st := range []jetstream.StorageType{jetstream.FileStorage, jetstream.MemoryStorage} {
		name := "BENCH_" + st.String()
		if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{name + ".>"}, Storage: st, AllowAtomicPublish: true}); err != nil {
			b.Fatal(err)
		}
	}
	var n int // a fresh key for each commit, across the runs
	msgs := func(stream string) []*nats.Msg {
		n++
		i := n
		var out []*nats.Msg
		for _, k := range []string{"ledger", "hold", "account"} {
			m := nats.NewMsg(fmt.Sprintf("%s.%s.%d", stream, k, i))
			m.Data = []byte(`{"amount":1}`)
			m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, "0")
			out = append(out, m)
		}
		return out
	}
	for _, st := range []jetstream.StorageType{jetstream.FileStorage, jetstream.MemoryStorage} {
		stream := "BENCH_" + st.String()
		b.Run("atomic/"+st.String(), func(b *testing.B) {
			for range b.N {
				if _, err := bus.PublishAtomic(ctx, js.Conn(), msgs(stream)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("plain/file", func(b *testing.B) {
		for range b.N {
			var fs []jetstream.PubAckFuture
			for _, m := range msgs("BENCH_" + jetstream.FileStorage.String()) {
				f, err := js.PublishMsgAsync(m)
				if err != nil {
					b.Fatal(err)
				}
				fs = append(fs, f)
			}
			for _, f := range fs {
				select {
				case <-f.Ok():
				case err := <-f.Err():
					b.Fatal(err)
				}
			}
		}
	})
}
