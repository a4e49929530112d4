package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
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

// LogValue keeps the token out of logs when a Session is logged whole: it
// is named by tokenID only.
func (s *Session) LogValue() slog.Value {
	if s == nil {
		return slog.Value{}
	}
	return slog.GroupValue(slog.String("session", tokenID(s.Token)), slog.Int64("user_id", s.User.UserID))
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
// [A-Za-z0-9._=-] (SPEC §5.3). It also keeps tokens valid as NATS keys,
// which cannot start or end with a dot or hold "..": such a token could be
// neither cached nor revoked across replicas.
func validTokenShape(t string) bool {
	if len(t) == 0 || len(t) > 256 || t[0] == '.' || t[len(t)-1] == '.' || strings.Contains(t, "..") {
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

// resolver turns a session token into a Session (SPEC §5.3): in-process
// near cache, revocation tombstone, the K/V session cache, then the NoETL
// server. Build it with newResolver and start its watchers with start.
type resolver struct {
	cfg      Config
	sessions kvStore
	revoked  kvStore
	noetl    *noetlClient
	rv       *rendezvous // SESSION_VALIDATE_VIA=playbook
	metrics  *metrics
	log      *slog.Logger
	now      func() time.Time
	// kvUp reports whether the K/V stores can answer now; while NATS is down
	// lookups skip them instead of waiting for a timeout.
	kvUp func() bool

	near *nearCache

	fmu     sync.Mutex
	flights map[string]*flight

	hmu   sync.Mutex
	hooks []func(token string)

	// Pre-resolved hot-path counters: a near-cache hit must not allocate.
	mNearHit, mNearNeg *series
}

// Near-cache tuning. Entries live at most SESSION_NEAR_CACHE_TTL_SECS (and
// never past the session's expires_at); the K/V watchers make changes
// visible before that.
// Invalid tokens are remembered for nearNegTTL so a client retrying a bad
// token cannot hammer NoETL. kvTimeout bounds a K/V call, so a sick NATS
// costs a request at most that much before it degrades to NoETL.
const (
	nearNegTTL  = 5 * time.Second
	nearMax     = 100_000
	kvTimeout   = 500 * time.Millisecond
	flightLimit = 2 * time.Minute
)

func newResolver(cfg Config, sessions, revoked kvStore, nx *noetlClient, rv *rendezvous, m *metrics, log *slog.Logger, kvUp func() bool) *resolver {
	if kvUp == nil {
		kvUp = func() bool { return true }
	}
	return &resolver{cfg: cfg, sessions: sessions, revoked: revoked, noetl: nx, rv: rv, metrics: m, log: log.With("component", "sessions"),
		now: time.Now, kvUp: kvUp, near: newNearCache(nearMax, min(cfg.NearCacheTTL, cfg.SessionCacheTTL)),
		flights: map[string]*flight{}, mNearHit: m.sessionLookups.with("near_hit"), mNearNeg: m.sessionLookups.with("near_invalid")}
}

// start runs the K/V watchers that keep this replica's near cache coherent
// with every other replica (and with playbooks writing the bucket) until
// ctx ends.
func (res *resolver) start(ctx context.Context) {
	res.sessions.Watch(ctx, func(key string, value []byte) {
		if value == nil {
			// Keep negative entries: the resolver itself deletes the K/V
			// entry of a token NoETL called invalid.
			res.near.dropValid(key)
			return
		}
		if !res.near.has(key) {
			return
		}
		if rec, err := decodeSessionRecord(value); err == nil {
			if s, ok := rec.session(key, res.now()); ok {
				res.near.put(key, s, res.now())
				return
			}
		}
		res.near.putInvalid(key, res.now().Add(nearNegTTL), false)
	})
	res.revoked.Watch(ctx, func(key string, value []byte) {
		if value != nil {
			res.revokeLocal(key)
		}
	})
}

// OnRevoke registers fn to run when a session is revoked: by a logout on
// this replica or a tombstone from any other. fn must not block; it may be
// called more than once for a token.
func (res *resolver) OnRevoke(fn func(token string)) {
	res.hmu.Lock()
	res.hooks = append(res.hooks, fn)
	res.hmu.Unlock()
}

// revokeLocal marks token revoked in the near cache and runs the hooks once
// per mark.
func (res *resolver) revokeLocal(token string) {
	if !res.near.putInvalid(token, res.now().Add(res.cfg.SessionMaxLifetime), true) {
		return
	}
	res.hmu.Lock()
	hooks := append([]func(string){}, res.hooks...)
	res.hmu.Unlock()
	for _, fn := range hooks {
		fn(token)
	}
}

// Revoke is logout (SPEC §5.5): a tombstone in the revocation bucket, the
// cache entry deleted, this replica's near cache and hooks told at once. The
// error says the tombstone could not be written (other replicas may still
// accept the token until NATS is back).
func (res *resolver) Revoke(ctx context.Context, token string) error {
	res.revokeLocal(token)
	if !res.kvUp() {
		return errors.New("K/V store unavailable")
	}
	ctx, cancel := context.WithTimeout(ctx, 2*kvTimeout)
	defer cancel()
	tomb, _ := json.Marshal(map[string]string{"revoked_at": res.now().UTC().Format(time.RFC3339)})
	err := res.revoked.Put(ctx, token, tomb)
	if derr := res.sessions.Delete(ctx, token); derr != nil {
		res.log.Warn("deleting revoked session from the cache failed", "session", tokenID(token), "err", derr)
	}
	return err
}

// Resolve returns the valid session for token, errInvalidSession, or
// errSessionUnavailable when NoETL could not answer on a cache miss. The
// returned Session is shared and must not be modified.
func (res *resolver) Resolve(ctx context.Context, token string) (*Session, error) {
	if res.cfg.AuthBypass {
		return &Session{Token: token, User: devUser(), ExpiresAt: res.now().Add(24 * time.Hour)}, nil
	}
	if !validTokenShape(token) {
		res.metrics.sessionLookups.with("malformed").Inc()
		return nil, errInvalidSession
	}
	if s, ok, hit := res.near.get(token, res.now()); hit {
		if !ok {
			res.mNearNeg.Inc()
			return nil, errInvalidSession
		}
		res.mNearHit.Inc()
		return s, nil
	}
	return res.resolveShared(ctx, token)
}

// flight is one lookup shared by every concurrent request for a token.
type flight struct {
	done chan struct{}
	s    *Session
	err  error
}

// resolveShared makes concurrent misses for one token share one lookup
// (single-flight). The lookup runs detached from the request that started
// it, so that request going away does not fail the others.
func (res *resolver) resolveShared(ctx context.Context, token string) (*Session, error) {
	res.fmu.Lock()
	f := res.flights[token]
	if f == nil {
		// A flight may have finished between the near-cache miss and here.
		if s, ok, hit := res.near.get(token, res.now()); hit {
			res.fmu.Unlock()
			if !ok {
				return nil, errInvalidSession
			}
			return s, nil
		}
		f = &flight{done: make(chan struct{})}
		res.flights[token] = f
		res.fmu.Unlock()
		go func() {
			lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), flightLimit)
			defer cancel()
			f.s, f.err = res.lookup(lctx, token)
			res.fmu.Lock()
			delete(res.flights, token)
			res.fmu.Unlock()
			close(f.done)
		}()
	} else {
		res.fmu.Unlock()
	}
	select {
	case <-f.done:
		return f.s, f.err
	case <-ctx.Done():
		return nil, errors.Join(errSessionUnavailable, ctx.Err())
	}
}

// lookup is the slow path: tombstone, K/V, NoETL. NATS trouble is a miss.
func (res *resolver) lookup(ctx context.Context, token string) (*Session, error) {
	now := res.now()
	kvOK := res.kvUp()
	if kvOK {
		s, found, err := res.lookupKV(ctx, token, now)
		switch {
		case err != nil:
			kvOK = false
			res.log.Warn("K/V lookup failed; asking NoETL", "session", tokenID(token), "err", err)
		case found:
			return s, errIfNil(s)
		}
	}
	var rec *sessionRecord
	var err error
	if res.cfg.SessionValidateVia == "playbook" && res.rv != nil {
		rec, err = res.rv.validateSession(ctx, res.noetl, token)
	} else {
		rec, err = res.noetl.validateSession(ctx, token)
	}
	if err != nil {
		res.metrics.sessionLookups.with("error").Inc()
		return nil, errors.Join(errSessionUnavailable, err)
	}
	s, ok := rec.session(token, res.now())
	if !ok {
		res.metrics.sessionLookups.with("noetl_invalid").Inc()
		res.near.putInvalid(token, res.now().Add(nearNegTTL), false)
		if kvOK {
			kctx, cancel := context.WithTimeout(ctx, kvTimeout)
			res.sessions.Delete(kctx, token)
			cancel()
		}
		return nil, errInvalidSession
	}
	res.metrics.sessionLookups.with("noetl_valid").Inc()
	res.near.put(token, s, res.now())
	if kvOK {
		res.store(ctx, s)
	}
	return s, nil
}

func errIfNil(s *Session) error {
	if s == nil {
		return errInvalidSession
	}
	return nil
}

// lookupKV checks the tombstone and the session record. found is true when
// K/V decided (a valid session, or a nil session for revoked/inactive/
// expired); err means the K/V stores could not answer.
func (res *resolver) lookupKV(ctx context.Context, token string, now time.Time) (s *Session, found bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, kvTimeout)
	defer cancel()
	if _, err := res.revoked.Get(ctx, token); err == nil {
		res.metrics.sessionLookups.with("revoked").Inc()
		res.revokeLocal(token)
		return nil, true, nil
	} else if !errors.Is(err, errNotFound) {
		return nil, false, err
	}
	raw, err := res.sessions.Get(ctx, token)
	if errors.Is(err, errNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	rec, derr := decodeSessionRecord(raw)
	if derr != nil {
		// Not ours to judge: a record we cannot read is a miss.
		return nil, false, nil
	}
	if s, ok := rec.session(token, now); ok {
		res.metrics.sessionLookups.with("kv_hit").Inc()
		res.near.put(token, s, now)
		return s, true, nil
	}
	// A record that says inactive or expired is refused (SPEC §5.3 fix), even
	// where the database would still say valid: a logout playbook may have
	// written it.
	res.metrics.sessionLookups.with("kv_invalid").Inc()
	res.near.putInvalid(token, now.Add(nearNegTTL), false)
	return nil, true, nil
}

// store writes s to the K/V cache in the original record layout, with
// expires_at in RFC 3339.
func (res *resolver) store(ctx context.Context, s *Session) {
	if !res.kvUp() {
		return
	}
	raw, err := json.Marshal(recordOf(s))
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, kvTimeout)
	defer cancel()
	if err := res.sessions.Put(ctx, s.Token, raw); err != nil {
		res.log.Warn("writing session to the K/V cache failed", "session", tokenID(s.Token), "err", err)
	}
}

func recordOf(s *Session) sessionRecord {
	roles, _ := json.Marshal(s.User.Roles)
	return sessionRecord{SessionToken: s.Token, UserID: s.User.UserID, Email: s.User.Email, DisplayName: s.User.DisplayName,
		ExpiresAt: s.ExpiresAt.UTC().Format(time.RFC3339Nano), IsActive: true, Roles: roles}
}

// decodeSessionRecord reads a K/V record as the gateway or a playbook wrote
// it; user_id may be a number or a numeric string.
func decodeSessionRecord(raw []byte) (*sessionRecord, error) {
	var r struct {
		SessionToken string          `json:"session_token"`
		UserID       json.RawMessage `json:"user_id"`
		Email        string          `json:"email"`
		DisplayName  string          `json:"display_name"`
		ExpiresAt    string          `json:"expires_at"`
		IsActive     bool            `json:"is_active"`
		Roles        json.RawMessage `json:"roles"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, err
	}
	id, err := (&userJSON{UserID: r.UserID}).id()
	if err != nil {
		return nil, err
	}
	return &sessionRecord{SessionToken: r.SessionToken, UserID: id, Email: r.Email, DisplayName: r.DisplayName,
		ExpiresAt: r.ExpiresAt, IsActive: r.IsActive, Roles: r.Roles}, nil
}

// nearCache is the per-replica session cache in front of K/V: bounded, short
// lived, never past a session's expiry. A nil session is a remembered
// "invalid"; revoked marks it as a tombstone.
type nearCache struct {
	ttl time.Duration
	max int

	mu sync.RWMutex
	m  map[string]nearEntry
}

type nearEntry struct {
	s       *Session
	until   time.Time
	revoked bool
}

func newNearCache(max int, ttl time.Duration) *nearCache {
	return &nearCache{ttl: ttl, max: max, m: map[string]nearEntry{}}
}

// get reports hit when the cache knows the token; ok says valid.
func (c *nearCache) get(token string, now time.Time) (s *Session, ok, hit bool) {
	c.mu.RLock()
	e, found := c.m[token]
	c.mu.RUnlock()
	if !found || !now.Before(e.until) {
		return nil, false, false
	}
	return e.s, e.s != nil, true
}

func (c *nearCache) has(token string) bool {
	c.mu.RLock()
	_, ok := c.m[token]
	c.mu.RUnlock()
	return ok
}

// put caches a valid session, unless the token is marked revoked.
func (c *nearCache) put(token string, s *Session, now time.Time) {
	until := now.Add(c.ttl)
	if s.ExpiresAt.Before(until) {
		until = s.ExpiresAt
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[token]; ok && e.revoked && now.Before(e.until) {
		return
	}
	c.makeRoom(now)
	c.m[token] = nearEntry{s: s, until: until}
}

// putInvalid remembers token as invalid until until; it reports whether a
// revocation mark is new.
func (c *nearCache) putInvalid(token string, until time.Time, revoked bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[token]
	if ok && e.revoked && time.Now().Before(e.until) {
		return false
	}
	c.makeRoom(time.Now())
	c.m[token] = nearEntry{until: until, revoked: revoked}
	return revoked
}

func (c *nearCache) dropValid(token string) {
	c.mu.Lock()
	if e, ok := c.m[token]; ok && e.s != nil {
		delete(c.m, token)
	}
	c.mu.Unlock()
}

// makeRoom keeps the cache under max: expired entries go first, then an
// arbitrary quarter (map order is random). Called with mu held.
func (c *nearCache) makeRoom(now time.Time) {
	if len(c.m) < c.max {
		return
	}
	for k, e := range c.m {
		if !now.Before(e.until) {
			delete(c.m, k)
		}
	}
	for k := range c.m {
		if len(c.m) < c.max*3/4 {
			break
		}
		delete(c.m, k)
	}
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
		s, ok := resolveOrAnswer(w, r, res, tokenFromRequest(r))
		if !ok {
			return
		}
		next.ServeHTTP(w, r.WithContext(withSession(r.Context(), s)))
	})
}

// resolveOrAnswer is the one place a handler turns a token into a session:
// a missing token is 401, an invalid session 401, NoETL unavailable 502
// (then it returns false, the answer written). The user id goes to the
// access log.
func resolveOrAnswer(w http.ResponseWriter, r *http.Request, res *resolver, token string) (*Session, bool) {
	if token == "" && !res.cfg.AuthBypass {
		writeError(w, r, http.StatusUnauthorized, "Missing authentication token", nil)
		return nil, false
	}
	s, err := res.Resolve(r.Context(), token)
	switch {
	case errors.Is(err, errSessionUnavailable):
		writeError(w, r, http.StatusBadGateway, "session validation unavailable", err)
		return nil, false
	case err != nil:
		writeError(w, r, http.StatusUnauthorized, "Invalid or expired session", nil)
		return nil, false
	}
	if ri := infoFrom(r.Context()); ri != nil {
		ri.userID = strconv.FormatInt(s.User.UserID, 10)
	}
	return s, true
}
