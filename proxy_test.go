package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// seen is what the fake NoETL received on a proxied request.
type seen struct {
	Method  string
	Path    string // decoded
	RawPath string // as sent on the wire
	Query   string
	Header  http.Header
	BodyLen int
	BodySum [32]byte
	BodyErr error
}

// upstreamLog records proxied requests that reached the fake NoETL.
type upstreamLog struct {
	mu   sync.Mutex
	reqs []seen
}

func (u *upstreamLog) add(s seen) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.reqs = append(u.reqs, s)
}

func (u *upstreamLog) all() []seen {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seen(nil), u.reqs...)
}

func (u *upstreamLog) last(t *testing.T) seen {
	t.Helper()
	all := u.all()
	if len(all) == 0 {
		t.Fatal("no request reached the upstream")
	}
	return all[len(all)-1]
}

var testUser = User{UserID: 42, Email: "ada@example.com", DisplayName: "Ada", Roles: []string{"admin", "dev"}}

const testToken = "tok0123456789abcdef0123456789abcd"

// startProxyEnv starts a fake NoETL whose every unclaimed /api/ path echoes
// the request it got, one valid session (testToken), and a gateway in front.
func startProxyEnv(t *testing.T, env map[string]string) (*fakeNoETL, *gateway, *upstreamLog) {
	t.Helper()
	noetl := startNoETL(t)
	noetl.addSession(testToken, testUser, time.Now().Add(time.Hour))
	log := &upstreamLog{}
	noetl.Handle("/api/", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		s := seen{Method: r.Method, Path: r.URL.Path, RawPath: r.URL.EscapedPath(), Query: r.URL.RawQuery,
			Header: r.Header.Clone(), BodyLen: int(n), BodyErr: err}
		copy(s.BodySum[:], h.Sum(nil))
		log.add(s)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "private, max-age=5")
		w.Header().Set("Set-Cookie", "upstream=1; Path=/")
		w.Header().Set("X-Upstream", "yes")
		fmt.Fprintf(w, `{"path":%q,"len":%d}`, r.URL.Path, n)
	})
	e := map[string]string{"NOETL_BASE_URL": noetl.URL, "AUTH_MODE": "sync"}
	for k, v := range env {
		e[k] = v
	}
	return noetl, startGateway(t, e), log
}

func authHeaders() map[string]string {
	return map[string]string{"Authorization": "Bearer " + testToken}
}

func TestProxyForwardsWithIdentity(t *testing.T) {
	t.Parallel()
	_, g, up := startProxyEnv(t, nil)
	req, _ := http.NewRequest("GET", g.URL+"/noetl/executions?limit=10&b=%2F&c=x+y&d=%zz", nil)
	req.Header.Set("Authorization", "Bearer "+testToken)
	req.Header.Set("Accept", "application/json")
	req.Header.Set("X-Custom", "kept")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"/api/executions"`) {
		t.Fatalf("status %d body %s", resp.StatusCode, body)
	}
	s := up.last(t)
	if s.Path != "/api/executions" || s.Query != "limit=10&b=%2F&c=x+y&d=%zz" {
		t.Errorf("upstream got path %q query %q", s.Path, s.Query)
	}
	want := map[string]string{
		"X-User-Id": "42", "X-User-Email": "ada@example.com", "X-User-Roles": "admin,dev",
		"X-Session-Token": testToken, "X-Custom": "kept", "Accept": "application/json",
		"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http", "X-Forwarded-Host": strings.TrimPrefix(g.URL, "http://"),
		"X-Request-Id": resp.Header.Get("X-Request-Id"),
	}
	for k, v := range want {
		if got := s.Header.Values(k); len(got) != 1 || got[0] != v {
			t.Errorf("upstream header %s = %q, want %q", k, got, v)
		}
	}
	for _, k := range []string{"Authorization", "Cookie"} {
		if s.Header.Get(k) != "" {
			t.Errorf("upstream got %s", k)
		}
	}
	// Response headers pass through, the gateway's request id stays single.
	if resp.Header.Get("Cache-Control") != "private, max-age=5" || resp.Header.Get("Set-Cookie") == "" || resp.Header.Get("X-Upstream") != "yes" {
		t.Errorf("response headers not passed through: %v", resp.Header)
	}
	if len(resp.Header.Values("X-Request-Id")) != 1 {
		t.Errorf("X-Request-Id: %q", resp.Header.Values("X-Request-Id"))
	}
}

func TestProxyHeaderSpoofing(t *testing.T) {
	t.Parallel()
	_, g, up := startProxyEnv(t, nil)
	const evil = "evil-value-1"
	cases := []struct {
		name    string
		headers map[string]string
	}{
		{"X-User-Id", map[string]string{"X-User-Id": evil}},
		{"x-user-id lower", map[string]string{"x-user-id": evil}},
		{"X_User_Id", map[string]string{"X_User_Id": evil}},
		{"X.User.Id", map[string]string{"X.User.Id": evil}},
		{"x_user.email", map[string]string{"x_user.email": evil}},
		{"X-User-Roles", map[string]string{"X-User-Roles": evil}},
		{"X-User-Other", map[string]string{"X-User-Other": evil}},
		{"X-Session-Token", map[string]string{"X-Session-Token": evil}},
		{"X_SESSION_TOKEN", map[string]string{"X_SESSION_TOKEN": evil}},
		{"X-Session-Id", map[string]string{"X-Session-Id": evil}},
		{"x.session.id", map[string]string{"x.session.id": evil}},
		{"X-Gateway-Internal", map[string]string{"X-Gateway-Internal": evil}},
		{"X_Gateway_Auth", map[string]string{"X_Gateway_Auth": evil}},
		{"X-Forwarded-For", map[string]string{"X-Forwarded-For": evil}},
		{"X_Forwarded_For", map[string]string{"X_Forwarded_For": evil}},
		{"X-Forwarded-Host", map[string]string{"X-Forwarded-Host": evil}},
		{"X-Forwarded-Proto", map[string]string{"X-Forwarded-Proto": evil}},
		{"Forwarded", map[string]string{"Forwarded": "for=" + evil}},
		{"X-Real-Ip", map[string]string{"X-Real-Ip": evil}},
		{"X_Request_Id", map[string]string{"X_Request_Id": evil}},
		{"Cookie", map[string]string{"Cookie": "session_token=" + evil}},
		{"Connection strips identity", map[string]string{"Connection": "X-User-Id, X-Session-Token, X-Forwarded-For, X-Request-Id", "X-User-Id": evil}},
		{"Connection strips email", map[string]string{"Connection": "X-User-Email", "X-User-Email": evil}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := authHeaders()
			for k, v := range tc.headers {
				h[k] = v
			}
			status, respH, _ := doJSON(t, "GET", g.URL+"/noetl/echo/"+strings.ReplaceAll(tc.name, " ", "-"), nil, h)
			if status != 200 {
				t.Fatalf("status %d", status)
			}
			var s seen
			for _, r := range up.all() {
				if r.Path == "/api/echo/"+strings.ReplaceAll(tc.name, " ", "-") {
					s = r
				}
			}
			if s.Header == nil {
				t.Fatal("request did not reach the upstream")
			}
			for k, vs := range s.Header {
				for _, v := range vs {
					if strings.Contains(v, evil) {
						t.Errorf("spoofed value reached upstream in %s: %q", k, v)
					}
				}
			}
			want := map[string]string{"X-User-Id": "42", "X-User-Email": "ada@example.com", "X-User-Roles": "admin,dev",
				"X-Session-Token": testToken, "X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http",
				"X-Request-Id": respH.Get("X-Request-Id")}
			for k, v := range want {
				if got := s.Header.Values(k); len(got) != 1 || got[0] != v {
					t.Errorf("upstream %s = %q, want %q", k, got, v)
				}
			}
			if s.Header.Get("Authorization") != "" || s.Header.Get("Cookie") != "" {
				t.Error("Authorization or Cookie forwarded")
			}
		})
	}
}

func TestProxyTrustedForwardedFor(t *testing.T) {
	t.Parallel()
	_, g, up := startProxyEnv(t, map[string]string{"TRUSTED_PROXIES": "127.0.0.0/8"})
	h := authHeaders()
	h["X-Forwarded-For"] = "203.0.113.7"
	h["X-Forwarded-Proto"] = "https"
	if status, _, _ := doJSON(t, "GET", g.URL+"/noetl/echo", nil, h); status != 200 {
		t.Fatalf("status %d", status)
	}
	s := up.last(t)
	if got := s.Header.Get("X-Forwarded-For"); got != "203.0.113.7, 127.0.0.1" {
		t.Errorf("X-Forwarded-For = %q", got)
	}
	if got := s.Header.Get("X-Forwarded-Proto"); got != "https" {
		t.Errorf("X-Forwarded-Proto = %q", got)
	}
}

// rawRequest sends one HTTP/1.1 request line as given (no client-side
// cleaning or escaping) and returns the status code and body.
func rawRequest(t *testing.T, base, target string) (int, string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n", target, testToken)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("%s: %v", target, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// proxyPathAttacks are request targets the proxy refuses with 400; they
// seed FuzzCanonicalProxyPath too.
var proxyPathAttacks = []string{
	"/noetl/../health",
	"/noetl/a/../../health",
	"/noetl/%2e%2e/health",
	"/noetl/a/%2E%2E/%2e%2e/health",
	"/noetl/a/%2e/b",
	"/noetl/./a",
	"/noetl/a%2Fb",
	"/noetl/a%2f..%2fb",
	"/noetl/a%5Cb",
	"/noetl/a%5c..%5cb",
	"/noetl/a\\..\\b",
	"/noetl/a;b=c",
	"/noetl/a%3Bb",
	"/noetl/a%00b",
	"/noetl/a%01b",
	"/noetl/a%7Fb",
	"/noetl//a",
	"/noetl/a//b",
	"/noetl/a%2F%2Fb",
	"/noetl/%252e%252e/health",
	"/noetl/a/%252F",
}

func TestProxyPathAttacks(t *testing.T) {
	t.Parallel()
	_, g, up := startProxyEnv(t, nil)
	for _, target := range proxyPathAttacks {
		status, body := rawRequest(t, g.URL, target)
		if status != http.StatusBadRequest {
			t.Errorf("%s: status %d body %s", target, status, body)
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(body), &m) != nil || m["error"] == nil {
			t.Errorf("%s: body not a JSON error: %s", target, body)
		}
	}
	if n := len(up.all()); n != 0 {
		t.Fatalf("%d attack requests reached the upstream: %+v", n, up.all())
	}
	// The canonical path is what the upstream receives.
	status, body := rawRequest(t, g.URL, "/noetl/catalog/%41bc/x%20y?q=%2F..%2F")
	if status != 200 {
		t.Fatalf("clean path: status %d %s", status, body)
	}
	s := up.last(t)
	if s.Path != "/api/catalog/Abc/x y" || s.RawPath != "/api/catalog/Abc/x%20y" || s.Query != "q=%2F..%2F" {
		t.Errorf("upstream got path %q raw %q query %q", s.Path, s.RawPath, s.Query)
	}
}

func TestProxyMethods(t *testing.T) {
	t.Parallel()
	_, g, up := startProxyEnv(t, nil)
	for _, m := range []string{"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"} {
		var body io.Reader
		if m != "GET" && m != "HEAD" && m != "OPTIONS" {
			body = strings.NewReader(`{"k":"v"}`)
		}
		req, _ := http.NewRequest(m, g.URL+"/noetl/credentials/x", body)
		req.Header.Set("Authorization", "Bearer "+testToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("X-Upstream") != "yes" {
			t.Errorf("%s: status %d", m, resp.StatusCode)
			continue
		}
		s := up.last(t)
		if s.Method != m || s.Path != "/api/credentials/x" {
			t.Errorf("%s: upstream got %s %s", m, s.Method, s.Path)
		}
		if body != nil && s.BodyLen != len(`{"k":"v"}`) {
			t.Errorf("%s: upstream body %d bytes", m, s.BodyLen)
		}
	}
	req, _ := http.NewRequest("TRACE", g.URL+"/noetl/x", nil)
	req.Header.Set("Authorization", "Bearer "+testToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("TRACE: status %d", resp.StatusCode)
	}
}

func TestProxyRequiresSession(t *testing.T) {
	t.Parallel()
	_, g, up := startProxyEnv(t, nil)
	for _, h := range []map[string]string{nil, {"Authorization": "Bearer nottoken0000000000000000000000"}, {"X-User-Id": "42"}} {
		status, _, body := doJSON(t, "GET", g.URL+"/noetl/executions", nil, h)
		if status != http.StatusUnauthorized || body["error"] == nil {
			t.Errorf("headers %v: status %d body %v", h, status, body)
		}
	}
	if len(up.all()) != 0 {
		t.Fatal("unauthenticated request reached the upstream")
	}
}

// chunked hides the length of a reader so the client streams it chunked.
type chunked struct{ io.Reader }

func TestProxyStreamedUpload(t *testing.T) {
	t.Parallel()
	_, g, up := startProxyEnv(t, map[string]string{"MAX_BODY_BYTES": "1048576"})
	send := func(n int) (*http.Response, [32]byte) {
		data := bytes.Repeat([]byte("0123456789abcdef"), n/16)
		req, _ := http.NewRequest("POST", g.URL+"/noetl/catalog/register", chunked{bytes.NewReader(data)})
		req.Header.Set("Authorization", "Bearer "+testToken)
		req.Header.Set("Content-Type", "application/octet-stream")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp, sha256.Sum256(data)
	}
	resp, sum := send(1000 * 1024)
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("within limit: status %d", resp.StatusCode)
	}
	if s := up.last(t); s.BodyLen != 1000*1024 || s.BodySum != sum {
		t.Fatalf("upstream got %d bytes (sum match %v)", s.BodyLen, s.BodySum == sum)
	}

	resp, _ = send(2 << 20)
	var m map[string]any
	json.NewDecoder(resp.Body).Decode(&m)
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge || m["error"] != "request body too large" {
		t.Fatalf("beyond limit: status %d body %v", resp.StatusCode, m)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("413 content type %q", ct)
	}
}

// TestProxyUploadStreams proves the body is not buffered: the upstream must
// see the first part of an upload while the client still holds the rest.
func TestProxyUploadStreams(t *testing.T) {
	t.Parallel()
	noetl, g, _ := startProxyEnv(t, nil)
	const first = 64 << 10
	gotFirst := make(chan struct{})
	done := make(chan int, 1)
	noetl.Handle("PUT /api/upload", func(w http.ResponseWriter, r *http.Request) {
		buf := make([]byte, first)
		n, _ := io.ReadFull(r.Body, buf)
		if n == first {
			close(gotFirst)
		}
		rest, _ := io.Copy(io.Discard, r.Body)
		done <- n + int(rest)
	})
	pr, pw := io.Pipe()
	go func() {
		pw.Write(make([]byte, first))
		select {
		case <-gotFirst:
			pw.Write(make([]byte, 1000))
			pw.Close()
		case <-time.After(10 * time.Second):
			pw.CloseWithError(fmt.Errorf("upstream never saw the first part"))
		}
	}()
	req, _ := http.NewRequest("PUT", g.URL+"/noetl/upload", pr)
	req.Header.Set("Authorization", "Bearer "+testToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if n := <-done; n != first+1000 {
		t.Fatalf("upstream got %d bytes", n)
	}
}

func TestProxyRedirectPassedThrough(t *testing.T) {
	t.Parallel()
	noetl, g, _ := startProxyEnv(t, nil)
	noetl.Handle("GET /api/moved", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/api/elsewhere", http.StatusFound)
	})
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	req, _ := http.NewRequest("GET", g.URL+"/noetl/moved", nil)
	req.Header.Set("Authorization", "Bearer "+testToken)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound || resp.Header.Get("Location") != "/api/elsewhere" {
		t.Fatalf("status %d location %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if noetl.Calls("GET /api/elsewhere") != 0 {
		t.Fatal("the gateway followed the redirect")
	}
}

func TestProxySlowUpstreamTimesOut(t *testing.T) {
	t.Parallel()
	noetl, g, _ := startProxyEnv(t, map[string]string{"NOETL_TIMEOUT_SECS": "1"})
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	noetl.Handle("GET /api/slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	start := time.Now()
	status, _, body := doJSON(t, "GET", g.URL+"/noetl/slow", nil, authHeaders())
	if status != http.StatusGatewayTimeout || body["error"] != "upstream timeout" {
		t.Fatalf("status %d body %v", status, body)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("took %v", d)
	}
}

func TestProxyDeadUpstream(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String()
	ln.Close()
	// Bypass mode: the session needs no NoETL, so the only upstream call
	// is the proxied one.
	g := startGateway(t, map[string]string{"NOETL_BASE_URL": dead, "GATEWAY_AUTH_BYPASS": "true"})
	status, _, body := doJSON(t, "GET", g.URL+"/noetl/executions", nil, nil)
	if status != http.StatusBadGateway || body["error"] != "upstream unavailable" {
		t.Fatalf("status %d body %v", status, body)
	}
	if strings.Contains(fmt.Sprint(body), "connect") {
		t.Fatalf("internal error text leaked: %v", body)
	}
}

func TestProxySSEPassthrough(t *testing.T) {
	t.Parallel()
	noetl, g, _ := startProxyEnv(t, nil)
	release := make(chan struct{})
	noetl.Handle("GET /api/stream", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "event: one\ndata: first\n\n")
		http.NewResponseController(w).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "event: two\ndata: second\n\n")
	})
	req, _ := http.NewRequest("GET", g.URL+"/noetl/stream", nil)
	req.Header.Set("Authorization", "Bearer "+testToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("content type %q", ct)
	}
	br := bufio.NewReader(resp.Body)
	readEvent := func() string {
		var lines []string
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				t.Fatalf("reading stream: %v", err)
			}
			if line == "\n" {
				return strings.Join(lines, "")
			}
			lines = append(lines, line)
		}
	}
	// The upstream is still blocked: the first event must arrive anyway.
	if ev := readEvent(); ev != "event: one\ndata: first\n" {
		t.Fatalf("first event %q", ev)
	}
	close(release)
	if ev := readEvent(); ev != "event: two\ndata: second\n" {
		t.Fatalf("second event %q", ev)
	}
}

func TestProxyExecuteAuthorization(t *testing.T) {
	t.Parallel()
	noetl, g, up := startProxyEnv(t, nil)
	var mu sync.Mutex
	var checked []map[string]string
	noetl.Handle("POST /api/auth/check-playbook-access", func(w http.ResponseWriter, r *http.Request) {
		var in map[string]string
		json.NewDecoder(r.Body).Decode(&in)
		mu.Lock()
		checked = append(checked, in)
		mu.Unlock()
		if in["playbook_path"] == "broken/playbook" {
			http.Error(w, "database down", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"allowed":%v,"user":null,"message":""}`, in["playbook_path"] == "ok/playbook")
	})
	post := func(body string) (int, map[string]any) {
		status, _, m := doJSON(t, "POST", g.URL+"/noetl/execute", body, authHeaders())
		return status, m
	}
	if status, m := post(`{"path":"secret/playbook","payload":{}}`); status != http.StatusForbidden || m["error"] != "permission denied" {
		t.Fatalf("denied: status %d body %v", status, m)
	}
	if status, m := post(`{"path":"broken/playbook"}`); status != http.StatusBadGateway || m["error"] != "access check unavailable" {
		t.Fatalf("failed check: status %d body %v", status, m)
	}
	if status, m := post(`{"path":"ok/playbook","PATH":"secret/playbook"}`); status != 200 {
		t.Fatalf("allowed: status %d body %v", status, m)
	}
	body := `{"path":"ok/playbook","payload":{"x":1}}`
	if status, _ := post(body); status != 200 {
		t.Fatalf("allowed: status %d", status)
	}
	if s := up.last(t); s.BodyLen != len(body) || s.BodySum != sha256.Sum256([]byte(body)) || s.Path != "/api/execute" {
		t.Fatalf("upstream got %d bytes at %s", s.BodyLen, s.Path)
	}
	for _, bad := range []string{`{"payload":{}}`, `{"path":""}`, `{"path":7}`, `not json`, `{"path":"ok/playbook","catalog_id":"123"}`} {
		if status, _ := post(bad); status != http.StatusBadRequest {
			t.Errorf("%s: status %d", bad, status)
		}
	}
	if n := noetl.Calls("POST /api/execute"); n != 2 {
		t.Fatalf("upstream execute calls %d, want 2", n)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(checked) == 0 || checked[0]["session_token"] != testToken || checked[0]["action"] != "execute" {
		t.Fatalf("access checks %v", checked)
	}
}

func TestProxyExecuteNotEnforced(t *testing.T) {
	t.Parallel()
	noetl, g, _ := startProxyEnv(t, map[string]string{"AUTHZ_ENFORCE": "false"})
	if status, _, _ := doJSON(t, "POST", g.URL+"/noetl/execute", `{"path":"any"}`, authHeaders()); status != 200 {
		t.Fatalf("status %d", status)
	}
	if noetl.Calls("POST /api/auth/check-playbook-access") != 0 {
		t.Fatal("access checked although AUTHZ_ENFORCE=false")
	}
}

func FuzzCanonicalProxyPath(f *testing.F) {
	for _, s := range append([]string{"/noetl/a/b", "/noetl/%2e%2e/x", "/noetl/a%2Fb", "/noetl/a;b", "/noetl/a%00", "/noetl/%252e",
		"/noetl/catalog/%41bc/x%20y", "/noetl/%65xecute", "/noetl/EXECUTE/"}, proxyPathAttacks...) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, escaped string) {
		p, ok := canonicalProxyPath(escaped)
		if !ok {
			return
		}
		for _, seg := range strings.Split(p, "/") {
			if seg == "." || seg == ".." {
				t.Fatalf("%q gave dot segment in %q", escaped, p)
			}
		}
		if strings.ContainsAny(p, "\\;%\x00") || strings.Contains(p, "//") {
			t.Fatalf("%q gave %q", escaped, p)
		}
	})
}

// BenchmarkProxyGET measures a full round trip through the gateway: session
// from the cache, header rewrite, upstream call, streamed response.
func BenchmarkProxyGET(b *testing.B) {
	noetl := startNoETL(b)
	noetl.addSession(testToken, testUser, time.Now().Add(time.Hour))
	noetl.Handle("GET /api/ping", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"ok":true}`)
	})
	g := startGateway(b, map[string]string{"NOETL_BASE_URL": noetl.URL, "AUTH_MODE": "sync"})
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			req, _ := http.NewRequest("GET", g.URL+"/noetl/ping?x=1", nil)
			req.Header.Set("Authorization", "Bearer "+testToken)
			resp, err := client.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
}
