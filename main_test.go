package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestRoutes checks that every route of SPEC §3 is registered on the real
// mux: none answers the mux's own 404 or 405. Building the mux at all proves
// the patterns do not conflict (ServeMux panics on conflicts).
func TestRoutes(t *testing.T) {
	t.Parallel()
	g := startGateway(t, nil)
	routes := []struct{ method, path string }{
		{"GET", "/health"}, {"GET", "/ready"}, {"POST", "/api/auth/login"}, {"POST", "/api/auth/validate"},
		{"POST", "/api/auth/check-access"}, {"POST", "/api/auth/logout"}, {"GET", "/events"},
		{"GET", "/graphql"}, {"POST", "/graphql"}, {"GET", "/noetl/executions"}, {"DELETE", "/noetl/credentials/x"},
		{"POST", "/api/internal/callback"}, {"POST", "/api/internal/callback/async"}, {"POST", "/api/internal/progress"},
		{"GET", "/metrics"},
	}
	for _, rt := range routes {
		status, _, body := doJSON(t, rt.method, g.URL+rt.path, nil, nil)
		if status == http.StatusNotFound && body["error"] == "not found" || status == http.StatusMethodNotAllowed {
			t.Errorf("%s %s is not routed: %d %v", rt.method, rt.path, status, body)
		}
	}
}

func TestHealthReadyMetrics(t *testing.T) {
	t.Parallel()
	g := startGateway(t, nil)

	resp, err := http.Get(g.URL + "/health")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "ok" || resp.Header.Get("Content-Type") != "text/plain; charset=utf-8" {
		t.Errorf("/health: %d %q %q", resp.StatusCode, body, resp.Header.Get("Content-Type"))
	}

	status, h, ready := doJSON(t, "GET", g.URL+"/ready", nil, nil)
	checks, _ := ready["checks"].(map[string]any)
	if status != 200 || ready["status"] != "ready" || checks["nats"] != "disabled" || checks["shutting_down"] != false {
		t.Errorf("/ready: %d %v", status, ready)
	}
	if h.Get("Content-Type") != "application/json" {
		t.Errorf("/ready content type %q", h.Get("Content-Type"))
	}

	resp, err = http.Get(g.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	text := string(body)
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("/metrics: %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	for _, want := range []string{
		`gateway_http_requests_total{route="GET /health",method="GET",status="200"} 1`,
		`gateway_http_request_duration_seconds_bucket{route="GET /ready",status="200",le="+Inf"}`,
		"# TYPE gateway_http_request_duration_seconds histogram",
		"# TYPE gateway_sse_connections gauge",
		"gateway_auth_bypass_enabled 0",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	checkExposition(t, text)
}

// checkExposition verifies the text format line by line: comments, or
// `name{labels} value` with a parseable value.
func checkExposition(t *testing.T, text string) {
	t.Helper()
	for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
		if strings.HasPrefix(line, "# HELP ") || strings.HasPrefix(line, "# TYPE ") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Errorf("bad exposition line %q", line)
			continue
		}
		var v float64
		if _, err := fmt.Sscan(line[i+1:], &v); err != nil && line[i+1:] != "+Inf" {
			t.Errorf("bad value in %q", line)
		}
	}
}

func TestMetricsRefusedFromNonLoopback(t *testing.T) {
	t.Parallel()
	h := loopbackOnly(handleMetrics(newMetrics()))
	for _, peer := range []string{"10.1.2.3:5555", "[2001:db8::1]:443"} {
		req := httptest.NewRequest("GET", "/metrics", nil)
		req.RemoteAddr = peer
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if res := rec.Result(); res.StatusCode != http.StatusForbidden || res.Header.Get("Content-Type") != "application/json" {
			t.Errorf("peer %s: %d", peer, res.StatusCode)
		}
	}
}

func TestInternalListener(t *testing.T) {
	t.Parallel()
	g := startGateway(t, map[string]string{"GATEWAY_INTERNAL_ADDR": "127.0.0.1:0"})
	if status, _, _ := doJSON(t, "GET", g.URL+"/metrics", nil, nil); status != http.StatusNotFound {
		t.Errorf("/metrics on the public listener with an internal one: %d", status)
	}
	if status, _, _ := doJSON(t, "POST", g.URL+"/api/internal/callback/async", map[string]any{}, nil); status != http.StatusNotFound {
		t.Errorf("callback route on the public listener with an internal one: %d", status)
	}
	resp, err := http.Get(g.InternalURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("/metrics on the internal listener: %d", resp.StatusCode)
	}
	if status, _, _ := doJSON(t, "GET", g.InternalURL+"/health", nil, nil); status != http.StatusNotFound {
		t.Errorf("public routes must not be on the internal listener: %d", status)
	}
}

func TestCORS(t *testing.T) {
	t.Parallel()
	g := startGateway(t, map[string]string{"CORS_ALLOWED_ORIGINS": "https://ui.example.com"})
	star := startGateway(t, map[string]string{"CORS_ALLOWED_ORIGINS": "*"})

	preflight := func(base, origin string) *http.Response {
		req, _ := http.NewRequest("OPTIONS", base+"/noetl/executions", nil)
		req.Header.Set("Origin", origin)
		req.Header.Set("Access-Control-Request-Method", "POST")
		req.Header.Set("Access-Control-Request-Headers", "authorization, content-type")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}

	// Allowed: answered before auth (no token sent) with the full set.
	resp := preflight(g.URL, "https://ui.example.com")
	h := resp.Header
	if resp.StatusCode != http.StatusNoContent || h.Get("Access-Control-Allow-Origin") != "https://ui.example.com" ||
		h.Get("Access-Control-Allow-Credentials") != "true" || h.Get("Access-Control-Allow-Methods") != corsMethods ||
		h.Get("Access-Control-Allow-Headers") != corsHeaders || h.Get("Access-Control-Max-Age") != "600" ||
		!strings.Contains(strings.Join(h.Values("Vary"), ","), "Origin") {
		t.Errorf("allowed preflight: %d %v", resp.StatusCode, h)
	}
	// Disallowed: no CORS headers at all.
	resp = preflight(g.URL, "https://evil.example")
	for k := range resp.Header {
		if strings.HasPrefix(k, "Access-Control-") {
			t.Errorf("disallowed origin got %s", k)
		}
	}
	// Wildcard: "*" and never credentials.
	resp = preflight(star.URL, "https://anything.example")
	if resp.Header.Get("Access-Control-Allow-Origin") != "*" || resp.Header.Get("Access-Control-Allow-Credentials") != "" {
		t.Errorf("wildcard preflight: %v", resp.Header)
	}

	// Simple requests.
	for _, tc := range []struct {
		base, origin, wantOrigin, wantCreds string
	}{
		{g.URL, "https://ui.example.com", "https://ui.example.com", "true"},
		{g.URL, "https://evil.example", "", ""},
		{star.URL, "https://x.example", "*", ""},
	} {
		_, h, _ := doJSON(t, "GET", tc.base+"/ready", nil, map[string]string{"Origin": tc.origin})
		if h.Get("Access-Control-Allow-Origin") != tc.wantOrigin || h.Get("Access-Control-Allow-Credentials") != tc.wantCreds ||
			!strings.Contains(strings.Join(h.Values("Vary"), ","), "Origin") {
			t.Errorf("simple request from %s: %v", tc.origin, h)
		}
	}
	// A plain OPTIONS (not a preflight) is routed normally.
	status, _, _ := doJSON(t, "OPTIONS", g.URL+"/health", nil, nil)
	if status != http.StatusMethodNotAllowed {
		t.Errorf("plain OPTIONS /health: %d", status)
	}
}

func TestErrorsAreJSON(t *testing.T) {
	t.Parallel()
	g := startGateway(t, map[string]string{"MAX_BODY_BYTES": "100"})

	status, h, body := doJSON(t, "GET", g.URL+"/nope", nil, nil)
	if status != 404 || body["error"] != "not found" || h.Get("Content-Type") != "application/json" {
		t.Errorf("404: %d %v %v", status, h, body)
	}
	status, h, body = doJSON(t, "DELETE", g.URL+"/health", nil, nil)
	if status != 405 || body["error"] != "method not allowed" || !strings.Contains(h.Get("Allow"), "GET") {
		t.Errorf("405: %d %v %v", status, h, body)
	}
	// An unclean path is refused, not redirected.
	status, h, body = doJSON(t, "GET", g.URL+"/noetl/a/../../health", nil, nil)
	if status != 400 || h.Get("Location") != "" || body["error"] == nil {
		t.Errorf("unclean path: %d %v %v", status, h, body)
	}
	status, _, body = doJSON(t, "POST", g.URL+"/api/auth/validate", strings.Repeat("x", 101), nil)
	if status != 413 || body["error"] != "request body too large" {
		t.Errorf("413: %d %v", status, body)
	}
}

func TestRequestID(t *testing.T) {
	t.Parallel()
	g := startGateway(t, nil)
	_, h, _ := doJSON(t, "GET", g.URL+"/health", nil, map[string]string{"X-Request-Id": "trace-123.abc"})
	if h.Get("X-Request-Id") != "trace-123.abc" {
		t.Errorf("safe id not kept: %q", h.Get("X-Request-Id"))
	}
	for _, bad := range []string{"has space", strings.Repeat("a", 129), "quote\"", "<script>"} {
		_, h, _ = doJSON(t, "GET", g.URL+"/health", nil, map[string]string{"X-Request-Id": bad})
		if id := h.Get("X-Request-Id"); id == bad || len(id) != 32 {
			t.Errorf("unsafe id %q answered with %q", bad, id)
		}
	}
	_, h1, _ := doJSON(t, "GET", g.URL+"/nope", nil, nil)
	_, h2, _ := doJSON(t, "GET", g.URL+"/nope", nil, nil)
	if h1.Get("X-Request-Id") == "" || h1.Get("X-Request-Id") == h2.Get("X-Request-Id") {
		t.Errorf("generated ids: %q %q", h1.Get("X-Request-Id"), h2.Get("X-Request-Id"))
	}
	// The access log line names the route pattern and the request id, never
	// the raw path or query.
	doJSON(t, "GET", g.URL+"/health?session_token=secret-token-value", nil, map[string]string{"X-Request-Id": "find-me"})
	waitFor(t, 5*time.Second, "access log line", func() bool {
		for _, l := range g.Logs.logLines() {
			if l["msg"] == "request" && l["request_id"] == "find-me" {
				return l["route"] == "GET /health" && l["status"] == float64(200)
			}
		}
		return false
	})
	if strings.Contains(g.Logs.String(), "secret-token-value") {
		t.Error("query string with a token reached the log")
	}
}

func TestRecover(t *testing.T) {
	t.Parallel()
	h := withRecover(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic("boom") }))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
	res := rec.Result()
	body, _ := io.ReadAll(res.Body)
	if res.StatusCode != 500 || res.Header.Get("Content-Type") != "application/json" || strings.Contains(string(body), "boom") {
		t.Errorf("panic answer: %d %s", res.StatusCode, body)
	}
	defer func() {
		if v := recover(); v != http.ErrAbortHandler {
			t.Errorf("ErrAbortHandler must pass through, got %v", v)
		}
	}()
	withRecover(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic(http.ErrAbortHandler) })).
		ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/", nil))
}

// TestFlushThroughMiddleware proves a streaming handler can flush through
// every wrapper of the stack: the client reads the first chunk while the
// handler is still running.
func TestFlushThroughMiddleware(t *testing.T) {
	t.Parallel()
	cfg, _ := loadConfig(envOf(nil))
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("GET /stream", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		if err := http.NewResponseController(w).Flush(); err != nil {
			t.Errorf("flush: %v", err)
		}
		<-release
		io.WriteString(w, "second\n")
	})
	srv := httptest.NewServer(newServer(cfg, discardLogger(), newMetrics(), mux).Handler)
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	close(release)
	if err != nil || line != "first\n" {
		t.Fatalf("first chunk: %q %v", line, err)
	}
}

func TestGracefulShutdownRefusesNewConnections(t *testing.T) {
	t.Parallel()
	g := startGateway(t, nil)
	addr := strings.TrimPrefix(g.URL, "http://")
	if err := g.Stop(t); err != nil {
		t.Fatalf("run returned %v", err)
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("listener still accepts after shutdown")
	}
	logs := g.Logs.String()
	if !strings.Contains(logs, `"msg":"shutting down"`) || !strings.Contains(logs, `"msg":"stopped"`) {
		t.Errorf("shutdown not logged:\n%s", logs)
	}
}

func TestRunFlagsAndBadConfig(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	if err := run(context.Background(), []string{"gateway", "-version"}, envOf(nil), &out, io.Discard); err != nil || !strings.HasPrefix(out.String(), "noetl-gateway ") {
		t.Errorf("-version: %v %q", err, out.String())
	}
	err := run(context.Background(), []string{"gateway"}, envOf(map[string]string{"ROUTER_PORT": "x", "LOG_FORMAT": "xml"}), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "ROUTER_PORT") || !strings.Contains(err.Error(), "LOG_FORMAT") {
		t.Errorf("bad config: %v", err)
	}

	g := startGateway(t, nil)
	port := g.URL[strings.LastIndexByte(g.URL, ':')+1:]
	hc := func(port string) error {
		return run(context.Background(), []string{"gateway", "-healthcheck"}, envOf(map[string]string{"ROUTER_PORT": port, "GATEWAY_BIND": "127.0.0.1"}), io.Discard, io.Discard)
	}
	if err := hc(port); err != nil {
		t.Errorf("-healthcheck against a live gateway: %v", err)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	if err := hc(fmt.Sprint(dead)); err == nil {
		t.Error("-healthcheck against nothing succeeded")
	}
}

func TestPortInUse(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
	err = run(context.Background(), []string{"gateway"}, envOf(map[string]string{"ROUTER_PORT": port, "GATEWAY_BIND": "127.0.0.1"}), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "listening on") {
		t.Errorf("port in use: %v", err)
	}
}

// TestNATSReadiness runs in NATS mode against an in-process server: /ready
// follows the connection down and up again, and the gateway never stops
// serving meanwhile.
func TestNATSReadiness(t *testing.T) {
	t.Parallel()
	ns := startNATS(t)
	g := startGateway(t, map[string]string{"NATS_URL": ns.URL()})
	natsState := func() string {
		_, _, body := doJSON(t, "GET", g.URL+"/ready", nil, nil)
		checks, _ := body["checks"].(map[string]any)
		s, _ := checks["nats"].(string)
		return s
	}
	waitFor(t, 10*time.Second, "nats ok", func() bool { return natsState() == "ok" })
	ns.stop()
	waitFor(t, 10*time.Second, "nats down", func() bool { return natsState() == "down" })
	if status, _, _ := doJSON(t, "GET", g.URL+"/ready", nil, nil); status != 200 {
		t.Errorf("a NATS outage must not make the replica unready: %d", status)
	}
	ns.start()
	waitFor(t, 15*time.Second, "nats ok again", func() bool { return natsState() == "ok" })
}

// TestNATSAbsentAtStart: start-up never waits for NATS.
func TestNATSAbsentAtStart(t *testing.T) {
	t.Parallel()
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	g := startGateway(t, map[string]string{"NATS_URL": fmt.Sprintf("nats://127.0.0.1:%d", port)})
	_, _, body := doJSON(t, "GET", g.URL+"/ready", nil, nil)
	if checks, _ := body["checks"].(map[string]any); checks["nats"] != "down" {
		t.Errorf("/ready with NATS absent: %v", body)
	}
}

// TestDeps fails when a module other than the allowed ones reaches the
// binary (SPEC §1): nats-server in particular must stay test-only.
func TestDeps(t *testing.T) {
	t.Parallel()
	out, err := exec.Command("go", "list", "-deps", "-f", "{{with .Module}}{{.Path}}{{end}}", ".").Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("go list: %v\n%s", err, ee.Stderr)
		}
		t.Fatal(err)
	}
	allowed := map[string]bool{
		"gateway":                      true,
		"github.com/nats-io/nats.go":   true,
		"github.com/golang-jwt/jwt/v5": true,
		// nats.go's own small dependencies.
		"github.com/nats-io/nkeys":      true,
		"github.com/nats-io/nuid":       true,
		"github.com/klauspost/compress": true,
		"golang.org/x/crypto":           true,
		"golang.org/x/sys":              true,
	}
	for _, m := range strings.Fields(string(out)) {
		if !allowed[m] {
			t.Errorf("module %s reaches the binary", m)
		}
	}
}
