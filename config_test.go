package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func envOf(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestLoadConfigDefaults(t *testing.T) {
	t.Parallel()
	c, err := loadConfig(envOf(nil))
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		Port: 8090, Bind: "0.0.0.0", PublicURL: "http://localhost:8090",
		NoETLBaseURL: "http://localhost:8082", NoETLTimeout: 120 * time.Second,
		AuthMode:                "playbook",
		PlaybookLogin:           "api_integration/auth0/auth0_login",
		PlaybookValidateSession: "api_integration/auth0/auth0_validate_session",
		PlaybookCheckAccess:     "api_integration/auth0/check_playbook_access",
		SessionDBCredential:     "pg_auth", PlaybookTimeout: 60 * time.Second,
		SessionValidateVia: "api", AuthzEnforce: true, AccessCacheTTL: 60 * time.Second,
		JWTAlgorithms: []string{"RS256"}, JWTLeeway: 60 * time.Second,
		JWKSRefresh: time.Hour, JWKSMinRefresh: 30 * time.Second,
		SessionBucket: "sessions", SessionCacheTTL: 300 * time.Second, NearCacheTTL: 15 * time.Second,
		RevocationBucket: "revoked_sessions", SessionMaxLifetime: 24 * time.Hour,
		RequestBucket: "requests", RequestTTL: 1800 * time.Second,
		CallbackSubjectPrefix: "noetl.callbacks", EventsSubjectPrefix: "gateway.events", EventsStream: "GATEWAY_EVENTS",
		CORSOrigins:     []string{"http://localhost:8080", "http://localhost:8090", "http://localhost:3000"},
		CORSCredentials: true, CORSMaxAge: 600 * time.Second,
		Heartbeat: 30 * time.Second, SSEClientBuffer: 256, SSEMaxClients: 20000, SSEMaxClientsPerSession: 32,
		SSESessionRecheck: 60 * time.Second,
		MaxBodyBytes:      10485760, ShutdownTimeout: 15 * time.Second,
		LogLevel: slog.LevelInfo, LogFormat: "json",
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("defaults differ:\n got %+v\nwant %+v", c, want)
	}
	if !c.InProcess() || c.IdentityConfigured() {
		t.Error("defaults must be in-process without identity provider")
	}
}

func TestLoadConfigValues(t *testing.T) {
	t.Parallel()
	creds := filepath.Join(t.TempDir(), "user.creds")
	os.WriteFile(creds, []byte("x"), 0o600)
	env := map[string]string{
		"ROUTER_PORT": "9000", "GATEWAY_BIND": "127.0.0.1", "GATEWAY_INTERNAL_ADDR": ":9001",
		"NOETL_BASE_URL": "https://noetl.internal:8443/", "NOETL_TIMEOUT_SECS": "5",
		"AUTH_MODE": "sync", "AUTH_PLAYBOOK_LOGIN": "a/login", "AUTH_PLAYBOOK_VALIDATE_SESSION": "a/validate",
		"AUTH_PLAYBOOK_CHECK_ACCESS": "a/check", "AUTH_PLAYBOOK_LOGOUT": "a/logout", "AUTH_SESSION_DB_CREDENTIAL": "pg2",
		"AUTH_PLAYBOOK_TIMEOUT_SECS": "12", "SESSION_VALIDATE_VIA": "playbook", "AUTHZ_ENFORCE": "false",
		"ACCESS_CACHE_TTL_SECS": "0", "AUTH0_DOMAIN": "acme.us.auth0.com", "AUTH0_CLIENT_ID": "c1, c2",
		"AUTH0_AUDIENCE": "api", "JWT_ALGORITHMS": "RS256,ES256,EdDSA", "JWT_LEEWAY_SECS": "5",
		"JWKS_REFRESH_SECS": "600", "JWKS_MIN_REFRESH_SECS": "10",
		"NATS_URL": "nats://u:p@a:4222,tls://b:4222", "NATS_CREDS": creds, "NATS_USERNAME": "u", "NATS_PASSWORD": "pw",
		"NATS_SESSION_BUCKET": "s", "NATS_SESSION_CACHE_TTL_SECS": "30", "SESSION_NEAR_CACHE_TTL_SECS": "0", "NATS_REVOCATION_BUCKET": "r",
		"SESSION_MAX_LIFETIME_HOURS": "8", "NATS_REQUEST_BUCKET": "q", "NATS_REQUEST_TTL_SECS": "60",
		"NATS_CALLBACK_SUBJECT_PREFIX": "cb.x", "NATS_EVENTS_SUBJECT_PREFIX": "ev.y", "NATS_EVENTS_STREAM": "EV",
		"CORS_ALLOWED_ORIGINS": "https://ui.example.com/, http://localhost:3000", "CORS_ALLOW_CREDENTIALS": "false",
		"CORS_MAX_AGE_SECS": "60", "GATEWAY_HEARTBEAT_INTERVAL_SECS": "5", "SSE_CLIENT_BUFFER": "8",
		"SSE_MAX_CLIENTS": "100", "SSE_MAX_CLIENTS_PER_SESSION": "4", "SSE_SESSION_RECHECK_SECS": "7",
		"CALLBACK_TOKEN": "0123456789abcdef0123", "TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7",
		"MAX_BODY_BYTES": "1024", "SHUTDOWN_TIMEOUT_SECS": "3", "LOG_LEVEL": "debug", "LOG_FORMAT": "text",
		"GATEWAY_AUTH_BYPASS": "1",
	}
	c, err := loadConfig(envOf(env))
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"Port", c.Port, 9000}, {"Bind", c.Bind, "127.0.0.1"}, {"InternalAddr", c.InternalAddr, ":9001"},
		{"PublicURL", c.PublicURL, "http://localhost:9001"}, {"NoETLBaseURL", c.NoETLBaseURL, "https://noetl.internal:8443"},
		{"NoETLTimeout", c.NoETLTimeout, 5 * time.Second}, {"AuthMode", c.AuthMode, "sync"},
		{"PlaybookLogin", c.PlaybookLogin, "a/login"}, {"PlaybookValidateSession", c.PlaybookValidateSession, "a/validate"},
		{"PlaybookCheckAccess", c.PlaybookCheckAccess, "a/check"}, {"PlaybookLogout", c.PlaybookLogout, "a/logout"},
		{"SessionDBCredential", c.SessionDBCredential, "pg2"}, {"PlaybookTimeout", c.PlaybookTimeout, 12 * time.Second},
		{"SessionValidateVia", c.SessionValidateVia, "playbook"}, {"AuthzEnforce", c.AuthzEnforce, false},
		{"AccessCacheTTL", c.AccessCacheTTL, time.Duration(0)}, {"Auth0Domain", c.Auth0Domain, "acme.us.auth0.com"}, {"Issuer", c.Issuer, "https://acme.us.auth0.com/"},
		{"JWKSURL", c.JWKSURL, "https://acme.us.auth0.com/.well-known/jwks.json"},
		{"Audiences", c.Audiences, []string{"c1", "c2", "api"}}, {"JWTAlgorithms", c.JWTAlgorithms, []string{"RS256", "ES256", "EdDSA"}},
		{"JWTLeeway", c.JWTLeeway, 5 * time.Second}, {"JWKSRefresh", c.JWKSRefresh, 600 * time.Second},
		{"JWKSMinRefresh", c.JWKSMinRefresh, 10 * time.Second}, {"NATSURL", c.NATSURL, "nats://u:p@a:4222,tls://b:4222"},
		{"NATSCreds", c.NATSCreds, creds}, {"NATSUser", c.NATSUser, "u"}, {"NATSPassword", c.NATSPassword, "pw"},
		{"SessionBucket", c.SessionBucket, "s"}, {"SessionCacheTTL", c.SessionCacheTTL, 30 * time.Second},
		{"NearCacheTTL", c.NearCacheTTL, time.Duration(0)}, {"RevocationBucket", c.RevocationBucket, "r"}, {"SessionMaxLifetime", c.SessionMaxLifetime, 8 * time.Hour},
		{"RequestBucket", c.RequestBucket, "q"}, {"RequestTTL", c.RequestTTL, 60 * time.Second},
		{"CallbackSubjectPrefix", c.CallbackSubjectPrefix, "cb.x"}, {"EventsSubjectPrefix", c.EventsSubjectPrefix, "ev.y"},
		{"EventsStream", c.EventsStream, "EV"}, {"CORSOrigins", c.CORSOrigins, []string{"https://ui.example.com", "http://localhost:3000"}},
		{"CORSCredentials", c.CORSCredentials, false}, {"CORSMaxAge", c.CORSMaxAge, 60 * time.Second},
		{"Heartbeat", c.Heartbeat, 5 * time.Second}, {"SSEClientBuffer", c.SSEClientBuffer, 8},
		{"SSEMaxClients", c.SSEMaxClients, 100}, {"SSEMaxClientsPerSession", c.SSEMaxClientsPerSession, 4},
		{"SSESessionRecheck", c.SSESessionRecheck, 7 * time.Second}, {"CallbackToken", c.CallbackToken, "0123456789abcdef0123"},
		{"TrustedProxies", c.TrustedProxies, []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("192.168.1.7/32")}},
		{"MaxBodyBytes", c.MaxBodyBytes, int64(1024)}, {"ShutdownTimeout", c.ShutdownTimeout, 3 * time.Second},
		{"LogLevel", c.LogLevel, slog.LevelDebug}, {"LogFormat", c.LogFormat, "text"}, {"AuthBypass", c.AuthBypass, true},
	}
	for _, ck := range checks {
		if !reflect.DeepEqual(ck.got, ck.want) {
			t.Errorf("%s = %#v, want %#v", ck.name, ck.got, ck.want)
		}
	}
	// Every field of Config is covered above: a new field needs a check.
	if n := reflect.TypeOf(c).NumField(); n != len(checks) {
		t.Errorf("Config has %d fields, the table checks %d", n, len(checks))
	}
}

func TestLoadConfigAliasesAndOverrides(t *testing.T) {
	t.Parallel()
	c, err := loadConfig(envOf(map[string]string{"GATEWAY_PORT": "7000", "OIDC_ISSUER": "https://id.example.com", "AUTH0_DOMAIN": "x.auth0.com"}))
	if err != nil {
		t.Fatal(err)
	}
	if c.Port != 7000 || c.PublicURL != "http://localhost:7000" {
		t.Errorf("GATEWAY_PORT alias: port %d url %s", c.Port, c.PublicURL)
	}
	if c.Issuer != "https://id.example.com" || c.JWKSURL != "" {
		t.Errorf("OIDC_ISSUER must override AUTH0_DOMAIN and use discovery: %q %q", c.Issuer, c.JWKSURL)
	}
	c, _ = loadConfig(envOf(map[string]string{"ROUTER_PORT": "7001", "GATEWAY_PORT": "7000"}))
	if c.Port != 7001 {
		t.Errorf("ROUTER_PORT must win over GATEWAY_PORT, got %d", c.Port)
	}
	c, _ = loadConfig(envOf(map[string]string{"OIDC_ISSUER": "https://id.example.com/", "OIDC_JWKS_URL": "https://keys.example.com/jwks"}))
	if c.JWKSURL != "https://keys.example.com/jwks" || c.Issuer != "https://id.example.com/" {
		t.Errorf("explicit JWKS URL: %q issuer %q", c.JWKSURL, c.Issuer)
	}
	c, _ = loadConfig(envOf(map[string]string{"CORS_ALLOWED_ORIGINS": "*"}))
	if !reflect.DeepEqual(c.CORSOrigins, []string{"*"}) {
		t.Errorf("wildcard origin: %v", c.CORSOrigins)
	}
}

func TestLoadConfigErrors(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, value string
		extra       map[string]string
	}{
		{"ROUTER_PORT", "70000", nil}, {"ROUTER_PORT", "http", nil}, {"GATEWAY_PORT", "-1", nil},
		{"GATEWAY_BIND", "not an ip", nil}, {"GATEWAY_INTERNAL_ADDR", "8091", nil}, {"GATEWAY_INTERNAL_ADDR", ":99999", nil},
		{"GATEWAY_PUBLIC_URL", "gateway.local", nil}, {"NOETL_BASE_URL", "ftp://x", nil}, {"NOETL_BASE_URL", "http://u:p@x", nil},
		{"NOETL_TIMEOUT_SECS", "0", nil}, {"NOETL_TIMEOUT_SECS", "1.5", nil},
		{"AUTH_MODE", "magic", nil}, {"AUTH_PLAYBOOK_LOGIN", "a b", nil}, {"AUTH_PLAYBOOK_VALIDATE_SESSION", "x;y", nil},
		{"AUTH_PLAYBOOK_CHECK_ACCESS", "$(x)", nil}, {"AUTH_PLAYBOOK_LOGOUT", "a'b", nil},
		{"AUTH_PLAYBOOK_TIMEOUT_SECS", "soon", nil}, {"SESSION_VALIDATE_VIA", "db", nil}, {"AUTHZ_ENFORCE", "maybe", nil},
		{"ACCESS_CACHE_TTL_SECS", "-5", nil}, {"AUTH0_DOMAIN", "https://acme.auth0.com/", nil}, {"OIDC_ISSUER", "id.example.com", nil},
		{"OIDC_JWKS_URL", "file:///etc/passwd", nil}, {"JWT_ALGORITHMS", "none", nil}, {"JWT_ALGORITHMS", "HS256", nil},
		{"JWT_ALGORITHMS", "RS256,XX1", nil}, {"JWT_ALGORITHMS", ",", nil}, {"JWT_LEEWAY_SECS", "x", nil},
		{"JWKS_REFRESH_SECS", "0", nil}, {"JWKS_MIN_REFRESH_SECS", "-1", nil},
		{"NATS_URL", "http://a:4222", nil}, {"NATS_URL", "nats://", nil}, {"NATS_CREDS", "/does/not/exist.creds", nil},
		{"NATS_SESSION_BUCKET", "a.b", nil}, {"NATS_SESSION_CACHE_TTL_SECS", "0", nil}, {"SESSION_NEAR_CACHE_TTL_SECS", "-1", nil}, {"NATS_REVOCATION_BUCKET", "a b", nil},
		{"SESSION_MAX_LIFETIME_HOURS", "0", nil}, {"NATS_REQUEST_BUCKET", "*", nil}, {"NATS_REQUEST_TTL_SECS", "x", nil},
		{"NATS_CALLBACK_SUBJECT_PREFIX", "a.>", nil}, {"NATS_EVENTS_SUBJECT_PREFIX", "a..b", nil}, {"NATS_EVENTS_STREAM", "a.b", nil},
		{"CORS_ALLOWED_ORIGINS", "localhost:3000", nil}, {"CORS_ALLOWED_ORIGINS", "https://x.com/app", nil},
		{"CORS_ALLOW_CREDENTIALS", "sure", nil}, {"CORS_MAX_AGE_SECS", "x", nil},
		{"GATEWAY_HEARTBEAT_INTERVAL_SECS", "0", nil}, {"SSE_CLIENT_BUFFER", "0", nil}, {"SSE_MAX_CLIENTS", "0", nil},
		{"SSE_MAX_CLIENTS_PER_SESSION", "x", nil}, {"SSE_SESSION_RECHECK_SECS", "0", nil},
		{"CALLBACK_TOKEN", "short", nil}, {"TRUSTED_PROXIES", "10.0.0.0/33", nil}, {"TRUSTED_PROXIES", "proxy.local", nil},
		{"MAX_BODY_BYTES", "0", nil}, {"SHUTDOWN_TIMEOUT_SECS", "x", nil}, {"LOG_LEVEL", "trace", nil}, {"LOG_FORMAT", "xml", nil},
		{"GATEWAY_AUTH_BYPASS", "true", nil}, // default bind 0.0.0.0 is not loopback
		{"GATEWAY_AUTH_BYPASS", "true", map[string]string{"GATEWAY_BIND": "10.1.2.3"}},
		{"GATEWAY_AUTH_BYPASS", "yes please", map[string]string{"GATEWAY_BIND": "127.0.0.1"}},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s=%s", tc.name, tc.value), func(t *testing.T) {
			env := map[string]string{tc.name: tc.value}
			for k, v := range tc.extra {
				env[k] = v
			}
			_, err := loadConfig(envOf(env))
			if err == nil {
				t.Fatalf("%s=%q accepted", tc.name, tc.value)
			}
			if !strings.HasPrefix(err.Error(), tc.name+":") {
				t.Errorf("error does not name %s: %v", tc.name, err)
			}
		})
	}
}

func TestLoadConfigJoinsEveryProblem(t *testing.T) {
	t.Parallel()
	_, err := loadConfig(envOf(map[string]string{"ROUTER_PORT": "x", "LOG_LEVEL": "loud", "JWT_ALGORITHMS": "none", "NATS_URL": "nats://user:hunter2@"}))
	if err == nil {
		t.Fatal("accepted")
	}
	msg := err.Error()
	for _, name := range []string{"ROUTER_PORT:", "LOG_LEVEL:", "JWT_ALGORITHMS:", "NATS_URL:"} {
		if !strings.Contains(msg, name) {
			t.Errorf("joined error misses %s: %s", name, msg)
		}
	}
	if strings.Contains(msg, "hunter2") {
		t.Error("error message leaks the NATS password")
	}
}

func TestConfigLogValueRedactsSecrets(t *testing.T) {
	t.Parallel()
	c, err := loadConfig(envOf(map[string]string{
		"NATS_URL": "nats://user:natspass123@a:4222", "NATS_PASSWORD": "natspass456", "CALLBACK_TOKEN": "callbacksecret-0123456789",
	}))
	if err != nil {
		t.Fatal(err)
	}
	var buf syncBuffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("starting", "config", c)
	out := buf.String()
	for _, secret := range []string{"natspass123", "natspass456", "callbacksecret"} {
		if strings.Contains(out, secret) {
			t.Errorf("log line contains %q: %s", secret, out)
		}
	}
	if !strings.Contains(out, "nats://a:4222") || !strings.Contains(out, "[redacted]") {
		t.Errorf("log line lacks the redacted servers: %s", out)
	}
}
