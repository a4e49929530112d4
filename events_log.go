package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// event is one kept SSE notification of a client: a playbook/result or
// playbook/progress JSON-RPC message with its id.
type event struct {
	// ID is the log position, monotonic per client: the JetStream stream
	// sequence in NATS mode, a process-wide counter in-process. It is the
	// SSE id: line and what Last-Event-ID names.
	ID uint64
	// Method is the JSON-RPC method and so the SSE event name.
	Method string
	// RequestID is params.requestId of a result, so that delivering it can
	// retire the pending request record.
	RequestID string
	// Data is the whole JSON-RPC message.
	Data json.RawMessage
}

// eventLog keeps every client's events for NATS_REQUEST_TTL_SECS and feeds
// them to the broker live. It is the seam between the two modes of SPEC §9:
// a JetStream stream shared by all replicas, or memory.
type eventLog interface {
	// append keeps ev (its ID is ignored) for clientID and returns its id.
	// Once append returns, the event reaches the broker of every replica
	// (deliver below) and replay sees it.
	append(ctx context.Context, clientID string, ev event) (uint64, error)
	// replay calls fn, in order, for every kept event of clientID with an id
	// after `after` that was appended before replay started.
	replay(ctx context.Context, clientID string, after uint64, fn func(event) error) error
	// ready is closed once live delivery runs: a connection registered after
	// it misses nothing appended later.
	ready() <-chan struct{}
}

var (
	_ eventLog = (*memLog)(nil)
	_ eventLog = (*natsLog)(nil)
)

// memLog is the in-process event log, bounded by age (the request TTL) and
// by count. append hands the event to deliver under the same lock that
// assigns ids, so every connection sees its events in id order.
type memLog struct {
	ttl     time.Duration
	max     int
	now     func() time.Time
	deliver func(clientID string, ev event)
	readyCh chan struct{}

	mu       sync.Mutex
	seq      uint64
	all      []memEvent // append order, oldest first
	byClient map[string][]event
}

type memEvent struct {
	clientID string
	id       uint64
	at       time.Time
}

// memLogMax bounds the in-process log whatever the TTL: in-process mode is
// for one small deployment, and memory must stay bounded.
const memLogMax = 100_000

func newMemLog(ttl time.Duration, max int, deliver func(string, event)) *memLog {
	ready := make(chan struct{})
	close(ready)
	// Ids start at the current Unix time in microseconds, not at 1, so they
	// keep growing across restarts: a browser coming back to a restarted
	// process with a Last-Event-ID must not skip the new events as seen.
	seq := uint64(time.Now().UnixMicro())
	return &memLog{ttl: ttl, max: max, now: time.Now, deliver: deliver, readyCh: ready, seq: seq, byClient: map[string][]event{}}
}

func (l *memLog) ready() <-chan struct{} { return l.readyCh }

func (l *memLog) append(_ context.Context, clientID string, ev event) (uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	l.seq++
	ev.ID = l.seq
	l.all = append(l.all, memEvent{clientID: clientID, id: ev.ID, at: now})
	l.byClient[clientID] = append(l.byClient[clientID], ev)
	for len(l.all) > 0 && (len(l.all) > l.max || now.Sub(l.all[0].at) >= l.ttl) {
		old := l.all[0]
		l.all = l.all[1:]
		// The globally oldest event is also its client's oldest.
		if rest := l.byClient[old.clientID][1:]; len(rest) > 0 {
			l.byClient[old.clientID] = rest
		} else {
			delete(l.byClient, old.clientID)
		}
	}
	l.deliver(clientID, ev)
	return ev.ID, nil
}

func (l *memLog) replay(ctx context.Context, clientID string, after uint64, fn func(event) error) error {
	l.mu.Lock()
	var out []event
	for _, ev := range l.byClient[clientID] {
		if ev.ID > after {
			out = append(out, ev)
		}
	}
	l.mu.Unlock()
	for _, ev := range out {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(ev); err != nil {
			return err
		}
	}
	return nil
}

// natsLog keeps events in the JetStream stream NATS_EVENTS_STREAM, one
// subject per client (<prefix>.<client_id>). Each replica follows the whole
// stream with one ordered consumer and delivers to its own connections; the
// stream sequence is the event id.
type natsLog struct {
	js      jetstream.JetStream
	stream  *natsStream
	prefix  string
	log     *slog.Logger
	deliver func(clientID string, ev event)
	readyCh chan struct{}
}

// replayNextWait bounds the wait for each replayed message.
const replayNextWait = 10 * time.Second

const (
	hdrMethod  = "Gateway-Event"
	hdrRequest = "Gateway-Request-Id"
)

func newNatsLog(c *natsConn, cfg Config, log *slog.Logger, deliver func(string, event)) *natsLog {
	st := c.stream(jetstream.StreamConfig{
		Name:        cfg.EventsStream,
		Description: "Gateway SSE events kept for replay and for clients that are away",
		Subjects:    []string{cfg.EventsSubjectPrefix + ".>"},
		MaxAge:      cfg.RequestTTL,
		Storage:     jetstream.FileStorage,
		Discard:     jetstream.DiscardOld,
		// A runaway playbook must not fill the server for everyone.
		MaxMsgsPerSubject: 10_000,
	})
	return &natsLog{js: c.js, stream: st, prefix: cfg.EventsSubjectPrefix, log: log, deliver: deliver, readyCh: make(chan struct{})}
}

func (l *natsLog) ready() <-chan struct{} { return l.readyCh }

func (l *natsLog) subject(clientID string) string { return l.prefix + "." + clientID }

func (l *natsLog) append(ctx context.Context, clientID string, ev event) (uint64, error) {
	if _, err := l.stream.get(ctx); err != nil {
		return 0, err
	}
	msg := nats.NewMsg(l.subject(clientID))
	msg.Data = ev.Data
	msg.Header.Set(hdrMethod, ev.Method)
	if ev.RequestID != "" {
		msg.Header.Set(hdrRequest, ev.RequestID)
	}
	ack, err := l.js.PublishMsg(ctx, msg, jetstream.WithExpectStream(l.stream.cfg.Name))
	if err != nil {
		return 0, fmt.Errorf("publishing event for client %s: %w", clientID, err)
	}
	return ack.Sequence, nil
}

func eventFromMsg(m jetstream.Msg) (clientID string, ev event, ok bool) {
	meta, err := m.Metadata()
	if err != nil {
		return "", ev, false
	}
	subj := m.Subject()
	clientID = subj[strings.LastIndexByte(subj, '.')+1:]
	h := m.Headers()
	return clientID, event{ID: meta.Sequence.Stream, Method: h.Get(hdrMethod), RequestID: h.Get(hdrRequest), Data: m.Data()}, true
}

// replay reads the client's subject with an ordered consumer from after+1
// up to the client's last message when replay started; later events reach
// the connection live.
func (l *natsLog) replay(ctx context.Context, clientID string, after uint64, fn func(event) error) error {
	st, err := l.stream.get(ctx)
	if err != nil {
		return err
	}
	last, err := st.GetLastMsgForSubject(ctx, l.subject(clientID))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading last event of client %s: %w", clientID, err)
	}
	if last.Sequence <= after {
		return nil
	}
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{l.subject(clientID)}, InactiveThreshold: time.Minute}
	if after > 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, after+1
	}
	cons, err := st.OrderedConsumer(ctx, cfg)
	if err != nil {
		return fmt.Errorf("replaying client %s: %w", clientID, err)
	}
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("replaying client %s: %w", clientID, err)
	}
	defer it.Stop()
	for {
		// Bounded: if the last message expired meanwhile, the stream ends and
		// the reconnect replays against the new end.
		nctx, cancel := context.WithTimeout(ctx, replayNextWait)
		m, err := it.Next(jetstream.NextContext(nctx))
		cancel()
		if err != nil {
			return fmt.Errorf("replaying client %s: %w", clientID, err)
		}
		_, ev, ok := eventFromMsg(m)
		if !ok {
			continue
		}
		if ev.ID > after {
			if err := fn(ev); err != nil {
				return err
			}
		}
		if ev.ID >= last.Sequence {
			return nil
		}
	}
}

// run follows the whole stream and hands every event to deliver until ctx
// ends. It starts after the stream's end at first start (older events are
// for replay) and, whenever the consumer has to be rebuilt, resumes right
// after the last event it delivered, so a NATS outage loses nothing.
func (l *natsLog) run(ctx context.Context) {
	var pos atomic.Uint64 // last stream sequence handed to deliver
	started, warned := false, false
	retryForever(ctx, nil, func(<-chan struct{}) bool {
		err := l.follow(ctx, &pos, &started)
		switch {
		case err == nil:
			warned = false
			return true
		case ctx.Err() != nil:
		case !warned:
			// Once per outage: SSE delivery is down until it recovers.
			l.log.Warn("cannot follow the events stream; retrying", "stream", l.stream.cfg.Name, "err", err)
			warned = true
		default:
			l.log.Debug("events stream still unavailable", "err", err)
		}
		return false
	})
}

// follow runs one ordered consumer until it ends; nil means it ran.
func (l *natsLog) follow(ctx context.Context, pos *atomic.Uint64, started *bool) error {
	st, err := l.stream.get(ctx)
	if err != nil {
		return err
	}
	if !*started {
		info, err := st.Info(ctx)
		if err != nil {
			return fmt.Errorf("reading stream info: %w", err)
		}
		pos.Store(info.State.LastSeq)
		*started = true
	}
	from := pos.Load() + 1
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{l.prefix + ".>"},
		DeliverPolicy:  jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:    from,
	})
	if err != nil {
		return fmt.Errorf("creating the events consumer: %w", err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		clientID, ev, ok := eventFromMsg(m)
		if !ok {
			return
		}
		pos.Store(ev.ID)
		l.deliver(clientID, ev)
	})
	if err != nil {
		return fmt.Errorf("consuming events: %w", err)
	}
	select {
	case <-l.readyCh:
	default:
		close(l.readyCh)
		l.log.Info("following events stream", "stream", l.stream.cfg.Name, "from", from)
	}
	select {
	case <-ctx.Done():
		cc.Stop()
	case <-cc.Closed():
		l.log.Warn("events consumer ended; restarting", "after", pos.Load())
	}
	return nil
}

// pendingIndex maps client_id to its pending requests (the init message's
// pendingRequests) so a connect never scans the requests bucket (the
// original read every key). It follows the bucket: every record written by
// executePlaybook on any replica, and its deletion.
type pendingIndex struct {
	ttl      time.Duration
	requests kvStore
	log      *slog.Logger

	mu       sync.Mutex
	byClient map[string]map[string]pendingRequest // client → request id → info
	owner    map[string]string                    // request id → client
	updates  int
}

type pendingRequest struct {
	RequestID    string `json:"requestId"`
	ExecutionID  string `json:"executionId"`
	PlaybookPath string `json:"playbookPath"`
	created      time.Time
}

func newPendingIndex(ttl time.Duration, requests kvStore, log *slog.Logger) *pendingIndex {
	return &pendingIndex{ttl: ttl, requests: requests, log: log, byClient: map[string]map[string]pendingRequest{}, owner: map[string]string{}}
}

// isRequestKey tells request records from the other keys of the bucket
// (client.<id> ownership, cursor.<id> delivery cursors).
func isRequestKey(key string) bool { return !strings.Contains(key, ".") }

func (ix *pendingIndex) update(key string, value []byte) {
	if !isRequestKey(key) {
		return
	}
	ix.mu.Lock()
	defer ix.mu.Unlock()
	ix.removeLocked(key)
	// Records that expire by TTL send no delete: sweep now and then so the
	// index stays bounded by what was written within one TTL.
	if ix.updates++; ix.updates%1024 == 0 {
		cutoff := time.Now().Add(-ix.ttl)
		for id, c := range ix.owner {
			if ix.byClient[c][id].created.Before(cutoff) {
				ix.removeLocked(id)
			}
		}
	}
	if value == nil {
		return
	}
	var rec requestRecord
	if json.Unmarshal(value, &rec) != nil || rec.ClientID == "" {
		return
	}
	created := time.Unix(rec.CreatedAt, 0)
	if rec.CreatedAt == 0 {
		created = time.Now()
	}
	if ix.byClient[rec.ClientID] == nil {
		ix.byClient[rec.ClientID] = map[string]pendingRequest{}
	}
	ix.byClient[rec.ClientID][key] = pendingRequest{RequestID: key, ExecutionID: rec.ExecutionID, PlaybookPath: rec.PlaybookPath, created: created}
	ix.owner[key] = rec.ClientID
}

func (ix *pendingIndex) removeLocked(id string) {
	if c, ok := ix.owner[id]; ok {
		delete(ix.byClient[c], id)
		if len(ix.byClient[c]) == 0 {
			delete(ix.byClient, c)
		}
		delete(ix.owner, id)
	}
}

func (ix *pendingIndex) reset() {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	clear(ix.byClient)
	clear(ix.owner)
}

// pendingListMax bounds the init message.
const pendingListMax = 100

// list returns the client's pending requests, oldest first. Bucket TTL
// expiry sends no delete, so entries are aged out here and each one is
// confirmed with a Get (a handful per connect, never a scan).
func (ix *pendingIndex) list(ctx context.Context, clientID string) []pendingRequest {
	ix.mu.Lock()
	var out []pendingRequest
	cutoff := time.Now().Add(-ix.ttl)
	for id, p := range ix.byClient[clientID] {
		if p.created.Before(cutoff) {
			ix.removeLocked(id)
			continue
		}
		out = append(out, p)
	}
	ix.mu.Unlock()
	slices.SortFunc(out, func(a, b pendingRequest) int {
		if c := a.created.Compare(b.created); c != 0 {
			return c
		}
		return strings.Compare(a.RequestID, b.RequestID)
	})
	if len(out) > pendingListMax {
		out = out[len(out)-pendingListMax:]
	}
	kept := out[:0]
	for _, p := range out {
		if _, err := ix.requests.Get(ctx, p.RequestID); errors.Is(err, errNotFound) {
			ix.update(p.RequestID, nil)
			continue
		}
		kept = append(kept, p)
	}
	return kept
}

// follow keeps the index in step with the requests store until ctx ends.
// In NATS mode it reads the bucket's current records first (records written
// before this replica started are pending too) and rebuilds after every
// re-open, since deletes may have been missed while disconnected.
func (ix *pendingIndex) follow(ctx context.Context) {
	kv, ok := ix.requests.(*natsKV)
	if !ok {
		ix.requests.Watch(ctx, ix.update)
		return
	}
	go kv.follow(ctx, ix.update, ix.reset)
}

// Delivery cursors: the id of the last event written to a client's stream,
// kept under cursor.<client_id> in the requests bucket so that a reconnect
// without Last-Event-ID (a reloaded page that kept its client_id) gets
// exactly the events it has not been sent. The key has the bucket's TTL,
// which equals the events' retention: when it has expired, so has every
// event it covered.

func cursorKey(clientID string) string { return "cursor." + clientID }

func readCursor(ctx context.Context, requests kvStore, clientID string) (uint64, error) {
	raw, err := requests.Get(ctx, cursorKey(clientID))
	if errors.Is(err, errNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(string(raw), 10, 64)
}

func writeCursor(ctx context.Context, requests kvStore, clientID string, id uint64) error {
	return requests.Put(ctx, cursorKey(clientID), []byte(strconv.FormatUint(id, 10)))
}
