package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
)

// Headers of a direct get's answer.
const (
	headerStream   = "Nats-Stream"
	headerSubject  = "Nats-Subject"
	headerSequence = "Nats-Sequence"
	headerTime     = "Nats-Time-Stamp"
	headerStatus   = "Status"
)

// ErrNoMessage is returned when a stream holds no message on the subjects
// asked for.
var ErrNoMessage = errors.New("no message")

// StoredMsg is a message read from a stream by a direct get.
type StoredMsg struct {
	Subject  string
	Sequence uint64
	Time     time.Time
	Header   nats.Header
	Data     []byte
}

// LastMsg reads the last message of stream on subject, which may hold
// wildcards, with a direct get whose subject names it
// ($JS.API.DIRECT.GET.<stream>.<subject>): the server checks that the
// caller may read exactly those subjects, and no consumer is needed. The
// stream must allow direct gets. No message wraps [ErrNoMessage].
func LastMsg(ctx context.Context, nc *nats.Conn, stream, subject string) (*StoredMsg, error) {
	reply, err := nc.RequestWithContext(ctx, "$JS.API.DIRECT.GET."+stream+"."+subject, nil)
	if err != nil {
		return nil, fmt.Errorf("reading the last message of %s on %s: %w", stream, subject, err)
	}
	m, err := storedMsg(reply)
	if err != nil {
		return nil, fmt.Errorf("reading the last message of %s on %s: %w", stream, subject, err)
	}
	return m, nil
}

// LastPerSubject reads the last message of every subject of stream that
// matches one of subjects (at most 1024 subjects), with one batched direct
// get: a snapshot of a key-value bucket without a consumer. The caller
// must be allowed the request form of direct gets
// ($JS.API.DIRECT.GET.<stream>). It returns the messages in stream order,
// and the stream sequence the snapshot is consistent up to.
func LastPerSubject(ctx context.Context, nc *nats.Conn, stream string, subjects []string) ([]*StoredMsg, uint64, error) {
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return nil, 0, fmt.Errorf("reading %s: %w", stream, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	req, _ := json.Marshal(struct {
		MultiLast []string `json:"multi_last"`
	}{subjects})
	if err := nc.PublishRequest("$JS.API.DIRECT.GET."+stream, inbox, req); err != nil {
		return nil, 0, fmt.Errorf("reading %s: %w", stream, err)
	}
	var out []*StoredMsg
	for {
		msg, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			return nil, 0, fmt.Errorf("reading %s: %w", stream, err)
		}
		switch msg.Header.Get(headerStatus) {
		case "":
			m, err := storedMsg(msg)
			if err != nil {
				return nil, 0, fmt.Errorf("reading %s: %w", stream, err)
			}
			out = append(out, m)
		case "204": // end of batch
			upTo, _ := strconv.ParseUint(msg.Header.Get("Nats-UpTo-Sequence"), 10, 64)
			return out, upTo, nil
		case "404":
			if len(out) == 0 {
				return nil, 0, nil
			}
			return nil, 0, fmt.Errorf("reading %s: a message vanished while being read", stream)
		default:
			return nil, 0, fmt.Errorf("reading %s: server answered %s %s", stream, msg.Header.Get(headerStatus), msg.Header.Get("Description"))
		}
	}
}

// subjectMsgsWait bounds, past the connection's timeout, the wait for a
// batched direct get's answer when the caller's context has no deadline.
const subjectMsgsWait = 5 * time.Second

// SubjectMsgs reads every message of stream on filter's subjects, oldest
// first, at most limit (at least 1) of them, with one batched direct get
// (next_by_subj from the first sequence): a sandbox's few lifecycle events
// in one request, without a consumer. The caller must be allowed the
// request form of direct gets ($JS.API.DIRECT.GET.<stream>). No message
// is an empty answer.
func SubjectMsgs(ctx context.Context, nc *nats.Conn, stream, filter string, limit int) ([]*StoredMsg, error) {
	limit = max(limit, 1)
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, nc.Opts.Timeout+subjectMsgsWait)
		defer cancel()
	}
	// A channel of the batch's size (and the end of batch): a synchronous
	// subscription would allocate nats.go's default of 64k slots per read.
	ch := make(chan *nats.Msg, limit+1)
	inbox := nc.NewInbox()
	sub, err := nc.ChanSubscribe(inbox, ch)
	if err != nil {
		return nil, fmt.Errorf("reading %s on %s: %w", stream, filter, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	req, _ := json.Marshal(struct {
		Seq   uint64 `json:"seq"`
		Next  string `json:"next_by_subj"`
		Batch int    `json:"batch"`
	}{1, filter, limit})
	if err := nc.PublishRequest("$JS.API.DIRECT.GET."+stream, inbox, req); err != nil {
		return nil, fmt.Errorf("reading %s on %s: %w", stream, filter, err)
	}
	var out []*StoredMsg
	for {
		var msg *nats.Msg
		select {
		case msg = <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("reading %s on %s: %w", stream, filter, ctx.Err())
		}
		switch msg.Header.Get(headerStatus) {
		case "":
			m, err := storedMsg(msg)
			if err != nil {
				return nil, fmt.Errorf("reading %s on %s: %w", stream, filter, err)
			}
			out = append(out, m)
			if len(out) == limit {
				return out, nil
			}
		case "204": // end of batch
			return out, nil
		case "404":
			return out, nil
		default:
			return nil, fmt.Errorf("reading %s on %s: server answered %s %s", stream, filter, msg.Header.Get(headerStatus), msg.Header.Get("Description"))
		}
	}
}

func storedMsg(msg *nats.Msg) (*StoredMsg, error) {
	switch st := msg.Header.Get(headerStatus); st {
	case "":
	case "404":
		return nil, ErrNoMessage
	default:
		return nil, fmt.Errorf("server answered %s %s", st, msg.Header.Get("Description"))
	}
	seq, err := strconv.ParseUint(msg.Header.Get(headerSequence), 10, 64)
	if err != nil {
		return nil, fmt.Errorf("answer without a sequence: %w", err)
	}
	m := &StoredMsg{Subject: msg.Header.Get(headerSubject), Sequence: seq, Header: msg.Header, Data: msg.Data}
	if t, err := time.Parse(time.RFC3339Nano, msg.Header.Get(headerTime)); err == nil {
		m.Time = t
	}
	return m, nil
}

// LeaderLastMsg reads the last message of stream on subject from the
// stream's leader ($JS.API.STREAM.MSG.GET.<stream>), never from a
// follower: what a compare-and-swap does not guard, such as whether a
// fact was already recorded, must not be decided on a replica that has
// not applied the latest writes (a direct get may be answered by any
// replica). It costs the leader the read. No message wraps
// [ErrNoMessage].
func LeaderLastMsg(ctx context.Context, nc *nats.Conn, stream, subject string) (*StoredMsg, error) {
	req, _ := json.Marshal(struct {
		LastBySubject string `json:"last_by_subj"`
	}{subject})
	reply, err := nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+stream, req)
	if err != nil {
		return nil, fmt.Errorf("reading the last message of %s on %s: %w", stream, subject, err)
	}
	var resp struct {
		Error *struct {
			Code        int    `json:"code"`
			ErrCode     int    `json:"err_code"`
			Description string `json:"description"`
		} `json:"error"`
		Message *struct {
			Subject string    `json:"subject"`
			Seq     uint64    `json:"seq"`
			Header  []byte    `json:"hdrs"`
			Data    []byte    `json:"data"`
			Time    time.Time `json:"time"`
		} `json:"message"`
	}
	if err := json.Unmarshal(reply.Data, &resp); err != nil {
		return nil, fmt.Errorf("reading the last message of %s on %s: %w", stream, subject, err)
	}
	switch {
	case resp.Error != nil && resp.Error.Code == 404:
		return nil, fmt.Errorf("reading the last message of %s on %s: %w", stream, subject, ErrNoMessage)
	case resp.Error != nil:
		return nil, fmt.Errorf("reading the last message of %s on %s: server answered %d %s", stream, subject, resp.Error.Code, resp.Error.Description)
	case resp.Message == nil:
		return nil, fmt.Errorf("reading the last message of %s on %s: an answer without a message", stream, subject)
	}
	m := &StoredMsg{Subject: resp.Message.Subject, Sequence: resp.Message.Seq, Data: resp.Message.Data, Time: resp.Message.Time}
	if len(resp.Message.Header) > 0 {
		h, err := nats.DecodeHeadersMsg(resp.Message.Header)
		if err != nil {
			return nil, fmt.Errorf("reading the last message of %s on %s: its headers: %w", stream, subject, err)
		}
		m.Header = h
	}
	return m, nil
}
