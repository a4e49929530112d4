package main

// The soak of issue 7: every kind of traffic at once, then goroutines and
// heap back at their baseline. Helpers shared with reliability_test.go.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// soakClient is what a soak worker uses: one pooled client; unexpected
// answers are collected and reported by the test goroutine once the
// workers are done.
type soakClient struct {
	c *http.Client

	mu         sync.Mutex
	unexpected []string
}

func (s *soakClient) do(method, url, body string, headers map[string]string, want int) ([]byte, bool) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, _ := http.NewRequest(method, url, rd)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := s.c.Do(req)
	if err != nil {
		s.fail(fmt.Sprintf("%s %s: %v", method, url, err))
		return nil, false
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		s.fail(fmt.Sprintf("%s %s: %d %s", method, url, resp.StatusCode, raw))
		return raw, false
	}
	return raw, true
}

func (s *soakClient) fail(msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.unexpected = append(s.unexpected, msg)
}

// churnStream opens an SSE stream, reads up to its init message and hangs
// up, as a browser tab that comes and goes.
func (s *soakClient) churnStream(url string) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	resp, err := s.c.Do(req)
	if err != nil {
		s.fail("GET /events: " + err.Error())
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		raw, _ := io.ReadAll(resp.Body)
		s.fail(fmt.Sprintf("GET /events: %d %s", resp.StatusCode, raw))
		return
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "data:") {
			return
		}
	}
	s.fail(fmt.Sprintf("GET /events: ended before its init message: %v", sc.Err()))
}

// heapInUse is the live heap after a full collection.
func heapInUse() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// TestReliabilitySoak runs SSE connection churn, progress callbacks to a
// live stream, sync-mode logins (login, proxied call, logout) and proxied
// calls together from several goroutines; then every answer was the
// expected one, every delivered callback reached the stream exactly once,
// and goroutines and heap are back to their baseline.
func TestReliabilitySoak(t *testing.T) {
	// Not parallel: it compares the process's goroutines and heap with a
	// baseline.
	dur := 10 * time.Second
	if testing.Short() {
		dur = 3 * time.Second
	}
	idp := startFlakyIdP(t, keyA())
	f := startNoETL(t)
	syncLoginNoETL(t, f)
	f.Handle("GET /api/ping", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, `{"pong":true}`) })
	for _, tok := range []string{"tok-soak-main", "tok-soak-churn-0", "tok-soak-churn-1"} {
		f.addSession(tok, sseUser, time.Now().Add(time.Hour))
	}
	g := startInProcess(t, map[string]string{"OIDC_ISSUER": idp.URL + "/", "AUTH0_CLIENT_ID": "client-1", "NOETL_BASE_URL": f.URL,
		// warn: the in-memory log sink would otherwise hold a line per
		// request and count as heap growth.
		"AUTH_MODE": "sync", "LOG_LEVEL": "warn"}, nil, nil)
	g.putRequest(t, "req-soak", "cl-soak", "tok-soak-main", "e-soak")
	idToken := idp.token(t, keyA())
	loginBody, _ := json.Marshal(map[string]string{"auth0_token": idToken})
	main := openSSE(t, g.URL+"/events?session_token=tok-soak-main&client_id=cl-soak", nil)
	main.skipInit(t)

	s := &soakClient{c: &http.Client{Timeout: 10 * time.Second}}
	defer s.c.CloseIdleConnections()
	var logins atomic.Int64
	ops := map[string]func(w, i int){
		"churn": func(w, i int) {
			s.churnStream(fmt.Sprintf("%s/events?session_token=tok-soak-churn-%d&client_id=churn-%d-%d", g.URL, w, w, i%3))
		},
		"callback": func(w, i int) {
			// Recorded before posting: the stream may see it before the
			// worker sees the 200.
			s.do("POST", g.URL+"/api/internal/progress", fmt.Sprintf(`{"request_id":"req-soak","step":"s-%d-%d"}`, w, i), nil, 200)
		},
		"login": func(w, i int) {
			raw, ok := s.do("POST", g.URL+"/api/auth/login", string(loginBody), nil, 200)
			if !ok {
				return
			}
			logins.Add(1)
			var out struct {
				SessionToken string `json:"session_token"`
			}
			json.Unmarshal(raw, &out)
			h := map[string]string{"X-Session-Token": out.SessionToken}
			s.do("GET", g.URL+"/noetl/ping", "", h, 200)
			s.do("POST", g.URL+"/api/auth/logout", "", h, 200)
		},
		"proxy": func(w, i int) {
			s.do("GET", g.URL+"/noetl/ping", "", map[string]string{"X-Session-Token": "tok-soak-main"}, 200)
		},
	}
	received := map[string]int{}
	var rmu sync.Mutex
	drained := make(chan struct{})
	stopReading := make(chan struct{})
	go func() {
		defer close(drained)
		for {
			select {
			case ev := <-main.events:
				if ev.Event == "ping" {
					continue
				}
				var m struct {
					Params struct {
						Step string `json:"step"`
					} `json:"params"`
				}
				json.Unmarshal([]byte(ev.Data), &m)
				rmu.Lock()
				received[m.Params.Step]++
				rmu.Unlock()
			case <-stopReading:
				return
			}
		}
	}()
	// One of each first, so lazily built state (pools, metrics series,
	// the JWKS) is in the baseline.
	for _, op := range ops {
		op(0, -1)
	}
	waitFor(t, 10*time.Second, "the warm-up callback", func() bool {
		rmu.Lock()
		defer rmu.Unlock()
		return received["s-0--1"] == 1
	})
	rmu.Lock()
	delete(received, "s-0--1")
	rmu.Unlock()
	logins.Store(0)
	if len(s.unexpected) > 0 {
		t.Fatalf("warm-up: %v", s.unexpected)
	}
	// Idle keep-alive connections (gateway to NoETL, test to gateway) are
	// a pool, not a leak: close them on both sides before counting.
	idle := func() {
		s.c.CloseIdleConnections()
		f.CloseClientConnections()
		idp.CloseClientConnections()
	}
	idle()
	baseG := quietGoroutines()
	baseHeap := heapInUse()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	// Filled before any worker starts: the workers read it concurrently.
	counts := map[string]*atomic.Int64{}
	for name := range ops {
		counts[name] = &atomic.Int64{}
	}
	for name, op := range ops {
		n := counts[name]
		for w := range 2 {
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					op(w, i)
					n.Add(1)
				}
			})
		}
	}
	time.Sleep(dur) // the soak's length: there is no condition to await
	close(stop)
	wg.Wait()
	for _, u := range s.unexpected {
		t.Error(u)
	}
	calls := counts["callback"].Load()
	waitFor(t, 10*time.Second, "every delivered callback on the stream", func() bool {
		rmu.Lock()
		defer rmu.Unlock()
		return int64(len(received)) >= calls
	})
	close(stopReading)
	<-drained
	for step, n := range received {
		if n != 1 || !strings.HasPrefix(step, "s-") {
			t.Errorf("callback %q received %d times", step, n)
		}
	}
	if int64(len(received)) != calls {
		t.Errorf("%d callbacks delivered, %d received", calls, len(received))
	}
	received = nil // the test's own bookkeeping is not the gateway's heap
	t.Logf("%v soak: %d stream opens, %d callbacks, %d logins, %d proxied calls", dur,
		counts["churn"].Load(), calls, counts["login"].Load(), counts["proxy"].Load())

	// Every connection of the soak is gone: the gateway's goroutines are
	// the baseline's. The slack covers the test's own HTTP client pool
	// winding down.
	goroutinesAt(t, baseG+3, 10*time.Second, "goroutines after the soak", idle)
	// Heap: two kinds of state legitimately outlive the soak. Each login
	// leaves a revocation tombstone (24 h) and a near-cache tombstone at
	// the gateway and a session at the fake NoETL: a few hundred bytes,
	// allowed 1 KiB. Each delivered callback stays in the in-process event
	// log for Last-Event-ID replay until REQUEST_TTL (bounded by
	// memLogMax): its frame and index entry, about 300 bytes, allowed 512 B.
	// Everything else (streams, connections, buffers, flights) must be
	// gone; 2 MiB covers allocator and GC noise. A leak of even a few
	// hundred bytes per request or stream (about 20,000 of each in a full
	// soak) exceeds this.
	heap := heapInUse()
	allowed := baseHeap + 2<<20 + uint64(logins.Load())<<10 + uint64(calls)*512
	t.Logf("heap in use: %d KiB before, %d KiB after (%d logins, %d callbacks; allowed %d KiB)", baseHeap>>10, heap>>10, logins.Load(), calls, allowed>>10)
	if heap > allowed {
		t.Errorf("heap in use grew from %d KiB to %d KiB (allowed %d KiB)", baseHeap>>10, heap>>10, allowed>>10)
	}
}
