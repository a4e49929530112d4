package main

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Config is every setting of the gateway, read once from the environment by
// loadConfig. Each field names its variable and default; nothing else in the
// program reads the environment.
type Config struct {
	// Port is ROUTER_PORT (alias GATEWAY_PORT), default 8090: the public
	// listener's port. 0 picks a free port (tests).
	Port int
	// Bind is GATEWAY_BIND, default 0.0.0.0: the public listener's address.
	Bind string
	// InternalAddr is GATEWAY_INTERNAL_ADDR, default empty. When set (for
	// example ":8091") internal routes (worker callbacks, /metrics) are served
	// only on this second listener.
	InternalAddr string
	// PublicURL is GATEWAY_PUBLIC_URL, default http://localhost:<port> (or the
	// internal listener's URL when that is set): where workers reach the
	// callback routes; injected into playbook payloads as gateway_url.
	PublicURL string

	// NoETLBaseURL is NOETL_BASE_URL, default http://localhost:8082, without a
	// trailing slash.
	NoETLBaseURL string
	// NoETLTimeout is NOETL_TIMEOUT_SECS, default 120: the timeout of
	// gateway→NoETL API calls and the proxy's wait for response headers.
	NoETLTimeout time.Duration

	// AuthMode is AUTH_MODE, default "playbook": sessions are created and
	// checked by NoETL playbooks; "sync" uses NoETL's synchronous endpoints.
	AuthMode string
	// PlaybookLogin is AUTH_PLAYBOOK_LOGIN, default api_integration/auth0/auth0_login.
	PlaybookLogin string
	// PlaybookValidateSession is AUTH_PLAYBOOK_VALIDATE_SESSION, default
	// api_integration/auth0/auth0_validate_session, used on a cache miss when
	// SessionValidateVia is "playbook".
	PlaybookValidateSession string
	// PlaybookCheckAccess is AUTH_PLAYBOOK_CHECK_ACCESS, default
	// api_integration/auth0/check_playbook_access.
	PlaybookCheckAccess string
	// PlaybookLogout is AUTH_PLAYBOOK_LOGOUT, default empty: an optional
	// playbook that deactivates a session in the database.
	PlaybookLogout string
	// SessionDBCredential is AUTH_SESSION_DB_CREDENTIAL, default pg_auth, sent
	// as "credential" to /api/auth/session/validate.
	SessionDBCredential string
	// PlaybookTimeout is AUTH_PLAYBOOK_TIMEOUT_SECS, default 60: how long login
	// and check-access wait for their playbook's callback.
	PlaybookTimeout time.Duration
	// SessionValidateVia is SESSION_VALIDATE_VIA, default "api": the
	// cache-miss path, "api" or "playbook".
	SessionValidateVia string
	// AuthzEnforce is AUTHZ_ENFORCE, default true: the gateway enforces
	// check-access before executing playbooks.
	AuthzEnforce bool
	// AccessCacheTTL is ACCESS_CACHE_TTL_SECS, default 60.
	AccessCacheTTL time.Duration

	// Auth0Domain is AUTH0_DOMAIN, default empty, e.g. acme.us.auth0.com.
	Auth0Domain string
	// Audiences is AUTH0_CLIENT_ID plus AUTH0_AUDIENCE (comma lists): the
	// accepted "aud" values of an ID token. Empty accepts any audience.
	Audiences []string
	// Issuer is OIDC_ISSUER, or https://<AUTH0_DOMAIN>/ when that is set. Empty
	// means no identity provider: login answers 503.
	Issuer string
	// JWKSURL is OIDC_JWKS_URL, or https://<AUTH0_DOMAIN>/.well-known/jwks.json
	// for Auth0; empty with OIDC_ISSUER means discovery.
	JWKSURL string
	// JWTAlgorithms is JWT_ALGORITHMS, default RS256. none and HMAC are refused.
	JWTAlgorithms []string
	// JWTLeeway is JWT_LEEWAY_SECS, default 60: clock skew on exp, nbf, iat.
	JWTLeeway time.Duration
	// JWKSRefresh is JWKS_REFRESH_SECS, default 3600.
	JWKSRefresh time.Duration
	// JWKSMinRefresh is JWKS_MIN_REFRESH_SECS, default 30: the cooldown between
	// refetches triggered by an unknown kid.
	JWKSMinRefresh time.Duration

	// NATSURL is NATS_URL, default empty (in-process mode). A comma list of
	// nats:// or tls:// servers; user:pass@ works. Secret: may hold a password.
	NATSURL string
	// NATSCreds is NATS_CREDS, default empty: path of a .creds file.
	NATSCreds string
	// NATSUser and NATSPassword are NATS_USERNAME and NATS_PASSWORD.
	NATSUser, NATSPassword string
	// SessionBucket is NATS_SESSION_BUCKET, default sessions.
	SessionBucket string
	// SessionCacheTTL is NATS_SESSION_CACHE_TTL_SECS, default 300.
	SessionCacheTTL time.Duration
	// RevocationBucket is NATS_REVOCATION_BUCKET, default revoked_sessions.
	RevocationBucket string
	// NearCacheTTL is SESSION_NEAR_CACHE_TTL_SECS, default 15: how long a
	// replica keeps a resolved session in memory before asking K/V again
	// (never past its expiry; K/V watchers evict changed entries at once).
	// 0 turns the near cache off.
	NearCacheTTL time.Duration
	// SessionMaxLifetime is SESSION_MAX_LIFETIME_HOURS, default 24: the TTL of
	// logout tombstones, the longest a session can live.
	SessionMaxLifetime time.Duration
	// RequestBucket is NATS_REQUEST_BUCKET, default requests.
	RequestBucket string
	// RequestTTL is NATS_REQUEST_TTL_SECS, default 1800: pending requests' TTL
	// and how long undelivered SSE events are kept.
	RequestTTL time.Duration
	// CallbackSubjectPrefix is NATS_CALLBACK_SUBJECT_PREFIX, default noetl.callbacks.
	CallbackSubjectPrefix string
	// EventsSubjectPrefix is NATS_EVENTS_SUBJECT_PREFIX, default gateway.events.
	EventsSubjectPrefix string
	// EventsStream is NATS_EVENTS_STREAM, default GATEWAY_EVENTS.
	EventsStream string

	// CORSOrigins is CORS_ALLOWED_ORIGINS, default the three localhost origins
	// of the original. "*" allows any origin and turns credentials off.
	CORSOrigins []string
	// CORSCredentials is CORS_ALLOW_CREDENTIALS, default true.
	CORSCredentials bool
	// CORSMaxAge is CORS_MAX_AGE_SECS, default 600.
	CORSMaxAge time.Duration

	// Heartbeat is GATEWAY_HEARTBEAT_INTERVAL_SECS, default 30: SSE ping interval.
	Heartbeat time.Duration
	// SSEClientBuffer is SSE_CLIENT_BUFFER, default 256 events per connection.
	SSEClientBuffer int
	// SSEMaxClients is SSE_MAX_CLIENTS, default 20000 per replica.
	SSEMaxClients int
	// SSEMaxClientsPerSession is SSE_MAX_CLIENTS_PER_SESSION, default 32.
	SSEMaxClientsPerSession int
	// SSESessionRecheck is SSE_SESSION_RECHECK_SECS, default 60.
	SSESessionRecheck time.Duration

	// CallbackToken is CALLBACK_TOKEN, default empty: the shared secret workers
	// send on internal routes. Secret.
	CallbackToken string
	// TrustedProxies is TRUSTED_PROXIES, default empty: peers whose
	// X-Forwarded-For is believed.
	TrustedProxies []netip.Prefix
	// MaxBodyBytes is MAX_BODY_BYTES, default 10485760.
	MaxBodyBytes int64
	// ShutdownTimeout is SHUTDOWN_TIMEOUT_SECS, default 15.
	ShutdownTimeout time.Duration
	// LogLevel is LOG_LEVEL, default info.
	LogLevel slog.Level
	// LogFormat is LOG_FORMAT, default json; or text.
	LogFormat string
	// AuthBypass is GATEWAY_AUTH_BYPASS (true/1): every request is the dev
	// user. Allowed only with a loopback GATEWAY_BIND.
	AuthBypass bool
}

// jwtAlgs lists the algorithms JWT_ALGORITHMS may name: asymmetric only.
var jwtAlgs = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}

var (
	bucketName    = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	subjectPrefix = regexp.MustCompile(`^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$`)
	playbookPath  = regexp.MustCompile(`^[A-Za-z0-9_./-]{1,256}$`)
)

// env reads variables and collects every problem, so one failed start lists
// them all.
type env struct {
	getenv func(string) string
	errs   []error
}

func (e *env) fail(name, format string, args ...any) {
	e.errs = append(e.errs, fmt.Errorf("%s: %s", name, fmt.Sprintf(format, args...)))
}

func (e *env) str(name, def string) string {
	return cmp.Or(strings.TrimSpace(e.getenv(name)), def)
}

func (e *env) integer(name string, def, lo, hi int) int {
	s := e.str(name, "")
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < lo || n > hi {
		e.fail(name, "%q is not an integer in [%d, %d]", s, lo, hi)
		return def
	}
	return n
}

func (e *env) secs(name string, def, lo int) time.Duration {
	return time.Duration(e.integer(name, def, lo, 365*24*3600)) * time.Second
}

func (e *env) boolean(name string, def bool) bool {
	switch strings.ToLower(e.str(name, "")) {
	case "":
		return def
	case "true", "1", "yes", "on":
		return true
	case "false", "0", "no", "off":
		return false
	}
	e.fail(name, "%q is not a boolean (true/false)", e.getenv(name))
	return def
}

func (e *env) oneOf(name, def string, allowed ...string) string {
	v := e.str(name, def)
	for _, a := range allowed {
		if v == a {
			return v
		}
	}
	e.fail(name, "%q is not one of %s", v, strings.Join(allowed, ", "))
	return def
}

func (e *env) match(name, def string, re *regexp.Regexp) string {
	v := e.str(name, def)
	if v != "" && !re.MatchString(v) {
		e.fail(name, "%q has invalid characters", v)
	}
	return v
}

// httpURL parses an absolute http(s) URL and returns it without a trailing slash.
func (e *env) httpURL(name, def string) string {
	v := e.str(name, def)
	if v == "" {
		return ""
	}
	if !isHTTPURL(v) {
		e.fail(name, "%q is not an absolute http(s) URL", v)
		return v
	}
	return strings.TrimRight(v, "/")
}

func isHTTPURL(v string) bool {
	u, err := url.Parse(v)
	return err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != "" && u.RawQuery == "" && u.Fragment == "" && u.User == nil
}

func list(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// loadConfig reads and validates the whole configuration. Its error joins
// every problem found, each starting with the variable's name.
func loadConfig(getenv func(string) string) (Config, error) {
	e := &env{getenv: getenv}
	var c Config

	port := "ROUTER_PORT"
	if e.str(port, "") == "" && e.str("GATEWAY_PORT", "") != "" {
		port = "GATEWAY_PORT"
	}
	c.Port = e.integer(port, 8090, 0, 65535)
	c.Bind = e.str("GATEWAY_BIND", "0.0.0.0")
	if _, err := netip.ParseAddr(c.Bind); err != nil && c.Bind != "localhost" {
		e.fail("GATEWAY_BIND", "%q is not an IP address", c.Bind)
	}
	c.InternalAddr = e.str("GATEWAY_INTERNAL_ADDR", "")
	if c.InternalAddr != "" {
		if _, p, err := net.SplitHostPort(c.InternalAddr); err != nil {
			e.fail("GATEWAY_INTERNAL_ADDR", "%q is not host:port", c.InternalAddr)
		} else if n, err := strconv.Atoi(p); err != nil || n < 0 || n > 65535 {
			e.fail("GATEWAY_INTERNAL_ADDR", "%q has an invalid port", c.InternalAddr)
		}
	}
	defURL := fmt.Sprintf("http://localhost:%d", c.Port)
	if _, p, err := net.SplitHostPort(c.InternalAddr); err == nil {
		defURL = "http://localhost:" + p
	}
	c.PublicURL = e.httpURL("GATEWAY_PUBLIC_URL", defURL)

	c.NoETLBaseURL = e.httpURL("NOETL_BASE_URL", "http://localhost:8082")
	c.NoETLTimeout = e.secs("NOETL_TIMEOUT_SECS", 120, 1)

	c.AuthMode = e.oneOf("AUTH_MODE", "playbook", "playbook", "sync")
	c.PlaybookLogin = e.match("AUTH_PLAYBOOK_LOGIN", "api_integration/auth0/auth0_login", playbookPath)
	c.PlaybookValidateSession = e.match("AUTH_PLAYBOOK_VALIDATE_SESSION", "api_integration/auth0/auth0_validate_session", playbookPath)
	c.PlaybookCheckAccess = e.match("AUTH_PLAYBOOK_CHECK_ACCESS", "api_integration/auth0/check_playbook_access", playbookPath)
	c.PlaybookLogout = e.match("AUTH_PLAYBOOK_LOGOUT", "", playbookPath)
	c.SessionDBCredential = e.str("AUTH_SESSION_DB_CREDENTIAL", "pg_auth")
	c.PlaybookTimeout = e.secs("AUTH_PLAYBOOK_TIMEOUT_SECS", 60, 1)
	c.SessionValidateVia = e.oneOf("SESSION_VALIDATE_VIA", "api", "api", "playbook")
	c.AuthzEnforce = e.boolean("AUTHZ_ENFORCE", true)
	c.AccessCacheTTL = e.secs("ACCESS_CACHE_TTL_SECS", 60, 0)

	c.Auth0Domain = e.str("AUTH0_DOMAIN", "")
	if d := c.Auth0Domain; d != "" {
		if strings.ContainsAny(d, "/:@ ") || strings.Contains(d, "..") {
			e.fail("AUTH0_DOMAIN", "%q is not a host name (no scheme or path)", d)
		}
		c.Issuer = "https://" + d + "/"
		c.JWKSURL = "https://" + d + "/.well-known/jwks.json"
	}
	if iss := e.str("OIDC_ISSUER", ""); iss != "" {
		// The issuer is compared byte for byte with "iss", so keep it as given
		// (trailing slash included).
		if isHTTPURL(iss) {
			c.Issuer, c.JWKSURL = iss, ""
		} else {
			e.fail("OIDC_ISSUER", "%q is not an absolute http(s) URL", iss)
		}
	}
	if j := e.httpURL("OIDC_JWKS_URL", ""); j != "" {
		c.JWKSURL = j
	}
	c.Audiences = append(list(e.getenv("AUTH0_CLIENT_ID")), list(e.getenv("AUTH0_AUDIENCE"))...)
	for _, a := range list(e.str("JWT_ALGORITHMS", "RS256")) {
		switch {
		case strings.EqualFold(a, "none"), strings.HasPrefix(strings.ToUpper(a), "HS"):
			e.fail("JWT_ALGORITHMS", "%q is refused: only asymmetric algorithms are allowed", a)
		case !contains(jwtAlgs, a):
			e.fail("JWT_ALGORITHMS", "%q is not one of %s", a, strings.Join(jwtAlgs, ", "))
		default:
			c.JWTAlgorithms = append(c.JWTAlgorithms, a)
		}
	}
	if len(c.JWTAlgorithms) == 0 && !hasErr(e.errs, "JWT_ALGORITHMS") {
		e.fail("JWT_ALGORITHMS", "no algorithm given")
	}
	c.JWTLeeway = e.secs("JWT_LEEWAY_SECS", 60, 0)
	c.JWKSRefresh = e.secs("JWKS_REFRESH_SECS", 3600, 1)
	c.JWKSMinRefresh = e.secs("JWKS_MIN_REFRESH_SECS", 30, 0)

	c.NATSURL = e.str("NATS_URL", "")
	for _, s := range list(c.NATSURL) {
		u, err := url.Parse(s)
		if err != nil || (u.Scheme != "nats" && u.Scheme != "tls") || u.Host == "" {
			// Never echo the value: it may carry a password.
			e.fail("NATS_URL", "an entry is not a nats:// or tls:// URL with a host")
			break
		}
	}
	c.NATSCreds = e.str("NATS_CREDS", "")
	if c.NATSCreds != "" {
		if _, err := os.Stat(c.NATSCreds); err != nil {
			e.fail("NATS_CREDS", "cannot read %q", c.NATSCreds)
		}
	}
	c.NATSUser = e.str("NATS_USERNAME", "")
	c.NATSPassword = e.getenv("NATS_PASSWORD")
	c.SessionBucket = e.match("NATS_SESSION_BUCKET", "sessions", bucketName)
	c.SessionCacheTTL = e.secs("NATS_SESSION_CACHE_TTL_SECS", 300, 1)
	c.NearCacheTTL = e.secs("SESSION_NEAR_CACHE_TTL_SECS", 15, 0)
	c.RevocationBucket = e.match("NATS_REVOCATION_BUCKET", "revoked_sessions", bucketName)
	c.SessionMaxLifetime = time.Duration(e.integer("SESSION_MAX_LIFETIME_HOURS", 24, 1, 24*365)) * time.Hour
	c.RequestBucket = e.match("NATS_REQUEST_BUCKET", "requests", bucketName)
	c.RequestTTL = e.secs("NATS_REQUEST_TTL_SECS", 1800, 1)
	c.CallbackSubjectPrefix = e.match("NATS_CALLBACK_SUBJECT_PREFIX", "noetl.callbacks", subjectPrefix)
	c.EventsSubjectPrefix = e.match("NATS_EVENTS_SUBJECT_PREFIX", "gateway.events", subjectPrefix)
	c.EventsStream = e.match("NATS_EVENTS_STREAM", "GATEWAY_EVENTS", bucketName)

	c.CORSOrigins = list(e.str("CORS_ALLOWED_ORIGINS", "http://localhost:8080,http://localhost:8090,http://localhost:3000"))
	for _, o := range c.CORSOrigins {
		if o == "*" {
			continue
		}
		u, err := url.Parse(o)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
			e.fail("CORS_ALLOWED_ORIGINS", "%q is not an origin (scheme://host[:port])", o)
		}
	}
	for i, o := range c.CORSOrigins {
		c.CORSOrigins[i] = strings.TrimSuffix(o, "/")
	}
	c.CORSCredentials = e.boolean("CORS_ALLOW_CREDENTIALS", true)
	c.CORSMaxAge = e.secs("CORS_MAX_AGE_SECS", 600, 0)

	c.Heartbeat = e.secs("GATEWAY_HEARTBEAT_INTERVAL_SECS", 30, 1)
	c.SSEClientBuffer = e.integer("SSE_CLIENT_BUFFER", 256, 1, 1<<20)
	c.SSEMaxClients = e.integer("SSE_MAX_CLIENTS", 20000, 1, 1<<24)
	c.SSEMaxClientsPerSession = e.integer("SSE_MAX_CLIENTS_PER_SESSION", 32, 1, 1<<20)
	c.SSESessionRecheck = e.secs("SSE_SESSION_RECHECK_SECS", 60, 1)

	c.CallbackToken = e.getenv("CALLBACK_TOKEN")
	if t := c.CallbackToken; t != "" && (len(t) < 16 || strings.TrimSpace(t) != t) {
		e.fail("CALLBACK_TOKEN", "must be at least 16 characters without surrounding spaces")
	}
	for _, p := range list(e.getenv("TRUSTED_PROXIES")) {
		pfx, err := netip.ParsePrefix(p)
		if err != nil {
			a, aerr := netip.ParseAddr(p)
			if aerr != nil {
				e.fail("TRUSTED_PROXIES", "%q is not a CIDR or IP address", p)
				continue
			}
			pfx = netip.PrefixFrom(a, a.BitLen())
		}
		c.TrustedProxies = append(c.TrustedProxies, pfx.Masked())
	}
	c.MaxBodyBytes = int64(e.integer("MAX_BODY_BYTES", 10<<20, 1, 1<<40))
	c.ShutdownTimeout = e.secs("SHUTDOWN_TIMEOUT_SECS", 15, 0)
	switch lv := e.oneOf("LOG_LEVEL", "info", "debug", "info", "warn", "error"); lv {
	case "debug":
		c.LogLevel = slog.LevelDebug
	case "warn":
		c.LogLevel = slog.LevelWarn
	case "error":
		c.LogLevel = slog.LevelError
	}
	c.LogFormat = e.oneOf("LOG_FORMAT", "json", "json", "text")

	// The original accepted exactly "true" or "1"; anything else set is a
	// typo an operator wants to hear about.
	switch b := e.str("GATEWAY_AUTH_BYPASS", ""); b {
	case "", "false", "0":
	case "true", "1":
		c.AuthBypass = true
		if !isLoopbackHost(c.Bind) {
			e.fail("GATEWAY_AUTH_BYPASS", "allowed only when GATEWAY_BIND is a loopback address (it is %q)", c.Bind)
		}
	default:
		e.fail("GATEWAY_AUTH_BYPASS", "%q is not true, 1, false or 0", b)
	}
	return c, errors.Join(e.errs...)
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func hasErr(errs []error, name string) bool {
	for _, err := range errs {
		if strings.HasPrefix(err.Error(), name+":") {
			return true
		}
	}
	return false
}

func isLoopbackHost(h string) bool {
	if h == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(h)
	return err == nil && a.IsLoopback()
}

// InProcess reports whether the gateway keeps its shared state in memory (no
// NATS_URL): one replica only.
func (c Config) InProcess() bool { return c.NATSURL == "" }

// IdentityConfigured reports whether ID tokens can be verified at all.
func (c Config) IdentityConfigured() bool { return c.Issuer != "" }

// LogValue keeps secrets out of logs: the callback token, NATS passwords and
// any credentials inside NATS_URL are never printed.
func (c Config) LogValue() slog.Value {
	natsServers := make([]string, 0, 2)
	for _, s := range list(c.NATSURL) {
		if u, err := url.Parse(s); err == nil {
			u.User = nil
			natsServers = append(natsServers, u.String())
		}
	}
	set := func(s string) string {
		if s == "" {
			return ""
		}
		return "[redacted]"
	}
	return slog.GroupValue(
		slog.String("bind", net.JoinHostPort(c.Bind, strconv.Itoa(c.Port))),
		slog.String("internal_addr", c.InternalAddr),
		slog.String("public_url", c.PublicURL),
		slog.String("noetl_base_url", c.NoETLBaseURL),
		slog.String("auth_mode", c.AuthMode),
		slog.String("session_validate_via", c.SessionValidateVia),
		slog.Bool("authz_enforce", c.AuthzEnforce),
		slog.String("issuer", c.Issuer),
		slog.String("jwks_url", c.JWKSURL),
		slog.Any("jwt_algorithms", c.JWTAlgorithms),
		slog.Any("nats_servers", natsServers),
		slog.String("nats_password", set(c.NATSPassword)),
		slog.String("nats_creds", c.NATSCreds),
		slog.String("callback_token", set(c.CallbackToken)),
		slog.Any("cors_origins", c.CORSOrigins),
		slog.Bool("auth_bypass", c.AuthBypass),
	)
}
