package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
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
