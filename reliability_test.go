package main

// Reliability under faults (issue 7): NATS absent, restarted and slow; NoETL
// down, slow, garbage and huge; the identity provider's JWKS broken; shutdown
// with work in flight; and a short soak. Every test drives the real gateway
// over real connections against in-process servers.
//
// Tests that count the process's goroutines or allocations do not call
// t.Parallel: sequential top-level tests run before every parallel one, so
// what they count is theirs.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// delayProxy is a TCP proxy that delivers every chunk delay after it was
// read, in both directions: a slow network in front of a server, without a
// bandwidth limit.
type delayProxy struct {
	ln     net.Listener
	target string
	delay  time.Duration
	wg     sync.WaitGroup

	mu     sync.Mutex
	conns  []net.Conn
	closed bool
}

func startDelayProxy(t testing.TB, target string, delay time.Duration) *delayProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &delayProxy{ln: ln, target: target, delay: delay}
	p.wg.Go(p.accept)
	t.Cleanup(p.close)
	return p
}

func (p *delayProxy) addr() string { return p.ln.Addr().String() }

func (p *delayProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			up.Close()
			return
		}
		p.conns = append(p.conns, c, up)
		p.mu.Unlock()
		p.wg.Go(func() { p.pipe(up, c) })
		p.wg.Go(func() { p.pipe(c, up) })
	}
}

// pipe copies src to dst; a writer goroutine holds each chunk until its
// delivery time, so latency is added without serialising the reads.
func (p *delayProxy) pipe(dst, src net.Conn) {
	type chunk struct {
		b  []byte
		at time.Time
	}
	q := make(chan chunk, 4096)
	p.wg.Go(func() {
		defer dst.Close()
		for ch := range q {
			// The injected latency itself, not a wait for a condition.
			time.Sleep(time.Until(ch.at))
			if _, err := dst.Write(ch.b); err != nil {
				src.Close()
				for range q {
				}
				return
			}
		}
	})
	defer close(q)
	for {
		buf := make([]byte, 32<<10)
		n, err := src.Read(buf)
		if n > 0 {
			q <- chunk{buf[:n], time.Now().Add(p.delay)}
		}
		if err != nil {
			return
		}
	}
}

func (p *delayProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// faultyNoETL is a NoETL server whose answers a test breaks on purpose:
// mode is "ok", "slow" (never answers until the caller gives up), "garbage"
// (200 with an HTML error page), "error" (500 with a stack trace), "shape"
// (valid JSON of the wrong shape) or "huge" (a 50 MiB body).
type faultyNoETL struct {
	*httptest.Server
	mode    atomic.Value
	release chan struct{}
}

const hugeBody = 50 << 20

func startFaultyNoETL(t testing.TB) *faultyNoETL {
	t.Helper()
	f := &faultyNoETL{release: make(chan struct{})}
	f.mode.Store("ok")
	stream := func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", fmt.Sprint(hugeBody))
		chunk := []byte(strings.Repeat("a", 64<<10))
		for n := 0; n < hugeBody && r.Context().Err() == nil; n += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}
	fault := func(w http.ResponseWriter, r *http.Request) bool {
		// net/http notices a caller that hung up only once the request
		// body is read.
		io.Copy(io.Discard, r.Body)
		switch f.mode.Load() {
		case "slow":
			select {
			case <-r.Context().Done():
			case <-f.release:
			}
		case "garbage":
			io.WriteString(w, "<html>upstream exploded: pq: relation sessions does not exist</html>")
		case "error":
			http.Error(w, "Traceback (most recent call last): psycopg.OperationalError secret-dsn", http.StatusInternalServerError)
		case "huge":
			stream(w, r)
		default:
			return false
		}
		return true
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /api/auth/session/validate", func(w http.ResponseWriter, r *http.Request) {
		if fault(w, r) {
			return
		}
		w.Header().Set("Content-Type", "application/json")
		if f.mode.Load() == "shape" {
			io.WriteString(w, `{"status":"ok","valid":true,"user":{"user_id":"not-a-number"},"expires_at":"2099-01-01 00:00:00+00"}`)
			return
		}
		io.WriteString(w, `{"status":"ok","valid":true,"error":null,"user":{"user_id":7,"email":"ada@example.com","display_name":"Ada","roles":["user"]},"expires_at":"2099-01-01 00:00:00+00"}`)
	})
	mux.HandleFunc("GET /api/ping", func(w http.ResponseWriter, r *http.Request) {
		if f.mode.Load() != "shape" && fault(w, r) {
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"pong":true}`)
	})
	f.Server = httptest.NewServer(mux)
	t.Cleanup(func() {
		close(f.release)
		f.Close()
	})
	return f
}

// goroutinesAt waits until no more than limit goroutines run, and fails
// with their stacks when they do not end within timeout.
func goroutinesAt(t testing.TB, limit int, timeout time.Duration, what string, closeIdle ...func()) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	// Keep-alive connections are a pool, not a leak, and one may go idle
	// just after a close (a dial that lost the race to an idle connection
	// lands in the pool later): close them every round, the tests' client's
	// and whatever the caller names (servers' client connections).
	idle := func() {
		http.DefaultClient.CloseIdleConnections()
		for _, f := range closeIdle {
			f()
		}
	}
	for idle(); runtime.NumGoroutine() > limit; idle() {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%s: %d goroutines, want at most %d:\n%s", what, runtime.NumGoroutine(), limit, buf)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// quietGoroutines is the goroutine count once idle keep-alive connections
// are gone and the count has stopped falling.
func quietGoroutines() int {
	http.DefaultClient.CloseIdleConnections()
	n := runtime.NumGoroutine()
	for range 50 {
		time.Sleep(10 * time.Millisecond)
		m := runtime.NumGoroutine()
		if m >= n {
			return min(n, m)
		}
		n = m
	}
	return n
}

// natsState is what /ready says about NATS.
func natsState(t testing.TB, base string) string {
	_, _, body := doJSON(t, "GET", base+"/ready", nil, nil)
	checks, _ := body["checks"].(map[string]any)
	s, _ := checks["nats"].(string)
	return s
}

// getWithToken sends a GET with a session token through client c and
// returns status and body.
func getWithToken(c *http.Client, url, token string) (int, string, error) {
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("X-Session-Token", token)
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// TestReliabilityNATSAbsentAtStart: with no NATS server at all the gateway
// starts, says nats: down, and resolves sessions through NoETL.
func TestReliabilityNATSAbsentAtStart(t *testing.T) {
	t.Parallel()
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	f := startNoETL(t)
	f.Handle("GET /api/ping", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, `{"pong":true}`) })
	f.addSession("tok-only-noetl", sseUser, time.Now().Add(time.Hour))
	g := startGateway(t, map[string]string{"NATS_URL": "nats://" + dead, "NOETL_BASE_URL": f.URL})
	if s := natsState(t, g.URL); s != "down" {
		t.Fatalf("/ready nats = %q, want down", s)
	}
	start := time.Now()
	st, body, err := getWithToken(http.DefaultClient, g.URL+"/noetl/ping", "tok-only-noetl")
	if err != nil || st != 200 || body != `{"pong":true}` {
		t.Fatalf("proxied call without NATS: %d %q %v", st, body, err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("the call waited %v for NATS", d)
	}
	if f.Calls("POST /api/auth/session/validate") != 1 {
		t.Fatal("the session was not resolved through NoETL")
	}
	if st, _, _ := getWithToken(http.DefaultClient, g.URL+"/noetl/ping", "tok-unknown-anywhere"); st != 401 {
		t.Fatalf("unknown token: %d", st)
	}
}

// TestReliabilityNATSRestartMidTraffic: proxied traffic on two replicas
// keeps succeeding while the NATS server stops and starts again; afterwards
// the K/V watchers are back (a logout on A is refused on B, a record changed
// in K/V reaches both near caches), SSE fan-out across replicas resumes, and
// what was stored before (K/V records, a queued event) is still there.
func TestReliabilityNATSRestartMidTraffic(t *testing.T) {
	t.Parallel()
	ns, f := startNATS(t), startNoETL(t)
	f.Handle("GET /api/ping", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, `{"pong":true}`) })
	for _, tok := range []string{"tok-traffic", "tok-logout", "tok-roles", "tok-sse"} {
		f.addSession(tok, sseUser, time.Now().Add(time.Hour))
	}
	// Near caches that outlive the test: only the watchers can change them.
	env := map[string]string{"SESSION_NEAR_CACHE_TTL_SECS": "300", "LOG_LEVEL": "info"}
	a, b := natsGateway(t, ns, f, env), natsGateway(t, ns, f, env)
	for _, g := range []*gateway{a, b} {
		waitFor(t, 10*time.Second, "NATS up", func() bool { return natsState(t, g.URL) == "ok" })
		for _, tok := range []string{"tok-traffic", "tok-logout", "tok-roles"} {
			if _, body := validate(t, g.URL, tok); body["valid"] != true {
				t.Fatalf("validate %s: %v", tok, body)
			}
		}
	}
	_, sessKV := natsClient(t, ns)
	if _, err := sessKV.Get(context.Background(), "tok-traffic"); err != nil {
		t.Fatalf("session not in K/V before the restart: %v", err)
	}
	reqKV := requestsKV(t, ns)
	putRequest(t, reqKV, "req-live", "cl-live", "tok-sse", "e-live")
	putRequest(t, reqKV, "req-queued", "cl-queued", "tok-sse", "e-queued")
	live := openSSE(t, a.URL+"/events?session_token=tok-sse&client_id=cl-live", nil)
	live.skipInit(t)
	// An event for a browser that is away: kept in JetStream.
	if st, m := callback(t, b.URL, "/api/internal/progress", map[string]any{"request_id": "req-queued", "step": "stored-before"}); st != 202 {
		t.Fatalf("queued callback: %d %v", st, m)
	}

	// Traffic: cached sessions and fresh ones (a K/V miss each) on both
	// replicas, from two goroutines, until told to stop.
	var (
		done     = make(chan struct{})
		wg       sync.WaitGroup
		total    atomic.Int64
		mu       sync.Mutex
		failures []string
	)
	client := &http.Client{Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	for w := range 2 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				g := []*gateway{a, b}[i%2]
				tok := "tok-traffic"
				if i%4 == 3 {
					tok = fmt.Sprintf("tok-fresh-%d-%d", w, i)
					f.addSession(tok, sseUser, time.Now().Add(time.Hour))
				}
				st, body, err := getWithToken(client, g.URL+"/noetl/ping", tok)
				total.Add(1)
				if err != nil || st != 200 {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("%s with %s: %d %q %v", g.URL, tok, st, body, err))
					mu.Unlock()
				}
			}
		})
	}
	awaitTraffic := func(what string) {
		n := total.Load()
		waitFor(t, 10*time.Second, what, func() bool { return total.Load() >= n+20 })
	}
	awaitTraffic("traffic before the outage")
	ns.stop()
	for _, g := range []*gateway{a, b} {
		waitFor(t, 10*time.Second, "NATS down", func() bool { return natsState(t, g.URL) == "down" })
	}
	awaitTraffic("traffic during the outage")
	ns.start()
	for _, g := range []*gateway{a, b} {
		waitFor(t, 15*time.Second, "NATS back", func() bool { return natsState(t, g.URL) == "ok" })
	}
	awaitTraffic("traffic after the outage")
	close(done)
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d of %d proxied calls failed across the restart, first: %s", len(failures), total.Load(), failures[0])
	}
	t.Logf("%d proxied calls across the restart, none failed", total.Load())

	t.Run("logout on A refused on B", func(t *testing.T) {
		if st, _, _ := doJSON(t, "POST", a.URL+"/api/auth/logout", nil, map[string]string{"X-Session-Token": "tok-logout"}); st != 200 {
			t.Fatalf("logout: %d", st)
		}
		// NoETL still calls the session valid and B's near cache holds it
		// for 300 s: only B's revocation watcher can refuse it now.
		waitFor(t, 5*time.Second, "revocation on B", func() bool { _, body := validate(t, b.URL, "tok-logout"); return body["valid"] == false })
	})
	t.Run("near caches follow K/V", func(t *testing.T) {
		rec := `{"session_token":"tok-roles","user_id":7,"email":"ada@example.com","display_name":"Ada","expires_at":"2099-01-01T00:00:00Z","is_active":true,"roles":["auditor"]}`
		if _, err := sessKV.Put(context.Background(), "tok-roles", []byte(rec)); err != nil {
			t.Fatal(err)
		}
		for _, g := range []*gateway{a, b} {
			waitFor(t, 5*time.Second, "new roles on "+g.URL, func() bool {
				_, body := validate(t, g.URL, "tok-roles")
				u, _ := body["user"].(map[string]any)
				roles, _ := u["roles"].([]any)
				return len(roles) == 1 && roles[0] == "auditor"
			})
		}
	})
	t.Run("SSE fan-out resumes", func(t *testing.T) {
		// A callback posted before the stream's consumer is back may be
		// queued (202, kept and replayed); the first 200 proves live
		// delivery across replicas again.
		n := 0
		waitFor(t, 15*time.Second, "a delivered callback on B for a stream on A", func() bool {
			n++
			st, _ := callback(t, b.URL, "/api/internal/progress", map[string]any{"request_id": "req-live", "step": fmt.Sprintf("after-%d", n)})
			return st == 200
		})
		want := fmt.Sprintf("after-%d", n)
		deadline := time.Now().Add(10 * time.Second)
		for {
			ev := live.nextEvent(t, time.Until(deadline))
			step := ev.json(t)["params"].(map[string]any)["step"]
			if step == want {
				break
			}
			if s, _ := step.(string); !strings.HasPrefix(s, "after-") {
				t.Fatalf("unexpected event %s", ev.Data)
			}
		}
	})
	t.Run("nothing stored is lost", func(t *testing.T) {
		if _, err := sessKV.Get(context.Background(), "tok-traffic"); err != nil {
			t.Fatalf("cached session lost: %v", err)
		}
		if _, err := reqKV.Get(context.Background(), "req-live"); err != nil {
			t.Fatalf("pending request lost: %v", err)
		}
		c := openSSE(t, a.URL+"/events?session_token=tok-sse&client_id=cl-queued", nil)
		c.skipInit(t)
		ev := c.nextEvent(t, 10*time.Second)
		if ev.json(t)["params"].(map[string]any)["step"] != "stored-before" {
			t.Fatalf("queued event: %s", ev.Data)
		}
	})
}

// TestReliabilityNATSSlow: with every byte to and from NATS delayed, session
// lookups give up on K/V after its timeout and complete through NoETL, even
// while the gateway's own watchers are still busy creating the buckets
// (requests used to queue behind them).
func TestReliabilityNATSSlow(t *testing.T) {
	t.Parallel()
	ns, f := startNATS(t), startNoETL(t)
	f.Handle("GET /api/ping", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, `{"pong":true}`) })
	// 600 ms each way: the handshake takes about 1.8 s, a K/V round trip
	// (1.2 s) exceeds kvTimeout, and the watchers' creation of a bucket
	// (two round trips after connecting) is still running when the
	// requests below start.
	proxy := startDelayProxy(t, strings.TrimPrefix(ns.URL(), "nats://"), 600*time.Millisecond)
	g := startGateway(t, map[string]string{"NATS_URL": "nats://" + proxy.addr(), "NOETL_BASE_URL": f.URL, "LOG_LEVEL": "info"})
	waitFor(t, 10*time.Second, "NATS connected through the slow link", func() bool { return natsState(t, g.URL) == "ok" })
	// A miss costs one K/V lookup that times out (kvTimeout; nothing is
	// stored after a failed lookup) and the NoETL call; the rest is
	// scheduling slack under -race.
	bound := kvTimeout + 1200*time.Millisecond
	var wg sync.WaitGroup
	for i := range 10 {
		tok := fmt.Sprintf("tok-slow-%d", i)
		f.addSession(tok, sseUser, time.Now().Add(time.Hour))
		wg.Go(func() {
			for range 2 { // a miss, then a near-cache hit
				start := time.Now()
				st, body, err := getWithToken(http.DefaultClient, g.URL+"/noetl/ping", tok)
				if d := time.Since(start); err != nil || st != 200 || d > bound {
					t.Errorf("%s: %d %q %v after %v (bound %v)", tok, st, body, err, d, bound)
				}
			}
		})
	}
	wg.Wait()
}

// TestReliabilityNoETLFaults: NoETL down, slow, answering garbage or a huge
// body gives the documented JSON errors, fast, without reading the body into
// memory and without leaving goroutines behind.
func TestReliabilityNoETLFaults(t *testing.T) {
	// Not parallel: it counts goroutines and allocations.
	f := startFaultyNoETL(t)
	g := startGateway(t, map[string]string{"NOETL_BASE_URL": f.URL, "NOETL_TIMEOUT_SECS": "1", "SESSION_NEAR_CACHE_TTL_SECS": "300"})
	if st, _, err := getWithToken(http.DefaultClient, g.URL+"/noetl/ping", "tok-cached"); err != nil || st != 200 {
		t.Fatalf("warm-up: %d %v", st, err)
	}
	f.CloseClientConnections()
	base := quietGoroutines()
	fresh := 0
	// hit runs n concurrent requests and checks each answer.
	hit := func(t *testing.T, n int, path string, cached bool, wantStatus int, wantErr string, within time.Duration) {
		t.Helper()
		var wg sync.WaitGroup
		for range n {
			tok := "tok-cached"
			if !cached {
				fresh++
				tok = fmt.Sprintf("tok-fresh-%d", fresh)
			}
			wg.Go(func() {
				start := time.Now()
				st, body, err := getWithToken(http.DefaultClient, g.URL+path, tok)
				d := time.Since(start)
				var m map[string]any
				json.Unmarshal([]byte(body), &m)
				if err != nil || st != wantStatus || m["error"] != wantErr || len(m) != 1 || d > within {
					t.Errorf("GET %s (cached %v): %d %q %v after %v; want %d {\"error\":%q} within %v", path, cached, st, body, err, d, wantStatus, wantErr, within)
				}
			})
		}
		wg.Wait()
	}
	settle := func(t *testing.T) {
		t.Helper()
		goroutinesAt(t, base+3, 10*time.Second, "goroutines after the fault", f.CloseClientConnections)
	}

	t.Run("slow", func(t *testing.T) {
		f.mode.Store("slow")
		hit(t, 10, "/noetl/ping", true, 504, "upstream timeout", 3*time.Second)
		hit(t, 10, "/noetl/ping", false, 502, "session validation unavailable", 3*time.Second)
		settle(t)
	})
	for _, mode := range []string{"garbage", "error", "shape"} {
		t.Run(mode+" on session validation", func(t *testing.T) {
			f.mode.Store(mode)
			hit(t, 10, "/noetl/ping", false, 502, "session validation unavailable", 2*time.Second)
			settle(t)
		})
	}
	t.Run("huge", func(t *testing.T) {
		f.mode.Store("huge")
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		hit(t, 4, "/noetl/ping", false, 502, "session validation unavailable", 3*time.Second)
		runtime.ReadMemStats(&after)
		// Four 50 MiB answers read whole would allocate 200 MiB; the
		// gateway stops at maxNoETLBody (1 MiB) each.
		if d := after.TotalAlloc - before.TotalAlloc; d > 32<<20 {
			t.Fatalf("validating against 4 huge answers allocated %d MiB", d>>20)
		}
		// Through the proxy the same body streams to the client.
		runtime.ReadMemStats(&before)
		req, _ := http.NewRequest("GET", g.URL+"/noetl/ping", nil)
		req.Header.Set("X-Session-Token", "tok-cached")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		runtime.ReadMemStats(&after)
		if err != nil || resp.StatusCode != 200 || n != hugeBody {
			t.Fatalf("proxied huge body: %d, %d bytes, %v", resp.StatusCode, n, err)
		}
		if d := after.TotalAlloc - before.TotalAlloc; d > 16<<20 {
			t.Fatalf("proxying 50 MiB allocated %d MiB: the body was buffered", d>>20)
		}
		settle(t)
	})
	t.Run("down", func(t *testing.T) {
		f.mode.Store("ok")
		f.Close() // the port now refuses connections
		hit(t, 10, "/noetl/ping", true, 502, "upstream unavailable", 2*time.Second)
		hit(t, 10, "/noetl/ping", false, 502, "session validation unavailable", 2*time.Second)
		settle(t)
	})
	if strings.Contains(g.Logs.String(), "tok-cached") || strings.Contains(g.Logs.String(), "tok-fresh-1\"") {
		t.Fatal("a session token reached the logs")
	}
}

// flakyIdP is an OIDC provider whose JWKS endpoint can break: mode "ok",
// "down" (500), "garbage" (200 HTML), "empty" (a key set without keys) or
// "reset" (the connection is closed without an answer).
type flakyIdP struct {
	*httptest.Server
	mode atomic.Value
	hits atomic.Int64

	mu   sync.Mutex
	keys []testKey
}

func startFlakyIdP(t testing.TB, keys ...testKey) *flakyIdP {
	t.Helper()
	p := &flakyIdP{keys: keys}
	p.mode.Store("ok")
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"issuer": p.URL + "/", "jwks_uri": p.URL + "/jwks"})
	})
	mux.HandleFunc("GET /jwks", func(w http.ResponseWriter, r *http.Request) {
		p.hits.Add(1)
		switch p.mode.Load() {
		case "down":
			http.Error(w, "down", http.StatusInternalServerError)
			return
		case "garbage":
			io.WriteString(w, "<html><body>502 Bad Gateway</body></html>")
			return
		case "empty":
			io.WriteString(w, `{"keys":[]}`)
			return
		case "reset":
			if c, _, err := http.NewResponseController(w).Hijack(); err == nil {
				c.Close()
			}
			return
		}
		p.mu.Lock()
		var ks []any
		for _, k := range p.keys {
			ks = append(ks, k.jwk())
		}
		p.mu.Unlock()
		json.NewEncoder(w).Encode(map[string]any{"keys": ks})
	})
	p.Server = httptest.NewServer(mux)
	t.Cleanup(p.Close)
	return p
}

func (p *flakyIdP) publish(keys ...testKey) {
	p.mu.Lock()
	p.keys = keys
	p.mu.Unlock()
}

func (p *flakyIdP) token(t testing.TB, k testKey) string {
	now := time.Now()
	return sign(t, k, jwt.MapClaims{"iss": p.URL + "/", "aud": "client-1", "sub": "auth0|42", "email": "ada@example.com",
		"name": "Ada", "email_verified": true, "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()})
}

// syncLoginNoETL is NoETL's POST /api/auth/login: every verified login gets
// a new session, which NoETL then also validates.
func syncLoginNoETL(t testing.TB, f *fakeNoETL) {
	var n atomic.Int64
	f.Handle("POST /api/auth/login", func(w http.ResponseWriter, r *http.Request) {
		tok := fmt.Sprintf("tok-login-%032d", n.Add(1))
		f.addSession(tok, sseUser, time.Now().Add(time.Hour))
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"status":"authenticated","session_token":%q,"user":{"user_id":7,"email":"ada@example.com","display_name":"Ada","roles":"{user}"},"expires_at":"2099-01-28 22:11:41+00"}`, tok)
	})
	f.Handle("POST /api/auth/logout", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, `{"status":"ok"}`) })
}

// TestReliabilityJWKSOutage: a JWKS endpoint that is down or answers
// garbage leaves the keys we had working; a key rotated in meanwhile is
// refused fast, and accepted once the endpoint recovers and the cooldown
// has passed.
func TestReliabilityJWKSOutage(t *testing.T) {
	t.Parallel()
	p := startFlakyIdP(t, keyA())
	f := startNoETL(t)
	syncLoginNoETL(t, f)
	g := startGateway(t, map[string]string{"OIDC_ISSUER": p.URL + "/", "AUTH0_CLIENT_ID": "client-1", "NOETL_BASE_URL": f.URL,
		"AUTH_MODE": "sync", "JWKS_MIN_REFRESH_SECS": "1"})
	oldTok := p.token(t, keyA())
	if st, body := login(t, g, oldTok); st != 200 {
		t.Fatalf("login: %d %v", st, body)
	}
	// A token naming an unknown kid makes the gateway fetch the JWKS (once
	// per cooldown): the way to make it meet each broken answer.
	probe := p.token(t, testKey{kid: "probe", alg: "RS256", priv: rsaKeyB()})
	for _, mode := range []string{"down", "garbage", "empty", "reset"} {
		p.mode.Store(mode)
		n := p.hits.Load()
		waitFor(t, 5*time.Second, "a JWKS fetch meeting "+mode, func() bool {
			if st, body := login(t, g, probe); st != 401 {
				t.Fatalf("unknown kid: %d %v", st, body)
			}
			return p.hits.Load() > n
		})
		if st, body := login(t, g, oldTok); st != 200 {
			t.Fatalf("known key with the JWKS %s: %d %v", mode, st, body)
		}
	}

	p.publish(keyA(), keyB())
	newTok := p.token(t, keyB())
	start := time.Now()
	if st, body := login(t, g, newTok); st != 401 || body["error"] != "Invalid credentials: unknown key" {
		t.Fatalf("new key while the JWKS is broken: %d %v", st, body)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("refusing the new key took %v", d)
	}
	p.mode.Store("ok")
	waitFor(t, 5*time.Second, "the new key accepted after recovery", func() bool { st, _ := login(t, g, newTok); return st == 200 })
	if st, body := login(t, g, oldTok); st != 200 {
		t.Fatalf("old key after recovery: %d %v", st, body)
	}
}

// TestReliabilityShutdown: on shutdown an in-flight proxied request
// finishes, SSE streams end, new connections are refused, and run returns
// within SHUTDOWN_TIMEOUT_SECS; a request that outlives the timeout does not
// hold run up.
func TestReliabilityShutdown(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		timeout  time.Duration
		upstream time.Duration // how long NoETL takes
	}{
		{"in-flight finishes", 5 * time.Second, time.Second},
		{"in-flight outlives the timeout", time.Second, time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := startNoETL(t)
			f.addSession("tok-sd", sseUser, time.Now().Add(time.Hour))
			started := make(chan struct{}, 1)
			f.Handle("GET /api/slow", func(w http.ResponseWriter, r *http.Request) {
				started <- struct{}{}
				select {
				case <-time.After(tc.upstream):
					io.WriteString(w, `{"slow":"done"}`)
				case <-r.Context().Done():
				}
			})
			g := startGateway(t, map[string]string{"NOETL_BASE_URL": f.URL, "SHUTDOWN_TIMEOUT_SECS": fmt.Sprint(int(tc.timeout.Seconds()))})
			addr := strings.TrimPrefix(g.URL, "http://")
			stream := openSSE(t, g.URL+"/events?session_token=tok-sd", nil)
			stream.skipInit(t)

			type result struct {
				status int
				body   string
				err    error
				at     time.Time
			}
			res := make(chan result, 1)
			go func() {
				st, body, err := getWithToken(http.DefaultClient, g.URL+"/noetl/slow", "tok-sd")
				res <- result{st, body, err, time.Now()}
			}()
			<-started
			start := time.Now()
			stopped := make(chan error, 1)
			go func() { stopped <- g.Stop(t) }()

			stream.waitEnd(t, 5*time.Second)
			if err := <-stream.ended; !errors.Is(err, io.EOF) {
				t.Fatalf("SSE stream ended with %v, want a clean EOF", err)
			}
			waitFor(t, 5*time.Second, "new connections refused", func() bool {
				c, err := net.DialTimeout("tcp", addr, time.Second)
				if err == nil {
					c.Close()
				}
				return err != nil
			})
			refused := time.Now()
			var runErr error
			select {
			case runErr = <-stopped:
			case <-time.After(tc.timeout + 3*time.Second):
				t.Fatalf("run did not return within %v", tc.timeout+3*time.Second)
			}
			took := time.Since(start)
			if runErr != nil {
				t.Fatalf("run: %v", runErr)
			}
			r := <-res
			if tc.upstream < tc.timeout {
				if r.err != nil || r.status != 200 || r.body != `{"slow":"done"}` {
					t.Fatalf("in-flight request: %d %q %v", r.status, r.body, r.err)
				}
				if !refused.Before(r.at) {
					t.Fatal("new connections were accepted while a request was in flight")
				}
				if took < tc.upstream/2 {
					t.Fatalf("run returned after %v, before the in-flight request could finish", took)
				}
			} else if r.status == 200 {
				t.Fatalf("a request cut by the shutdown timeout answered 200")
			}
			if took > tc.timeout+1500*time.Millisecond {
				t.Fatalf("run took %v with SHUTDOWN_TIMEOUT_SECS=%v", took, tc.timeout)
			}
			t.Logf("run returned after %v", took)
		})
	}
}
