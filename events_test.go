package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestEventsInitAndHeartbeat(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-init", sseUser, time.Now().Add(time.Hour))
	g := natsGateway(t, ns, noetl, map[string]string{"GATEWAY_HEARTBEAT_INTERVAL_SECS": "1"})
	kv := requestsKV(t, ns)
	putRequest(t, kv, "req-pending-1", "client-init", "tok-init", "exec-1")
	waitPendingIndexed(t, g, kv, "tok-init")

	c := openSSE(t, g.URL+"/events?session_token=tok-init&client_id=client-init", nil)
	h := c.Resp.Header
	if h.Get("Content-Type") != "text/event-stream" || h.Get("Cache-Control") != "no-cache" || h.Get("X-Accel-Buffering") != "no" {
		t.Fatalf("headers %v", h)
	}
	if ev := c.next(t, 10*time.Second); ev.Retry != "3000" || ev.Data != "" {
		t.Fatalf("first frame %+v", ev)
	}
	ev := c.next(t, 10*time.Second)
	if ev.Event != "message" {
		t.Fatalf("init frame %+v", ev)
	}
	want := `{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2024-11-05","serverInfo":{"name":"noetl-gateway","version":"` + version +
		`"},"clientId":"client-init","capabilities":{"playbooks":true,"callbacks":true},"pendingRequests":[{"requestId":"req-pending-1","executionId":"exec-1","playbookPath":"tests/echo"}]}}`
	if ev.Data != want {
		t.Fatalf("init\n got %s\nwant %s", ev.Data, want)
	}
	start := time.Now()
	if ev := c.next(t, 10*time.Second); ev.Event != "ping" || ev.Data != `{"jsonrpc":"2.0","method":"ping","params":{}}` || ev.ID != "" {
		t.Fatalf("first ping %+v", ev)
	}
	if ev := c.next(t, 10*time.Second); ev.Event != "ping" {
		t.Fatalf("second ping %+v", ev)
	}
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Fatalf("second ping after %v, want about the 1s interval", d)
	}

	// Without client_id the gateway makes one (a UUIDv4) and has nothing
	// pending for it.
	c2 := openSSE(t, g.URL+"/events", map[string]string{"Authorization": "Bearer tok-init"})
	res := c2.skipInit(t)
	id, _ := res["clientId"].(string)
	if len(id) != 36 || id[14] != '4' || res["pendingRequests"] != nil {
		t.Fatalf("generated init %v", res)
	}
}

func TestEventsRejects(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-a", sseUser, time.Now().Add(time.Hour))
	noetl.addSession("tok-b", sseUser, time.Now().Add(time.Hour))
	g := natsGateway(t, ns, noetl, nil)

	for _, tc := range []struct {
		name, query string
		headers     map[string]string
		status      int
		msg         string
	}{
		{"no token", "", nil, 401, "Missing authentication token"},
		{"unknown session", "?session_token=tok-unknown", nil, 401, "Invalid or expired session"},
		{"malformed token", "?session_token=" + url.QueryEscape("a b<"), nil, 401, "Invalid or expired session"},
		{"bad client_id", "?session_token=tok-a&client_id=a.b", nil, 400, "invalid client_id"},
		{"bad Last-Event-ID", "?session_token=tok-a&client_id=c1", map[string]string{"Last-Event-ID": "abc"}, 400, "invalid Last-Event-ID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, h, m := doJSON(t, "GET", g.URL+"/events"+tc.query, nil, tc.headers)
			if status != tc.status || m["error"] != tc.msg || !strings.HasPrefix(h.Get("Content-Type"), "application/json") {
				t.Fatalf("got %d %v %v", status, h.Get("Content-Type"), m)
			}
		})
	}

	t.Run("client_id of another session", func(t *testing.T) {
		c := openSSE(t, g.URL+"/events?session_token=tok-a&client_id=owned-by-a", nil)
		c.skipInit(t)
		status, _, m := doJSON(t, "GET", g.URL+"/events?session_token=tok-b&client_id=owned-by-a", nil, nil)
		if status != 403 || m["error"] != "client_id belongs to another session" {
			t.Fatalf("got %d %v", status, m)
		}
		c.Close()
		// Still A's after A left.
		status, _, _ = doJSON(t, "GET", g.URL+"/events?session_token=tok-b&client_id=owned-by-a", nil, nil)
		if status != 403 {
			t.Fatalf("after disconnect: %d", status)
		}
	})

	t.Run("NoETL unavailable", func(t *testing.T) {
		dead := startGateway(t, map[string]string{"NOETL_BASE_URL": "http://127.0.0.1:1"})
		status, _, m := doJSON(t, "GET", dead.URL+"/events?session_token=tok-a", nil, nil)
		if status != 502 || m["error"] != "session validation unavailable" {
			t.Fatalf("got %d %v", status, m)
		}
	})
}

func TestEventsReplayLastEventID(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-l", sseUser, time.Now().Add(time.Hour))
	g := natsGateway(t, ns, noetl, nil)
	kv := requestsKV(t, ns)
	putRequest(t, kv, "req-l", "client-l", "tok-l", "exec-l")
	stream := g.URL + "/events?session_token=tok-l&client_id=client-l"
	progress := func(n int) (int, map[string]any) {
		return callback(t, g.URL, "/api/internal/progress", map[string]any{"request_id": "req-l", "message": fmt.Sprint("m", n)})
	}
	msgOf := func(ev sseEvent) string {
		return ev.json(t)["params"].(map[string]any)["message"].(string)
	}

	c := openSSE(t, stream, nil)
	c.skipInit(t)
	if status, _ := progress(1); status != 200 {
		t.Fatalf("progress 1: %d", status)
	}
	first := c.nextEvent(t, 10*time.Second)
	c.Close()
	waitFor(t, 5*time.Second, "the stream to be gone", func() bool {
		return strings.Contains(scrape(t, g.URL), "gateway_sse_connections 0")
	})
	for n := 2; n <= 4; n++ {
		if status, m := progress(n); status != 202 {
			t.Fatalf("progress %d while away: %d %v", n, status, m)
		}
	}

	// Header form: exactly 2, 3, 4 in order, then live 5; nothing twice.
	c = openSSE(t, stream, map[string]string{"Last-Event-ID": first.ID})
	c.skipInit(t)
	var ids []uint64
	for n := 2; n <= 4; n++ {
		ev := c.nextEvent(t, 10*time.Second)
		if msgOf(ev) != fmt.Sprint("m", n) {
			t.Fatalf("replayed %s, want m%d", ev.Data, n)
		}
		id, _ := strconv.ParseUint(ev.ID, 10, 64)
		ids = append(ids, id)
	}
	if !(ids[0] < ids[1] && ids[1] < ids[2]) {
		t.Fatalf("ids not increasing: %v", ids)
	}
	if status, _ := progress(5); status != 200 {
		t.Fatalf("live progress: %d", status)
	}
	if ev := c.nextEvent(t, 10*time.Second); msgOf(ev) != "m5" {
		t.Fatalf("live after replay: %s", ev.Data)
	}
	c.quiet(t, 300*time.Millisecond)
	c.Close()

	// Query form, from the middle.
	c = openSSE(t, stream+"&last_event_id="+strconv.FormatUint(ids[1], 10), nil)
	c.skipInit(t)
	for _, want := range []string{"m4", "m5"} {
		if ev := c.nextEvent(t, 10*time.Second); msgOf(ev) != want {
			t.Fatalf("got %s, want %s", ev.Data, want)
		}
	}
	c.quiet(t, 300*time.Millisecond)
}

// Replay and live overlap: events published continuously while clients
// reconnect with Last-Event-ID arrive once each, in order.
func TestEventsReplayLiveNoGapNoDuplicate(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-o", sseUser, time.Now().Add(time.Hour))
	g := natsGateway(t, ns, noetl, nil)
	kv := requestsKV(t, ns)
	putRequest(t, kv, "req-o", "client-o", "tok-o", "exec-o")
	const total = 60
	done := make(chan struct{})
	go func() {
		defer close(done)
		for n := 1; n <= total; n++ {
			doJSON(t, "POST", g.URL+"/api/internal/progress", map[string]any{"request_id": "req-o", "progress": n}, nil)
		}
	}()
	got := 0.0
	last := ""
	for got < total {
		h := map[string]string{}
		if last != "" {
			h["Last-Event-ID"] = last
		}
		c := openSSE(t, g.URL+"/events?session_token=tok-o&client_id=client-o", h)
		c.skipInit(t)
		for i := 0; i < 7 && got < total; i++ {
			ev := c.nextEvent(t, 10*time.Second)
			p := ev.json(t)["params"].(map[string]any)["progress"].(float64)
			if p != got+1 {
				t.Fatalf("got progress %v after %v", p, got)
			}
			got, last = p, ev.ID
		}
		c.Close()
	}
	<-done
}

func TestEventsDeliveredOnPlainReconnect(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-p", sseUser, time.Now().Add(time.Hour))
	g := natsGateway(t, ns, noetl, nil)
	kv := requestsKV(t, ns)
	putRequest(t, kv, "req-p1", "client-p", "tok-p", "exec-p1")
	putRequest(t, kv, "req-p2", "client-p", "tok-p", "exec-p2")
	waitPendingIndexed(t, g, kv, "tok-p")
	stream := g.URL + "/events?session_token=tok-p&client_id=client-p"

	// The result arrives before the browser ever connected.
	status, m := callback(t, g.URL, "/api/internal/callback/async", map[string]any{"request_id": "req-p1", "data": "early"})
	if status != 202 || m["clientDisconnected"] != true {
		t.Fatalf("early result: %d %v", status, m)
	}
	c := openSSE(t, stream, nil)
	init := c.skipInit(t)
	if n := len(init["pendingRequests"].([]any)); n != 2 {
		t.Fatalf("pending %v", init["pendingRequests"])
	}
	ev := c.nextEvent(t, 10*time.Second)
	if ev.json(t)["params"].(map[string]any)["data"] != "early" {
		t.Fatalf("got %s", ev.Data)
	}
	c.quiet(t, 200*time.Millisecond)
	c.Close()

	// A plain reconnect (no Last-Event-ID) gets exactly what it was not
	// sent: nothing old again, the result that came meanwhile, and the
	// delivered request is no longer pending.
	waitFor(t, 5*time.Second, "the stream to be gone", func() bool {
		return strings.Contains(scrape(t, g.URL), "gateway_sse_connections 0")
	})
	if status, _ := callback(t, g.URL, "/api/internal/callback/async", map[string]any{"request_id": "req-p2", "data": "later"}); status != 202 {
		t.Fatalf("later result: %d", status)
	}
	c = openSSE(t, stream, nil)
	init = c.skipInit(t)
	pend := init["pendingRequests"].([]any)
	if len(pend) != 1 || pend[0].(map[string]any)["requestId"] != "req-p2" {
		t.Fatalf("pending after delivery %v", pend)
	}
	if ev := c.nextEvent(t, 10*time.Second); ev.json(t)["params"].(map[string]any)["data"] != "later" {
		t.Fatalf("got %s", ev.Data)
	}
	c.quiet(t, 200*time.Millisecond)
	c.Close()
	waitFor(t, 5*time.Second, "the stream to be gone", func() bool {
		return strings.Contains(scrape(t, g.URL), "gateway_sse_connections 0")
	})
	c = openSSE(t, stream, nil)
	if init := c.skipInit(t); init["pendingRequests"] != nil {
		t.Fatalf("still pending: %v", init["pendingRequests"])
	}
	c.quiet(t, 300*time.Millisecond)
}

func TestEventsSlowClientCut(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-s", sseUser, time.Now().Add(time.Hour))
	g := natsGateway(t, ns, noetl, map[string]string{"SSE_CLIENT_BUFFER": "4"})
	kv := requestsKV(t, ns)
	putRequest(t, kv, "req-slow", "client-slow", "tok-s", "e1")
	putRequest(t, kv, "req-fast", "client-fast", "tok-s", "e2")

	// The slow client sends its request and never reads a byte.
	u, _ := url.Parse(g.URL)
	raw, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	fmt.Fprintf(raw, "GET /events?session_token=tok-s&client_id=client-slow HTTP/1.1\r\nHost: %s\r\n\r\n", u.Host)
	waitFor(t, 5*time.Second, "the slow stream", func() bool {
		return strings.Contains(scrape(t, g.URL), "gateway_sse_connections 1")
	})
	fast := openSSE(t, g.URL+"/events?session_token=tok-s&client_id=client-fast", nil)
	fast.skipInit(t)

	big := strings.Repeat("x", 256<<10)
	cut := false
	for n := 1; n <= 200 && !cut; n++ {
		callback(t, g.URL, "/api/internal/progress", map[string]any{"request_id": "req-slow", "message": big})
		status, _ := callback(t, g.URL, "/api/internal/progress", map[string]any{"request_id": "req-fast", "progress": n})
		if status != 200 {
			t.Fatalf("fast client event %d: %d", n, status)
		}
		ev := fast.nextEvent(t, 10*time.Second)
		if p := ev.json(t)["params"].(map[string]any)["progress"].(float64); p != float64(n) {
			t.Fatalf("fast client got %v, want %d", p, n)
		}
		cut = strings.Contains(scrape(t, g.URL), `gateway_sse_events_total{outcome="overflow_disconnect"} 1`)
	}
	if !cut {
		t.Fatal("the slow client was never cut")
	}
	// Once cut, the slow client's events are queued for its reconnect while
	// the fast one still gets its own live.
	status, m := callback(t, g.URL, "/api/internal/progress", map[string]any{"request_id": "req-slow", "message": "after"})
	if status != 202 || m["status"] != "queued" {
		t.Fatalf("slow client after the cut: %d %v", status, m)
	}
	if status, _ := callback(t, g.URL, "/api/internal/progress", map[string]any{"request_id": "req-fast", "message": "still"}); status != 200 {
		t.Fatalf("fast client after the cut: %d", status)
	}
	if ev := fast.nextEvent(t, 10*time.Second); ev.json(t)["params"].(map[string]any)["message"] != "still" {
		t.Fatalf("fast client got %s", ev.Data)
	}
	// The server closed the slow client's connection: reading it through
	// reaches its end before the deadline. (Cut, not finished: the last
	// chunk is not written to a client that stopped reading, as that write
	// could wait out the write deadline.)
	raw.SetReadDeadline(time.Now().Add(20 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(raw), nil)
	if err != nil {
		t.Fatal(err)
	}
	var ne net.Error
	if _, err := io.Copy(io.Discard, resp.Body); errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("slow client's stream not ended: %v\n%s", err, g.Logs)
	}
}

func TestEventsReplaceSameClient(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-x", sseUser, time.Now().Add(time.Hour))
	g := natsGateway(t, ns, noetl, nil)
	kv := requestsKV(t, ns)
	putRequest(t, kv, "req-x", "client-x", "tok-x", "e")
	stream := g.URL + "/events?session_token=tok-x&client_id=client-x"

	old := openSSE(t, stream, nil)
	old.skipInit(t)
	for i := 0; i < 3; i++ {
		c := openSSE(t, stream, nil)
		c.skipInit(t)
		old.waitEnd(t, 10*time.Second)
		// The old stream's cleanup has run; the new one must still be
		// registered and receive.
		status, _ := callback(t, g.URL, "/api/internal/progress", map[string]any{"request_id": "req-x", "progress": i})
		if status != 200 {
			t.Fatalf("round %d: %d", i, status)
		}
		if ev := c.nextEvent(t, 10*time.Second); ev.json(t)["params"].(map[string]any)["progress"] != float64(i) {
			t.Fatalf("round %d: %s", i, ev.Data)
		}
		old = c
	}
	if m := scrape(t, g.URL); !strings.Contains(m, "gateway_sse_connections 1") {
		t.Fatalf("connections gauge wrong:\n%s", m)
	}
}

func TestEventsSessionRecheck(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-rc", sseUser, time.Now().Add(time.Hour))
	g := natsGateway(t, ns, noetl, map[string]string{"NATS_SESSION_CACHE_TTL_SECS": "1", "SSE_SESSION_RECHECK_SECS": "1"})
	c := openSSE(t, g.URL+"/events?session_token=tok-rc", nil)
	c.skipInit(t)
	// Still valid across several re-checks.
	c.quiet(t, 1500*time.Millisecond)
	noetl.removeSession("tok-rc")
	ev := c.nextEvent(t, 10*time.Second)
	if ev.Event != "error" || ev.Data != `{"jsonrpc":"2.0","error":{"code":-32002,"message":"Invalid or expired session"}}` {
		t.Fatalf("got %+v", ev)
	}
	c.waitEnd(t, 10*time.Second)
}

func TestEventsLogoutClosesStreams(t *testing.T) {
	t.Parallel()
	noetl := startNoETL(t)
	noetl.addSession("tok-out", sseUser, time.Now().Add(time.Hour))
	noetl.addSession("tok-stay", sseUser, time.Now().Add(time.Hour))
	p := startInProcess(t, map[string]string{"NOETL_BASE_URL": noetl.URL}, nil, nil)
	a1 := openSSE(t, p.URL+"/events?session_token=tok-out&client_id=tab-1", nil)
	a2 := openSSE(t, p.URL+"/events?session_token=tok-out&client_id=tab-2", nil)
	b := openSSE(t, p.URL+"/events?session_token=tok-stay&client_id=tab-3", nil)
	for _, c := range []*sseClient{a1, a2, b} {
		c.skipInit(t)
	}
	p.app.broker.closeSession("tok-out")
	for _, c := range []*sseClient{a1, a2} {
		if ev := c.nextEvent(t, 10*time.Second); ev.Event != "error" || ev.json(t)["error"].(map[string]any)["code"] != float64(-32002) {
			t.Fatalf("got %+v", ev)
		}
		c.waitEnd(t, 10*time.Second)
	}
	p.putRequest(t, "req-stay", "tab-3", "tok-stay", "e")
	if status, _ := callback(t, p.URL, "/api/internal/progress", map[string]any{"request_id": "req-stay"}); status != 200 {
		t.Fatalf("other session: %d", status)
	}
	b.nextEvent(t, 10*time.Second)
}

func TestEventsShutdownEndsStreams(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-sd", sseUser, time.Now().Add(time.Hour))
	g := natsGateway(t, ns, noetl, map[string]string{"SHUTDOWN_TIMEOUT_SECS": "10"})
	c := openSSE(t, g.URL+"/events?session_token=tok-sd", nil)
	c.skipInit(t)
	start := time.Now()
	if err := g.Stop(t); err != nil {
		t.Fatalf("run: %v", err)
	}
	c.waitEnd(t, 10*time.Second)
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("shutdown took %v: the stream held it up", d)
	}
}

func TestEventsTwoReplicas(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-2", sseUser, time.Now().Add(time.Hour))
	a := natsGateway(t, ns, noetl, nil)
	b := natsGateway(t, ns, noetl, nil)
	kv := requestsKV(t, ns)
	putRequest(t, kv, "req-2r", "client-2r", "tok-2", "e-2r")
	putRequest(t, kv, "req-2r-b", "client-2r", "tok-2", "e-2r-b")

	c := openSSE(t, a.URL+"/events?session_token=tok-2&client_id=client-2r", nil)
	c.skipInit(t)
	status, m := callback(t, b.URL, "/api/internal/progress", map[string]any{"request_id": "req-2r", "step": "on-b"})
	if status != 200 || m["status"] != "delivered" {
		t.Fatalf("progress via B: %d %v", status, m)
	}
	if ev := c.nextEvent(t, 10*time.Second); ev.json(t)["params"].(map[string]any)["step"] != "on-b" {
		t.Fatalf("got %s", ev.Data)
	}
	status, m = callback(t, b.URL, "/api/internal/callback/async", map[string]any{"request_id": "req-2r", "data": map[string]any{"ok": true}})
	if status != 200 || m["status"] != "delivered" {
		t.Fatalf("result via B: %d %v", status, m)
	}
	ev := c.nextEvent(t, 10*time.Second)
	if ev.Event != "playbook/result" {
		t.Fatalf("got %+v", ev)
	}
	// The browser moves to B with the same client_id: A's stream closes, and
	// a callback on A reaches it on B.
	c2 := openSSE(t, b.URL+"/events?session_token=tok-2&client_id=client-2r", map[string]string{"Last-Event-ID": ev.ID})
	c2.skipInit(t)
	c.waitEnd(t, 10*time.Second)
	status, _ = callback(t, a.URL, "/api/internal/callback/async", map[string]any{"request_id": "req-2r-b", "data": "via-a"})
	if status != 200 {
		t.Fatalf("result via A: %d", status)
	}
	if ev := c2.nextEvent(t, 10*time.Second); ev.json(t)["params"].(map[string]any)["data"] != "via-a" {
		t.Fatalf("got %s", ev.Data)
	}
	c2.quiet(t, 200*time.Millisecond)
}

func TestEventsLimits(t *testing.T) {
	t.Parallel()
	noetl := startNoETL(t)
	for _, tok := range []string{"tok-1", "tok-2", "tok-3"} {
		noetl.addSession(tok, sseUser, time.Now().Add(time.Hour))
	}
	g := startGateway(t, map[string]string{"NOETL_BASE_URL": noetl.URL, "SSE_MAX_CLIENTS": "2", "SSE_MAX_CLIENTS_PER_SESSION": "1"})
	c1 := openSSE(t, g.URL+"/events?session_token=tok-1&client_id=l1", nil)
	c1.skipInit(t)
	if _, status, body := tryOpenSSE(t, g.URL+"/events?session_token=tok-1&client_id=l2", nil); status != 429 || !strings.Contains(body, `"error"`) {
		t.Fatalf("second stream of a session: %d %s", status, body)
	}
	// Replacing its own client_id is not a new connection.
	c1b := openSSE(t, g.URL+"/events?session_token=tok-1&client_id=l1", nil)
	c1b.skipInit(t)
	c2 := openSSE(t, g.URL+"/events?session_token=tok-2&client_id=l3", nil)
	c2.skipInit(t)
	if _, status, body := tryOpenSSE(t, g.URL+"/events?session_token=tok-3&client_id=l4", nil); status != 503 || !strings.Contains(body, `"error"`) {
		t.Fatalf("beyond SSE_MAX_CLIENTS: %d %s", status, body)
	}
}

func TestEventsInProcessMode(t *testing.T) {
	t.Parallel()
	noetl := startNoETL(t)
	noetl.addSession("tok-m", sseUser, time.Now().Add(time.Hour))
	p := startInProcess(t, map[string]string{"NOETL_BASE_URL": noetl.URL}, nil, nil)
	p.putRequest(t, "req-m1", "client-m", "tok-m", "e1")
	p.putRequest(t, "req-m2", "client-m", "tok-m", "e2")
	stream := p.URL + "/events?session_token=tok-m&client_id=client-m"

	if status, _ := callback(t, p.URL, "/api/internal/progress", map[string]any{"request_id": "req-m1", "step": "early"}); status != 202 {
		t.Fatalf("early: %d", status)
	}
	c := openSSE(t, stream, nil)
	if init := c.skipInit(t); len(init["pendingRequests"].([]any)) != 2 {
		t.Fatalf("pending: %v", init)
	}
	first := c.nextEvent(t, 10*time.Second)
	if status, m := callback(t, p.URL, "/api/internal/callback/async", map[string]any{"request_id": "req-m1", "execution_id": 12}); status != 200 || m["status"] != "delivered" {
		t.Fatalf("result: %d %v", status, m)
	}
	if ev := c.nextEvent(t, 10*time.Second); ev.Event != "playbook/result" || ev.json(t)["params"].(map[string]any)["executionId"] != "12" {
		t.Fatalf("got %+v", ev)
	}
	c.Close()
	waitFor(t, 5*time.Second, "the stream to be gone", func() bool { return p.app.broker.lookup("client-m") == nil })
	callback(t, p.URL, "/api/internal/progress", map[string]any{"request_id": "req-m2", "step": "away"})
	c = openSSE(t, stream, map[string]string{"Last-Event-ID": first.ID})
	c.skipInit(t)
	if ev := c.nextEvent(t, 10*time.Second); ev.Event != "playbook/result" {
		t.Fatalf("replay 1: %+v", ev)
	}
	if ev := c.nextEvent(t, 10*time.Second); ev.json(t)["params"].(map[string]any)["step"] != "away" {
		t.Fatalf("replay 2: %+v", ev)
	}
	c.quiet(t, 200*time.Millisecond)
}

// A ResponseWriter chain that cannot hand over its connection is refused
// loudly, not served as a stream that never arrives.
func TestEventsNeedHijack(t *testing.T) {
	t.Parallel()
	noetl := startNoETL(t)
	noetl.addSession("tok-nf", sseUser, time.Now().Add(time.Hour))
	p := startInProcess(t, map[string]string{"NOETL_BASE_URL": noetl.URL}, nil, nil)
	rec := httptest.NewRecorder()
	req := httptest.NewRequest("GET", "/events?session_token=tok-nf", nil)
	handleEvents(p.app.broker).ServeHTTP(rec, req)
	if rec.Code != 500 || !strings.Contains(rec.Body.String(), "streaming unsupported") {
		t.Fatalf("got %d %s", rec.Code, rec.Body)
	}
}

// metricValue reads one series from a scrape (0 when absent).
func metricValue(scrape, series string) float64 {
	for _, line := range strings.Split(scrape, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

// scrape reads /metrics (loopback, no internal listener).
func scrape(t testing.TB, base string) string {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	bufio.NewReader(resp.Body).WriteTo(&b)
	return b.String()
}

// BenchmarkCallbackAcrossReplicas is one progress callback posted to
// replica B and read by a browser stream on replica A, through JetStream.
func BenchmarkCallbackAcrossReplicas(b *testing.B) {
	ns, noetl := startNATS(b), startNoETL(b)
	noetl.addSession("tok-bench", sseUser, time.Now().Add(time.Hour))
	env := map[string]string{"LOG_LEVEL": "info"}
	ga, gb := natsGateway(b, ns, noetl, env), natsGateway(b, ns, noetl, env)
	putRequest(b, requestsKV(b, ns), "req-bench", "client-bench", "tok-bench", "e")
	c := openSSE(b, ga.URL+"/events?session_token=tok-bench&client_id=client-bench", nil)
	c.skipInit(b)
	body := []byte(`{"request_id":"req-bench","step":"s","progress":0.5}`)
	for b.Loop() {
		resp, err := http.Post(gb.URL+"/api/internal/progress", "application/json", bytes.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("status %d", resp.StatusCode)
		}
		c.nextEvent(b, 10*time.Second)
	}
}

// After a NATS restart, open streams keep receiving: the live consumer and
// the control subscription come back by themselves.
func TestEventsSurviveNATSRestart(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-nr", sseUser, time.Now().Add(time.Hour))
	a := natsGateway(t, ns, noetl, nil)
	b := natsGateway(t, ns, noetl, nil)
	kv := requestsKV(t, ns)
	putRequest(t, kv, "req-nr", "client-nr", "tok-nr", "e")
	c := openSSE(t, a.URL+"/events?session_token=tok-nr&client_id=client-nr", nil)
	c.skipInit(t)
	if status, _ := callback(t, b.URL, "/api/internal/progress", map[string]any{"request_id": "req-nr", "step": "before"}); status != 200 {
		t.Fatalf("before: %d", status)
	}
	c.nextEvent(t, 10*time.Second)

	ns.stop()
	ns.start()
	for _, g := range []*gateway{a, b} {
		waitFor(t, 15*time.Second, "NATS back", func() bool {
			_, _, m := doJSON(t, "GET", g.URL+"/ready", nil, nil)
			checks, _ := m["checks"].(map[string]any)
			return checks["nats"] == "ok"
		})
	}
	var status int
	waitFor(t, 15*time.Second, "a delivered callback after the restart", func() bool {
		status, _ = callback(t, b.URL, "/api/internal/progress", map[string]any{"request_id": "req-nr", "step": "after"})
		return status == 200
	})
	// The delivered event arrives (and any kept by earlier 202s), nothing else.
	if ev := c.nextEvent(t, 15*time.Second); ev.json(t)["params"].(map[string]any)["step"] != "after" {
		t.Fatalf("got %s", ev.Data)
	}
	for {
		select {
		case ev := <-c.events:
			if ev.Event != "ping" && ev.json(t)["params"].(map[string]any)["step"] != "after" {
				t.Fatalf("got %s", ev.Data)
			}
		case <-time.After(300 * time.Millisecond):
			return
		}
	}
}

// TestEventsWire reads streams off raw TCP: the hijacked response is valid
// HTTP/1.1 (chunked, the middleware's request id and CORS headers, the
// connection not offered for reuse) and ends with a clean last chunk; an
// HTTP/1.0 client gets a body that ends at close; a client that sends
// anything after its GET is cut.
func TestEventsWire(t *testing.T) {
	t.Parallel()
	noetl := startNoETL(t)
	noetl.addSession("tok-wire", sseUser, time.Now().Add(time.Hour))
	p := startInProcess(t, map[string]string{"NOETL_BASE_URL": noetl.URL, "CORS_ALLOWED_ORIGINS": "https://ui.example.com"}, nil, nil)
	u, _ := url.Parse(p.URL)
	open := func(proto, clientID string) (net.Conn, *http.Response) {
		t.Helper()
		raw, err := net.Dial("tcp", u.Host)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { raw.Close() })
		raw.SetDeadline(time.Now().Add(20 * time.Second))
		fmt.Fprintf(raw, "GET /events?session_token=tok-wire&client_id=%s %s\r\nHost: %s\r\nOrigin: https://ui.example.com\r\nX-Request-Id: wire-%s\r\n\r\n", clientID, proto, u.Host, clientID)
		resp, err := http.ReadResponse(bufio.NewReader(raw), nil)
		if err != nil {
			t.Fatal(err)
		}
		h := resp.Header
		if resp.StatusCode != 200 || h.Get("Content-Type") != "text/event-stream" || h.Get("X-Request-Id") != "wire-"+clientID ||
			h.Get("Access-Control-Allow-Origin") != "https://ui.example.com" || !strings.Contains(h.Get("Vary"), "Origin") || !resp.Close {
			t.Fatalf("%s: %d %v", proto, resp.StatusCode, h)
		}
		return raw, resp
	}
	untilEnd := func(resp *http.Response) string {
		t.Helper()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("stream did not end cleanly: %v (read %q)", err, body)
		}
		return string(body)
	}

	raw, resp := open("HTTP/1.1", "wire-11")
	if len(resp.TransferEncoding) != 1 || resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("HTTP/1.1 transfer encoding %v", resp.TransferEncoding)
	}
	waitFor(t, 5*time.Second, "the stream", func() bool { return p.app.broker.lookup("wire-11") != nil })
	p.app.broker.closeSession("tok-wire")
	body := untilEnd(resp)
	if !strings.HasPrefix(body, "retry: 3000\n\n") || !strings.HasSuffix(body, "event: error\ndata: {\"jsonrpc\":\"2.0\",\"error\":{\"code\":-32002,\"message\":\"Invalid or expired session\"}}\n\n") {
		t.Fatalf("HTTP/1.1 body %q", body)
	}
	if n, err := raw.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after the last chunk: %d %v, want the connection closed", n, err)
	}

	// The session was revoked only in the broker; it still resolves.
	_, resp = open("HTTP/1.0", "wire-10")
	if resp.TransferEncoding != nil {
		t.Fatalf("HTTP/1.0 transfer encoding %v", resp.TransferEncoding)
	}
	waitFor(t, 5*time.Second, "the stream", func() bool { return p.app.broker.lookup("wire-10") != nil })
	p.app.broker.closeSession("tok-wire")
	if body := untilEnd(resp); !strings.HasPrefix(body, "retry: 3000\n\n") || !strings.Contains(body, "-32002") {
		t.Fatalf("HTTP/1.0 body %q", body)
	}

	// HEAD gets a GET's head and no stream.
	req, _ := http.NewRequest("HEAD", p.URL+"/events?session_token=tok-wire&client_id=wire-head", nil)
	hresp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	hresp.Body.Close()
	if hresp.StatusCode != 200 || hresp.Header.Get("Content-Type") != "text/event-stream" || p.app.broker.lookup("wire-head") != nil {
		t.Fatalf("HEAD: %d %v", hresp.StatusCode, hresp.Header)
	}

	raw, _ = open("HTTP/1.1", "wire-talk")
	waitFor(t, 5*time.Second, "the stream", func() bool { return p.app.broker.lookup("wire-talk") != nil })
	io.WriteString(raw, "GET / HTTP/1.1\r\n")
	waitFor(t, 5*time.Second, "a client that talks to be cut", func() bool { return p.app.broker.lookup("wire-talk") == nil })
}
