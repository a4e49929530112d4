package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
)

// TestSecurity is the security regression suite: each subtest guards one
// class of vulnerability that real advisories in comparable gateways and
// auth proxies belong to, end to end against the same two gateway replicas
// (security_env_test.go). The logs of every gateway it starts are captured
// for the whole suite and searched, at the end, for every token and secret
// the suite used.
func TestSecurity(t *testing.T) {
	t.Parallel()
	e := startSecEnv(t)
	// The flood counts JWKS fetches: it runs alone, before anything else.
	t.Run("JWTUnknownKidFlood", e.jwtUnknownKidFlood)
	t.Run("classes", func(t *testing.T) {
		for _, c := range []struct {
			name string
			fn   func(*testing.T)
		}{
			{"IdentityHeaderSpoofing", e.identityHeaderSpoofing},
			{"HopByHopStripping", e.hopByHopStripping},
			{"PathNormalisationAuthz", e.pathNormalisationAuthz},
			{"ForwardedTrust", e.forwardedTrust},
			{"JWTAlgorithmConfusion", e.jwtAlgorithmConfusion},
			{"DuplicateAuthorization", e.duplicateAuthorization},
			{"OversizedHeadersAndBodies", e.oversizedHeadersAndBodies},
			{"SSEFieldInjection", e.sseFieldInjection},
			{"CORSWildcardCredentials", e.corsWildcardCredentials},
			{"InternalRoutesGuard", e.internalRoutesGuard},
			{"SSRFProxyRequest", e.ssrfProxyRequest},
			{"AccessDecisionCacheKey", e.accessDecisionCacheKey},
			{"ErrorsExposeNoInternals", e.errorsExposeNoInternals},
			{"GraphQLAliasAmplification", e.graphqlAliasAmplification},
		} {
			t.Run(c.name, func(t *testing.T) {
				t.Parallel()
				c.fn(t)
			})
		}
	})
	t.Run("NoSecretsInLogs", e.noSecretsInLogs)
}

// identityHeaderSpoofing guards CWE-290 / identity header spoofing (cf.
// oauth2-proxy and Traefik forwardAuth advisories, and the underscore and dot
// spellings that nginx, WSGI and CGI servers fold into the same name): a
// client's X-User-*, X-Session-*, X-Gateway-*, X-Forwarded-* or Forwarded
// header, in any case, with "_" or "." for "-", or repeated, never reaches
// NoETL; NoETL sees exactly one value of each identity header, the gateway's.
func (e *secEnv) identityHeaderSpoofing(t *testing.T) {
	tok := e.session(secUser)
	victim := e.session(User{UserID: 1, Email: "root@example.com", Roles: []string{"admin"}})
	pairs := []string{"Authorization", "Bearer " + tok}
	for _, name := range []string{
		"X-User-Id", "x-user-id", "X-USER-ID", "X_User_Id", "x_user_id", "X.User.Id", "x.user.id", "X-User_Id",
		"X-User-Roles", "X_User_Roles", "x.user.roles", "X-User-Email", "X_USER_EMAIL", "X-User-Admin",
		"X-Session-Token", "X_Session_Token", "x.session.token", "X-Session-Id", "X_Session_Id",
		"X-Gateway-User", "X_Gateway_Admin", "x.gateway.roles", "X-Forwarded-User", "X_Forwarded_Email",
		"X_Forwarded_For", "X.Forwarded.Host", "X-Real-IP", "X_Real_IP", "X-Client-IP", "Forwarded",
	} {
		v := "1"
		switch {
		case strings.Contains(strings.ToLower(name), "session"):
			v = victim
		case strings.Contains(strings.ToLower(name), "role"):
			v = "admin"
		case strings.Contains(strings.ToLower(name), "forward"), strings.Contains(strings.ToLower(name), "ip"):
			v = "for=10.9.9.9"
		}
		pairs = append(pairs, name, v, name, v+"-again") // every spelling twice
	}
	resp, _ := secDo(t, "GET", e.a.URL+"/noetl/spoof/whoami", nil, pairs...)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	got := e.proxiedFor(tok)
	if len(got) != 1 {
		t.Fatalf("%d requests reached NoETL", len(got))
	}
	want := map[string]string{
		"X-User-Id": "1001", "X-User-Email": secUser.Email, "X-User-Roles": "user", "X-Session-Token": tok,
		"X-Request-Id": resp.Header.Get("X-Request-Id"), "X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http",
		"X-Forwarded-Host": strings.TrimPrefix(e.a.URL, "http://"),
	}
	for name, vs := range got[0].Header {
		fold := strings.ToLower(strings.NewReplacer("_", "-", ".", "-").Replace(name))
		owned := fold == "forwarded" || fold == "x-real-ip" || fold == "x-client-ip" || fold == "cookie" || fold == "authorization" ||
			strings.HasPrefix(fold, "x-user-") || strings.HasPrefix(fold, "x-session-") || strings.HasPrefix(fold, "x-gateway-") || strings.HasPrefix(fold, "x-forwarded-")
		if !owned {
			continue
		}
		if w, ok := want[name]; !ok || len(vs) != 1 || vs[0] != w {
			t.Errorf("NoETL got %s: %q", name, vs)
		}
		for _, v := range vs {
			if strings.Contains(v, victim) {
				t.Errorf("victim's token reached NoETL in %s", name)
			}
		}
	}
	for name := range want {
		if got[0].Header.Get(name) == "" {
			t.Errorf("NoETL did not get %s", name)
		}
	}
}

// hopByHopStripping guards hop-by-hop header abuse (CWE-444 family; cf. the
// "Connection: X-Forwarded-For" advisories of Traefik and Apache mod_proxy)
// and h2c upgrade smuggling (cf. the h2c smuggling research against Envoy,
// Traefik and nginx): headers named in Connection are dropped before the
// gateway sets its own, never after, and no upgrade but WebSocket reaches
// NoETL, so the connection cannot become a tunnel past the gateway's checks.
func (e *secEnv) hopByHopStripping(t *testing.T) {
	tok := e.session(secUser)
	owned := "X-User-Id, X-User-Email, X-User-Roles, X-Session-Token, X-Request-Id, X-Forwarded-For, X-Forwarded-Host, X-Forwarded-Proto"
	resp, _ := secDo(t, "GET", e.a.URL+"/noetl/hop/a", nil, "Authorization", "Bearer "+tok,
		"Connection", owned, "Connection", "keep-alive, x-user-id", "Keep-Alive", "timeout=5", "X-Request-Id", "client-chosen-id")
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	status, _, body := secRawHTTP(t, e.a.URL, "GET /noetl/hop/h2c HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "+tok+
		"\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
	if status != 200 {
		t.Fatalf("h2c request: %d %s", status, body)
	}
	// Request smuggling (CWE-444): however the client frames its body, the
	// gateway re-frames what it forwards, so nothing the client pipelined
	// inside a body reaches NoETL as a request of its own.
	for _, framing := range []string{
		"Content-Length: 4\r\nTransfer-Encoding: chunked",
		"Transfer-Encoding: chunked\r\nContent-Length: 4",
		"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
		"Transfer-Encoding: xchunked",
		"Transfer-Encoding : chunked",
		"Transfer-Encoding: chunked, identity",
		"Content-Length: 4\r\nContent-Length: 60",
		"Content-Length: +4",
	} {
		secRawHTTP(t, e.a.URL, "POST /noetl/hop/smuggle HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "+tok+"\r\nContent-Type: application/json\r\n"+framing+
			"\r\n\r\n0\r\n\r\nPOST /api/hop-smuggled HTTP/1.1\r\nHost: noetl\r\nContent-Length: 2\r\n\r\n{}")
	}
	var got []seen
	for _, s := range e.proxiedFor(tok) {
		if s.Path != "/api/hop/smuggle" {
			got = append(got, s)
		}
	}
	e.mu.Lock()
	for _, s := range e.proxied {
		if strings.Contains(s.Path, "smuggled") {
			t.Errorf("a smuggled request reached NoETL: %s %s", s.Method, s.Path)
		}
	}
	e.mu.Unlock()
	if len(got) != 2 {
		t.Fatalf("%d requests reached NoETL", len(got))
	}
	for _, s := range got {
		for _, h := range strings.Split(owned, ", ") {
			if len(s.Header.Values(h)) != 1 {
				t.Errorf("%s: NoETL got %s = %q", s.Path, h, s.Header.Values(h))
			}
		}
		if s.Header.Get("X-User-Id") != "1001" || s.Header.Get("Keep-Alive") != "" || s.Header.Get("Upgrade") != "" || s.Header.Get("Http2-Settings") != "" {
			t.Errorf("%s: NoETL got %v", s.Path, s.Header)
		}
	}
}

// pathNormalisationAuthz guards path confusion between authorization and
// routing (CWE-22 / CWE-863; cf. the path normalisation bypasses of Spring
// Cloud Gateway, Envoy and Traefik): whatever the spelling of the execute
// path — dot segments, empty segments, trailing slash, case, percent-encoded
// letters, absolute-form targets, a lower-case method, or GraphQL
// proxyRequest — a denied playbook never reaches NoETL's execute endpoint,
// and an allowed one is checked before it does.
func (e *secEnv) pathNormalisationAuthz(t *testing.T) {
	tok := e.session(secUser)
	const denied = "secret/pn-payroll"
	body := `{"path":"` + denied + `","payload":{}}`
	post := func(method, target string) (int, []byte) {
		st, _, b := secRawHTTP(t, e.a.URL, fmt.Sprintf("%s %s HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
			method, target, tok, len(body), body))
		return st, b
	}
	for _, target := range []string{
		"/noetl/execute", "/noetl/execute/", "/noetl/EXECUTE", "/noetl/Execute/", "/noetl/%65xecute", "/noetl/%45XECUTE",
		"/noetl/execute?path=ok/x", "/noetl/./execute", "/noetl//execute", "/noetl/x/../execute", "/noetl/%2e/execute",
		"/noetl/execute/.", "/noetl/execute%2f", "/noetl/execute;a=b", "/noetl/execute%3b", "/noetl/execute%00", "/noetl/execute%09",
		"/noetl/%2565xecute", "//noetl/execute", "/noetl/execute\\", "http://gw/noetl/EXECUTE",
	} {
		st, b := post("POST", target)
		if st < 400 {
			t.Errorf("POST %s: %d %s", target, st, b)
		}
		var m map[string]any
		if json.Unmarshal(b, &m) != nil || m["error"] == nil {
			t.Errorf("POST %s: not a JSON error: %d %s", target, st, b)
		}
	}
	// These may pass the gateway, but never to execute.
	for _, method := range []string{"post", "Post", "PUT", "PATCH"} {
		post(method, "/noetl/execute")
	}
	post("POST", "/noetl/execute#x")
	post("POST", "/noetl/execute%20")
	// Method override and URL rewrite headers never reach NoETL, whatever
	// NoETL's framework might make of them.
	for _, name := range []string{"X-HTTP-Method-Override", "X_HTTP_Method", "x-method-override", "X-Original-URL", "X.Rewrite.URL", "X-Original-Method"} {
		value := "POST"
		if strings.Contains(strings.ToLower(name), "url") {
			value = "/api/execute"
		}
		secDo(t, "GET", e.a.URL+"/noetl/pn-override", strings.NewReader(body), "Authorization", "Bearer "+tok, name, value)
	}
	for _, s := range e.proxiedFor(tok) {
		for name := range s.Header {
			if n := strings.ToLower(name); strings.Contains(n, "override") || strings.Contains(n, "original") || strings.Contains(n, "rewrite") || strings.HasSuffix(n, "http-method") || strings.HasSuffix(n, "http_method") {
				t.Errorf("NoETL got %s on %s %s", name, s.Method, s.Path)
			}
		}
	}
	const q = `mutation($e: String!, $b: JSON) { proxyRequest(input: {method: "POST", endpoint: $e, body: $b}) { success error } }`
	for _, ep := range []string{"/api/execute", "/api/execute/", "/api/EXECUTE", "/api/%65xecute", "/api/Execute?x=1"} {
		res := postGQL(t, e.a.URL, tok, q, map[string]any{"e": ep, "b": map[string]any{"path": denied}})
		if r, _ := res["data"].(map[string]any)["proxyRequest"].(map[string]any); r["success"] != false || r["error"] != "permission denied" {
			t.Errorf("proxyRequest %s: %v", ep, res)
		}
	}
	for _, b := range []map[string]any{{"catalog_id": "1"}, {"path": "ok/pn", "catalog_id": 7}, nil} {
		res := postGQL(t, e.a.URL, tok, q, map[string]any{"e": "/api/execute", "b": b})
		if r, _ := res["data"].(map[string]any)["proxyRequest"].(map[string]any); r["success"] != false {
			t.Errorf("proxyRequest body %v: %v", b, res)
		}
	}
	if got := e.executesOf(denied); len(got) != 0 {
		t.Fatalf("denied playbook reached NoETL's execute: %+v", got)
	}
	// Allowed: every spelling that reaches execute was checked first.
	const allowed = "ok/pn-report"
	body = `{"path":"` + allowed + `"}`
	for _, target := range []string{"/noetl/EXECUTE", "/noetl/%65xecute/"} {
		if st, b := post("POST", target); st != 200 {
			t.Errorf("allowed POST %s: %d %s", target, st, b)
		}
	}
	res := postGQL(t, e.a.URL, tok, q, map[string]any{"e": "/api/Execute", "b": map[string]any{"path": allowed}})
	if r, _ := res["data"].(map[string]any)["proxyRequest"].(map[string]any); r["success"] != true {
		t.Errorf("allowed proxyRequest: %v", res)
	}
	if n, c := len(e.executesOf(allowed)), e.checkCount(tok, allowed, "execute"); n != 3 || c != 1 {
		t.Fatalf("allowed playbook: %d executes, %d checks", n, c)
	}
}

// forwardedTrust guards client address spoofing through X-Forwarded-For and
// friends (CWE-348; cf. the X-Forwarded-For trust advisories of Traefik,
// Kong and many rate limiters): from an untrusted peer no forwarding header
// is believed, for the login's client_ip or towards NoETL; from a
// TRUSTED_PROXIES peer the right-most hop that is not a trusted proxy is the
// client, and entries left of it (client-controlled) never are.
func (e *secEnv) forwardedTrust(t *testing.T) {
	// Each login has its own ID token, so its payload is found among the
	// logins other classes make at the same time.
	loginIP := func(g *gateway, pairs ...string) any {
		t.Helper()
		idToken := e.secret("ID token", sign(t, keyA(), e.idp.claims(map[string]any{"sub": "auth0|xff-" + secRandHex(4)})))
		body, _ := json.Marshal(map[string]any{"auth0_token": idToken})
		resp, m := secDo(t, "POST", g.URL+"/api/auth/login", bytes.NewReader(body), pairs...)
		if resp.StatusCode != 200 {
			t.Fatalf("login: %d %v", resp.StatusCode, m)
		}
		e.secret("session token", fmt.Sprint(m["session_token"]))
		return e.loginPayload(idToken)["client_ip"]
	}
	spoof := []string{"X-Forwarded-For", "203.0.113.9", "X-Real-IP", "203.0.113.10", "Forwarded", "for=203.0.113.11", "X-Client-IP", "203.0.113.12"}
	if ip := loginIP(e.a, spoof...); ip != "127.0.0.1" {
		t.Errorf("untrusted peer: client_ip %v", ip)
	}
	for _, tc := range []struct {
		pairs []string
		want  string
	}{
		{[]string{"X-Forwarded-For", "198.51.100.1, 203.0.113.9, 10.1.2.3"}, "203.0.113.9"},
		{[]string{"X-Forwarded-For", "198.51.100.1", "X-Forwarded-For", "203.0.113.9, 10.0.0.1"}, "203.0.113.9"},
		{[]string{"X-Forwarded-For", "203.0.113.9, not-an-ip"}, "127.0.0.1"},
		{[]string{"X-Forwarded-For", "10.0.0.1, 10.0.0.2"}, "127.0.0.1"},
		{[]string{"X-Forwarded-For", "::ffff:203.0.113.7"}, "203.0.113.7"},
		{[]string{"X-Real-IP", "203.0.113.9", "Forwarded", "for=203.0.113.9"}, "127.0.0.1"},
	} {
		if ip := loginIP(e.b, tc.pairs...); ip != tc.want {
			t.Errorf("trusted peer %q: client_ip %v, want %s", tc.pairs, ip, tc.want)
		}
	}
	tok := e.session(secUser)
	secDo(t, "GET", e.a.URL+"/noetl/xff", nil, append([]string{"Authorization", "Bearer " + tok, "X-Forwarded-Host", "evil.example", "X-Forwarded-Proto", "https"}, spoof...)...)
	tokB := e.session(secUser)
	secDo(t, "GET", e.b.URL+"/noetl/xff", nil, "Authorization", "Bearer "+tokB, "X-Forwarded-For", "198.51.100.1, 203.0.113.9", "X-Forwarded-Proto", "https")
	a, b := e.proxiedFor(tok), e.proxiedFor(tokB)
	if len(a) != 1 || len(b) != 1 {
		t.Fatalf("NoETL got %d and %d requests", len(a), len(b))
	}
	if h := a[0].Header; h.Get("X-Forwarded-For") != "127.0.0.1" || h.Get("X-Forwarded-Host") != strings.TrimPrefix(e.a.URL, "http://") ||
		h.Get("X-Forwarded-Proto") != "http" || h.Get("X-Real-Ip") != "" || h.Get("Forwarded") != "" || h.Get("X-Client-Ip") != "" {
		t.Errorf("untrusted peer: NoETL got %v", h)
	}
	if h := b[0].Header; h.Get("X-Forwarded-For") != "198.51.100.1, 203.0.113.9, 127.0.0.1" || h.Get("X-Forwarded-Proto") != "https" {
		t.Errorf("trusted peer: NoETL got %v", h)
	}
}

// duplicateAuthorization guards credential confusion through repeated
// headers (CWE-287; cf. the duplicate Authorization header advisories of
// API gateways where the proxy checked one value and the backend used
// another): two Authorization headers are ambiguous and authenticate nobody,
// on every authenticated route, and never fall back to another source.
func (e *secEnv) duplicateAuthorization(t *testing.T) {
	s1, s2 := e.session(secUser), e.session(secUser)
	cookie := e.secret("cookie value", "ck"+secRandHex(16))
	dup := []string{"Authorization", "Bearer " + s1, "Authorization", "Bearer " + s2, "X-Session-Token", s1, "Cookie", "session_token=" + s1 + "; csrftoken=" + cookie}
	for _, tc := range []struct{ method, path, body string }{
		{"GET", "/noetl/dup", ""},
		{"POST", "/graphql", `{"query":"{ health }"}`},
		{"GET", "/graphql", ""},
		{"GET", "/events", ""},
		{"POST", "/api/auth/logout", ""},
		{"POST", "/api/auth/check-access", `{"playbook_path":"ok/x","permission_type":"view"}`},
	} {
		var body io.Reader
		if tc.body != "" {
			body = strings.NewReader(tc.body)
		}
		if resp, m := secDo(t, tc.method, e.a.URL+tc.path, body, dup...); resp.StatusCode != 401 || m["error"] == nil {
			t.Errorf("%s %s: %d %v", tc.method, tc.path, resp.StatusCode, m)
		}
	}
	if resp, _ := secDo(t, "GET", e.a.URL+"/noetl/dup", nil, "Authorization", "Bearer "+s1+", Bearer "+s2); resp.StatusCode != 401 {
		t.Errorf("comma-joined Authorization: %d", resp.StatusCode)
	}
	if len(e.proxiedFor(s1))+len(e.proxiedFor(s2)) != 0 {
		t.Error("an ambiguous request reached NoETL")
	}
	// Neither session was logged out by the ambiguous logout.
	for _, s := range []string{s1, s2} {
		if st, m := validate(t, e.a.URL, s); st != 200 || m["valid"] != true {
			t.Errorf("session after ambiguous logout: %d %v", st, m)
		}
	}
	// One header is fine, and the cookie never reaches NoETL.
	if resp, _ := secDo(t, "GET", e.a.URL+"/noetl/dup", nil, "Authorization", "Bearer "+s1, "Cookie", "csrftoken="+cookie); resp.StatusCode != 200 {
		t.Errorf("single Authorization: %d", resp.StatusCode)
	}
	if got := e.proxiedFor(s1); len(got) != 1 || got[0].Header.Get("Cookie") != "" || got[0].Header.Get("Authorization") != "" {
		t.Errorf("NoETL got %+v", got)
	}
}

// secStreamed hides a reader's length so the client sends it chunked.
type secStreamed struct{ io.Reader }

// oversizedHeadersAndBodies guards resource exhaustion through request size
// (CWE-400 / CWE-770; cf. the unbounded body and header advisories of
// GraphQL servers and reverse proxies): headers beyond MaxHeaderBytes get
// 431, and every route that reads a body answers 413 JSON beyond
// MAX_BODY_BYTES, whether the length is declared or the body is streamed.
func (e *secEnv) oversizedHeadersAndBodies(t *testing.T) {
	tok := e.session(secUser)
	for _, pairs := range [][]string{
		{"X-Pad", strings.Repeat("a", 80<<10)},
		{"Cookie", "session_token=" + tok + "; pad=" + strings.Repeat("b", 80<<10)},
	} {
		resp, _ := secDo(t, "GET", e.a.URL+"/noetl/oversized", nil, append([]string{"Authorization", "Bearer " + tok}, pairs...)...)
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("%s of 80 KiB: %d", pairs[0], resp.StatusCode)
		}
	}
	big := `{"session_token":"` + tok + `","x":"` + strings.Repeat("a", secBodyLimit+1024) + `"}`
	cb := []string{"X-Callback-Token", e.cbToken}
	auth := []string{"Authorization", "Bearer " + tok}
	for _, tc := range []struct {
		path  string
		pairs []string
	}{
		{"/api/auth/login", nil}, {"/api/auth/validate", nil}, {"/api/auth/check-access", nil}, {"/api/auth/logout", nil},
		{"/graphql", auth}, {"/api/internal/callback", cb}, {"/api/internal/callback/async", cb}, {"/api/internal/progress", cb},
		{"/noetl/oversized", auth}, {"/noetl/execute", auth},
	} {
		for _, mode := range []string{"declared", "streamed"} {
			var body io.Reader = strings.NewReader(big)
			if mode == "streamed" {
				body = secStreamed{body}
			}
			resp, m := secDo(t, "POST", e.a.URL+tc.path, body, tc.pairs...)
			if resp.StatusCode != http.StatusRequestEntityTooLarge || m["error"] != "request body too large" ||
				!strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
				t.Errorf("%s %s: %d %v", mode, tc.path, resp.StatusCode, m)
			}
		}
	}
	if got := e.executesOf(""); len(got) != 0 {
		t.Errorf("an oversized execute reached NoETL: %+v", got)
	}
	if st, m := validate(t, e.a.URL, tok); st != 200 || m["valid"] != true {
		t.Errorf("an oversized logout logged the session out: %d %v", st, m)
	}
}

// corsWildcardCredentials guards permissive CORS (CWE-942; cf. the origin
// reflection and "*"-with-credentials advisories of API gateways): an origin
// is echoed only when listed exactly, "*" never comes with credentials, a
// disallowed preflight gets no CORS headers, NoETL's own CORS headers never
// pass the proxy, and a cross-origin logout (CSRF, CWE-352) is refused.
func (e *secEnv) corsWildcardCredentials(t *testing.T) {
	tok := e.session(secUser)
	check := func(g *gateway, name, origin, wantACAO string, wantCred bool, req func() *http.Response) {
		t.Helper()
		resp := req()
		acao, cred := resp.Header.Values("Access-Control-Allow-Origin"), resp.Header.Get("Access-Control-Allow-Credentials")
		if len(acao) > 1 || (len(acao) == 1) != (wantACAO != "") || len(acao) == 1 && acao[0] != wantACAO || (cred == "true") != wantCred {
			t.Errorf("%s origin %q: ACAO %q credentials %q", name, origin, acao, cred)
		}
		if len(acao) == 1 && acao[0] == "*" && cred != "" {
			t.Errorf("%s: wildcard with credentials", name)
		}
	}
	for _, g := range []*gateway{e.a, e.b} {
		wildcard := g == e.b
		for _, origin := range []string{"http://app.example", "http://app.example.evil.com", "http://evil.com", "null", "http://APP.example", "http://app.example:80", "https://app.example"} {
			want, cred := "", false
			switch {
			case wildcard:
				want = "*"
			case origin == "http://app.example":
				want, cred = origin, true
			}
			check(g, "proxied GET", origin, want, cred, func() *http.Response {
				resp, _ := secDo(t, "GET", g.URL+"/noetl/cors", nil, "Authorization", "Bearer "+tok, "Origin", origin)
				return resp
			})
			check(g, "preflight", origin, want, cred, func() *http.Response {
				resp, _ := secDo(t, "OPTIONS", g.URL+"/api/auth/logout", nil, "Origin", origin, "Access-Control-Request-Method", "POST", "Access-Control-Request-Headers", "authorization")
				if want == "" && resp.Header.Get("Access-Control-Allow-Methods") != "" {
					t.Errorf("disallowed preflight got Allow-Methods")
				}
				return resp
			})
		}
	}
	resp, _ := secDo(t, "POST", e.a.URL+"/api/auth/logout", nil, "Cookie", "session_token="+tok, "Origin", "http://evil.com", "Sec-Fetch-Site", "cross-site")
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("cross-origin logout: %d", resp.StatusCode)
	}
	if st, m := validate(t, e.a.URL, tok); st != 200 || m["valid"] != true {
		t.Errorf("session after cross-origin logout: %d %v", st, m)
	}
}

// ssrfProxyRequest guards server-side request forgery (CWE-918; cf. the
// SSRF advisories of GraphQL gateways and URL-joining proxies): no
// proxyRequest endpoint — schemes, "@host", "//host", backslashes, encoded
// and Unicode look-alike slashes, CR/LF — no absolute-form request target,
// Host header, token key URL or login auth0_domain makes the gateway
// contact any host but NoETL, and what reaches NoETL stays under /api/.
func (e *secEnv) ssrfProxyRequest(t *testing.T) {
	tok := e.session(secUser)
	ch := strings.TrimPrefix(e.canary.URL, "http://")
	const q = `mutation($m: String!, $e: String!) { proxyRequest(input: {method: $m, endpoint: $e}) { success error } }`
	for _, ep := range []string{
		"@" + ch + "/api/x", "//" + ch + "/api/x", "/api/x@" + ch, "/api/@" + ch, "/api/%40" + ch, "http://" + ch + "/api/x",
		"https://" + ch + "/api/", "/api/http://" + ch + "/", "/api/http:%2F%2F" + ch, "/api/%2F%2F" + ch, "/api//" + ch,
		"/api/\\\\" + ch, "/api/%5C%5C" + ch, "\\\\" + ch + "/api/x", "/api\\" + ch, "/api/..%2F..%2F" + ch, "/api/%2e%2e/%2e%2e/" + ch,
		"/api/x/../../" + ch, "/api/x#@" + ch, " /api/x", "/api/x\t@" + ch, "/api/x\r\nHost: " + ch, "/api/\u2215\u2215" + ch,
		"/api/／／" + ch, "/api/%ef%bc%8f%ef%bc%8f" + ch, "api/x", "/API/x", "//" + ch, "/api/x:@" + ch, "/api/" + ch + ":80/",
		"/api/x?u=http://" + ch, "/api/%252F%252F" + ch, "/api/%00" + ch, "/api/\x00" + ch,
	} {
		for _, m := range []string{"GET", "POST"} {
			res := postGQL(t, e.a.URL, tok, q, map[string]any{"m": m, "e": ep})
			if res["errors"] != nil {
				t.Errorf("%q: %v", ep, res["errors"])
			}
		}
	}
	// A dying upstream: the error is logged without the URL's query.
	leak := e.secret("session token in a query", "st"+secRandHex(20))
	postGQL(t, e.a.URL, tok, q, map[string]any{"m": "GET", "e": "/api/drop?session_token=" + leak})
	for _, target := range []string{"http://" + ch + "/noetl/ssrf", "http://" + ch + "@gw/noetl/ssrf"} {
		secRawHTTP(t, e.a.URL, "GET "+target+" HTTP/1.1\r\nHost: "+ch+"\r\nAuthorization: Bearer "+tok+"\r\nConnection: close\r\n\r\n")
	}
	secDo(t, "GET", e.a.URL+"/noetl/ssrf", nil, "Authorization", "Bearer "+tok, "Host", ch)
	login(t, e.a, e.secret("ID token", sign(t, keyA(), e.idp.claims(map[string]any{"iss": "https://" + ch + "/"}))))
	if n := e.canaryHits.Load(); n != 0 {
		t.Fatalf("%d requests reached a host other than NoETL", n)
	}
	noetlHost := strings.TrimPrefix(e.noetl.URL, "http://")
	got := e.proxiedFor(tok)
	if len(got) == 0 {
		t.Fatal("no request reached NoETL: the control is broken")
	}
	for _, s := range got {
		if s.Header.Get("Host") != noetlHost || !strings.HasPrefix(s.Path, "/api/") || strings.Contains(s.Path, "//") || strings.Contains(s.Path, "..") {
			t.Errorf("NoETL got %s %s (Host %s)", s.Method, s.RawPath, s.Header.Get("Host"))
		}
	}
}

var secInternalText = regexp.MustCompile(`main\.|\*[a-z]|json: |invalid character|unexpected EOF|reflect|runtime|goroutine|dial tcp|connection refused|127\.0\.0\.1|http: |nats: `)

// errorsExposeNoInternals guards information exposure through error
// messages (CWE-209; cf. gateways that echoed upstream bodies and Go error
// strings): malformed, mistyped and hostile bodies on every JSON route, and
// an upstream that dies, get short fixed messages, never Go types, decoder
// errors, addresses or upstream bodies.
func (e *secEnv) errorsExposeNoInternals(t *testing.T) {
	tok := e.session(secUser)
	auth := []string{"Authorization", "Bearer " + tok}
	cb := []string{"X-Callback-Token", e.cbToken}
	for _, tc := range []struct {
		path  string
		pairs []string
	}{
		{"/api/auth/login", nil}, {"/api/auth/validate", nil}, {"/api/auth/check-access", nil}, {"/api/auth/logout", nil},
		{"/graphql", auth}, {"/api/internal/callback", cb}, {"/api/internal/callback/async", cb}, {"/api/internal/progress", cb},
		{"/noetl/execute", auth},
	} {
		for _, body := range []string{
			`{`, `[]`, `"x"`, `{"auth0_token":1,"session_duration_hours":"8"}`, `{"session_token":{"a":1}}`, `{"playbook_path":[1],"permission_type":true}`,
			`{"query":1,"variables":"x"}`, `{"request_id":"r","execution_id":{},"error":""}`, `{"request_id":"r","error":{"code":"x","message":1}}`,
			`{"path":{"$gt":""}}`, "{\"a\":\"\xff\"}", `{"a":1}{"b":2}`, strings.Repeat(`[`, 100000),
		} {
			resp, m := secDo(t, "POST", e.a.URL+tc.path, strings.NewReader(body), tc.pairs...)
			msg := fmt.Sprint(m["error"])
			if m == nil || resp.StatusCode >= 500 || secInternalText.MatchString(msg) {
				t.Errorf("%s %.40q: %d %v", tc.path, body, resp.StatusCode, m)
			}
		}
	}
	const q = `mutation($e: String!) { proxyRequest(input: {method: "GET", endpoint: $e}) { success error } }`
	res := postGQL(t, e.a.URL, tok, q, map[string]any{"e": "/api/drop"})
	if raw, _ := json.Marshal(res); secInternalText.MatchString(string(raw)) {
		t.Errorf("proxyRequest to a dying upstream: %s", raw)
	}
	if resp, m := secDo(t, "GET", e.a.URL+"/noetl/drop", nil, auth...); resp.StatusCode != 502 || m["error"] != "upstream unavailable" {
		t.Errorf("proxy to a dying upstream: %d %v", resp.StatusCode, m)
	}
}

// graphqlAliasAmplification guards batching through aliases (CWE-770; cf.
// the alias and batching amplification advisories of GraphQL servers): one
// HTTP request cannot carry more than a handful of side effects, however
// many aliased mutation fields (directly or through fragments) it names.
func (e *secEnv) graphqlAliasAmplification(t *testing.T) {
	tok := e.session(secUser)
	var fields, frag strings.Builder
	for i := range 60 {
		fmt.Fprintf(&fields, "a%d: proxyRequest(input: {method: \"GET\", endpoint: \"/api/amp\"}) { success }\n", i)
		fmt.Fprintf(&frag, "b%d: executePlaybook(name: \"ok/amp\") { id }\n", i)
	}
	for _, q := range []string{
		"mutation {\n" + fields.String() + "}",
		"mutation { ...F }\nfragment F on MutationRoot {\n" + frag.String() + "}",
	} {
		res := postGQL(t, e.a.URL, tok, q, nil)
		if res["data"] != nil || res["errors"] == nil {
			t.Errorf("%d aliased mutations: %v", 60, res)
		}
	}
	if n := len(e.proxiedFor(tok)) + len(e.executesOf("ok/amp")); n != 0 {
		t.Fatalf("%d side effects reached NoETL", n)
	}
	// A UI-sized request still works.
	res := postGQL(t, e.a.URL, tok, "mutation { a: proxyRequest(input: {method: \"GET\", endpoint: \"/api/amp\"}) { success } b: proxyRequest(input: {method: \"GET\", endpoint: \"/api/amp\"}) { success } }", nil)
	if res["errors"] != nil || len(e.proxiedFor(tok)) != 2 {
		t.Fatalf("two mutations: %v", res)
	}
}
