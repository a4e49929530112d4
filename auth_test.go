package main

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Keys are slow to generate under -race; every test shares these.
var (
	rsaKeyA = sync.OnceValue(func() *rsa.PrivateKey { return mustRSA(2048) })
	rsaKeyB = sync.OnceValue(func() *rsa.PrivateKey { return mustRSA(2048) })
	rsaWeak = sync.OnceValue(func() *rsa.PrivateKey { return mustRSA(1024) })
)

func mustRSA(bits int) *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		panic(err)
	}
	return k
}

// testKey is a signing key of the test identity provider.
type testKey struct {
	kid, alg string
	priv     crypto.Signer
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// jwk renders the public half as the provider publishes it.
func (k testKey) jwk() map[string]any {
	m := map[string]any{"use": "sig"}
	if k.kid != "" {
		m["kid"] = k.kid
	}
	if k.alg != "" {
		m["alg"] = k.alg
	}
	switch p := k.priv.Public().(type) {
	case *rsa.PublicKey:
		m["kty"], m["n"], m["e"] = "RSA", b64(p.N.Bytes()), b64(big.NewInt(int64(p.E)).Bytes())
	case *ecdsa.PublicKey:
		size := (p.Curve.Params().BitSize + 7) / 8
		raw, _ := p.Bytes()
		m["kty"], m["crv"], m["x"], m["y"] = "EC", p.Curve.Params().Name, b64(raw[1:1+size]), b64(raw[1+size:])
	case ed25519.PublicKey:
		m["kty"], m["crv"], m["x"] = "OKP", "Ed25519", b64(p)
	}
	return m
}

func newECKey(kid string, c elliptic.Curve, alg string) testKey {
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		panic(err)
	}
	return testKey{kid: kid, alg: alg, priv: k}
}

func newEdKey(kid string) testKey {
	_, k, _ := ed25519.GenerateKey(rand.Reader)
	return testKey{kid: kid, alg: "EdDSA", priv: k}
}

// testIdP is an OIDC identity provider: discovery document and JWKS over
// HTTP, keys generated in the test.
type testIdP struct {
	*httptest.Server
	jwksHits atomic.Int64
	fail     atomic.Bool // JWKS answers 500

	mu   sync.Mutex
	keys []testKey
}

func startIdP(t testing.TB, keys ...testKey) *testIdP {
	t.Helper()
	p := &testIdP{keys: keys}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"issuer": p.issuer(), "jwks_uri": p.URL + "/jwks"})
	})
	mux.HandleFunc("GET /jwks", func(w http.ResponseWriter, r *http.Request) {
		p.jwksHits.Add(1)
		if p.fail.Load() {
			http.Error(w, "down", http.StatusInternalServerError)
			return
		}
		p.mu.Lock()
		var ks []any
		for _, k := range p.keys {
			ks = append(ks, k.jwk())
		}
		p.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"keys": ks})
	})
	p.Server = httptest.NewServer(mux)
	t.Cleanup(p.Close)
	return p
}

func (p *testIdP) issuer() string { return p.URL + "/" }

func (p *testIdP) publish(keys ...testKey) {
	p.mu.Lock()
	p.keys = keys
	p.mu.Unlock()
}

// claims are valid ID token claims for this provider; set overrides them
// (a nil value deletes the claim).
func (p *testIdP) claims(set map[string]any) jwt.MapClaims {
	now := time.Now()
	c := jwt.MapClaims{"iss": p.issuer(), "aud": "client-1", "sub": "auth0|42", "email": "ada@example.com",
		"name": "Ada", "email_verified": true, "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}
	for k, v := range set {
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
	}
	return c
}

func sign(t testing.TB, k testKey, c jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(jwt.GetSigningMethod(k.alg), c)
	if k.kid != "" {
		tok.Header["kid"] = k.kid
	}
	s, err := tok.SignedString(k.priv)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func keyA() testKey { return testKey{kid: "k1", alg: "RS256", priv: rsaKeyA()} }
func keyB() testKey { return testKey{kid: "k2", alg: "RS256", priv: rsaKeyB()} }

// worker plays NoETL's execute endpoint and its workers: POST /api/execute
// answers an execution_id, then, like a worker, the playbook's result is
// POSTed to the gateway's callback route (or published on NATS) unless the
// test's result function says not to.
type worker struct {
	f      *fakeNoETL
	target atomic.Value // string: gateway URL the callbacks go to
	token  string       // CALLBACK_TOKEN to send
	seq    atomic.Int64

	mu        sync.Mutex
	payloads  map[string][]map[string]any // playbook path → payloads
	cancelled []string
	results   map[string]func(payload map[string]any) (status string, data any, deliver bool)
	publish   func(subject string, body []byte) // set: deliver over NATS instead of HTTP
}

func startWorker(t testing.TB, f *fakeNoETL) *worker {
	w := &worker{f: f, payloads: map[string][]map[string]any{}, results: map[string]func(map[string]any) (string, any, bool){}}
	f.Handle("POST /api/execute", func(rw http.ResponseWriter, r *http.Request) {
		var in struct {
			Path    string         `json:"path"`
			Payload map[string]any `json:"payload"`
		}
		if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
			http.Error(rw, `{"detail":"bad request"}`, http.StatusUnprocessableEntity)
			return
		}
		w.mu.Lock()
		w.payloads[in.Path] = append(w.payloads[in.Path], in.Payload)
		fn := w.results[in.Path]
		pub := w.publish
		w.mu.Unlock()
		if fn == nil {
			http.Error(rw, `{"detail":"Playbook not found"}`, http.StatusNotFound)
			return
		}
		id := fmt.Sprint(7000000000 + w.seq.Add(1))
		rw.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(rw, `{"execution_id":"%s","status":"started","commands_generated":3}`, id)
		status, data, deliver := fn(in.Payload)
		if !deliver {
			return
		}
		body, _ := json.Marshal(map[string]any{"request_id": in.Payload["request_id"], "execution_id": id, "step": "callback", "status": status, "data": data})
		go func() {
			if pub != nil {
				pub(in.Payload["callback_subject"].(string), body)
				return
			}
			req, _ := http.NewRequest(http.MethodPost, w.target.Load().(string)+"/api/internal/callback", bytes.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			if w.token != "" {
				req.Header.Set("X-Callback-Token", w.token)
			}
			if resp, err := http.DefaultClient.Do(req); err == nil {
				resp.Body.Close()
			}
		}()
	})
	f.Handle("POST /api/executions/{id}/cancel", func(rw http.ResponseWriter, r *http.Request) {
		w.mu.Lock()
		w.cancelled = append(w.cancelled, r.PathValue("id"))
		w.mu.Unlock()
		io.WriteString(rw, `{"status":"cancelled"}`)
	})
	return w
}

func (w *worker) on(path string, fn func(map[string]any) (string, any, bool)) {
	w.mu.Lock()
	w.results[path] = fn
	w.mu.Unlock()
}

func (w *worker) lastPayload(path string) map[string]any {
	w.mu.Lock()
	defer w.mu.Unlock()
	ps := w.payloads[path]
	if len(ps) == 0 {
		return nil
	}
	return ps[len(ps)-1]
}

func (w *worker) cancels() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.cancelled)
}

// totalCalls counts every request NoETL received.
func (f *fakeNoETL) totalCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		n += c
	}
	return n
}

const loginPath = "api_integration/auth0/auth0_login"

// loginOK is the auth0_login playbook's success callback, roles as given.
func loginOK(token string, roles any) func(map[string]any) (string, any, bool) {
	return func(map[string]any) (string, any, bool) {
		return "success", map[string]any{"status": "authenticated", "session_token": token,
			"user":       map[string]any{"user_id": "42", "email": "ada@example.com", "display_name": "", "roles": roles},
			"expires_at": "2099-01-28 22:11:41.335589+00"}, true
	}
}

// authEnv is the environment of a gateway wired to the test IdP and NoETL.
func authEnv(p *testIdP, f *fakeNoETL, more map[string]string) map[string]string {
	e := map[string]string{"OIDC_ISSUER": p.issuer(), "AUTH0_CLIENT_ID": "client-1", "NOETL_BASE_URL": f.URL,
		"AUTH_PLAYBOOK_TIMEOUT_SECS": "5", "LOG_LEVEL": "debug"}
	for k, v := range more {
		e[k] = v
	}
	return e
}

func login(t testing.TB, g *gateway, idToken string) (int, map[string]any) {
	t.Helper()
	st, _, body := doJSON(t, "POST", g.URL+"/api/auth/login", map[string]any{"auth0_token": idToken, "auth0_domain": "evil.example.com"}, map[string]string{"User-Agent": "test-agent/1"})
	return st, body
}

// forgedToken is an ID token login must refuse, with the reason it gives.
type forgedToken struct {
	name, token, reason string
}

// forgedTokenCases are TestLoginRefusesForgedTokens' table for the provider
// p (keys k1, weak and e1; audience client-1), and seeds of FuzzVerify.
// good is the genuine token they are forged from.
func forgedTokenCases(t testing.TB, p *testIdP) (string, []forgedToken) {
	good := sign(t, keyA(), p.claims(nil))
	parts := strings.Split(good, ".")
	pubDER, _ := x509.MarshalPKIXPublicKey(rsaKeyA().Public())
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	hs := jwt.NewWithClaims(jwt.SigningMethodHS256, p.claims(nil))
	hs.Header["kid"] = "k1"
	hsToken, _ := hs.SignedString(pubPEM)
	header := func(h string) string { return b64([]byte(h)) }
	payload := func(c jwt.MapClaims) string { raw, _ := json.Marshal(c); return b64(raw) }
	tamperedClaims := p.claims(map[string]any{"sub": "auth0|admin"})
	sig, _ := base64.RawURLEncoding.DecodeString(parts[2])
	sig[10] ^= 0xff
	now := time.Now()

	return good, []forgedToken{
		{"alg none", header(`{"alg":"none","kid":"k1"}`) + "." + parts[1] + ".", "algorithm not allowed"},
		{"HS256 with the RSA public key", hsToken, "algorithm not allowed"},
		{"alg swapped to ES256", header(`{"alg":"ES256","kid":"k1","typ":"JWT"}`) + "." + parts[1] + "." + parts[2], "algorithm does not match the key"},
		{"alg swapped to RS384", header(`{"alg":"RS384","kid":"k1","typ":"JWT"}`) + "." + parts[1] + "." + parts[2], "algorithm not allowed"},
		{"wrong iss", sign(t, keyA(), p.claims(map[string]any{"iss": "https://evil.example.com/"})), "wrong issuer"},
		{"iss without trailing slash", sign(t, keyA(), p.claims(map[string]any{"iss": p.URL})), "wrong issuer"},
		{"missing iss", sign(t, keyA(), p.claims(map[string]any{"iss": nil})), "missing required claim"},
		{"wrong aud", sign(t, keyA(), p.claims(map[string]any{"aud": []string{"other", "another"}})), "wrong audience"},
		{"missing aud", sign(t, keyA(), p.claims(map[string]any{"aud": nil})), "missing required claim"},
		{"expired beyond leeway", sign(t, keyA(), p.claims(map[string]any{"exp": now.Add(-2 * time.Minute).Unix()})), "token expired"},
		{"missing exp", sign(t, keyA(), p.claims(map[string]any{"exp": nil})), "missing required claim"},
		{"nbf in the future", sign(t, keyA(), p.claims(map[string]any{"nbf": now.Add(5 * time.Minute).Unix()})), "token not valid yet"},
		{"iat in the future", sign(t, keyA(), p.claims(map[string]any{"iat": now.Add(5 * time.Minute).Unix()})), "token issued in the future"},
		{"unknown kid", sign(t, testKey{kid: "nope", alg: "RS256", priv: rsaKeyB()}, p.claims(nil)), "unknown key"},
		{"no kid with two keys", sign(t, testKey{alg: "RS256", priv: rsaKeyA()}, p.claims(nil)), "unknown key"},
		{"1024-bit RSA key", sign(t, testKey{kid: "weak", alg: "RS256", priv: rsaWeak()}, p.claims(nil)), "unknown key"},
		{"tampered payload", parts[0] + "." + payload(tamperedClaims) + "." + parts[2], "invalid signature"},
		{"tampered signature", parts[0] + "." + parts[1] + "." + b64(sig), "invalid signature"},
		{"signed by another key under kid k1", sign(t, testKey{kid: "k1", alg: "RS256", priv: rsaKeyB()}, p.claims(nil)), "invalid signature"},
		{"malformed base64", parts[0] + ".!!!$$$." + parts[2], "malformed token"},
		{"malformed JSON", parts[0] + "." + b64([]byte(`{"iss":`)) + "." + parts[2], "malformed token"},
		{"two segments", parts[0] + "." + parts[1], "malformed token"},
		{"garbage", "not-a-jwt", "malformed token"},
		{"oversized", strings.Repeat("a", 20000) + ".b.c", "malformed token"},
	}
}

// TestLoginRefusesForgedTokens: every forged or broken ID token is refused
// with 401 before NoETL hears of it.
func TestLoginRefusesForgedTokens(t *testing.T) {
	t.Parallel()
	p := startIdP(t, keyA(), testKey{kid: "weak", alg: "RS256", priv: rsaWeak()}, newECKey("e1", elliptic.P256(), "ES256"))
	f := startNoETL(t)
	w := startWorker(t, f)
	w.on(loginPath, loginOK("0123456789abcdef0123456789abcdef", []string{"admin"}))
	g := startGateway(t, authEnv(p, f, map[string]string{"JWT_ALGORITHMS": "RS256,ES256,EdDSA", "JWKS_MIN_REFRESH_SECS": "3600"}))
	w.target.Store(g.URL)

	good, cases := forgedTokenCases(t, p)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			st, body := login(t, g, tc.token)
			if st != http.StatusUnauthorized || body["error"] != "Invalid credentials: "+tc.reason {
				t.Fatalf("got %d %v, want 401 %q", st, body, tc.reason)
			}
		})
	}
	t.Run("duplicate Authorization headers", func(t *testing.T) {
		req, _ := http.NewRequest("POST", g.URL+"/api/auth/logout", nil)
		req.Header.Add("Authorization", "Bearer 0123456789abcdef0123456789abcdef")
		req.Header.Add("Authorization", "Bearer fedcba9876543210fedcba9876543210")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("status %d, want 401", resp.StatusCode)
		}
	})
	if n := f.totalCalls(); n != 0 {
		t.Fatalf("NoETL was called %d times for forged tokens", n)
	}
	// The same gateway accepts the genuine token: the table tested the
	// checks, not a broken setup.
	if st, body := login(t, g, good); st != http.StatusOK {
		t.Fatalf("genuine token: %d %v", st, body)
	}
}

// TestLoginPlaybook covers the login playbook's happy path: the payload
// NoETL receives, the four roles forms, numeric-string user_id and the
// RFC 3339 expiry; the new session then validates from the cache.
func TestLoginPlaybook(t *testing.T) {
	t.Parallel()
	p := startIdP(t, keyA())
	f := startNoETL(t)
	w := startWorker(t, f)
	g := startGateway(t, authEnv(p, f, nil))
	w.target.Store(g.URL)

	for i, tc := range []struct {
		name  string
		roles any
		want  string
	}{
		{"array", []any{"admin", 7, "dev"}, "admin,dev"},
		{"json string", `["viewer","analyst"]`, "viewer,analyst"},
		{"postgres literal", `{admin,"dev",}`, "admin,dev"},
		{"single", "viewer", "viewer"},
		{"null", nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			token := fmt.Sprintf("%032x", i+1)
			w.on(loginPath, loginOK(token, tc.roles))
			st, body := login(t, g, sign(t, keyA(), p.claims(nil)))
			if st != http.StatusOK {
				t.Fatalf("login: %d %v", st, body)
			}
			u := body["user"].(map[string]any)
			var roles []string
			for _, r := range u["roles"].([]any) {
				roles = append(roles, r.(string))
			}
			if body["status"] != "authenticated" || body["session_token"] != token || u["user_id"] != 42.0 ||
				u["display_name"] != "ada@example.com" || strings.Join(roles, ",") != tc.want ||
				body["expires_at"] != "2099-01-28T22:11:41.335589Z" || body["message"] != "Authentication successful" {
				t.Fatalf("login response %v", body)
			}
		})
	}

	pl := w.lastPayload(loginPath)
	vc, _ := pl["verified_claims"].(map[string]any)
	if pl["client_ip"] != "127.0.0.1" || pl["client_user_agent"] != "test-agent/1" || pl["auth0_refresh_token"] != "" ||
		pl["session_duration_hours"] != 8.0 || pl["auth0_domain"] == "evil.example.com" || pl["gateway_url"] == nil ||
		vc["sub"] != "auth0|42" || vc["email"] != "ada@example.com" || vc["name"] != "Ada" || vc["email_verified"] != true {
		t.Fatalf("login payload %v", pl)
	}
	if !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`).MatchString(pl["request_id"].(string)) ||
		pl["callback_subject"] != "noetl.callbacks."+pl["request_id"].(string) {
		t.Fatalf("request_id/callback_subject %v %v", pl["request_id"], pl["callback_subject"])
	}
	if logs := g.Logs.String(); strings.Contains(logs, fmt.Sprintf("%032x", 1)) || strings.Contains(logs, pl["auth0_token"].(string)) {
		t.Fatal("a token reached the logs")
	}
	// The login cached the session: validating it needs no NoETL call.
	st, _, body := doJSON(t, "POST", g.URL+"/api/auth/validate", map[string]any{"session_token": fmt.Sprintf("%032x", 1)}, nil)
	if st != 200 || body["valid"] != true || f.Calls("POST /api/auth/session/validate") != 0 {
		t.Fatalf("validate after login: %d %v, %d NoETL calls", st, body, f.Calls("POST /api/auth/session/validate"))
	}
}

// TestLoginPlaybookErrors walks the original's error table, plus the
// timeout (504 and the execution cancelled).
func TestLoginPlaybookErrors(t *testing.T) {
	t.Parallel()
	p := startIdP(t, keyA())
	f := startNoETL(t)
	w := startWorker(t, f)
	g := startGateway(t, authEnv(p, f, map[string]string{"AUTH_PLAYBOOK_TIMEOUT_SECS": "1"}))
	w.target.Store(g.URL)
	user := map[string]any{"user_id": 42, "email": "ada@example.com", "display_name": "Ada", "roles": []string{}}
	data := func(set map[string]any) map[string]any {
		d := map[string]any{"status": "authenticated", "session_token": "0123456789abcdef0123456789abcdef", "user": user, "expires_at": "2099-01-01T00:00:00Z"}
		for k, v := range set {
			if v == nil {
				delete(d, k)
			} else {
				d[k] = v
			}
		}
		return d
	}
	cases := []struct {
		name   string
		status string
		data   any
		code   int
		msg    string
	}{
		{"error with message and error", "error", map[string]any{"message": "Token validation failed", "error": "bad sub"}, 401, "Token validation failed: bad sub"},
		{"error with message", "error", map[string]any{"message": "Failed to create session"}, 401, "Failed to create session"},
		{"error with error", "error", map[string]any{"error": "Database error"}, 401, "Database error"},
		{"error without reason", "failed", nil, 401, "Invalid credentials"},
		{"data without status", "success", data(map[string]any{"status": nil}), 500, "Login callback missing status field"},
		{"status not a string", "success", data(map[string]any{"status": 5}), 500, "Login callback missing status field"},
		{"not authenticated", "success", data(map[string]any{"status": "locked"}), 401, "Authentication status: locked"},
		{"not authenticated with message", "success", data(map[string]any{"status": "locked", "message": "Account locked"}), 401, "Account locked"},
		{"no session token", "success", data(map[string]any{"session_token": nil}), 500, "No session token returned"},
		{"unsafe session token", "success", data(map[string]any{"session_token": "a b"}), 500, "Invalid session token returned"},
		{"no user", "success", data(map[string]any{"user": nil}), 500, "No user data returned"},
		{"no email", "success", data(map[string]any{"user": map[string]any{"user_id": 1}}), 500, "Invalid email"},
		{"bad user_id", "success", data(map[string]any{"user": map[string]any{"user_id": "4x2", "email": "a@b.c"}}), 500, "Invalid user_id"},
		{"no expires_at", "success", data(map[string]any{"expires_at": nil}), 500, "Invalid expires_at"},
		{"unparsable expires_at", "success", data(map[string]any{"expires_at": "tomorrow"}), 500, "Invalid expires_at"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := "pb/" + strings.ReplaceAll(tc.name, " ", "_")
			w.on(path, func(map[string]any) (string, any, bool) { return tc.status, tc.data, true })
			g := startGateway(t, authEnv(p, f, map[string]string{"AUTH_PLAYBOOK_LOGIN": path}))
			w.target.Store(g.URL)
			st, body := login(t, g, sign(t, keyA(), p.claims(nil)))
			if st != tc.code || body["error"] != tc.msg {
				t.Fatalf("got %d %v, want %d %q", st, body, tc.code, tc.msg)
			}
		})
	}
	t.Run("playbook not found", func(t *testing.T) {
		g := startGateway(t, authEnv(p, f, map[string]string{"AUTH_PLAYBOOK_LOGIN": "no/such/playbook"}))
		st, body := login(t, g, sign(t, keyA(), p.claims(nil)))
		if st != http.StatusBadGateway || body["error"] != "Login playbook failed" {
			t.Fatalf("got %d %v", st, body)
		}
	})
	t.Run("timeout cancels the execution", func(t *testing.T) {
		w.on(loginPath, func(map[string]any) (string, any, bool) { return "", nil, false })
		w.target.Store(g.URL)
		start := time.Now()
		st, body := login(t, g, sign(t, keyA(), p.claims(nil)))
		if st != http.StatusGatewayTimeout || body["error"] != "Login playbook timed out" || time.Since(start) > 4*time.Second {
			t.Fatalf("got %d %v after %v", st, body, time.Since(start))
		}
		waitFor(t, 5*time.Second, "cancel call", func() bool { return w.cancels() == 1 })
	})
}

// TestLoginSync: AUTH_MODE=sync asks NoETL's POST /api/auth/login with the
// same payload and reads its answer like a callback's data.
func TestLoginSync(t *testing.T) {
	t.Parallel()
	p := startIdP(t, keyA())
	f := startNoETL(t)
	var mode atomic.Value
	mode.Store("ok")
	var got atomic.Value
	f.Handle("POST /api/auth/login", func(w http.ResponseWriter, r *http.Request) {
		var in map[string]any
		json.NewDecoder(r.Body).Decode(&in)
		got.Store(in)
		switch mode.Load() {
		case "denied":
			http.Error(w, `{"detail":"invalid token"}`, http.StatusUnauthorized)
		case "broken":
			http.Error(w, `{"detail":"boom"}`, http.StatusInternalServerError)
		case "error":
			io.WriteString(w, `{"status":"error","message":"Failed to create session","error":"Database error"}`)
		default:
			io.WriteString(w, `{"status":"authenticated","session_token":"abcdefabcdefabcdefabcdefabcdef12","user":{"user_id":7,"email":"ada@example.com","display_name":"Ada","roles":"{admin}"},"expires_at":"2099-01-28 22:11:41+00"}`)
		}
	})
	g := startGateway(t, authEnv(p, f, map[string]string{"AUTH_MODE": "sync"}))
	st, body := login(t, g, sign(t, keyA(), p.claims(nil)))
	if st != 200 || body["session_token"] != "abcdefabcdefabcdefabcdefabcdef12" || body["expires_at"] != "2099-01-28T22:11:41Z" {
		t.Fatalf("sync login: %d %v", st, body)
	}
	if in := got.Load().(map[string]any); in["client_ip"] != "127.0.0.1" || in["verified_claims"] == nil || in["auth0_token"] == nil {
		t.Fatalf("sync payload %v", in)
	}
	for _, tc := range []struct {
		mode string
		code int
		msg  string
	}{
		{"denied", 401, "Invalid credentials"},
		{"broken", 502, "Login failed"},
		{"error", 401, "Failed to create session: Database error"},
	} {
		mode.Store(tc.mode)
		if st, body := login(t, g, sign(t, keyA(), p.claims(nil))); st != tc.code || body["error"] != tc.msg {
			t.Fatalf("%s: %d %v", tc.mode, st, body)
		}
	}
	if f.Calls("POST /api/execute") != 0 {
		t.Fatal("sync mode ran a playbook")
	}
}

func TestLoginWithoutIdentityProvider(t *testing.T) {
	t.Parallel()
	f := startNoETL(t)
	g := startGateway(t, map[string]string{"NOETL_BASE_URL": f.URL})
	st, _, body := doJSON(t, "POST", g.URL+"/api/auth/login", map[string]any{"auth0_token": "a.b.c"}, nil)
	if st != http.StatusServiceUnavailable || body["error"] != "identity provider not configured" {
		t.Fatalf("got %d %v", st, body)
	}
	st, _, body = doJSON(t, "POST", g.URL+"/api/auth/login", "{", nil)
	if st != http.StatusServiceUnavailable {
		t.Fatalf("got %d %v", st, body)
	}
}

// TestJWKSRotationAndFlood: a new kid is accepted after one fetch; a flood
// of unknown kids costs at most one fetch per cooldown and fails fast; a
// failed refresh keeps the old keys; refresh is periodic.
func TestJWKSRotationAndFlood(t *testing.T) {
	t.Parallel()
	p := startIdP(t, keyA())
	f := startNoETL(t)
	w := startWorker(t, f)
	w.on(loginPath, loginOK("0123456789abcdef0123456789abcdef", nil))
	g := startGateway(t, authEnv(p, f, map[string]string{"JWKS_MIN_REFRESH_SECS": "3600"}))
	w.target.Store(g.URL)
	if st, body := login(t, g, sign(t, keyA(), p.claims(nil))); st != 200 {
		t.Fatalf("login: %d %v", st, body)
	}
	before := p.jwksHits.Load()

	p.publish(keyA(), keyB())
	if st, body := login(t, g, sign(t, keyB(), p.claims(nil))); st != 200 {
		t.Fatalf("rotated key: %d %v", st, body)
	}
	if n := p.jwksHits.Load() - before; n != 1 {
		t.Fatalf("rotation took %d fetches, want 1", n)
	}

	// The cooldown now runs: a flood of unknown kids fails fast, no fetch.
	before = p.jwksHits.Load()
	var wg sync.WaitGroup
	start := time.Now()
	for i := range 50 {
		wg.Go(func() {
			tok := sign(t, testKey{kid: fmt.Sprintf("flood-%d", i), alg: "RS256", priv: rsaKeyB()}, p.claims(nil))
			if st, body := login(t, g, tok); st != 401 || body["error"] != "Invalid credentials: unknown key" {
				t.Errorf("flood: %d %v", st, body)
			}
		})
	}
	wg.Wait()
	if n := p.jwksHits.Load() - before; n != 0 || time.Since(start) > 5*time.Second {
		t.Fatalf("flood caused %d fetches in %v", n, time.Since(start))
	}
	resp, err := http.Get(g.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metricsText, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`gateway_id_token_verifications_total{outcome="invalid"} 50`, `gateway_id_token_verifications_total{outcome="ok"} 2`,
		`gateway_jwks_fetches_total{outcome="ok"} 2`, `gateway_logins_total{outcome="invalid_token"} 50`} {
		if !strings.Contains(string(metricsText), want) {
			t.Errorf("metrics lack %s", want)
		}
	}

	t.Run("flood on a fresh gateway fetches once", func(t *testing.T) {
		p := startIdP(t, keyA())
		g := startGateway(t, authEnv(p, f, map[string]string{"JWKS_MIN_REFRESH_SECS": "3600"}))
		var wg sync.WaitGroup
		for i := range 100 {
			wg.Go(func() {
				tok := sign(t, testKey{kid: fmt.Sprintf("x-%d", i), alg: "RS256", priv: rsaKeyA()}, p.claims(nil))
				login(t, g, tok)
			})
		}
		wg.Wait()
		// The start-up fetch plus at most one triggered by the flood.
		if n := p.jwksHits.Load(); n > 2 {
			t.Fatalf("%d JWKS fetches, want at most 2", n)
		}
	})

	t.Run("failed refresh keeps keys, refresh is periodic", func(t *testing.T) {
		p := startIdP(t, keyA())
		g := startGateway(t, authEnv(p, f, map[string]string{"JWKS_REFRESH_SECS": "1"}))
		w.target.Store(g.URL)
		waitFor(t, 5*time.Second, "first JWKS fetch", func() bool { return p.jwksHits.Load() >= 1 })
		p.fail.Store(true)
		n := p.jwksHits.Load()
		waitFor(t, 5*time.Second, "a failed periodic refresh", func() bool { return p.jwksHits.Load() >= n+1 })
		if st, body := login(t, g, sign(t, keyA(), p.claims(nil))); st != 200 {
			t.Fatalf("after failed refresh: %d %v", st, body)
		}
	})
}

// TestInternalCallbackGuard: the callback route refuses callers without the
// CALLBACK_TOKEN, and non-loopback peers when no token is configured.
func TestInternalCallbackGuard(t *testing.T) {
	t.Parallel()
	f := startNoETL(t)
	g := startGateway(t, map[string]string{"NOETL_BASE_URL": f.URL, "CALLBACK_TOKEN": "0123456789abcdef-secret"})
	body := map[string]any{"request_id": "8f7c1b5e-0000-4000-8000-000000000000", "status": "success", "data": map[string]any{}}
	if st, _, _ := doJSON(t, "POST", g.URL+"/api/internal/callback", body, nil); st != 401 {
		t.Fatalf("no token: %d", st)
	}
	if st, _, _ := doJSON(t, "POST", g.URL+"/api/internal/callback", body, map[string]string{"X-Callback-Token": "wrong-wrong-wrong-wrong"}); st != 401 {
		t.Fatalf("wrong token: %d", st)
	}
	st, _, got := doJSON(t, "POST", g.URL+"/api/internal/callback", body, map[string]string{"Authorization": "Bearer 0123456789abcdef-secret"})
	if st != 200 || got["delivered"] != false || got["message"] != "No pending request found for this request_id" {
		t.Fatalf("with token: %d %v", st, got)
	}
	for _, bad := range []any{map[string]any{"status": "success"}, map[string]any{"request_id": "a.b>"}, map[string]any{"request_id": "x", "execution_id": []int{1}}} {
		if st, _, _ := doJSON(t, "POST", g.URL+"/api/internal/callback", bad, map[string]string{"X-Callback-Token": "0123456789abcdef-secret"}); st != 400 {
			t.Fatalf("bad body %v: %d", bad, st)
		}
	}

	cfg, _ := loadConfig(envOf(nil))
	rv := newRendezvous(cfg, nil, discardLogger(), newMetrics())
	h := internalOnly(cfg, false, handleAuthCallback(rv))
	id, ch, done := rv.register()
	defer done()
	for _, tc := range []struct {
		peer string
		code int
	}{{"10.1.2.3:4567", 403}, {"[2001:db8::1]:80", 403}, {"127.0.0.1:9999", 200}} {
		raw, _ := json.Marshal(map[string]any{"request_id": id, "execution_id": 12, "data": map[string]any{"status": "authenticated"}})
		req := httptest.NewRequest("POST", "/api/internal/callback", bytes.NewReader(raw))
		req.Header.Set("Content-Type", "application/json")
		req.RemoteAddr = tc.peer
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Result().StatusCode != tc.code {
			t.Fatalf("peer %s: %d", tc.peer, rec.Result().StatusCode)
		}
	}
	select {
	case msg := <-ch:
		if msg.Status != "success" {
			t.Fatalf("status defaulted to %q", msg.Status)
		}
	default:
		t.Fatal("loopback callback not delivered")
	}
}
