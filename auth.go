package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"time"
)

// handleLogin is POST /api/auth/login (SPEC §5.1): verify the ID token
// ourselves, then have NoETL create the session (login playbook and its
// callback, or the sync endpoint), and cache the session.
func handleLogin(cfg Config, v *verifier, nx *noetlClient, rv *rendezvous, res *resolver, m *metrics) http.Handler {
	type request struct {
		Auth0Token           string  `json:"auth0_token"`
		Auth0RefreshToken    *string `json:"auth0_refresh_token"`
		SessionDurationHours *int32  `json:"session_duration_hours"`
		// auth0_domain, client_ip and client_user_agent from the body are
		// ignored: the issuer comes from configuration and the client's
		// address and agent from the connection.
	}
	type response struct {
		Status       string `json:"status"`
		SessionToken string `json:"session_token"`
		User         User   `json:"user"`
		ExpiresAt    string `json:"expires_at"`
		Message      string `json:"message"`
	}
	domain := cfg.Auth0Domain
	if u, err := url.Parse(cfg.Issuer); domain == "" && err == nil {
		domain = u.Host
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fail := func(status int, outcome, msg string, err error) {
			m.logins.with(outcome).Inc()
			writeError(w, r, status, msg, err)
		}
		if v == nil {
			fail(http.StatusServiceUnavailable, "unconfigured", "identity provider not configured", nil)
			return
		}
		var in request
		if !decodeJSON(w, r, &in) {
			m.logins.with("bad_request").Inc()
			return
		}
		if in.Auth0Token == "" {
			fail(http.StatusBadRequest, "bad_request", "auth0_token is required", nil)
			return
		}
		claims, err := v.Verify(r.Context(), in.Auth0Token)
		if err != nil {
			reason := "invalid token"
			var te *tokenError
			if errors.As(err, &te) {
				reason = te.reason
			}
			fail(http.StatusUnauthorized, "invalid_token", "Invalid credentials: "+reason, err)
			return
		}
		refresh, hours := "", int32(8)
		if in.Auth0RefreshToken != nil {
			refresh = *in.Auth0RefreshToken
		}
		if in.SessionDurationHours != nil {
			hours = *in.SessionDurationHours
		}
		name := claims.Name
		if name == "" {
			name = claims.Email
		}
		agent := r.UserAgent()
		if agent == "" {
			agent = "unknown"
		} else if len(agent) > 512 {
			agent = agent[:512]
		}
		// The playbook stores client_ip as inet: always send an address.
		ip := "0.0.0.0"
		if a := clientIP(r, cfg.TrustedProxies); a.IsValid() {
			ip = a.String()
		}
		payload := map[string]any{
			"auth0_token":            in.Auth0Token,
			"auth0_refresh_token":    refresh,
			"auth0_domain":           domain,
			"session_duration_hours": hours,
			"client_ip":              ip,
			"client_user_agent":      agent,
			"gateway_url":            cfg.PublicURL,
			"verified_claims": map[string]any{
				"sub": claims.Subject, "email": claims.Email, "name": name, "email_verified": claims.EmailVerified == true || claims.EmailVerified == "true",
			},
		}

		var data json.RawMessage
		if cfg.AuthMode == "sync" {
			err := nx.postJSON(r.Context(), "/api/auth/login", payload, &data)
			var se *noetlStatusError
			switch {
			case errors.As(err, &se) && (se.Status == http.StatusUnauthorized || se.Status == http.StatusForbidden):
				fail(http.StatusUnauthorized, "denied", "Invalid credentials", err)
				return
			case err != nil:
				fail(http.StatusBadGateway, "error", "Login failed", err)
				return
			}
		} else {
			msg, err := rv.runPlaybook(r.Context(), nx, cfg.PlaybookLogin, payload)
			switch {
			case errors.Is(err, errPlaybookTimeout):
				fail(http.StatusGatewayTimeout, "timeout", "Login playbook timed out", err)
				return
			case err != nil:
				fail(http.StatusBadGateway, "error", "Login playbook failed", err)
				return
			}
			if msg.Status != "success" {
				fail(http.StatusUnauthorized, "denied", callbackReason(msg.Data, "Invalid credentials"), nil)
				return
			}
			data = msg.Data
		}
		s, status, errMsg := readLogin(data, time.Now())
		if status != 0 {
			outcome := "error"
			if status == http.StatusUnauthorized {
				outcome = "denied"
			}
			fail(status, outcome, errMsg, nil)
			return
		}
		res.store(r.Context(), s)
		res.near.put(s.Token, s, time.Now())
		m.logins.with("ok").Inc()
		loggerFrom(r).Info("login", "session", tokenID(s.Token), "user_id", s.User.UserID)
		writeJSON(w, http.StatusOK, response{Status: "authenticated", SessionToken: s.Token, User: s.User,
			ExpiresAt: s.ExpiresAt.UTC().Format(time.RFC3339Nano), Message: "Authentication successful"})
	})
}

// readLogin applies the original's rules to a login result (REFERENCE §1.1
// error table); status 0 means success.
func readLogin(raw json.RawMessage, now time.Time) (*Session, int, string) {
	var data map[string]json.RawMessage
	if json.Unmarshal(raw, &data) != nil || data == nil {
		return nil, http.StatusInternalServerError, "Login callback missing status field"
	}
	var status string
	if json.Unmarshal(data["status"], &status) != nil {
		return nil, http.StatusInternalServerError, "Login callback missing status field"
	}
	if status != "authenticated" {
		return nil, http.StatusUnauthorized, callbackReason(raw, "Authentication status: "+truncate(status, 64))
	}
	var token string
	if json.Unmarshal(data["session_token"], &token) != nil || token == "" {
		return nil, http.StatusInternalServerError, "No session token returned"
	}
	if !validTokenShape(token) {
		// A token we would refuse on every later request is no session.
		return nil, http.StatusInternalServerError, "Invalid session token returned"
	}
	if u, ok := data["user"]; !ok || string(u) == "null" {
		return nil, http.StatusInternalServerError, "No user data returned"
	}
	var u userJSON
	var email string
	var user map[string]json.RawMessage
	if json.Unmarshal(data["user"], &user) != nil || json.Unmarshal(user["email"], &email) != nil {
		return nil, http.StatusInternalServerError, "Invalid email"
	}
	json.Unmarshal(user["display_name"], &u.DisplayName)
	u.UserID, u.Roles = user["user_id"], user["roles"]
	id, err := u.id()
	if err != nil {
		return nil, http.StatusInternalServerError, "Invalid user_id"
	}
	var expStr string
	if json.Unmarshal(data["expires_at"], &expStr) != nil {
		return nil, http.StatusInternalServerError, "Invalid expires_at"
	}
	exp, ok := parseExpiry(expStr)
	if !ok {
		return nil, http.StatusInternalServerError, "Invalid expires_at"
	}
	if !now.Before(exp) {
		return nil, http.StatusInternalServerError, "Session already expired"
	}
	name := u.DisplayName
	if name == "" {
		name = email
	}
	return &Session{Token: token, ExpiresAt: exp, User: User{UserID: id, Email: email, DisplayName: name, Roles: parseRoles(u.Roles)}}, 0, ""
}

// callbackReason builds the client message from a result's data.message and
// data.error, as the original did.
func callbackReason(raw json.RawMessage, fallback string) string {
	var d struct {
		Message any `json:"message"`
		Error   any `json:"error"`
	}
	json.Unmarshal(raw, &d)
	msg, _ := d.Message.(string)
	e, _ := d.Error.(string)
	msg, e = truncate(msg, 200), truncate(e, 200)
	switch {
	case msg != "" && e != "":
		return msg + ": " + e
	case msg != "":
		return msg
	case e != "":
		return e
	}
	return fallback
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// handleValidate is POST /api/auth/validate (SPEC §5.2): 200 with valid true
// or false; 502 when NoETL cannot answer on a miss.
func handleValidate(res *resolver) http.Handler {
	type request struct {
		SessionToken string `json:"session_token"`
	}
	type response struct {
		Valid     bool    `json:"valid"`
		User      *User   `json:"user"`
		ExpiresAt *string `json:"expires_at"`
		Message   string  `json:"message"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var in request
		if !decodeJSON(w, r, &in) {
			return
		}
		s, err := res.Resolve(r.Context(), in.SessionToken)
		switch {
		case errors.Is(err, errSessionUnavailable):
			writeError(w, r, http.StatusBadGateway, "session validation unavailable", err)
		case err != nil:
			writeJSON(w, http.StatusOK, response{Message: "Session is invalid or expired"})
		default:
			exp := s.ExpiresAt.UTC().Format(time.RFC3339Nano)
			u := s.User
			writeJSON(w, http.StatusOK, response{Valid: true, User: &u, ExpiresAt: &exp, Message: "Session is valid"})
		}
	})
}

// handleCheckAccess is POST /api/auth/check-access (SPEC §5.4).
func handleCheckAccess(res *resolver, ac *accessChecker) http.Handler {
	type request struct {
		SessionToken   string `json:"session_token"`
		PlaybookPath   string `json:"playbook_path"`
		PermissionType string `json:"permission_type"`
	}
	type response struct {
		Allowed        bool   `json:"allowed"`
		User           *User  `json:"user"`
		PlaybookPath   string `json:"playbook_path"`
		PermissionType string `json:"permission_type"`
		Message        string `json:"message"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var in request
		if !decodeJSON(w, r, &in) {
			return
		}
		if err := validAccessRequest(in.PlaybookPath, in.PermissionType); err != nil {
			writeError(w, r, http.StatusBadRequest, err.Error(), nil)
			return
		}
		token := in.SessionToken
		if token == "" {
			token = tokenFromRequest(r)
		}
		s, ok := resolveOrAnswer(w, r, res, token)
		if !ok {
			return
		}
		d, err := ac.Decide(r.Context(), s, in.PlaybookPath, in.PermissionType)
		switch {
		case errors.Is(err, errPlaybookTimeout):
			writeError(w, r, http.StatusGatewayTimeout, "Check access playbook timed out", err)
			return
		case err != nil:
			writeError(w, r, http.StatusBadGateway, "Check access playbook failed", err)
			return
		}
		writeJSON(w, http.StatusOK, response{Allowed: d.Allowed, User: d.User, PlaybookPath: in.PlaybookPath,
			PermissionType: in.PermissionType, Message: d.Message})
	})
}

// handleLogout is POST /api/auth/logout (SPEC §5.5). Logging out a token
// that is already invalid (or logged out) is a success with nothing to do.
// The session cookie makes it CSRF-able, so cross-origin browser requests
// are refused unless they come from a CORS-allowed origin.
func handleLogout(cfg Config, res *resolver, nx *noetlClient) http.Handler {
	h := logoutHandler(cfg, res, nx)
	if contains(cfg.CORSOrigins, "*") {
		return h
	}
	cop := http.NewCrossOriginProtection()
	for _, o := range cfg.CORSOrigins {
		cop.AddTrustedOrigin(o)
	}
	cop.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, http.StatusForbidden, "cross-origin request refused", nil)
	}))
	return cop.Handler(h)
}

func logoutHandler(cfg Config, res *resolver, nx *noetlClient) http.Handler {
	type request struct {
		SessionToken string `json:"session_token"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token := tokenFromRequest(r)
		if token == "" && len(r.Header.Values("Authorization")) < 2 && r.ContentLength != 0 && r.Body != nil && r.Body != http.NoBody {
			var in request
			if !decodeJSON(w, r, &in) {
				return
			}
			token = in.SessionToken
		}
		if token == "" {
			writeError(w, r, http.StatusUnauthorized, "Missing authentication token", nil)
			return
		}
		if !validTokenShape(token) {
			writeError(w, r, http.StatusUnauthorized, "Invalid or expired session", nil)
			return
		}
		_, err := res.Resolve(r.Context(), token)
		if errors.Is(err, errInvalidSession) {
			writeJSON(w, http.StatusOK, map[string]string{"status": "logged_out"})
			return
		}
		// Valid, or NoETL could not say: revoke either way, logging out
		// must not depend on NoETL being up.
		if err := res.Revoke(r.Context(), token); err != nil {
			writeError(w, r, http.StatusServiceUnavailable, "logout could not be recorded", err)
			return
		}
		loggerFrom(r).Info("logout", "session", tokenID(token))
		if cfg.AuthMode == "sync" || cfg.PlaybookLogout != "" {
			log := loggerFrom(r)
			// Detached: the answer does not wait for NoETL. Built here so
			// the goroutine does not touch the request after the handler
			// returned.
			ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), cfg.NoETLTimeout)
			go func() {
				defer cancel()
				var err error
				if cfg.AuthMode == "sync" {
					err = nx.postJSON(ctx, "/api/auth/logout", map[string]string{"session_token": token}, nil)
				} else {
					_, err = nx.execute(ctx, cfg.PlaybookLogout, map[string]any{"session_token": token, "gateway_url": cfg.PublicURL})
				}
				if err != nil {
					log.Warn("NoETL logout failed; the session stays revoked at the gateway", "session", tokenID(token), "err", err)
				}
			}()
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "logged_out"})
	})
}

var accessPath = regexp.MustCompile(`^[A-Za-z0-9_./*-]{1,256}$`)

// validAccessRequest checks check-access input before anything reaches a
// playbook's SQL (SPEC §5.4).
func validAccessRequest(path, action string) error {
	switch action {
	case "execute", "view", "modify":
	default:
		return errors.New("permission_type must be execute, view or modify")
	}
	if !accessPath.MatchString(path) || strings.Contains(path, "..") {
		return errors.New("invalid playbook_path")
	}
	return nil
}

// accessChecker decides whether a session may act on a playbook (SPEC §5.4),
// through the check-access playbook or NoETL's sync endpoint. Decisions are
// cached for ACCESS_CACHE_TTL_SECS by (session token, path, action).
type accessChecker struct {
	cfg     Config
	noetl   *noetlClient
	rv      *rendezvous
	metrics *metrics
	now     func() time.Time

	mu    sync.Mutex
	cache map[accessKey]accessEntry
}

type accessKey struct{ token, path, action string }

type accessEntry struct {
	d     accessDecision
	until time.Time
}

// accessDecision is one answer of the check-access playbook or endpoint.
type accessDecision struct {
	Allowed bool
	User    *User // nil when the answer named none (denied)
	Message string
}

const accessCacheMax = 100_000

func newAccessChecker(cfg Config, nx *noetlClient, rv *rendezvous, m *metrics) *accessChecker {
	return &accessChecker{cfg: cfg, noetl: nx, rv: rv, metrics: m, now: time.Now, cache: map[accessKey]accessEntry{}}
}

// Allowed reports the access decision for (session, playbook path, action),
// action being execute, view or modify. It shares Decide's cache.
func (ac *accessChecker) Allowed(ctx context.Context, s *Session, path, action string) (bool, error) {
	d, err := ac.Decide(ctx, s, path, action)
	return d.Allowed, err
}

// Decide returns the (possibly cached) decision.
func (ac *accessChecker) Decide(ctx context.Context, s *Session, path, action string) (accessDecision, error) {
	if err := validAccessRequest(path, action); err != nil {
		return accessDecision{}, err
	}
	key := accessKey{s.Token, path, action}
	now := ac.now()
	ac.mu.Lock()
	e, ok := ac.cache[key]
	ac.mu.Unlock()
	if ok && now.Before(e.until) {
		ac.metrics.accessChecks.with("cached").Inc()
		return e.d, nil
	}
	d, err := ac.ask(ctx, s.Token, path, action)
	if err != nil {
		ac.metrics.accessChecks.with("error").Inc()
		return accessDecision{}, err
	}
	if d.Allowed {
		ac.metrics.accessChecks.with("allowed").Inc()
	} else {
		ac.metrics.accessChecks.with("denied").Inc()
	}
	if ac.cfg.AccessCacheTTL > 0 {
		ac.mu.Lock()
		if len(ac.cache) >= accessCacheMax {
			for k, e := range ac.cache {
				if !now.Before(e.until) || len(ac.cache) >= accessCacheMax*3/4 {
					delete(ac.cache, k)
				}
			}
		}
		ac.cache[key] = accessEntry{d: d, until: now.Add(ac.cfg.AccessCacheTTL)}
		ac.mu.Unlock()
	}
	return d, nil
}

// forget drops every cached decision of a revoked session.
func (ac *accessChecker) forget(token string) {
	ac.mu.Lock()
	for k := range ac.cache {
		if k.token == token {
			delete(ac.cache, k)
		}
	}
	ac.mu.Unlock()
}

func (ac *accessChecker) ask(ctx context.Context, token, path, action string) (accessDecision, error) {
	var data json.RawMessage
	if ac.cfg.AuthMode == "sync" {
		err := ac.noetl.postJSON(ctx, "/api/auth/check-playbook-access",
			map[string]string{"session_token": token, "playbook_path": path, "action": action}, &data)
		if err != nil {
			return accessDecision{}, fmt.Errorf("check access: %w", err)
		}
	} else {
		if ac.rv == nil {
			return accessDecision{}, errors.New("check access: no playbook rendezvous")
		}
		msg, err := ac.rv.runPlaybook(ctx, ac.noetl, ac.cfg.PlaybookCheckAccess,
			map[string]any{"session_token": token, "playbook_path": path, "action": action})
		if err != nil {
			return accessDecision{}, fmt.Errorf("check access playbook: %w", err)
		}
		// The callback's own status is ignored, as the original did: a
		// failed playbook reports allowed:false (or nothing).
		data = msg.Data
	}
	return readAccess(data), nil
}

// readAccess applies the original's rules (REFERENCE §1.3).
func readAccess(raw json.RawMessage) accessDecision {
	var data struct {
		Allowed any                        `json:"allowed"`
		User    map[string]json.RawMessage `json:"user"`
		Message any                        `json:"message"`
	}
	json.Unmarshal(raw, &data)
	d := accessDecision{Message: "Access check completed"}
	d.Allowed, _ = data.Allowed.(bool)
	if m, ok := data.Message.(string); ok && m != "" {
		d.Message = truncate(m, 200)
	}
	if data.User != nil {
		u := User{Email: "unknown", DisplayName: "Unknown User"}
		if id, err := (&userJSON{UserID: data.User["user_id"]}).id(); err == nil {
			u.UserID = id
		}
		var s string
		if json.Unmarshal(data.User["email"], &s) == nil && s != "" {
			u.Email = s
		}
		if s = ""; json.Unmarshal(data.User["display_name"], &s) == nil && s != "" {
			u.DisplayName = s
		}
		u.Roles = parseRoles(data.User["roles"])
		d.User = &u
	}
	return d
}
