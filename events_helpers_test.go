package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// sseEvent is one frame as a client parses it.
type sseEvent struct {
	ID, Event, Data, Retry string
}

// json decodes the frame's data.
func (e sseEvent) json(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(e.Data), &m); err != nil {
		t.Fatalf("frame data is not JSON: %q", e.Data)
	}
	return m
}

// sseClient is a real streaming HTTP client of /events with a line reader
// that parses frames as EventSource does.
type sseClient struct {
	Resp   *http.Response
	events chan sseEvent
	ended  chan error // receives once: io.EOF or the read error
	cancel context.CancelFunc
}

// openSSE connects and requires a 200 event stream.
func openSSE(t testing.TB, url string, headers map[string]string) *sseClient {
	t.Helper()
	c, status, body := tryOpenSSE(t, url, headers)
	if status != http.StatusOK {
		t.Fatalf("GET %s: status %d: %s", url, status, body)
	}
	return c
}

// tryOpenSSE connects and returns the client on 200, or the status and body.
func tryOpenSSE(t testing.TB, url string, headers map[string]string) (*sseClient, int, string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("GET %s: %v", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer cancel()
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return nil, resp.StatusCode, string(b)
	}
	c := &sseClient{Resp: resp, events: make(chan sseEvent, 1024), ended: make(chan error, 1), cancel: cancel}
	t.Cleanup(c.Close)
	go c.read()
	return c, resp.StatusCode, ""
}

func (c *sseClient) read() {
	sc := bufio.NewScanner(c.Resp.Body)
	sc.Buffer(make([]byte, 64<<10), 8<<20)
	var ev sseEvent
	var data []string
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			if data != nil || ev.Retry != "" || ev.Event != "" {
				ev.Data = strings.Join(data, "\n")
				c.events <- ev
			}
			ev, data = sseEvent{}, nil
			continue
		}
		if strings.HasPrefix(line, ":") {
			continue
		}
		name, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch name {
		case "id":
			ev.ID = value
		case "event":
			ev.Event = value
		case "data":
			data = append(data, value)
		case "retry":
			ev.Retry = value
		default:
			c.ended <- errors.New("unknown SSE field " + name)
			return
		}
	}
	err := sc.Err()
	if err == nil {
		err = io.EOF
	}
	c.ended <- err
}

// Close disconnects the client.
func (c *sseClient) Close() {
	c.cancel()
	c.Resp.Body.Close()
}

// next returns the next frame, pings included.
func (c *sseClient) next(t testing.TB, timeout time.Duration) sseEvent {
	t.Helper()
	select {
	case ev := <-c.events:
		return ev
	case err := <-c.ended:
		c.ended <- err
		// The reader queues every frame before it reports the end.
		select {
		case ev := <-c.events:
			return ev
		default:
		}
		t.Fatalf("stream ended while waiting for a frame: %v", err)
	case <-time.After(timeout):
		t.Fatalf("no frame within %v", timeout)
	}
	return sseEvent{}
}

// nextEvent returns the next frame that is not a ping.
func (c *sseClient) nextEvent(t testing.TB, timeout time.Duration) sseEvent {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ev := c.next(t, time.Until(deadline))
		if ev.Event != "ping" {
			return ev
		}
	}
}

// skipInit reads the retry line, init message and first ping, and returns
// the init message's result.
func (c *sseClient) skipInit(t testing.TB) map[string]any {
	t.Helper()
	if ev := c.next(t, 10*time.Second); ev.Retry != "3000" {
		t.Fatalf("first frame %+v, want retry: 3000", ev)
	}
	ev := c.next(t, 10*time.Second)
	if ev.Event != "message" || ev.ID != "" {
		t.Fatalf("second frame %+v, want the init message", ev)
	}
	m := ev.json(t)
	if ping := c.next(t, 10*time.Second); ping.Event != "ping" {
		t.Fatalf("third frame %+v, want the first ping", ping)
	}
	return m["result"].(map[string]any)
}

// waitEnd waits until the server ends the stream.
func (c *sseClient) waitEnd(t testing.TB, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case <-c.events:
		case err := <-c.ended:
			c.ended <- err
			if !errors.Is(err, io.EOF) {
				t.Logf("stream ended with %v", err)
			}
			return
		case <-deadline:
			t.Fatalf("stream still open after %v", timeout)
		}
	}
}

// quiet fails when any non-ping frame arrives within d.
func (c *sseClient) quiet(t testing.TB, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case ev := <-c.events:
			if ev.Event != "ping" {
				t.Fatalf("unexpected frame %+v", ev)
			}
		case <-deadline:
			return
		}
	}
}

// natsGateway starts a NATS-mode gateway on ns with the fake NoETL.
func natsGateway(t testing.TB, ns *natsServer, noetl *fakeNoETL, extra map[string]string) *gateway {
	t.Helper()
	env := map[string]string{"NATS_URL": ns.URL(), "NOETL_BASE_URL": noetl.URL, "LOG_LEVEL": "debug"}
	for k, v := range extra {
		env[k] = v
	}
	return startGateway(t, env)
}

// sseUser is the identity of test sessions.
var sseUser = User{UserID: 7, Email: "ada@example.com", DisplayName: "Ada", Roles: []string{"user"}}

// requestsKV opens the requests bucket as a worker-side client would, to
// write request records the way executePlaybook does.
func requestsKV(t testing.TB, ns *natsServer) jetstream.KeyValue {
	t.Helper()
	nc, err := nats.Connect(ns.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "requests", TTL: 30 * time.Minute, History: 1, MaxValueSize: 64 << 10})
	if errors.Is(err, jetstream.ErrBucketExists) {
		kv, err = js.KeyValue(ctx, "requests")
	}
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

func recordJSON(clientID, token, execID string) []byte {
	b, _ := json.Marshal(requestRecord{ClientID: clientID, SessionToken: token, ExecutionID: execID, PlaybookPath: "tests/echo", CreatedAt: time.Now().Unix()})
	return b
}

// waitPendingIndexed returns once the gateway's pending index holds every
// request record written so far: it writes one more, for a client of its
// own, and connects as that client until the init message lists it (the
// index follows the bucket in order). The index is eventually consistent;
// tests that expect a record just written in an init message wait here.
func waitPendingIndexed(t testing.TB, g *gateway, kv jetstream.KeyValue, token string) {
	t.Helper()
	client := "sentinel-" + newID()[:8]
	putRequest(t, kv, "req-"+client, client, token, "e-"+client)
	waitFor(t, 10*time.Second, "the pending index to catch up", func() bool {
		c := openSSE(t, g.URL+"/events?session_token="+token+"&client_id="+client, nil)
		defer c.Close()
		pending, _ := c.skipInit(t)["pendingRequests"].([]any)
		return len(pending) == 1
	})
}

func putRequest(t testing.TB, kv jetstream.KeyValue, rid, clientID, token, execID string) {
	t.Helper()
	if _, err := kv.Put(context.Background(), rid, recordJSON(clientID, token, execID)); err != nil {
		t.Fatal(err)
	}
}

// callback posts a worker callback and returns status and body.
func callback(t testing.TB, base, route string, body any) (int, map[string]any) {
	t.Helper()
	status, _, m := doJSON(t, "POST", base+route, body, nil)
	return status, m
}

// inProcess is the in-process gateway built from its real pieces (config,
// stores, resolver, broker, routes, middleware) behind an httptest server,
// so a test can reach the broker and the memory stores.
type inProcess struct {
	*httptest.Server
	app   *app
	Logs  *syncBuffer
	stop  context.CancelFunc
	conns *connTracker
}

// cutConnections closes every client connection, SSE streams included, as
// a network failure would. (httptest's CloseClientConnections forgets the
// hijacked connections that streams run on.)
func (p *inProcess) cutConnections() { p.conns.cut() }

// connTracker is a listener that remembers the connections it accepted
// until they are closed.
type connTracker struct {
	net.Listener
	mu    sync.Mutex
	conns map[*trackedConn]struct{}
}

type trackedConn struct {
	net.Conn
	l *connTracker
}

func (c *trackedConn) Close() error {
	c.l.mu.Lock()
	delete(c.l.conns, c)
	c.l.mu.Unlock()
	return c.Conn.Close()
}

func (l *connTracker) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: c, l: l}
	l.mu.Lock()
	l.conns[tc] = struct{}{}
	l.mu.Unlock()
	return tc, nil
}

func (l *connTracker) cut() {
	l.mu.Lock()
	conns := l.conns
	l.conns = map[*trackedConn]struct{}{}
	l.mu.Unlock()
	for c := range conns {
		c.Conn.Close()
	}
}

// extra adds test routes to the mux; wrap, when set, wraps the whole
// server handler.
func startInProcess(t testing.TB, env map[string]string, extra func(mux *http.ServeMux), wrap func(http.Handler) http.Handler) *inProcess {
	t.Helper()
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	log := newLogger(cfg, logs)
	streams, stop := context.WithCancel(context.Background())
	a, err := newApp(streams, streams, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	routes(mux, mux, a)
	if extra != nil {
		extra(mux)
	}
	real := newServer(cfg, log, a.metrics, mux)
	if wrap != nil {
		real.Handler = wrap(real.Handler)
	}
	srv := httptest.NewUnstartedServer(real.Handler)
	// The gateway's own server settings (timeouts), on the test listener.
	srv.Config = real
	conns := &connTracker{Listener: srv.Listener, conns: map[*trackedConn]struct{}{}}
	srv.Listener = conns
	srv.Start()
	p := &inProcess{Server: srv, app: a, Logs: logs, stop: stop, conns: conns}
	t.Cleanup(func() {
		stop()
		srv.CloseClientConnections()
		srv.Close()
	})
	return p
}

// putMemRequest writes a request record into the in-process store.
func (p *inProcess) putRequest(t testing.TB, rid, clientID, token, execID string) {
	t.Helper()
	if err := p.app.requests.Put(context.Background(), rid, recordJSON(clientID, token, execID)); err != nil {
		t.Fatal(err)
	}
}
