package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

var ada = User{UserID: 42, Email: "ada@example.com", DisplayName: "Ada", Roles: []string{"admin"}}

// inProcessResolver is the resolver run builds in in-process mode, against
// the fake NoETL.
func inProcessResolver(t testing.TB, f *fakeNoETL, env map[string]string) *resolver {
	t.Helper()
	e := map[string]string{"NOETL_BASE_URL": f.URL}
	for k, v := range env {
		e[k] = v
	}
	cfg, err := loadConfig(envOf(e))
	if err != nil {
		t.Fatal(err)
	}
	m := newMetrics()
	rv := newRendezvous(cfg, nil, discardLogger(), m)
	res := newResolver(cfg, newMemKV(cfg.SessionCacheTTL), newMemKV(cfg.SessionMaxLifetime), newNoETLClient(cfg), rv, m, discardLogger(), nil)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	res.start(ctx)
	return res
}

func validate(t testing.TB, base, token string) (int, map[string]any) {
	t.Helper()
	st, _, body := doJSON(t, "POST", base+"/api/auth/validate", map[string]any{"session_token": token}, nil)
	return st, body
}

// TestRequireSessionTokenSources: bearer, X-Session-Token and cookie all
// carry the session; a malformed or ambiguous token never reaches NoETL.
func TestRequireSessionTokenSources(t *testing.T) {
	t.Parallel()
	f := startNoETL(t)
	tok := "0123456789abcdef0123456789abcdef"
	f.addSession(tok, ada, time.Now().Add(time.Hour))
	res := inProcessResolver(t, f, nil)
	srv := httptest.NewServer(requireSession(res, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, sessionFrom(r.Context()).User.Email)
	})))
	defer srv.Close()
	for _, tc := range []struct {
		name string
		set  func(*http.Request)
		code int
	}{
		{"bearer", func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+tok) }, 200},
		{"x-session-token", func(r *http.Request) { r.Header.Set("X-Session-Token", tok) }, 200},
		{"cookie", func(r *http.Request) { r.AddCookie(&http.Cookie{Name: "session_token", Value: tok}) }, 200},
		{"none", func(r *http.Request) {}, 401},
		{"basic auth", func(r *http.Request) { r.SetBasicAuth("a", "b") }, 401},
		{"bad shape", func(r *http.Request) { r.Header.Set("X-Session-Token", "a;b/c") }, 401},
		{"too long", func(r *http.Request) { r.Header.Set("X-Session-Token", fmt.Sprintf("%0300d", 1)) }, 401},
		{"not a NATS key", func(r *http.Request) { r.Header.Set("X-Session-Token", "abc..def") }, 401},
		{"leading dot", func(r *http.Request) { r.Header.Set("X-Session-Token", ".abcdef") }, 401},
		{"duplicate authorization", func(r *http.Request) {
			r.Header.Add("Authorization", "Bearer "+tok)
			r.Header.Add("Authorization", "Bearer ffffffffffffffffffffffffffffffff")
		}, 401},
	} {
		req, _ := http.NewRequest("GET", srv.URL, nil)
		tc.set(req)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.code || (tc.code == 200 && string(body) != ada.Email) {
			t.Errorf("%s: %d %s", tc.name, resp.StatusCode, body)
		}
	}
	if n := f.Calls("POST /api/auth/session/validate"); n != 1 {
		t.Fatalf("%d NoETL validate calls, want 1", n)
	}
}

// TestSessionRecordsRefused: is_active and expires_at are enforced on K/V
// hits and NoETL answers alike; records playbooks write are read.
func TestSessionRecordsRefused(t *testing.T) {
	t.Parallel()
	f := startNoETL(t)
	res := inProcessResolver(t, f, nil)
	ctx := context.Background()
	future := time.Now().Add(time.Hour).UTC().Format("2006-01-02 15:04:05.999999-07")
	past := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)
	put := func(token, rec string) { res.sessions.Put(ctx, token, []byte(rec)) }
	put("expired1", `{"session_token":"expired1","user_id":1,"email":"a@b.c","display_name":"A","expires_at":"`+past+`","is_active":true,"roles":["admin"]}`)
	put("inactive1", `{"session_token":"inactive1","user_id":1,"email":"a@b.c","display_name":"A","expires_at":"`+future+`","is_active":false}`)
	put("playbook1", `{"session_token":"playbook1","user_id":"17","email":"p@b.c","display_name":"","expires_at":"`+future+`","is_active":true,"roles":"{dev,viewer}"}`)
	for _, tok := range []string{"expired1", "inactive1"} {
		if _, err := res.Resolve(ctx, tok); err != errInvalidSession {
			t.Errorf("%s: %v", tok, err)
		}
	}
	s, err := res.Resolve(ctx, "playbook1")
	if err != nil || s.User.UserID != 17 || s.User.DisplayName != "p@b.c" || len(s.User.Roles) != 2 {
		t.Fatalf("playbook record: %+v %v", s, err)
	}
	if n := f.totalCalls(); n != 0 {
		t.Fatalf("K/V decided, yet NoETL was called %d times", n)
	}
	// NoETL: an expired session is invalid, and an invalid answer is
	// remembered briefly.
	f.addSession("expired2", ada, time.Now().Add(-time.Second))
	for range 3 {
		if _, err := res.Resolve(ctx, "expired2"); err != errInvalidSession {
			t.Fatalf("expired2: %v", err)
		}
	}
	if n := f.Calls("POST /api/auth/session/validate"); n != 1 {
		t.Fatalf("%d validate calls for a remembered invalid token", n)
	}
	// A valid NoETL answer is cached in K/V in the original layout, RFC 3339.
	f.addSession("fresh1", ada, time.Now().Add(time.Hour))
	if _, err := res.Resolve(ctx, "fresh1"); err != nil {
		t.Fatal(err)
	}
	raw, err := res.sessions.Get(ctx, "fresh1")
	var rec map[string]any
	json.Unmarshal(raw, &rec)
	if err != nil || rec["is_active"] != true || rec["user_id"] != 42.0 || rec["session_token"] != "fresh1" {
		t.Fatalf("cached record %s %v", raw, err)
	}
	if _, err := time.Parse(time.RFC3339, rec["expires_at"].(string)); err != nil {
		t.Fatalf("expires_at %v", rec["expires_at"])
	}
}

// TestSessionSingleFlight: 200 concurrent requests with one cold token make
// exactly one NoETL call.
func TestSessionSingleFlight(t *testing.T) {
	t.Parallel()
	f := startNoETL(t)
	tok := "cafecafecafecafecafecafecafecafe"
	f.addSession(tok, ada, time.Now().Add(time.Hour))
	target, _ := url.Parse(f.URL)
	rp := httputil.NewSingleHostReverseProxy(target)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(200 * time.Millisecond) // a slow database makes the window wide
		rp.ServeHTTP(w, r)
	}))
	defer slow.Close()
	g := startGateway(t, map[string]string{"NOETL_BASE_URL": slow.URL})
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 200}}
	var wg sync.WaitGroup
	var ok atomic.Int64
	start := make(chan struct{})
	for range 200 {
		wg.Go(func() {
			<-start
			req, _ := http.NewRequest("POST", g.URL+"/api/auth/validate", jsonBody(map[string]any{"session_token": tok}))
			req.Header.Set("Content-Type", "application/json")
			resp, err := client.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			var body map[string]any
			json.NewDecoder(resp.Body).Decode(&body)
			resp.Body.Close()
			if body["valid"] == true {
				ok.Add(1)
			}
		})
	}
	close(start)
	wg.Wait()
	if ok.Load() != 200 {
		t.Fatalf("%d of 200 valid", ok.Load())
	}
	if n := f.Calls("POST /api/auth/session/validate"); n != 1 {
		t.Fatalf("%d NoETL validate calls, want exactly 1", n)
	}
}

func jsonBody(v any) io.Reader {
	raw, _ := json.Marshal(v)
	return &bytesReader{b: raw}
}

type bytesReader struct{ b []byte }

func (r *bytesReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

// TestValidateAndLogout: validate's shapes, and logout revoking a session
// the database still calls valid; twice is fine; the logout playbook runs.
func TestValidateAndLogout(t *testing.T) {
	t.Parallel()
	f := startNoETL(t)
	w := startWorker(t, f)
	w.on("auth/logout", func(map[string]any) (string, any, bool) { return "", nil, false })
	g := startGateway(t, map[string]string{"NOETL_BASE_URL": f.URL, "AUTH_PLAYBOOK_LOGOUT": "auth/logout"})
	tok := "0123456789abcdef0123456789abcdee"
	f.addSession(tok, ada, time.Now().Add(time.Hour))

	st, body := validate(t, g.URL, tok)
	u, _ := body["user"].(map[string]any)
	if st != 200 || body["valid"] != true || u["email"] != ada.Email || body["message"] != "Session is valid" {
		t.Fatalf("validate: %d %v", st, body)
	}
	if _, err := time.Parse(time.RFC3339, body["expires_at"].(string)); err != nil {
		t.Fatalf("expires_at %v", body["expires_at"])
	}
	for _, bad := range []string{"unknown0unknown0unknown0unknown0", "", "a b"} {
		st, body = validate(t, g.URL, bad)
		if st != 200 || body["valid"] != false || body["user"] != nil || body["expires_at"] != nil || body["message"] != "Session is invalid or expired" {
			t.Fatalf("validate %q: %d %v", bad, st, body)
		}
	}

	if st, _, body := doJSON(t, "POST", g.URL+"/api/auth/logout", nil, nil); st != 401 {
		t.Fatalf("logout without token: %d %v", st, body)
	}
	for i := range 2 {
		st, _, body := doJSON(t, "POST", g.URL+"/api/auth/logout", nil, map[string]string{"Authorization": "Bearer " + tok})
		if st != 200 || body["status"] != "logged_out" {
			t.Fatalf("logout %d: %d %v", i, st, body)
		}
	}
	if st, body := validate(t, g.URL, tok); st != 200 || body["valid"] != false {
		t.Fatalf("validate after logout: %d %v", st, body)
	}
	waitFor(t, 5*time.Second, "logout playbook", func() bool { return w.lastPayload("auth/logout")["session_token"] == tok })
	if n := f.Calls("POST /api/execute"); n != 1 {
		t.Fatalf("logout playbook ran %d times, want 1", n)
	}

	// Token in the body works too.
	tok2 := "0123456789abcdef0123456789abcded"
	f.addSession(tok2, ada, time.Now().Add(time.Hour))
	if st, _, body := doJSON(t, "POST", g.URL+"/api/auth/logout", map[string]any{"session_token": tok2}, nil); st != 200 || body["status"] != "logged_out" {
		t.Fatalf("body logout: %d %v", st, body)
	}
	if _, body := validate(t, g.URL, tok2); body["valid"] != false {
		t.Fatalf("body logout did not revoke: %v", body)
	}
}

func TestValidateNoETLDown(t *testing.T) {
	t.Parallel()
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close()
	g := startGateway(t, map[string]string{"NOETL_BASE_URL": dead.URL})
	st, body := validate(t, g.URL, "0123456789abcdef0123456789abcdef")
	if st != http.StatusBadGateway || body["error"] != "session validation unavailable" {
		t.Fatalf("got %d %v", st, body)
	}
}

// TestValidateSessionViaPlaybook: SESSION_VALIDATE_VIA=playbook runs the
// validate-session playbook and reads its callback.
func TestValidateSessionViaPlaybook(t *testing.T) {
	t.Parallel()
	f := startNoETL(t)
	w := startWorker(t, f)
	tok := "0123456789abcdef0123456789abcdef"
	w.on("api_integration/auth0/auth0_validate_session", func(p map[string]any) (string, any, bool) {
		if p["session_token"] != tok {
			return "success", map[string]any{"valid": false, "message": "Session not found or expired"}, true
		}
		return "success", map[string]any{"valid": true, "expires_at": "2099-01-01 00:00:00+00", "message": "Session is valid",
			"user": map[string]any{"user_id": "9", "email": "pb@example.com", "display_name": "PB", "roles": `["viewer"]`}}, true
	})
	g := startGateway(t, map[string]string{"NOETL_BASE_URL": f.URL, "SESSION_VALIDATE_VIA": "playbook"})
	w.target.Store(g.URL)
	st, body := validate(t, g.URL, tok)
	if u, _ := body["user"].(map[string]any); st != 200 || body["valid"] != true || u["user_id"] != 9.0 || body["expires_at"] != "2099-01-01T00:00:00Z" {
		t.Fatalf("valid: %d %v", st, body)
	}
	if st, body := validate(t, g.URL, "ffffffffffffffffffffffffffffffff"); st != 200 || body["valid"] != false {
		t.Fatalf("invalid: %d %v", st, body)
	}
	if f.Calls("POST /api/auth/session/validate") != 0 {
		t.Fatal("the API was used in playbook mode")
	}
}

// TestCheckAccess: input validation, the playbook's payload and answer,
// decisions cached per (token, path, action), timeouts, sync mode.
func TestCheckAccess(t *testing.T) {
	t.Parallel()
	f := startNoETL(t)
	w := startWorker(t, f)
	const path = "api_integration/auth0/check_playbook_access"
	w.on(path, func(p map[string]any) (string, any, bool) {
		pp := p["playbook_path"].(string)
		if len(pp) > 5 && pp[:5] == "data/" {
			return "success", map[string]any{"allowed": true, "playbook_path": pp, "permission_type": p["action"],
				"user": map[string]any{"user_id": "5", "email": "ada@example.com", "display_name": "Ada"}, "message": "Access granted to " + p["action"].(string) + " playbook"}, true
		}
		return "success", map[string]any{"allowed": false, "playbook_path": pp, "message": "Access denied"}, true
	})
	g := startGateway(t, map[string]string{"NOETL_BASE_URL": f.URL})
	w.target.Store(g.URL)
	tok := "0123456789abcdef0123456789abcdef"
	f.addSession(tok, ada, time.Now().Add(time.Hour))
	check := func(token, pp, perm string) (int, map[string]any) {
		st, _, body := doJSON(t, "POST", g.URL+"/api/auth/check-access", map[string]any{"session_token": token, "playbook_path": pp, "permission_type": perm}, nil)
		return st, body
	}

	st, body := check(tok, "data/report", "execute")
	u, _ := body["user"].(map[string]any)
	if st != 200 || body["allowed"] != true || u["user_id"] != 5.0 || u["roles"] == nil || body["playbook_path"] != "data/report" ||
		body["permission_type"] != "execute" || body["message"] != "Access granted to execute playbook" {
		t.Fatalf("allowed: %d %v", st, body)
	}
	pl := w.lastPayload(path)
	if pl["session_token"] != tok || pl["playbook_path"] != "data/report" || pl["action"] != "execute" || pl["request_id"] == nil ||
		pl["callback_subject"] != "noetl.callbacks."+pl["request_id"].(string) {
		t.Fatalf("payload %v", pl)
	}
	check(tok, "data/report", "execute")
	if n := f.Calls("POST /api/execute"); n != 1 {
		t.Fatalf("cached decision re-ran the playbook: %d", n)
	}
	check(tok, "data/report", "view")
	if n := f.Calls("POST /api/execute"); n != 2 {
		t.Fatalf("another action must not share the decision: %d", n)
	}
	if st, body := check(tok, "system/x", "execute"); st != 200 || body["allowed"] != false || body["user"] != nil || body["message"] != "Access denied" {
		t.Fatalf("denied: %d %v", st, body)
	}
	for _, tc := range []struct{ pp, perm string }{
		{"data/x", "edit"}, {"data/x", ""}, {"../etc/passwd", "view"}, {"data/../system", "view"},
		{"data x", "view"}, {"", "view"}, {"data/x'; drop table", "view"},
	} {
		if st, body := check(tok, tc.pp, tc.perm); st != 400 {
			t.Errorf("%q %q: %d %v", tc.pp, tc.perm, st, body)
		}
	}
	if st, _ := check("ffffffffffffffffffffffffffffffff", "data/x", "view"); st != 401 {
		t.Fatalf("unknown session: %d", st)
	}
	if st, _, _ := doJSON(t, "POST", g.URL+"/api/auth/check-access", map[string]any{"playbook_path": "data/x", "permission_type": "view"}, nil); st != 401 {
		t.Fatalf("no session: %d", st)
	}

	t.Run("timeout", func(t *testing.T) {
		w.on("slow/check", func(map[string]any) (string, any, bool) { return "", nil, false })
		g := startGateway(t, map[string]string{"NOETL_BASE_URL": f.URL, "AUTH_PLAYBOOK_CHECK_ACCESS": "slow/check", "AUTH_PLAYBOOK_TIMEOUT_SECS": "1"})
		before := w.cancels()
		st, _, body := doJSON(t, "POST", g.URL+"/api/auth/check-access", map[string]any{"session_token": tok, "playbook_path": "data/x", "permission_type": "view"}, nil)
		if st != http.StatusGatewayTimeout || body["error"] != "Check access playbook timed out" {
			t.Fatalf("%d %v", st, body)
		}
		waitFor(t, 5*time.Second, "cancel", func() bool { return w.cancels() == before+1 })
	})

	t.Run("sync", func(t *testing.T) {
		f := startNoETL(t)
		f.addSession(tok, ada, time.Now().Add(time.Hour))
		f.Handle("POST /api/auth/check-playbook-access", func(w http.ResponseWriter, r *http.Request) {
			var in map[string]string
			json.NewDecoder(r.Body).Decode(&in)
			fmt.Fprintf(w, `{"allowed":%v,"user":{"user_id":42,"email":"ada@example.com","display_name":"Ada","roles":["admin"]},"message":"ok"}`, in["action"] == "view" && in["session_token"] == tok)
		})
		g := startGateway(t, map[string]string{"NOETL_BASE_URL": f.URL, "AUTH_MODE": "sync"})
		st, _, body := doJSON(t, "POST", g.URL+"/api/auth/check-access", map[string]any{"session_token": tok, "playbook_path": "data/x", "permission_type": "view"}, nil)
		if st != 200 || body["allowed"] != true || body["message"] != "ok" {
			t.Fatalf("%d %v", st, body)
		}
		// Allowed (the proxy's and GraphQL's seam) shares the cache.
		cfg, _ := loadConfig(envOf(map[string]string{"NOETL_BASE_URL": f.URL, "AUTH_MODE": "sync"}))
		ac := newAccessChecker(cfg, newNoETLClient(cfg), nil, newMetrics())
		s := &Session{Token: tok, User: ada}
		before := f.Calls("POST /api/auth/check-playbook-access")
		d, err := ac.Decide(context.Background(), s, "data/x", "modify")
		ok, err2 := ac.Allowed(context.Background(), s, "data/x", "modify")
		if err != nil || err2 != nil || d.Allowed || ok || f.Calls("POST /api/auth/check-playbook-access") != before+1 {
			t.Fatalf("Decide/Allowed: %v %v %v %v", d, ok, err, err2)
		}
		if _, err := ac.Allowed(context.Background(), s, "../x", "view"); err == nil {
			t.Fatal("Allowed accepted a bad path")
		}
	})
}

// natsEnv is a gateway environment on a shared NATS server.
func natsEnv(ns *natsServer, f *fakeNoETL, more map[string]string) map[string]string {
	e := map[string]string{"NATS_URL": ns.URL(), "NOETL_BASE_URL": f.URL}
	for k, v := range more {
		e[k] = v
	}
	return e
}

func natsClient(t testing.TB, ns *natsServer) (*nats.Conn, jetstream.KeyValue) {
	t.Helper()
	nc, err := nats.Connect(ns.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, _ := jetstream.New(nc)
	var kv jetstream.KeyValue
	waitFor(t, 5*time.Second, "sessions bucket", func() bool {
		kv, err = js.KeyValue(context.Background(), "sessions")
		return err == nil
	})
	return nc, kv
}

// TestTwoReplicas: two gateways on one NATS server behave as one: a login
// whose callback lands on the other replica completes, a logout on one is
// refused on the other at once, a record a playbook changes in K/V is seen
// by both, and playbooks may publish callbacks on NATS directly.
func TestTwoReplicas(t *testing.T) {
	t.Parallel()
	ns := startNATS(t)
	p := startIdP(t, keyA())
	f := startNoETL(t)
	w := startWorker(t, f)
	env := natsEnv(ns, f, map[string]string{"OIDC_ISSUER": p.issuer(), "AUTH0_CLIENT_ID": "client-1"})
	gA, gB := startGateway(t, env), startGateway(t, env)

	tok := "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	w.on(loginPath, loginOK(tok, []string{"admin"}))
	w.target.Store(gB.URL) // the load balancer sends the worker to B
	if st, body := login(t, gA, sign(t, keyA(), p.claims(nil))); st != 200 || body["session_token"] != tok {
		t.Fatalf("cross-replica login: %d %v", st, body)
	}
	for _, g := range []*gateway{gA, gB} {
		if _, body := validate(t, g.URL, tok); body["valid"] != true {
			t.Fatalf("validate on %s: %v", g.URL, body)
		}
	}
	if n := f.Calls("POST /api/auth/session/validate"); n != 0 {
		t.Fatalf("replica B asked NoETL %d times for a session A cached", n)
	}

	nc, kv := natsClient(t, ns)
	t.Run("record changed by a playbook", func(t *testing.T) {
		rec := `{"session_token":"` + tok + `","user_id":42,"email":"ada@example.com","display_name":"Ada","expires_at":"2099-01-01T00:00:00Z","is_active":true,"roles":["auditor"]}`
		if _, err := kv.Put(context.Background(), tok, []byte(rec)); err != nil {
			t.Fatal(err)
		}
		// The waits here stay below the 15 s near-cache TTL: only the K/V
		// watchers can make the change visible in time.
		for _, g := range []*gateway{gA, gB} {
			waitFor(t, 8*time.Second, "new roles on "+g.URL, func() bool {
				_, body := validate(t, g.URL, tok)
				u, _ := body["user"].(map[string]any)
				roles, _ := u["roles"].([]any)
				return len(roles) == 1 && roles[0] == "auditor"
			})
		}
		kv.Put(context.Background(), tok, []byte(`{"session_token":"`+tok+`","user_id":42,"email":"ada@example.com","expires_at":"2099-01-01T00:00:00Z","is_active":false}`))
		for _, g := range []*gateway{gA, gB} {
			waitFor(t, 8*time.Second, "inactive on "+g.URL, func() bool { _, body := validate(t, g.URL, tok); return body["valid"] == false })
		}
	})

	t.Run("logout on one replica", func(t *testing.T) {
		tok2 := "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
		f.addSession(tok2, ada, time.Now().Add(time.Hour))
		for _, g := range []*gateway{gA, gB} {
			if _, body := validate(t, g.URL, tok2); body["valid"] != true {
				t.Fatalf("before logout: %v", body)
			}
		}
		if st, _, _ := doJSON(t, "POST", gA.URL+"/api/auth/logout", nil, map[string]string{"X-Session-Token": tok2}); st != 200 {
			t.Fatalf("logout: %d", st)
		}
		start := time.Now()
		waitFor(t, 8*time.Second, "revocation on B", func() bool { _, body := validate(t, gB.URL, tok2); return body["valid"] == false })
		t.Logf("revocation visible on the other replica after %v", time.Since(start))
		// A fresh replica, with nothing cached, refuses it too.
		gC := startGateway(t, env)
		if _, body := validate(t, gC.URL, tok2); body["valid"] != false {
			t.Fatalf("new replica accepted a revoked token: %v", body)
		}
	})

	t.Run("callback published on NATS", func(t *testing.T) {
		tok3 := "cccccccccccccccccccccccccccccccc"
		w.on(loginPath, loginOK(tok3, nil))
		w.mu.Lock()
		w.publish = func(subject string, body []byte) { nc.Publish(subject, body) }
		w.mu.Unlock()
		defer func() { w.mu.Lock(); w.publish = nil; w.mu.Unlock() }()
		if st, body := login(t, gB, sign(t, keyA(), p.claims(nil))); st != 200 || body["session_token"] != tok3 {
			t.Fatalf("NATS-published callback: %d %v", st, body)
		}
	})

	t.Run("tokens never logged", func(t *testing.T) {
		for _, g := range []*gateway{gA, gB} {
			if strings.Contains(g.Logs.String(), tok) {
				t.Fatal("session token in the logs")
			}
		}
	})
	t.Run("callback nobody waits for", func(t *testing.T) {
		st, _, body := doJSON(t, "POST", gA.URL+"/api/internal/callback", map[string]any{"request_id": "d1b7a0a2-0000-4000-8000-000000000000", "data": nil}, nil)
		if st != 200 || body["delivered"] != false {
			t.Fatalf("%d %v", st, body)
		}
	})
}

// TestOnRevokeAcrossReplicas: a logout on one replica runs the OnRevoke
// hooks (SSE streams close) on every other.
func TestOnRevokeAcrossReplicas(t *testing.T) {
	t.Parallel()
	ns := startNATS(t)
	f := startNoETL(t)
	tok := "dddddddddddddddddddddddddddddddd"
	f.addSession(tok, ada, time.Now().Add(time.Hour))
	cfg, _ := loadConfig(envOf(map[string]string{"NATS_URL": ns.URL(), "NOETL_BASE_URL": f.URL}))
	mk := func() *resolver {
		m := newMetrics()
		c, err := connectNATS(cfg, discardLogger(), m)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.nc.Close)
		res := newResolver(cfg, c.kv(cfg.SessionBucket, "", cfg.SessionCacheTTL), c.kv(cfg.RevocationBucket, "", cfg.SessionMaxLifetime),
			newNoETLClient(cfg), nil, m, discardLogger(), c.nc.IsConnected)
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		res.start(ctx)
		return res
	}
	a, b := mk(), mk()
	ctx := context.Background()
	if _, err := b.Resolve(ctx, tok); err != nil {
		t.Fatal(err)
	}
	var got atomic.Value
	b.OnRevoke(func(token string) { got.Store(token) })
	// Watchers start asynchronously; keep revoking until B's watcher sees it.
	waitFor(t, 5*time.Second, "hook on B", func() bool {
		if err := a.Revoke(ctx, tok); err != nil {
			t.Fatal(err)
		}
		return got.Load() == tok
	})
	if _, err := b.Resolve(ctx, tok); err != errInvalidSession {
		t.Fatalf("B after revoke: %v", err)
	}
}

// TestNATSOutage: with NATS stopped sessions still resolve through NoETL;
// when it is back, caching in K/V resumes.
func TestNATSOutage(t *testing.T) {
	t.Parallel()
	ns := startNATS(t)
	f := startNoETL(t)
	tok := func(s string) string { return strings.Repeat("0", 30) + s }
	for _, s := range []string{"e1", "e2", "e3"} {
		f.addSession(tok(s), ada, time.Now().Add(time.Hour))
	}
	g := startGateway(t, natsEnv(ns, f, nil))
	if _, body := validate(t, g.URL, tok("e1")); body["valid"] != true {
		t.Fatalf("before outage: %v", body)
	}
	ns.stop()
	waitFor(t, 5*time.Second, "nats down", func() bool {
		_, _, body := doJSON(t, "GET", g.URL+"/ready", nil, nil)
		checks, _ := body["checks"].(map[string]any)
		return checks["nats"] == "down"
	})
	start := time.Now()
	for _, s := range []string{"e1", "e2"} {
		if st, body := validate(t, g.URL, tok(s)); st != 200 || body["valid"] != true {
			t.Fatalf("during outage %s: %d %v", s, st, body)
		}
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("degraded lookups took %v", d)
	}
	ns.start()
	waitFor(t, 10*time.Second, "nats back", func() bool {
		_, _, body := doJSON(t, "GET", g.URL+"/ready", nil, nil)
		checks, _ := body["checks"].(map[string]any)
		return checks["nats"] == "ok"
	})
	if _, body := validate(t, g.URL, tok("e3")); body["valid"] != true {
		t.Fatalf("after outage: %v", body)
	}
	_, kv := natsClient(t, ns)
	if _, err := kv.Get(context.Background(), tok("e3")); err != nil {
		t.Fatalf("session not cached in K/V after NATS came back: %v", err)
	}
}

// TestLogoutCrossOrigin: a foreign site cannot log a user out through the
// session cookie; the configured UI origins can.
func TestLogoutCrossOrigin(t *testing.T) {
	t.Parallel()
	f := startNoETL(t)
	tok := "0123456789abcdef0123456789abcdef"
	f.addSession(tok, ada, time.Now().Add(time.Hour))
	g := startGateway(t, map[string]string{"NOETL_BASE_URL": f.URL})
	hdr := map[string]string{"Cookie": "session_token=" + tok, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
	if st, _, body := doJSON(t, "POST", g.URL+"/api/auth/logout", nil, hdr); st != 403 || body["error"] != "cross-origin request refused" {
		t.Fatalf("cross-site logout: %d %v", st, body)
	}
	if _, body := validate(t, g.URL, tok); body["valid"] != true {
		t.Fatal("refused logout revoked the session")
	}
	hdr["Origin"] = "http://localhost:3000"
	if st, _, body := doJSON(t, "POST", g.URL+"/api/auth/logout", nil, hdr); st != 200 {
		t.Fatalf("UI-origin logout: %d %v", st, body)
	}
}

func TestSessionLogValueHidesToken(t *testing.T) {
	t.Parallel()
	var buf strings.Builder
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	s := &Session{Token: "0123456789abcdef0123456789abcdef", User: ada}
	log.Info("x", "s", s)
	if strings.Contains(buf.String(), s.Token) || !strings.Contains(buf.String(), tokenID(s.Token)) {
		t.Fatalf("log line %s", buf.String())
	}
}
