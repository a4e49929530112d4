package main

import (
	"crypto"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// secJWT assembles a JWT from parts without any library checks.
func secJWT(header, claims map[string]any, sign func(input string) []byte) string {
	h, _ := json.Marshal(header)
	c, _ := json.Marshal(claims)
	input := b64(h) + "." + b64(c)
	return input + "." + b64(sign(input))
}

// jwtUnknownKidFlood guards JWKS amplification (CWE-400; cf. the unknown-kid
// refetch advisories of JWT middlewares such as go-oidc and
// jwks-rsa): a flood of tokens with unknown, hostile or missing key ids
// causes at most one JWKS fetch within JWKS_MIN_REFRESH_SECS and no queueing.
func (e *secEnv) jwtUnknownKidFlood(t *testing.T) {
	// Both replicas have their keys (the start-up fetch is done).
	for _, g := range []*gateway{e.a, e.b} {
		if st, m := login(t, g, e.secret("ID token", sign(t, keyA(), e.idp.claims(nil)))); st != 200 {
			t.Fatalf("login: %d %v", st, m)
		}
	}
	before := e.idp.jwksHits.Load()
	logins := e.noetl.Calls("POST /api/auth/login")
	start := time.Now()
	var wg sync.WaitGroup
	for i := range 60 {
		kid := []string{"kid-" + secRandHex(4), "../../../../dev/null", "' OR 1=1 --", strings.Repeat("k", 4000), "", "k1\x00"}[i%6]
		k := testKey{kid: kid, alg: "RS256", priv: rsaKeyB()}
		if kid == "" {
			k.kid = ""
		}
		tok := e.secret("ID token", sign(t, k, e.idp.claims(nil)))
		wg.Go(func() {
			if st, m := login(t, e.a, tok); st != 401 || !strings.HasPrefix(fmt.Sprint(m["error"]), "Invalid credentials") {
				t.Errorf("kid %.20q: %d %v", kid, st, m)
			}
		})
	}
	wg.Wait()
	if d := e.idp.jwksHits.Load() - before; d > 1 {
		t.Errorf("%d JWKS fetches for the flood, want at most 1", d)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("flood took %v: callers queued", d)
	}
	if n := e.noetl.Calls("POST /api/auth/login"); n != logins {
		t.Errorf("NoETL was asked to log in %d times", n-logins)
	}
}

// jwtAlgorithmConfusion guards JWT algorithm confusion (CWE-347 / CWE-327;
// cf. the alg "none" and RS256→HS256 key confusion advisories of many JWT
// libraries, and CVE-class embedded-key trust such as "jwk"/"jku" headers):
// "none" in any case, HMAC keyed with the provider's public key in any
// encoding, an algorithm that does not fit the key's type or pinned alg, and
// keys offered by the token itself are all refused, and no key URL in a token
// is ever fetched.
func (e *secEnv) jwtAlgorithmConfusion(t *testing.T) {
	claims := map[string]any(e.idp.claims(nil))
	pub := &rsaKeyA().PublicKey
	der, _ := x509.MarshalPKIXPublicKey(pub)
	pemPKIX := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	pemPKCS1 := pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(pub)})
	jwkJSON, _ := json.Marshal(keyA().jwk())
	hs := func(_ string, key []byte) func(string) []byte {
		return func(in string) []byte {
			h := hmac.New(sha256.New, key)
			h.Write([]byte(in))
			return h.Sum(nil)
		}
	}
	withKey := func(k crypto.Signer, alg string) func(string) []byte {
		return func(in string) []byte {
			sig, err := jwt.GetSigningMethod(alg).Sign(in, k)
			if err != nil {
				t.Fatal(err)
			}
			return sig
		}
	}
	none := func(string) []byte { return nil }
	attacker := keyB()
	canary := e.canary.URL + "/jwks"
	cases := map[string]string{
		"alg none":               secJWT(map[string]any{"alg": "none", "kid": "k1"}, claims, none),
		"alg None":               secJWT(map[string]any{"alg": "None", "kid": "k1"}, claims, none),
		"alg NONE with sig":      secJWT(map[string]any{"alg": "NONE", "kid": "k1"}, claims, withKey(rsaKeyA(), "RS256")),
		"alg nOnE":               secJWT(map[string]any{"alg": "nOnE"}, claims, none),
		"no alg":                 secJWT(map[string]any{"kid": "k1"}, claims, withKey(rsaKeyA(), "RS256")),
		"HS256 PKIX PEM":         secJWT(map[string]any{"alg": "HS256", "kid": "k1"}, claims, hs("HS256", pemPKIX)),
		"HS256 PKCS1 PEM":        secJWT(map[string]any{"alg": "HS256", "kid": "k1"}, claims, hs("HS256", pemPKCS1)),
		"HS256 DER":              secJWT(map[string]any{"alg": "HS256", "kid": "k1"}, claims, hs("HS256", der)),
		"HS256 modulus":          secJWT(map[string]any{"alg": "HS256", "kid": "k1"}, claims, hs("HS256", pub.N.Bytes())),
		"HS256 JWK JSON":         secJWT(map[string]any{"alg": "HS256", "kid": "k1"}, claims, hs("HS256", jwkJSON)),
		"ES256 on RSA kid":       secJWT(map[string]any{"alg": "ES256", "kid": "k1"}, claims, withKey(secECKey().priv, "ES256")),
		"RS256 on EC kid":        secJWT(map[string]any{"alg": "RS256", "kid": "e1"}, claims, withKey(rsaKeyA(), "RS256")),
		"PS256 on RS256 key":     secJWT(map[string]any{"alg": "PS256", "kid": "k1"}, claims, withKey(rsaKeyA(), "PS256")),
		"EdDSA not allowed":      sign(t, testKey{kid: "k1", alg: "EdDSA", priv: newEdKey("k1").priv}, e.idp.claims(nil)),
		"embedded jwk":           secJWT(map[string]any{"alg": "RS256", "kid": "k1", "jwk": attacker.jwk()}, claims, withKey(attacker.priv, "RS256")),
		"jku to canary":          secJWT(map[string]any{"alg": "RS256", "kid": "k1", "jku": canary}, claims, withKey(attacker.priv, "RS256")),
		"x5u to canary":          secJWT(map[string]any{"alg": "RS256", "kid": "k1", "x5u": canary}, claims, withKey(attacker.priv, "RS256")),
		"kid as number":          secJWT(map[string]any{"alg": "RS256", "kid": 1}, claims, withKey(rsaKeyA(), "RS256")),
		"crit header":            secJWT(map[string]any{"alg": "RS256", "kid": "k1", "b64": false, "crit": []string{"b64"}}, claims, withKey(attacker.priv, "RS256")),
		"signature of other key": secJWT(map[string]any{"alg": "RS256", "kid": "k1"}, claims, withKey(attacker.priv, "RS256")),
	}
	for name, tok := range cases {
		e.secret("ID token", tok)
		st, m := login(t, e.a, tok)
		if st != 401 || !strings.HasPrefix(fmt.Sprint(m["error"]), "Invalid credentials") {
			t.Errorf("%s: %d %v", name, st, m)
		}
		if e.loginSent(tok) {
			t.Errorf("%s: NoETL was asked to log it in", name)
		}
	}
	// Control: the provider's own token passes, the same claims re-signed
	// by its key with the right alg.
	good := e.secret("ID token", secJWT(map[string]any{"alg": "RS256", "kid": "k1", "typ": "JWT"}, claims, withKey(rsaKeyA(), "RS256")))
	if st, m := login(t, e.a, good); st != 200 {
		t.Fatalf("genuine token: %d %v", st, m)
	} else {
		e.secret("session token", fmt.Sprint(m["session_token"]))
	}
	if !e.loginSent(good) {
		t.Error("NoETL never saw the genuine token: the control is broken")
	}
}

var secSSELine = regexp.MustCompile(`^(id: [0-9]+|event: (message|ping|playbook/result|playbook/progress|error)|data: .*|retry: 3000|:.*)$`)

// sseFieldInjection guards SSE field injection (CWE-93 / CWE-74; cf.
// newline injection advisories in SSE and log libraries): a worker callback
// whose execution id, status, step, message, error or data carries CR, LF,
// "\nevent: x", "\nid:" or "\nretry:" cannot create a field, event or frame
// at the browser. The stream is read raw on one replica while the callbacks
// land on the other.
func (e *secEnv) sseFieldInjection(t *testing.T) {
	tok := e.session(secUser)
	client := "sec-sse-" + secRandHex(4)
	// The token in the query, as EventSource sends it: the request log
	// must not keep it (checked at the end of the suite).
	stream := secOpenRawSSE(t, e.a.URL+"/events?client_id="+client+"&session_token="+tok, "")
	for _, q := range []string{"client_id=a%0Aevent:%20x", "client_id=a%0D", "last_event_id=1%0Aevent:%20x", "last_event_id=1%0D%0Aid:%202"} {
		if resp, m := secDo(t, "GET", e.a.URL+"/events?"+q, nil, "Authorization", "Bearer "+tok); resp.StatusCode != 400 || m["error"] == nil {
			t.Errorf("/events?%s: %d %v", q, resp.StatusCode, m)
		}
	}
	waitFor(t, 10*time.Second, "init frame", func() bool { return strings.Contains(stream.buf.String(), "event: ping") })
	rid := func() string {
		res := postGQL(t, e.a.URL, tok, `mutation($c: String) { executePlaybook(name: "ok/sse", clientId: $c) { requestId } }`, map[string]any{"c": client})
		r, _ := res["data"].(map[string]any)["executePlaybook"].(map[string]any)
		if r == nil || r["requestId"] == nil {
			t.Fatalf("executePlaybook: %v", res)
		}
		return r["requestId"].(string)
	}
	const inj = "x\n\nevent: x\nid: 999\nretry: 1\r\ndata: {}\r\rid: 1\u2028\u0085"
	r1, r2 := rid(), rid()
	post := func(route string, body map[string]any) {
		st, _, m := doJSON(t, "POST", e.b.InternalURL+route, body, nil)
		if st != 200 && st != 202 {
			t.Fatalf("%s: %d %v", route, st, m)
		}
	}
	post("/api/internal/progress", map[string]any{"request_id": r1, "execution_id": inj, "step": inj, "message": inj, "progress": 0.5})
	post("/api/internal/callback/async", map[string]any{"request_id": r1, "execution_id": inj, "status": inj, "data": map[string]any{inj: inj, "n": []any{inj}}})
	post("/api/internal/callback/async", map[string]any{"request_id": r2, "execution_id": 7, "status": "FAILED", "error": map[string]any{"code": 1, "message": inj, "data": inj}})
	for _, bad := range []string{"a\nb", "a\rb", "x\nevent: y"} {
		if st, _, _ := doJSON(t, "POST", e.b.InternalURL+"/api/internal/progress", map[string]any{"request_id": bad}, nil); st != 400 {
			t.Errorf("request_id %q: %d", bad, st)
		}
	}
	waitFor(t, 10*time.Second, "three events", func() bool { return strings.Count(stream.buf.String(), "event: playbook/") >= 3 })
	raw := stream.buf.String()
	if strings.ContainsAny(raw, "\r\x00") {
		t.Fatalf("stream carries CR or NUL: %q", raw)
	}
	var frames int
	for _, frame := range strings.Split(strings.TrimSuffix(raw, "\n\n"), "\n\n") {
		for _, line := range strings.Split(frame, "\n") {
			if !secSSELine.MatchString(line) {
				t.Errorf("line %q creates a field", line)
			}
			if d, ok := strings.CutPrefix(line, "data: "); ok {
				var m map[string]any
				if err := json.Unmarshal([]byte(d), &m); err != nil {
					t.Errorf("data is not one JSON value: %q", d)
				}
				if p, _ := m["params"].(map[string]any); p != nil && p["executionId"] == inj {
					frames++
				}
			}
		}
	}
	if frames != 2 {
		t.Errorf("%d frames carried the execution id intact, want 2:\n%s", frames, raw)
	}
}

// internalRoutesGuard guards unauthenticated internal endpoints (CWE-306 /
// CWE-288; cf. exposed admin and callback endpoint advisories, and the
// "localhost behind a same-host proxy" bypass class): worker routes refuse a
// missing or wrong CALLBACK_TOKEN in any near-miss spelling; without a token
// they accept loopback peers only, and a loopback peer that forwards for
// someone else is not local; with GATEWAY_INTERNAL_ADDR they do not exist on
// the public listener.
func (e *secEnv) internalRoutesGuard(t *testing.T) {
	routes := []string{"/api/internal/callback", "/api/internal/callback/async", "/api/internal/progress"}
	body := `{"request_id":"sec-guard-1","status":"success","data":{}}`
	wrong := e.secret("wrong callback token", "cb"+secRandHex(16))
	for _, route := range routes {
		for _, pairs := range [][]string{
			nil,
			{"X-Callback-Token", wrong},
			{"X-Callback-Token", strings.ToUpper(e.cbToken)},
			{"X-Callback-Token", e.cbToken[:len(e.cbToken)-1]},
			{"X-Callback-Token", e.cbToken + "x"},
			{"Authorization", "bearer " + e.cbToken},
			{"Authorization", "Basic " + e.cbToken},
			{"Authorization", "Bearer " + wrong, "Authorization", "Bearer " + e.cbToken},
			{"X-Callback-Token", "", "Authorization", "Bearer " + wrong},
		} {
			resp, m := secDo(t, "POST", e.a.URL+route, strings.NewReader(body), pairs...)
			if resp.StatusCode != 401 || m["error"] != "callback token required" {
				t.Errorf("%s with %q: %d %v", route, pairs, resp.StatusCode, m)
			}
		}
		if resp, _ := secDo(t, "POST", e.a.URL+route+"?callback_token="+e.cbToken, strings.NewReader(body)); resp.StatusCode != 401 {
			t.Errorf("%s with the token in the query: %d", route, resp.StatusCode)
		}
		// The right token passes the guard (the body is then judged).
		if resp, _ := secDo(t, "POST", e.a.URL+route, strings.NewReader(body), "X-Callback-Token", e.cbToken); resp.StatusCode == 401 || resp.StatusCode == 403 {
			t.Errorf("%s with the token: %d", route, resp.StatusCode)
		}
		// Replica B serves them on its internal listener only.
		if resp, _ := secDo(t, "POST", e.b.URL+route, strings.NewReader(body)); resp.StatusCode != 404 {
			t.Errorf("%s on B's public listener: %d", route, resp.StatusCode)
		}
	}
	// The in-process chain has neither: loopback only, proxied loopback is
	// not loopback. Peers a socket cannot fake go through a recorder.
	h := e.chain.Config.Handler
	for _, route := range append(routes, "/metrics") {
		for _, tc := range []struct {
			peer    string
			headers []string
			refused bool
		}{
			{"203.0.113.5:4000", nil, true},
			{"[2001:db8::1]:4000", nil, true},
			{"10.0.0.8:4000", []string{"X-Callback-Token", e.cbToken}, true},
			{"127.0.0.1:4000", []string{"X-Forwarded-For", "203.0.113.5"}, true},
			{"127.0.0.1:4000", []string{"Forwarded", "for=203.0.113.5"}, true},
			{"[::1]:4000", []string{"X-Real-IP", "203.0.113.5"}, true},
			{"127.0.0.1:4000", nil, false},
			{"[::1]:4000", nil, false},
		} {
			method := "POST"
			if route == "/metrics" {
				method = "GET"
			}
			req := httptest.NewRequest(method, route, strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			for i := 0; i+1 < len(tc.headers); i += 2 {
				req.Header.Set(tc.headers[i], tc.headers[i+1])
			}
			req.RemoteAddr = tc.peer
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if refused := rec.Code == http.StatusForbidden; refused != tc.refused {
				t.Errorf("%s from %s %q: %d %s", route, tc.peer, tc.headers, rec.Code, rec.Body)
			}
		}
	}
}

// accessDecisionCacheKey guards authorization cache confusion (CWE-639 /
// CWE-863; cf. the cache-key advisories of authorization proxies where a
// decision made for one user or resource was served for another): each
// (session, playbook path, action) gets its own decision from NoETL, repeats
// are served from the cache, and a logout on one replica ends the session
// and its decisions on both.
func (e *secEnv) accessDecisionCacheKey(t *testing.T) {
	s1, denied := e.session(secUser), e.session(secUser, "deny")
	ask := func(g *gateway, tok, path, action string) (int, any) {
		t.Helper()
		st, _, m := doJSON(t, "POST", g.URL+"/api/auth/check-access", map[string]any{"session_token": tok, "playbook_path": path, "permission_type": action}, nil)
		return st, m["allowed"]
	}
	cases := []struct {
		tok, path, action string
		allowed           bool
	}{
		{s1, "ok/cache-a", "execute", true},
		{denied, "ok/cache-a", "execute", false},
		{s1, "secret/cache-b", "execute", false},
		{s1, "ok/cache-a", "view", true},
		{s1, "ok/cache-a", "modify", false},
		{s1, "ok/Cache-A", "execute", true},
		{s1, "ok/cache-a/", "execute", true},
	}
	for round := range 2 {
		for _, c := range cases {
			if st, allowed := ask(e.a, c.tok, c.path, c.action); st != 200 || allowed != c.allowed {
				t.Errorf("round %d %s %s %s: %d allowed=%v", round, c.tok[:4], c.path, c.action, st, allowed)
			}
		}
	}
	for _, c := range cases {
		if n := e.checkCount(c.tok, c.path, c.action); n != 1 {
			t.Errorf("%s %s %s: NoETL asked %d times, want 1", c.tok[:4], c.path, c.action, n)
		}
	}
	// The proxy's execute uses the same per-session decisions.
	for _, tc := range []struct {
		tok  string
		want int
	}{{s1, 200}, {denied, 403}} {
		if resp, m := secDo(t, "POST", e.a.URL+"/noetl/execute", strings.NewReader(`{"path":"ok/cache-a"}`), "Authorization", "Bearer "+tc.tok); resp.StatusCode != tc.want {
			t.Errorf("execute: %d %v", resp.StatusCode, m)
		}
	}
	if n := e.checkCount(denied, "ok/cache-a", "execute"); n != 1 {
		t.Errorf("denied session asked %d times", n)
	}
	// Logout on A: B refuses the session at once, even for decisions it
	// had cached, although NoETL still calls it valid.
	if st, _ := ask(e.b, s1, "ok/cache-a", "execute"); st != 200 {
		t.Fatalf("B before logout: %d", st)
	}
	if resp, m := secDo(t, "POST", e.a.URL+"/api/auth/logout", nil, "Authorization", "Bearer "+s1); resp.StatusCode != 200 {
		t.Fatalf("logout: %d %v", resp.StatusCode, m)
	}
	waitFor(t, 5*time.Second, "logout on B", func() bool {
		st, _ := ask(e.b, s1, "ok/cache-a", "execute")
		return st == 401
	})
	if resp, _ := secDo(t, "POST", e.b.URL+"/noetl/execute", strings.NewReader(`{"path":"ok/cache-a"}`), "Authorization", "Bearer "+s1); resp.StatusCode != 401 {
		t.Errorf("execute on B after logout: %d", resp.StatusCode)
	}
}

// noSecretsInLogs guards sensitive data in logs (CWE-532; cf. the token
// logging advisories of oauth2-proxy, Grafana and Vault): nothing the suite
// used as a session token, ID token, callback token, NATS password or cookie
// value appears in any gateway's log output, whole or in part.
func (e *secEnv) noSecretsInLogs(t *testing.T) {
	e.mu.Lock()
	secrets := make(map[string]string, len(e.secrets))
	for k, v := range e.secrets {
		secrets[k] = v
	}
	e.mu.Unlock()
	if len(secrets) < 50 {
		t.Fatalf("only %d secrets registered: the suite did not run", len(secrets))
	}
	for i, logs := range e.logs {
		out := logs.String()
		if strings.Count(out, `"msg":"request"`) < 20 {
			t.Fatalf("log %d has too few request lines to judge:\n%.2000s", i, out)
		}
		for s, kind := range secrets {
			for _, part := range []string{s, s[:min(len(s), 20)], s[max(0, len(s)-20):]} {
				if len(part) >= 16 && strings.Contains(out, part) {
					t.Errorf("log %d contains a %s (%.12s…)", i, kind, s)
					break
				}
			}
		}
	}
	// Sessions are named in logs by their id, which is how operators follow them.
	if !strings.Contains(e.a.Logs.String(), `"msg":"logout"`) {
		t.Error("no logout line: sessions are not named in logs at all")
	}
}
