package main

import (
	"bufio"
	"context"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// The world of the security regression suite (security_test.go): one NATS
// server that requires a password, an OIDC identity provider, a NoETL server
// that records everything it is asked, a canary host that no request may
// ever reach, two gateway replicas sharing NATS, and one in-process handler
// chain driven through httptest.NewRecorder for peers a real socket cannot
// fake. Every secret the suite uses is registered, so that at the end the
// logs of every gateway can be searched for it.

// secExecCall is one request NoETL would serve as its execute endpoint.
type secExecCall struct {
	Path, Playbook, Token string
}

type secEnv struct {
	idp        *testIdP
	noetl      *fakeNoETL
	canary     *httptest.Server
	canaryHits atomic.Int64
	a          *gateway   // CALLBACK_TOKEN, internal routes on the public listener
	b          *gateway   // TRUSTED_PROXIES, CORS "*" with credentials asked for, GATEWAY_INTERNAL_ADDR
	chain      *inProcess // no CALLBACK_TOKEN, no internal listener: loopback-only internal routes
	logs       []*syncBuffer
	cbToken    string

	mu       sync.Mutex
	secrets  map[string]string // value → what it is
	proxied  []seen
	executes []secExecCall
	checks   map[accessKey]int
	logins   []map[string]any
}

func secRandHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// secret registers v as something no log may contain.
func (e *secEnv) secret(kind, v string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.secrets[v] = kind
	return v
}

// session makes a fresh valid session for u and returns its token. NoETL
// denies every access check of a token whose prefix contains "deny".
func (e *secEnv) session(u User, prefix ...string) string {
	tok := e.secret("session token", strings.Join(prefix, "")+"st"+secRandHex(20))
	e.noetl.addSession(tok, u, time.Now().Add(time.Hour))
	return tok
}

// proxiedFor returns the requests that reached NoETL's API for a session.
func (e *secEnv) proxiedFor(token string) []seen {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []seen
	for _, s := range e.proxied {
		if s.Header.Get("X-Session-Token") == token {
			out = append(out, s)
		}
	}
	return out
}

func (e *secEnv) executesOf(playbook string) []secExecCall {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []secExecCall
	for _, x := range e.executes {
		if x.Playbook == playbook {
			out = append(out, x)
		}
	}
	return out
}

func (e *secEnv) checkCount(token, path, action string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.checks[accessKey{token, path, action}]
}

// loginSent reports whether NoETL was asked to log in with idToken.
func (e *secEnv) loginSent(idToken string) bool { return e.loginPayload(idToken) != nil }

// loginPayload is what NoETL was sent to log idToken in (nil if never).
func (e *secEnv) loginPayload(idToken string) map[string]any {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, l := range e.logins {
		if l["auth0_token"] == idToken {
			return l
		}
	}
	return nil
}

// secUser is the identity of the suite's sessions.
var secUser = User{UserID: 1001, Email: "mallory@example.com", DisplayName: "Mallory", Roles: []string{"user"}}

// secAccessAllowed is NoETL's access policy in the suite: playbooks under ok/
// may be executed and viewed, never modified; everything else is denied, and
// so is everything for a denied session.
func secAccessAllowed(path, action string, denied bool) bool {
	return !denied && strings.HasPrefix(path, "ok/") && action != "modify"
}

func startSecEnv(t *testing.T) *secEnv {
	t.Helper()
	e := &secEnv{secrets: map[string]string{}, checks: map[accessKey]int{}}
	e.canary = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.canaryHits.Add(1)
		w.WriteHeader(http.StatusTeapot)
	}))
	t.Cleanup(e.canary.Close)
	e.idp = startIdP(t, keyA(), secECKey())
	e.noetl = startNoETL(t)
	e.noetlHandlers()

	natsPassword := e.secret("NATS password", "np"+secRandHex(16))
	ns := &natsServer{t: t, opts: &server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(),
		NoLog: true, NoSigs: true, Username: "gateway", Password: natsPassword}}
	ns.start()
	ns.opts.Port = ns.srv.Addr().(*net.TCPAddr).Port
	t.Cleanup(ns.stop)

	e.cbToken = e.secret("CALLBACK_TOKEN", "cb"+secRandHex(16))
	common := map[string]string{
		"OIDC_ISSUER": e.idp.issuer(), "AUTH0_CLIENT_ID": "client-1", "NOETL_BASE_URL": e.noetl.URL, "AUTH_MODE": "sync",
		"JWT_ALGORITHMS": "RS256,PS256,ES256", "JWKS_MIN_REFRESH_SECS": "3600", "MAX_BODY_BYTES": fmt.Sprint(secBodyLimit),
		"LOG_LEVEL": "debug", "CORS_ALLOWED_ORIGINS": "http://app.example", "NOETL_TIMEOUT_SECS": "10",
	}
	env := func(more map[string]string) map[string]string {
		m := map[string]string{}
		for k, v := range common {
			m[k] = v
		}
		for k, v := range more {
			m[k] = v
		}
		return m
	}
	e.a = startGateway(t, env(map[string]string{
		"NATS_URL":       fmt.Sprintf("nats://gateway:%s@127.0.0.1:%d", natsPassword, ns.opts.Port),
		"CALLBACK_TOKEN": e.cbToken,
	}))
	e.b = startGateway(t, env(map[string]string{
		"NATS_URL": ns.URL(), "NATS_USERNAME": "gateway", "NATS_PASSWORD": natsPassword,
		"TRUSTED_PROXIES": "127.0.0.0/8,10.0.0.0/8", "CORS_ALLOWED_ORIGINS": "*", "CORS_ALLOW_CREDENTIALS": "true",
		"GATEWAY_INTERNAL_ADDR": "127.0.0.1:0",
	}))
	e.chain = startInProcess(t, map[string]string{"NOETL_BASE_URL": e.noetl.URL, "AUTH_MODE": "sync", "LOG_LEVEL": "debug"}, nil, nil)
	e.logs = []*syncBuffer{e.a.Logs, e.b.Logs, e.chain.Logs}
	return e
}

const secBodyLimit = 64 << 10

var secECKey = sync.OnceValue(func() testKey { return newECKey("e1", elliptic.P256(), "ES256") })

// noetlHandlers plays NoETL: the sync auth endpoints and a catch-all for
// /api/ that records every request and serves any POST whose path is
// execute in any spelling as the execute endpoint.
func (e *secEnv) noetlHandlers() {
	f := e.noetl
	f.Handle("POST /api/auth/login", func(w http.ResponseWriter, r *http.Request) {
		var in map[string]any
		json.NewDecoder(r.Body).Decode(&in)
		e.mu.Lock()
		e.logins = append(e.logins, in)
		e.mu.Unlock()
		tok := e.session(secUser)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"status": "authenticated", "session_token": tok,
			"user":       map[string]any{"user_id": secUser.UserID, "email": secUser.Email, "display_name": secUser.DisplayName, "roles": secUser.Roles},
			"expires_at": time.Now().Add(time.Hour).UTC().Format(time.RFC3339)})
	})
	f.Handle("POST /api/auth/check-playbook-access", func(w http.ResponseWriter, r *http.Request) {
		var in map[string]string
		json.NewDecoder(r.Body).Decode(&in)
		e.mu.Lock()
		e.checks[accessKey{in["session_token"], in["playbook_path"], in["action"]}]++
		e.mu.Unlock()
		denied := strings.Contains(in["session_token"], "deny")
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"allowed":%v,"user":null,"message":""}`, secAccessAllowed(in["playbook_path"], in["action"], denied))
	})
	f.Handle("/api/", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		s := seen{Method: r.Method, Path: r.URL.Path, RawPath: r.URL.EscapedPath(), Query: r.URL.RawQuery, Header: r.Header.Clone(), BodyLen: len(body)}
		s.Header.Set("Host", r.Host)
		e.mu.Lock()
		e.proxied = append(e.proxied, s)
		e.mu.Unlock()
		if r.URL.Path == "/api/drop" {
			// The connection dies without an answer.
			if c, _, err := http.NewResponseController(w).Hijack(); err == nil {
				c.Close()
			}
			return
		}
		// NoETL's own (wrong) CORS answer: the gateway must not pass it on.
		w.Header().Set("Access-Control-Allow-Origin", "*")
		w.Header().Set("Access-Control-Allow-Credentials", "true")
		w.Header().Set("Content-Type", "application/json")
		if r.Method == http.MethodPost && strings.EqualFold(strings.TrimSuffix(r.URL.Path, "/"), "/api/execute") {
			var in struct {
				Path string `json:"path"`
			}
			json.Unmarshal(body, &in)
			e.mu.Lock()
			e.executes = append(e.executes, secExecCall{Path: r.URL.Path, Playbook: in.Path, Token: r.Header.Get("X-Session-Token")})
			e.mu.Unlock()
			io.WriteString(w, `{"execution_id":"7100000000000000001","status":"started","commands_generated":1}`)
			return
		}
		fmt.Fprintf(w, `{"path":%q}`, r.URL.Path)
	})
}

// secRawHTTP writes one request exactly as given (no client-side cleaning,
// canonicalisation or escaping) and reads the response.
func secRawHTTP(t *testing.T, base, request string) (int, http.Header, []byte) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("%q: %v", request[:min(len(request), 80)], err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b
}

// secDo sends a request with headers given as (name, value) pairs, names
// written exactly as given and repeated names sent as separate lines.
func secDo(t *testing.T, method, url string, body io.Reader, pairs ...string) (*http.Response, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(pairs); i += 2 {
		req.Header[pairs[i]] = append(req.Header[pairs[i]], pairs[i+1])
	}
	if body != nil && req.Header.Get("Content-Type") == "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var m map[string]any
	json.Unmarshal(raw, &m)
	return resp, m
}

// secRawStream records the bytes of an SSE response exactly as they arrive.
type secRawStream struct {
	buf    syncBuffer
	cancel context.CancelFunc
	done   chan struct{}
}

func secOpenRawSSE(t *testing.T, url, token string) *secRawStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		cancel()
		t.Fatalf("GET %s: %d", url, resp.StatusCode)
	}
	s := &secRawStream{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		io.Copy(&s.buf, resp.Body)
		resp.Body.Close()
	}()
	t.Cleanup(func() {
		cancel()
		<-s.done
	})
	return s
}
