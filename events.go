package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

// SSE (SPEC §6): a hand-written broker. Each connection has a bounded queue
// fed without blocking; a connection whose queue is full is closed (the
// browser reconnects and replays from the event log), so one slow client
// never slows the others and no event is lost silently. Events are kept in
// the event log (events_log.go), which is what makes replay, delivery to
// clients that were away and fan-out across replicas work.

const (
	// sseWriteTimeout bounds each write to a client: a peer that stops
	// reading is cut rather than holding a goroutine and its buffers.
	sseWriteTimeout = 10 * time.Second
	// sseRetryMillis is the reconnect delay the stream asks browsers for.
	sseRetryMillis = 3000
	// confirmWait bounds how long a callback waits to learn whether a live
	// connection took its event (the holder may be on another replica).
	confirmWait = 2 * time.Second
	// readyWait bounds how long a connect waits for live delivery to run
	// (NATS mode, right after start).
	readyWait = 5 * time.Second
	// replaceWait bounds how long a reconnect waits for the stream it
	// replaces to finish on this replica.
	replaceWait = time.Second
)

// JSON-RPC error codes of the original (REFERENCE §14.1).
const rpcUnauthorized = -32002

// encodeSSE appends one SSE frame to buf: optional id and event lines and a
// single data line holding data as JSON. It is the only way frames are made,
// so that nothing a playbook or client sends can inject a field: an id or
// event containing CR, LF or NUL is refused, and data is JSON, whose encoding
// never contains a raw line break (checked anyway).
func encodeSSE(buf *bytes.Buffer, id, event string, data any) error {
	if strings.ContainsAny(id, "\r\n\x00") {
		return errors.New("sse: id contains CR, LF or NUL")
	}
	if strings.ContainsAny(event, "\r\n\x00") {
		return errors.New("sse: event contains CR, LF or NUL")
	}
	body, err := json.Marshal(data)
	if err != nil {
		return fmt.Errorf("sse: encoding data: %w", err)
	}
	if bytes.ContainsAny(body, "\r\n") {
		return errors.New("sse: data is not single-line JSON")
	}
	if id != "" {
		buf.WriteString("id: ")
		buf.WriteString(id)
		buf.WriteByte('\n')
	}
	if event != "" {
		buf.WriteString("event: ")
		buf.WriteString(event)
		buf.WriteByte('\n')
	}
	buf.WriteString("data: ")
	buf.Write(body)
	buf.WriteString("\n\n")
	return nil
}

// rpcNotification is a JSON-RPC 2.0 notification, as the original sends.
type rpcNotification struct {
	JSONRPC string `json:"jsonrpc"`
	Method  string `json:"method"`
	Params  any    `json:"params"`
}

type rpcError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Data    any    `json:"data,omitempty"`
}

// sessionErrorFrame is the original's frame for a bad session.
var sessionErrorFrame = struct {
	JSONRPC string   `json:"jsonrpc"`
	Error   rpcError `json:"error"`
}{"2.0", rpcError{Code: rpcUnauthorized, Message: "Invalid or expired session"}}

var pingFrame = rpcNotification{JSONRPC: "2.0", Method: "ping", Params: struct{}{}}

// errConnClosed stops a replay when the broker closed the connection.
var errConnClosed = errors.New("connection closed by the broker")

// closeReason says why the broker ended a connection.
type closeReason int

const (
	closeReplaced closeReason = iota + 1 // same client_id connected again
	closeOverflow                        // queue full: the client cannot keep up
	closeRevoked                         // logout, revoked or expired session
	closeGone                            // the client left or the stream failed
)

// conn is one open /events stream.
type conn struct {
	clientID string
	token    string
	gen      uint64 // tells a connection from the one that replaced it
	// queue holds pointers: a channel buffer is allocated whole when the
	// connection opens, so its element size is paid SSE_CLIENT_BUFFER
	// times for every idle connection.
	queue chan *event
	done  chan struct{}

	closeOnce sync.Once
	reason    closeReason // written before done is closed

	// flushed is the highest event id flushed to the client; ended is
	// closed when the connection's handler has returned. A connection that
	// replaces this one on the same replica waits for ended and continues
	// after flushed, so a plain reconnect neither repeats nor skips events
	// even before the delivery cursor is saved.
	flushed atomic.Uint64
	ended   chan struct{}

	mu         sync.Mutex
	lastQueued uint64        // highest event id put on queue (or replayed)
	advanced   chan struct{} // closed when lastQueued grows, for waiters
}

func (c *conn) close(r closeReason) {
	c.closeOnce.Do(func() {
		c.reason = r
		close(c.done)
	})
}

func (c *conn) closed() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// took records that the connection has event id (queued or replayed).
func (c *conn) took(id uint64) {
	c.mu.Lock()
	if id > c.lastQueued {
		c.lastQueued = id
		if c.advanced != nil {
			close(c.advanced)
			c.advanced = nil
		}
	}
	c.mu.Unlock()
}

// waitTook reports whether the connection takes event id before ctx ends
// or the connection closes.
func (c *conn) waitTook(ctx context.Context, id uint64) bool {
	for {
		c.mu.Lock()
		if c.lastQueued >= id {
			c.mu.Unlock()
			return true
		}
		if c.advanced == nil {
			c.advanced = make(chan struct{})
		}
		ch := c.advanced
		c.mu.Unlock()
		select {
		case <-ch:
		case <-c.done:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

// clientEntry is the registration of a client_id on this replica. In NATS
// mode it owns the client's control subscription, which outlives a local
// replacement of the connection.
type clientEntry struct {
	conn *conn
	sub  *nats.Subscription
}

// broker holds this replica's SSE connections, indexed by client_id and by
// session token.
type broker struct {
	ctx      context.Context // the streams context: cancelled at shutdown
	cfg      Config
	log      *slog.Logger
	metrics  *metrics
	resolver *resolver
	requests kvStore
	pending  *pendingIndex
	events   eventLog
	nc       *nats.Conn // nil in-process
	// ctl receives every per-client control subscription: one channel and
	// one goroutine for the replica instead of a goroutine per client.
	ctl     chan *nats.Msg
	replica string // this replica's id on control messages

	// streams counts the goroutines of open streams: hijacked connections
	// are not the http.Server's to wait for at shutdown.
	streams streamCount

	mu        sync.Mutex
	byClient  map[string]*clientEntry
	bySession map[string]map[*conn]struct{}
	total     int
	gen       uint64
}

// newBroker builds the broker and its event log (JetStream when nc is set,
// memory otherwise) and starts following the log and the requests bucket.
// Everything ends when ctx (the streams context) is cancelled.
func newBroker(ctx context.Context, cfg Config, log *slog.Logger, m *metrics, res *resolver, requests kvStore, nc *natsConn) *broker {
	log = log.With("component", "sse")
	b := &broker{
		ctx: ctx, cfg: cfg, log: log, metrics: m, resolver: res, requests: requests,
		pending:   newPendingIndex(cfg.RequestTTL, requests, log),
		replica:   newID(),
		byClient:  map[string]*clientEntry{},
		bySession: map[string]map[*conn]struct{}{},
	}
	if nc == nil {
		b.events = newMemLog(cfg.RequestTTL, memLogMax, b.dispatch)
	} else {
		b.nc = nc.nc
		nl := newNatsLog(nc, cfg, log, b.dispatch)
		b.events = nl
		go nl.run(ctx)
		b.ctl = make(chan *nats.Msg, 4096)
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case m := <-b.ctl:
					b.onControl(m)
				}
			}
		}()
	}
	b.pending.follow(ctx)
	return b
}

// wait waits until every stream has ended (the streams context is
// cancelled first) or ctx ends.
func (b *broker) wait(ctx context.Context) error { return b.streams.wait(ctx) }

// streamCount is a goroutine count that, unlike a sync.WaitGroup, may grow
// while someone waits: a handler that has hijacked its connection is no
// longer waited for by http.Server.Shutdown, so it may still be starting
// its stream's goroutines when shutdown starts waiting for them.
type streamCount struct {
	mu    sync.Mutex
	n     int
	empty chan struct{} // closed when n drops to 0; made by the first waiter
}

func (sc *streamCount) add(d int) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.n += d
	if sc.n == 0 && sc.empty != nil {
		close(sc.empty)
		sc.empty = nil
	}
}

func (sc *streamCount) wait(ctx context.Context) error {
	sc.mu.Lock()
	if sc.n == 0 {
		sc.mu.Unlock()
		return nil
	}
	if sc.empty == nil {
		sc.empty = make(chan struct{})
	}
	empty := sc.empty
	sc.mu.Unlock()
	select {
	case <-empty:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// controlSubject is where replicas talk about one client: "who holds it and
// did it take event N" (request/reply) and "it connected elsewhere"
// (replace). It is outside <prefix>.> so the events stream does not keep it.
func (b *broker) controlSubject(clientID string) string {
	return "_GATEWAY.ctl." + b.cfg.EventsSubjectPrefix + "." + clientID
}

const (
	hdrOp    = "Gateway-Op"
	hdrOwner = "Gateway-Owner"
	hdrSeq   = "Gateway-Seq"
)

// errTooMany* are the connection limits (SPEC §6).
var (
	errTooManyClients        = errors.New("too many SSE connections on this replica")
	errTooManyClientsSession = errors.New("too many SSE connections for this session")
)

// register adds a connection for clientID, closing any connection the same
// client_id has here (and, through NATS, on other replicas).
//
// It also returns the connection it replaced on this replica, if any.
func (b *broker) register(clientID, token string) (c, replaced *conn, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	old := b.byClient[clientID]
	sameSession := 0
	for c := range b.bySession[token] {
		if old == nil || c != old.conn {
			sameSession++
		}
	}
	switch {
	case old == nil && b.total >= b.cfg.SSEMaxClients:
		return nil, nil, errTooManyClients
	case sameSession >= b.cfg.SSEMaxClientsPerSession:
		return nil, nil, errTooManyClientsSession
	}
	b.gen++
	c = &conn{clientID: clientID, token: token, gen: b.gen, queue: make(chan *event, b.cfg.SSEClientBuffer), done: make(chan struct{}), ended: make(chan struct{})}
	if old != nil {
		replaced = old.conn
		b.removeLocked(old.conn)
		old.conn.close(closeReplaced)
		old.conn = c
	} else {
		old = &clientEntry{conn: c}
		b.byClient[clientID] = old
		if b.nc != nil {
			sub, err := b.nc.ChanSubscribe(b.controlSubject(clientID), b.ctl)
			if err != nil {
				b.log.Warn("control subscription failed", "client_id", clientID, "err", err)
			}
			old.sub = sub
		}
	}
	if b.bySession[token] == nil {
		b.bySession[token] = map[*conn]struct{}{}
	}
	b.bySession[token][c] = struct{}{}
	b.total++
	b.metrics.sseConnections.with().Set(float64(b.total))
	if b.nc != nil {
		msg := nats.NewMsg(b.controlSubject(clientID))
		msg.Header.Set(hdrOp, "replace")
		msg.Header.Set(hdrOwner, b.replica)
		b.nc.PublishMsg(msg)
	}
	return c, replaced, nil
}

// removeLocked drops c from the session index and the count.
func (b *broker) removeLocked(c *conn) {
	if set := b.bySession[c.token]; set != nil {
		if _, ok := set[c]; ok {
			delete(set, c)
			b.total--
			if len(set) == 0 {
				delete(b.bySession, c.token)
			}
		}
	}
	b.metrics.sseConnections.with().Set(float64(b.total))
}

// unregister removes c, but never a newer connection of the same client_id
// that replaced it.
func (b *broker) unregister(c *conn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.removeLocked(c)
	if e := b.byClient[c.clientID]; e != nil && e.conn == c {
		delete(b.byClient, c.clientID)
		if e.sub != nil {
			e.sub.Unsubscribe()
		}
	}
}

func (b *broker) lookup(clientID string) *conn {
	b.mu.Lock()
	defer b.mu.Unlock()
	if e := b.byClient[clientID]; e != nil {
		return e.conn
	}
	return nil
}

// dispatch hands a logged event to the client's connection on this replica,
// never blocking: a full queue closes the connection, and the event waits in
// the log for the reconnect.
func (b *broker) dispatch(clientID string, ev event) {
	c := b.lookup(clientID)
	if c == nil || c.closed() {
		return
	}
	select {
	case c.queue <- &ev:
		c.took(ev.ID)
	default:
		b.metrics.sseEvents.with("overflow_disconnect").Inc()
		b.log.Warn("SSE client cannot keep up; closing its stream", "client_id", clientID, "buffer", cap(c.queue))
		c.close(closeOverflow)
		b.unregister(c)
	}
}

// closeSession ends every stream of the session with the −32002 error
// frame. The resolver calls it on logout (OnRevoke).
func (b *broker) closeSession(token string) {
	b.mu.Lock()
	conns := make([]*conn, 0, len(b.bySession[token]))
	for c := range b.bySession[token] {
		conns = append(conns, c)
	}
	b.mu.Unlock()
	for _, c := range conns {
		c.close(closeRevoked)
	}
	if len(conns) > 0 {
		b.log.Info("closed SSE streams of a revoked session", "session", tokenID(token), "streams", len(conns))
	}
}

// onControl answers other replicas about a client this replica holds.
func (b *broker) onControl(m *nats.Msg) {
	clientID := m.Subject[strings.LastIndexByte(m.Subject, '.')+1:]
	c := b.lookup(clientID)
	if c == nil {
		return
	}
	switch m.Header.Get(hdrOp) {
	case "replace":
		if m.Header.Get(hdrOwner) != b.replica {
			b.log.Info("client connected on another replica; closing its stream here", "client_id", clientID)
			c.close(closeReplaced)
			b.unregister(c)
		}
	case "confirm":
		seq, err := strconv.ParseUint(m.Header.Get(hdrSeq), 10, 64)
		if err != nil {
			return
		}
		go func() {
			ctx, cancel := context.WithTimeout(b.ctx, confirmWait)
			defer cancel()
			if c.waitTook(ctx, seq) {
				m.Respond([]byte("took"))
			}
		}()
	}
}

// publish keeps a notification for clientID and reports whether a live
// connection, on any replica, took it.
func (b *broker) publish(ctx context.Context, clientID, method, requestID string, msg any) (delivered bool, err error) {
	data, err := json.Marshal(msg)
	if err != nil {
		return false, err
	}
	id, err := b.events.append(ctx, clientID, event{Method: method, RequestID: requestID, Data: data})
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, confirmWait)
	defer cancel()
	if c := b.lookup(clientID); c != nil {
		return c.waitTook(ctx, id), nil
	}
	if b.nc == nil {
		return false, nil
	}
	req := nats.NewMsg(b.controlSubject(clientID))
	req.Header.Set(hdrOp, "confirm")
	req.Header.Set(hdrSeq, strconv.FormatUint(id, 10))
	_, err = b.nc.RequestMsgWithContext(ctx, req)
	return err == nil, nil
}

// canHijack reports whether w, through any Unwrap chain, can hand over its
// connection.
func canHijack(w http.ResponseWriter) bool {
	for {
		if _, ok := w.(http.Hijacker); ok {
			return true
		}
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return false
		}
		w = u.Unwrap()
	}
}

// initResult is the init message's result, in the original's field order.
type initResult struct {
	ProtocolVersion string           `json:"protocolVersion"`
	ServerInfo      serverInfo       `json:"serverInfo"`
	ClientID        string           `json:"clientId"`
	Capabilities    capabilities     `json:"capabilities"`
	PendingRequests []pendingRequest `json:"pendingRequests,omitempty"`
}

type serverInfo struct {
	Name    string `json:"name"`
	Version string `json:"version"`
}

type capabilities struct {
	Playbooks bool `json:"playbooks"`
	Callbacks bool `json:"callbacks"`
}

// sseStream writes frames to one hijacked connection: the response head
// once, then each batch of frames as one HTTP/1.1 chunk in one write under
// a deadline. The stream owns the connection: net/http's buffers and its
// background reader are gone, which is most of what an idle stream cost.
type sseStream struct {
	conn    net.Conn
	head    []byte // the response head, sent with the first batch
	chunked bool   // false for HTTP/1.0 clients: the body ends at close
	failed  bool   // a write failed or timed out: nothing more is sent
	buf     bytes.Buffer
}

// sseBufKeep is the frame buffer an idle stream keeps; a larger one (a big
// replay) is dropped after its flush.
const sseBufKeep = 4 << 10

var crlf = []byte("\r\n")

func (s *sseStream) frame(id uint64, event string, data any) error {
	sid := ""
	if id > 0 {
		sid = strconv.FormatUint(id, 10)
	}
	return encodeSSE(&s.buf, sid, event, data)
}

func (s *sseStream) flush() error {
	if s.buf.Len() == 0 {
		return nil
	}
	out := make(net.Buffers, 0, 4)
	if s.head != nil {
		out = append(out, s.head)
		s.head = nil
	}
	if s.chunked {
		out = append(out, fmt.Appendf(nil, "%x\r\n", s.buf.Len()), s.buf.Bytes(), crlf)
	} else {
		out = append(out, s.buf.Bytes())
	}
	err := s.write(out)
	s.buf.Reset()
	if s.buf.Cap() > sseBufKeep {
		s.buf = bytes.Buffer{}
	}
	return err
}

func (s *sseStream) write(out net.Buffers) error {
	err := s.conn.SetWriteDeadline(time.Now().Add(sseWriteTimeout))
	if err == nil {
		_, err = out.WriteTo(s.conn)
	}
	if err != nil {
		s.failed = true
	}
	return err
}

// end closes the connection. A graceful end first finishes the response
// (the last chunk), so the client sees a clean end of stream and
// reconnects; a client that stopped reading gets no more writes, each of
// which could wait out the write deadline.
func (s *sseStream) end(graceful bool) {
	if graceful && s.chunked && s.head == nil && !s.failed {
		s.write(net.Buffers{[]byte("0\r\n\r\n")})
	}
	s.conn.Close()
}

// setStreamHeaders sets what describes an event stream.
func setStreamHeaders(h http.Header) {
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	// Tell nginx-style proxies not to buffer the stream.
	h.Set("X-Accel-Buffering", "no")
}

// responseHead is the status line and headers of a stream: the headers the
// middleware set (request id, CORS) and the stream's own.
func responseHead(h http.Header, chunked bool) []byte {
	setStreamHeaders(h)
	h.Set("Date", time.Now().UTC().Format(http.TimeFormat))
	// The connection ends with the stream: a client must not put it back
	// in its keep-alive pool.
	h.Set("Connection", "close")
	if chunked {
		h.Set("Transfer-Encoding", "chunked")
	}
	var b bytes.Buffer
	b.WriteString("HTTP/1.1 200 OK\r\n")
	h.Write(&b)
	b.WriteString("\r\n")
	return b.Bytes()
}

// handleEvents serves GET /events (SPEC §6).
func handleEvents(b *broker) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		q := r.URL.Query()
		token := q.Get("session_token")
		if token == "" {
			token = tokenFromRequest(r)
		}
		_, ok := resolveOrAnswer(w, r, b.resolver, token)
		if !ok {
			return
		}
		clientID, generated := q.Get("client_id"), false
		if clientID == "" {
			clientID, generated = newUUID(), true
		} else if !validClientID(clientID) {
			writeError(w, r, http.StatusBadRequest, "invalid client_id", nil)
			return
		}
		after, hasLast := uint64(0), false
		if v := cmp.Or(r.Header.Get("Last-Event-ID"), q.Get("last_event_id")); v != "" {
			var err error
			if after, err = strconv.ParseUint(v, 10, 64); err != nil {
				writeError(w, r, http.StatusBadRequest, "invalid Last-Event-ID", nil)
				return
			}
			hasLast = true
		}
		if r.Method == http.MethodHead {
			// The mux routes HEAD here with GET. Answer what a GET would
			// start with, without opening (and registering) a stream.
			setStreamHeaders(w.Header())
			w.WriteHeader(http.StatusOK)
			return
		}
		if !canHijack(w) {
			writeError(w, r, http.StatusInternalServerError, "streaming unsupported", errors.New("SSE: the ResponseWriter chain cannot hijack (a wrapper without Unwrap, or HTTP/2?)"))
			return
		}
		if err := claimClient(ctx, b.requests, clientID, token); errors.Is(err, errClientTaken) {
			writeError(w, r, http.StatusForbidden, "client_id belongs to another session", err)
			return
		} else if err != nil {
			writeError(w, r, http.StatusServiceUnavailable, "event store unavailable", err)
			return
		}
		if !hasLast && !generated {
			// A plain reconnect of a known client: send what it has not been
			// sent yet (the delivery cursor), or everything kept.
			var err error
			if after, err = readCursor(ctx, b.requests, clientID); err != nil {
				writeError(w, r, http.StatusServiceUnavailable, "event store unavailable", err)
				return
			}
		}
		select {
		case <-b.events.ready():
		case <-time.After(readyWait):
			writeError(w, r, http.StatusServiceUnavailable, "event stream unavailable", errors.New("SSE: live delivery is not running (NATS down?)"))
			return
		case <-ctx.Done():
			return
		}
		c, replaced, err := b.register(clientID, token)
		switch {
		case errors.Is(err, errTooManyClients):
			writeError(w, r, http.StatusServiceUnavailable, "too many connections", err)
			return
		case errors.Is(err, errTooManyClientsSession):
			writeError(w, r, http.StatusTooManyRequests, "too many connections for this session", err)
			return
		}
		if replaced != nil && !hasLast {
			// The stream this one replaces may still be saving its cursor:
			// let it finish (it stops at once; a write stuck on a dead
			// client is cut by its deadline) and continue after what it
			// flushed.
			select {
			case <-replaced.ended:
			case <-time.After(replaceWait):
			}
			after = max(after, replaced.flushed.Load())
		}
		log := loggerFrom(r).With("client_id", clientID, "session", tokenID(token), "gen", c.gen)
		b.run(w, r, c, log, generated, after)
	})
}

// release ends a registered connection's life in the broker: its
// re-check and any confirm waiting on it stop, it leaves the indexes, and
// a connection replacing it may go on.
func (b *broker) release(c *conn) {
	c.close(closeGone)
	b.unregister(c)
	close(c.ended)
}

// run takes the connection over from net/http and runs the registered
// stream c on it. A goroutine reads the connection only to learn that the
// client left; run itself sends the opening and the replay (deep,
// short-lived work, on the handler's stack) and returns, leaving one small
// goroutine for the live part. The access log records the opening.
func (b *broker) run(w http.ResponseWriter, r *http.Request, c *conn, log *slog.Logger, generated bool, after uint64) {
	nc, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		b.release(c)
		writeError(w, r, http.StatusInternalServerError, "streaming unsupported", err)
		return
	}
	chunked := r.ProtoAtLeast(1, 1)
	s := &sseStream{conn: nc, head: responseHead(w.Header(), chunked), chunked: chunked}
	ctx, cancel := context.WithCancel(b.ctx)
	opened := time.Now()
	end := func() {
		cancel()
		// A stream that ends without a reason of the broker's: the client
		// left, a write failed, or the gateway is shutting down.
		c.close(closeGone)
		s.end(c.reason != closeOverflow)
		b.release(c)
		log.Debug("SSE stream ended", "duration", time.Since(opened))
	}
	b.streams.add(1)
	go func() {
		defer b.streams.add(-1)
		defer cancel()
		// A client sends nothing after its GET: any byte, EOF or error
		// ends the stream.
		var one [1]byte
		s.conn.Read(one[:])
		c.close(closeGone)
	}()
	st := &streamState{b: b, s: s, c: c, log: log, cursor: after, sent: after}
	if !st.open(ctx, generated) {
		end()
		return
	}
	b.streams.add(1)
	go func() {
		defer b.streams.add(-1)
		defer end()
		st.live(ctx)
	}()
}

// streamState is one registered stream. It tracks what the stream has
// sent: events at or below sent are duplicates (replayed, then also queued
// live) and are skipped.
type streamState struct {
	b      *broker
	s      *sseStream
	c      *conn
	log    *slog.Logger
	sent   uint64   // highest event id written
	cursor uint64   // highest id recorded in the delivery cursor
	done   []string // results written since the last commit
	n      int
}

// open sends the stream's opening (retry, init message, ping) and replays
// what was kept for the client after the cursor. Live events have been
// queuing since register; the ones replayed are skipped later. It reports
// whether the stream goes on.
func (st *streamState) open(ctx context.Context, generated bool) bool {
	b, c, s, log := st.b, st.c, st.s, st.log
	log.Debug("SSE stream open", "after", st.sent)
	fmt.Fprintf(&s.buf, "retry: %d\n\n", sseRetryMillis)
	init := initResult{
		ProtocolVersion: "2024-11-05",
		ServerInfo:      serverInfo{Name: "noetl-gateway", Version: version},
		ClientID:        c.clientID,
		Capabilities:    capabilities{Playbooks: true, Callbacks: true},
		PendingRequests: b.pending.list(ctx, c.clientID),
	}
	s.frame(0, "message", struct {
		JSONRPC string     `json:"jsonrpc"`
		ID      int        `json:"id"`
		Result  initResult `json:"result"`
	}{"2.0", 1, init})
	s.frame(0, "ping", pingFrame)
	if err := s.flush(); err != nil {
		log.Debug("SSE write failed", "err", err)
		return false
	}
	if generated {
		return true
	}
	err := b.events.replay(ctx, c.clientID, st.sent, func(ev event) error {
		if c.closed() {
			return errConnClosed
		}
		c.took(ev.ID)
		return st.send(ctx, ev, "replayed")
	})
	if err == nil {
		err = st.commit(ctx)
	}
	switch {
	case errors.Is(err, errConnClosed):
		st.finish()
		return false
	case err != nil:
		// Ending the stream makes the browser come back with its
		// Last-Event-ID: better than a gap.
		log.Warn("SSE replay failed; ending stream", "err", err)
		return false
	}
	return true
}

// finish ends a stream the broker closed.
func (st *streamState) finish() {
	switch st.c.reason {
	case closeRevoked:
		st.s.frame(0, "error", sessionErrorFrame)
		st.s.flush()
		st.log.Info("SSE stream closed: session no longer valid")
	case closeReplaced:
		st.log.Debug("SSE stream replaced by a newer connection")
	case closeOverflow:
		st.log.Info("SSE stream closed: client could not keep up")
	}
}

// live delivers queued events and heartbeats until the client goes, the
// broker closes the stream, or the gateway shuts down.
func (st *streamState) live(ctx context.Context) {
	b, c, s, log := st.b, st.c, st.s, st.log
	stopRecheck := b.recheck(c, log)
	defer stopRecheck()
	heartbeat := time.NewTicker(b.cfg.Heartbeat)
	defer heartbeat.Stop()
	for {
		// A closed connection stops at once, even with events queued: they
		// are in the log for the reconnect.
		if c.closed() {
			st.finish()
			return
		}
		select {
		case <-ctx.Done():
			if b.ctx.Err() != nil {
				log.Debug("SSE stream ended by shutdown")
			}
			return
		case <-c.done:
			st.finish()
			return
		case <-heartbeat.C:
			s.frame(0, "ping", pingFrame)
			if err := s.flush(); err != nil {
				log.Debug("SSE write failed", "err", err)
				return
			}
		case ev := <-c.queue:
			err := st.send(ctx, *ev, "delivered")
			for more := true; more && err == nil; {
				select {
				case ev := <-c.queue:
					err = st.send(ctx, *ev, "delivered")
				default:
					more = false
				}
			}
			if err == nil {
				err = st.commit(ctx)
			}
			if err != nil {
				log.Debug("SSE write failed", "err", err)
				return
			}
		}
	}
}

func (st *streamState) send(ctx context.Context, ev event, outcome string) error {
	if ev.ID <= st.sent {
		return nil
	}
	if err := st.s.frame(ev.ID, ev.Method, ev.Data); err != nil {
		// Kept events are JSON the gateway wrote; this cannot happen short of
		// a corrupted stream. Skip it rather than end the stream in a loop.
		st.log.Error("SSE event not encodable; skipped", "id", ev.ID, "err", err)
		return nil
	}
	st.sent = ev.ID
	st.b.metrics.sseEvents.with(outcome).Inc()
	if ev.Method == "playbook/result" && ev.RequestID != "" {
		st.done = append(st.done, ev.RequestID)
	}
	if st.n++; st.n%64 == 0 {
		return st.commit(ctx)
	}
	return nil
}

// commit flushes what was written and then records it: the delivery cursor
// moves and delivered results' request records are retired.
func (st *streamState) commit(ctx context.Context) error {
	if err := st.s.flush(); err != nil {
		return err
	}
	st.c.flushed.Store(st.sent)
	if st.sent > st.cursor {
		if err := writeCursor(ctx, st.b.requests, st.c.clientID, st.sent); err != nil {
			st.log.Warn("SSE delivery cursor not saved", "err", err)
		} else {
			st.cursor = st.sent
		}
	}
	for _, rid := range st.done {
		st.b.requests.Delete(ctx, rid)
	}
	st.done = st.done[:0]
	return nil
}

// recheck re-resolves the stream's session every SSE_SESSION_RECHECK_SECS
// and closes the stream when it is no longer valid. An unavailable NoETL
// does not end streams. A timer, not a goroutine: an idle connection then
// costs one goroutine (its handler), not two. The returned func stops it.
func (b *broker) recheck(c *conn, log *slog.Logger) (stop func()) {
	var mu sync.Mutex
	stopped := false
	var t *time.Timer
	// Held while t is assigned, so the first run sees it.
	mu.Lock()
	defer mu.Unlock()
	t = time.AfterFunc(b.cfg.SSESessionRecheck, func() {
		if c.closed() || b.ctx.Err() != nil {
			return
		}
		ctx, cancel := context.WithTimeout(b.ctx, b.cfg.NoETLTimeout)
		_, err := b.resolver.Resolve(ctx, c.token)
		cancel()
		if errors.Is(err, errInvalidSession) {
			c.close(closeRevoked)
			return
		}
		if err != nil {
			log.Debug("SSE session re-check failed; keeping the stream", "err", err)
		}
		mu.Lock()
		if !stopped {
			t.Reset(b.cfg.SSESessionRecheck)
		}
		mu.Unlock()
	})
	return func() {
		mu.Lock()
		stopped = true
		t.Stop()
		mu.Unlock()
	}
}
