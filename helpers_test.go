package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// syncBuffer is a goroutine-safe log sink: tests read what the gateway logged.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// logLines decodes every JSON log line written so far.
func (b *syncBuffer) logLines() []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(b.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// natsServer is an in-process NATS server with JetStream that can be
// stopped and started again on the same port and store.
type natsServer struct {
	t    testing.TB
	opts *server.Options
	srv  *server.Server
}

func startNATS(t testing.TB) *natsServer {
	t.Helper()
	ns := &natsServer{t: t, opts: &server.Options{
		Host:      "127.0.0.1",
		Port:      -1,
		JetStream: true,
		StoreDir:  t.TempDir(),
		NoLog:     true,
		NoSigs:    true,
	}}
	ns.start()
	// Restarts must reuse the port the first start picked.
	ns.opts.Port = ns.srv.Addr().(*net.TCPAddr).Port
	t.Cleanup(ns.stop)
	return ns
}

func (ns *natsServer) start() {
	ns.t.Helper()
	srv, err := server.NewServer(ns.opts)
	if err != nil {
		ns.t.Fatalf("nats server: %v", err)
	}
	srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		ns.t.Fatal("nats server not ready")
	}
	ns.srv = srv
}

func (ns *natsServer) stop() {
	if ns.srv != nil {
		ns.srv.Shutdown()
		ns.srv.WaitForShutdown()
		ns.srv = nil
	}
}

func (ns *natsServer) URL() string { return fmt.Sprintf("nats://127.0.0.1:%d", ns.opts.Port) }

// gateway is a running instance of run, as a test sees it.
type gateway struct {
	URL         string // public listener
	InternalURL string // internal listener, when GATEWAY_INTERNAL_ADDR is set
	Logs        *syncBuffer
	stop        context.CancelFunc
	done        chan error
}

// startGateway runs the real run function in-process with env as its whole
// environment (ROUTER_PORT defaults to 0) and waits until it is listening
// and /ready answers. It is stopped at cleanup.
func startGateway(t testing.TB, env map[string]string) *gateway {
	t.Helper()
	e := map[string]string{"ROUTER_PORT": "0", "GATEWAY_BIND": "127.0.0.1", "SHUTDOWN_TIMEOUT_SECS": "5"}
	for k, v := range env {
		e[k] = v
	}
	getenv := func(k string) string { return e[k] }
	ctx, cancel := context.WithCancel(context.Background())
	g := &gateway{Logs: &syncBuffer{}, stop: cancel, done: make(chan error, 1)}
	go func() { g.done <- run(ctx, []string{"gateway"}, getenv, g.Logs, g.Logs) }()
	deadline := time.Now().Add(10 * time.Second)
	for g.URL == "" || (e["GATEWAY_INTERNAL_ADDR"] != "" && g.InternalURL == "") {
		select {
		case err := <-g.done:
			t.Fatalf("gateway exited at start: %v\n%s", err, g.Logs)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("gateway did not listen:\n%s", g.Logs)
		}
		for _, l := range g.Logs.logLines() {
			if l["msg"] == "listening" {
				switch l["listener"] {
				case "public":
					g.URL = "http://" + l["addr"].(string)
				case "internal":
					g.InternalURL = "http://" + l["addr"].(string)
				}
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	waitFor(t, 10*time.Second, "gateway /ready", func() bool {
		resp, err := http.Get(g.URL + "/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	t.Cleanup(func() { g.Stop(t) })
	return g
}

// Stop shuts the gateway down as SIGTERM would and returns run's error.
func (g *gateway) Stop(t testing.TB) error {
	t.Helper()
	g.stop()
	select {
	case err, ok := <-g.done:
		if ok {
			close(g.done)
		}
		return err
	case <-time.After(30 * time.Second):
		t.Fatalf("gateway did not stop")
		return nil
	}
}

// waitFor polls cond until it holds; it fails the test after timeout.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// doJSON sends a request with an optional JSON body and headers and returns
// the status, headers and decoded JSON body (nil when not JSON).
func doJSON(t testing.TB, method, url string, body any, headers map[string]string) (int, http.Header, map[string]any) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		switch b := body.(type) {
		case string:
			rd = strings.NewReader(b)
		default:
			buf, _ := json.Marshal(b)
			rd = bytes.NewReader(buf)
		}
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var m map[string]any
	json.Unmarshal(raw, &m)
	return resp.StatusCode, resp.Header, m
}

// fakeNoETL stands in for the NoETL server with its real request and
// response shapes. Sessions it knows answer /api/auth/session/validate;
// tests add handlers for anything else with Handle.
type fakeNoETL struct {
	*httptest.Server
	mux *http.ServeMux

	mu       sync.Mutex
	sessions map[string]fakeSession
	calls    map[string]int // "METHOD /path" → count
}

type fakeSession struct {
	User      User
	ExpiresAt time.Time
}

func startNoETL(t testing.TB) *fakeNoETL {
	t.Helper()
	f := &fakeNoETL{mux: http.NewServeMux(), sessions: map[string]fakeSession{}, calls: map[string]int{}}
	f.mux.HandleFunc("POST /api/auth/session/validate", func(w http.ResponseWriter, r *http.Request) {
		var in struct {
			SessionToken string `json:"session_token"`
			Credential   string `json:"credential"`
		}
		if err := json.NewDecoder(r.Body).Decode(&in); err != nil || in.SessionToken == "" {
			http.Error(w, `{"detail":"bad request"}`, http.StatusUnprocessableEntity)
			return
		}
		f.mu.Lock()
		s, ok := f.sessions[in.SessionToken]
		f.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if !ok || !time.Now().Before(s.ExpiresAt) {
			io.WriteString(w, `{"status":"ok","valid":false,"user":null,"expires_at":null,"error":null}`)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{
			"status": "ok", "valid": true, "error": nil,
			"user": map[string]any{"user_id": s.User.UserID, "email": s.User.Email, "display_name": s.User.DisplayName, "roles": s.User.Roles},
			// PostgreSQL's text format, as the real server sends it.
			"expires_at": s.ExpiresAt.UTC().Format("2006-01-02 15:04:05.999999-07"),
		})
	})
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.calls[r.Method+" "+r.URL.Path]++
		f.mu.Unlock()
		f.mux.ServeHTTP(w, r)
	}))
	t.Cleanup(f.Close)
	return f
}

// addSession makes token a valid session for user until expires.
func (f *fakeNoETL) addSession(token string, u User, expires time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sessions[token] = fakeSession{User: u, ExpiresAt: expires}
}

func (f *fakeNoETL) removeSession(token string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.sessions, token)
}

// Handle adds a handler for other NoETL endpoints.
func (f *fakeNoETL) Handle(pattern string, h http.HandlerFunc) { f.mux.HandleFunc(pattern, h) }

// Calls counts the requests received for "METHOD /path".
func (f *fakeNoETL) Calls(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[key]
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
