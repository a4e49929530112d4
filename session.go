package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// User is a session's identity, in the original's JSON shape.
type User struct {
	UserID      int64    `json:"user_id"`
	Email       string   `json:"email"`
	DisplayName string   `json:"display_name"`
	Roles       []string `json:"roles"`
}

// Session is a resolved, valid session.
type Session struct {
	Token     string
	User      User
	ExpiresAt time.Time
}

// sessionRecord is the value layout of the NATS K/V "sessions" bucket, as
// the original gateway and the auth playbooks write it (REFERENCE §3.2).
type sessionRecord struct {
	SessionToken string          `json:"session_token"`
	UserID       int64           `json:"user_id"`
	Email        string          `json:"email"`
	DisplayName  string          `json:"display_name"`
	ExpiresAt    string          `json:"expires_at"`
	IsActive     bool            `json:"is_active"`
	Roles        json.RawMessage `json:"roles,omitempty"`
}

var (
	// errInvalidSession: unknown, expired, inactive, revoked or malformed.
	errInvalidSession = errors.New("invalid or expired session")
	// errSessionUnavailable: the session could not be checked (NoETL down).
	errSessionUnavailable = errors.New("session validation unavailable")
)

// tokenID names a session in logs: the first 8 hex digits of the SHA-256 of
// its token. The token itself is never logged.
func tokenID(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:4])
}

// validTokenShape is the check done before any lookup: 1–256 characters of
// [A-Za-z0-9._=-] (SPEC §5.3). It also keeps tokens valid as NATS keys.
func validTokenShape(t string) bool {
	if len(t) == 0 || len(t) > 256 {
		return false
	}
	for i := 0; i < len(t); i++ {
		c := t[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '=' || c == '-') {
			return false
		}
	}
	return true
}

// tokenFromRequest finds the session token: Authorization Bearer, then
// X-Session-Token, then the session_token cookie. A request with more than
// one Authorization header is ambiguous and yields no token.
func tokenFromRequest(r *http.Request) string {
	if auths := r.Header.Values("Authorization"); len(auths) > 1 {
		return ""
	} else if len(auths) == 1 && strings.HasPrefix(auths[0], "Bearer ") {
		return auths[0][len("Bearer "):]
	}
	if t := r.Header.Get("X-Session-Token"); t != "" {
		return t
	}
	if c, err := r.Cookie("session_token"); err == nil {
		return c.Value
	}
	return ""
}

type sessionKey struct{}

// sessionFrom returns the session that requireSession put on the context.
func sessionFrom(ctx context.Context) *Session {
	s, _ := ctx.Value(sessionKey{}).(*Session)
	return s
}

func withSession(ctx context.Context, s *Session) context.Context {
	return context.WithValue(ctx, sessionKey{}, s)
}

// resolver turns a session token into a Session (SPEC §5.3): revocation
// tombstone, then the K/V session cache, then the NoETL server.
type resolver struct {
	cfg      Config
	sessions kvStore
	revoked  kvStore
	noetl    *noetlClient
	metrics  *metrics
	now      func() time.Time
}

// Resolve returns the valid session for token, errInvalidSession, or
// errSessionUnavailable when NoETL could not answer on a cache miss.
func (res *resolver) Resolve(ctx context.Context, token string) (*Session, error) {
	if res.cfg.AuthBypass {
		return &Session{Token: token, User: devUser(), ExpiresAt: res.now().Add(24 * time.Hour)}, nil
	}
	if !validTokenShape(token) {
		res.metrics.sessionLookups.with("malformed").Inc()
		return nil, errInvalidSession
	}
	if _, err := res.revoked.Get(ctx, token); err == nil {
		res.metrics.sessionLookups.with("revoked").Inc()
		return nil, errInvalidSession
	}
	if raw, err := res.sessions.Get(ctx, token); err == nil {
		var rec sessionRecord
		if json.Unmarshal(raw, &rec) == nil {
			if s, ok := rec.session(token, res.now()); ok {
				res.metrics.sessionLookups.with("kv_hit").Inc()
				return s, nil
			}
		}
	}
	rec, err := res.noetl.validateSession(ctx, token)
	if err != nil {
		res.metrics.sessionLookups.with("error").Inc()
		return nil, errors.Join(errSessionUnavailable, err)
	}
	s, ok := rec.session(token, res.now())
	if !ok {
		res.metrics.sessionLookups.with("noetl_invalid").Inc()
		res.sessions.Delete(ctx, token)
		return nil, errInvalidSession
	}
	res.metrics.sessionLookups.with("noetl_valid").Inc()
	if raw, err := json.Marshal(rec); err == nil {
		res.sessions.Put(ctx, token, raw)
	}
	return s, nil
}

// session checks a record (SPEC §5.3 fix): valid only when active and not
// expired.
func (rec *sessionRecord) session(token string, now time.Time) (*Session, bool) {
	if rec == nil || !rec.IsActive {
		return nil, false
	}
	exp, ok := parseExpiry(rec.ExpiresAt)
	if !ok || !now.Before(exp) {
		return nil, false
	}
	name := rec.DisplayName
	if name == "" {
		name = rec.Email
	}
	return &Session{Token: token, ExpiresAt: exp, User: User{
		UserID: rec.UserID, Email: rec.Email, DisplayName: name, Roles: parseRoles(rec.Roles),
	}}, true
}

// parseExpiry reads expires_at in RFC 3339 or PostgreSQL's text format
// ("2026-01-28 22:11:41.335589+00").
func parseExpiry(s string) (time.Time, bool) {
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02 15:04:05.999999999-07", "2006-01-02 15:04:05.999999999-07:00", "2006-01-02T15:04:05.999999999-07", "2006-01-02 15:04:05.999999999Z07:00"} {
		if t, err := time.Parse(layout, strings.TrimSpace(s)); err == nil {
			return t, true
		}
	}
	return time.Time{}, false
}

// parseRoles accepts roles in the four forms the original did (REFERENCE
// §3.4): a JSON array of strings, a string holding a JSON array, a
// PostgreSQL array literal {a,b}, or any other non-empty string as one role.
func parseRoles(raw json.RawMessage) []string {
	roles := []string{}
	var arr []any
	if json.Unmarshal(raw, &arr) == nil {
		for _, v := range arr {
			if s, ok := v.(string); ok {
				roles = append(roles, s)
			}
		}
		return roles
	}
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return roles
	}
	s = strings.TrimSpace(s)
	switch {
	case s == "":
		return roles
	case strings.HasPrefix(s, "["):
		return parseRoles(json.RawMessage(s))
	case strings.HasPrefix(s, "{") && strings.HasSuffix(s, "}"):
		for _, p := range strings.Split(s[1:len(s)-1], ",") {
			if p = strings.Trim(strings.TrimSpace(p), `"`); p != "" {
				roles = append(roles, p)
			}
		}
		return roles
	}
	return append(roles, s)
}

func devUser() User {
	return User{UserID: 0, Email: "dev@localhost", DisplayName: "Dev User", Roles: []string{"admin"}}
}

// requireSession resolves the request's session or answers 401/502; the
// session is then on the request context (sessionFrom).
func requireSession(res *resolver, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token := tokenFromRequest(r)
		if token == "" && !res.cfg.AuthBypass {
			writeError(w, r, http.StatusUnauthorized, "Missing authentication token", nil)
			return
		}
		s, err := res.Resolve(r.Context(), token)
		switch {
		case errors.Is(err, errSessionUnavailable):
			writeError(w, r, http.StatusBadGateway, "session validation unavailable", err)
			return
		case err != nil:
			writeError(w, r, http.StatusUnauthorized, "Invalid or expired session", nil)
			return
		}
		if ri := infoFrom(r.Context()); ri != nil {
			ri.userID = strconv.FormatInt(s.User.UserID, 10)
		}
		next.ServeHTTP(w, r.WithContext(withSession(r.Context(), s)))
	})
}
