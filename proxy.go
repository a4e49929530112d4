package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The /noetl/{path...} reverse proxy (SPEC §4).
//
// Header contract with the NoETL server (and anything else behind it): every
// request carries X-User-Id, X-User-Email, X-User-Roles (comma list),
// X-Session-Token, X-Request-Id and X-Forwarded-For/Host/Proto set by the
// gateway from the resolved session. A client can never supply any of them:
// every header the gateway owns is deleted in every spelling before they are
// set, and they are set inside Rewrite, after hop-by-hop removal, so a
// "Connection: X-User-Id" request header cannot strip them either. Cookie and
// Authorization are never forwarded: the session token travels only as
// X-Session-Token.

// newUpstreamTransport is the transport for gateway→NoETL traffic (the
// proxy, GraphQL proxyRequest and the NoETL API client). Its pool is
// sized for a gateway: every browser request funnels into one upstream host,
// so the per-host idle limit (2 by default) would make the gateway open and
// close connections under any real load.
func newUpstreamTransport(cfg Config) *http.Transport {
	connect := min(cfg.NoETLTimeout, 10*time.Second)
	return &http.Transport{
		// NoETL sits on the private network; an HTTP_PROXY meant for
		// outbound traffic must not capture it.
		Proxy:                 nil,
		DialContext:           (&net.Dialer{Timeout: connect, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   connect,
		ResponseHeaderTimeout: cfg.NoETLTimeout,
		ExpectContinueTimeout: time.Second,
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   256,
		IdleConnTimeout:       90 * time.Second,
		ForceAttemptHTTP2:     true,
	}
}

// proxyTarget is what the handler decided before the proxy runs; Rewrite
// reads it back from the request context.
type proxyTarget struct {
	path    string // canonical, decoded path below /api/
	session *Session
}

type proxyTargetKey struct{}

// handleProxy is the /noetl/{path...} handler; it must be wrapped in
// requireSession. access is consulted for POST /noetl/execute when
// AUTHZ_ENFORCE is on.
func handleProxy(cfg Config, log *slog.Logger, access *accessChecker) http.Handler {
	base, err := url.Parse(cfg.NoETLBaseURL)
	if err != nil {
		// loadConfig validated the URL, so this is unreachable; fail the
		// requests rather than the process.
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			writeError(w, r, http.StatusBadGateway, "upstream unavailable", err)
		})
	}
	basePath := strings.TrimSuffix(base.Path, "/")
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			t := pr.In.Context().Value(proxyTargetKey{}).(*proxyTarget)
			pr.SetURL(base)
			// SetURL joined the client's path onto the base; the target is
			// the canonical path only, re-encoded by net/url (RawPath empty),
			// and the raw query exactly as the client sent it.
			pr.Out.URL.Path = basePath + "/api/" + t.path
			pr.Out.URL.RawPath = ""
			pr.Out.URL.RawQuery = pr.In.URL.RawQuery
			stripOwnedHeaders(pr.Out.Header)
			// An upgrade to anything but WebSocket (h2c above all) would
			// turn the connection into a tunnel to NoETL whose later
			// requests never pass the gateway's path and access checks.
			if up := pr.Out.Header.Get("Upgrade"); up != "" && !strings.EqualFold(up, "websocket") {
				pr.Out.Header.Del("Upgrade")
				pr.Out.Header.Del("Connection")
			}
			setIdentityHeaders(pr.Out.Header, t.session, requestIDFrom(pr.In.Context()))
			setForwarded(pr, cfg)
		},
		Transport: newUpstreamTransport(cfg),
		// No FlushInterval: ReverseProxy already flushes every write of a
		// streaming response (text/event-stream, or no Content-Length), so
		// SSE and long downloads from NoETL pass as they come (SPEC §4),
		// while a small JSON reply goes out in one write instead of a
		// header write plus a body write.
		// Without a pool ReverseProxy allocates a 32 KiB copy buffer per
		// request: three quarters of the gateway's allocation and most of
		// its GC work under load (see docs/BENCHMARKS.md).
		BufferPool:     &copyBuffers{},
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ErrorHandler:   proxyError,
		ModifyResponse: cleanUpstreamResponse,
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete, http.MethodOptions:
		default:
			w.Header().Set("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
			writeError(w, r, http.StatusMethodNotAllowed, "method not allowed", nil)
			return
		}
		p, ok := canonicalProxyPath(r.URL.EscapedPath())
		if !ok {
			writeError(w, r, http.StatusBadRequest, "invalid path", nil)
			return
		}
		s := sessionFrom(r.Context())
		if s == nil {
			writeError(w, r, http.StatusUnauthorized, "Missing authentication token", nil)
			return
		}
		if cfg.AuthzEnforce && r.Method == http.MethodPost && isExecutePath(p) {
			if !authorizeExecute(w, r, access, s) {
				return
			}
		}
		ctx := context.WithValue(r.Context(), proxyTargetKey{}, &proxyTarget{path: p, session: s})
		rp.ServeHTTP(w, r.WithContext(ctx))
	})
}

// copyBuffers recycles ReverseProxy's body copy buffers.
type copyBuffers struct{ pool sync.Pool }

func (b *copyBuffers) Get() []byte {
	if p, ok := b.pool.Get().(*[]byte); ok {
		return *p
	}
	return make([]byte, 32<<10)
}

func (b *copyBuffers) Put(buf []byte) { b.pool.Put(&buf) }

// canonicalProxyPath checks the raw (still escaped) request path of a
// /noetl/ request and returns the decoded path below it. It refuses anything
// that could reach a different upstream resource than the one it names once
// some layer decodes or normalises it: dot segments, empty segments, encoded
// slashes and backslashes, backslashes, NUL and every control character,
// ";" (path parameters), and "%" left after decoding (double encoding).
func canonicalProxyPath(escaped string) (string, bool) {
	rest, ok := strings.CutPrefix(escaped, "/noetl/")
	if !ok {
		return "", false
	}
	lower := strings.ToLower(rest)
	for _, bad := range []string{"%2f", "%5c", "%00"} {
		if strings.Contains(lower, bad) {
			return "", false
		}
	}
	p, err := url.PathUnescape(rest)
	if err != nil {
		return "", false
	}
	if strings.ContainsAny(p, "\\;%") || strings.Contains(p, "//") || strings.HasPrefix(p, "/") {
		return "", false
	}
	for _, c := range p {
		if c < 0x20 || c == 0x7f || c == '\uFFFD' {
			return "", false
		}
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "." || seg == ".." {
			return "", false
		}
	}
	return p, true
}

// authorizeExecute enforces SPEC §4 for POST /noetl/execute: the body is read
// (within the body limit), its "path" must be allowed for "execute", and the
// same bytes are then forwarded. It answers and returns false otherwise.
func authorizeExecute(w http.ResponseWriter, r *http.Request, access *accessChecker, s *Session) bool {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
			writeError(w, r, http.StatusRequestEntityTooLarge, "request body too large", nil)
		} else {
			writeError(w, r, http.StatusBadRequest, "could not read request body", err)
		}
		return false
	}
	path, problem := executeBodyPath(body)
	if problem != "" {
		writeError(w, r, http.StatusBadRequest, problem, nil)
		return false
	}
	allowed, err := access.Allowed(r.Context(), s, path, "execute")
	if err != nil {
		writeError(w, r, http.StatusBadGateway, "access check unavailable", err)
		return false
	}
	if !allowed {
		writeError(w, r, http.StatusForbidden, "permission denied", nil)
		return false
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	r.Header.Del("Transfer-Encoding")
	return true
}

// isExecutePath reports whether a canonical proxy path (below /api/) names
// NoETL's execute endpoint. Case is ignored: whether the upstream routes
// case-insensitively is not the gateway's to assume, and authorization must
// cover every spelling the upstream might serve.
func isExecutePath(p string) bool {
	return strings.EqualFold(strings.TrimSuffix(p, "/"), "execute")
}

// executeBodyPath reads the playbook path of an execute request body, or
// returns the problem to answer with 400.
func executeBodyPath(body []byte) (path, problem string) {
	// A map, not a struct: encoding/json matches struct fields without
	// regard to case, so {"path":"a","PATH":"b"} would be checked as "b"
	// while NoETL runs "a". With a map only the exact key counts, and for a
	// repeated key the last one wins, as in NoETL's own parser.
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return "", "invalid JSON"
	}
	if raw, ok := fields["path"]; !ok || json.Unmarshal(raw, &path) != nil || path == "" {
		return "", "path is required"
	}
	if !playbookPath.MatchString(path) {
		return "", "invalid path"
	}
	// NoETL also accepts catalog_id, which names a playbook the check above
	// never saw.
	if raw, ok := fields["catalog_id"]; ok && string(raw) != "null" {
		return "", "catalog_id is not accepted here; send path"
	}
	return path, ""
}

// ownedHeader reports whether a header name, in any spelling, is one the
// gateway sets itself towards NoETL, or one that NoETL or a framework in
// front of it might read as the client's address or identity, or as a
// method or path other than the one the gateway authorized (method override
// and X-Original-URL style rewrites): lower-cased, with "_" and "." read as
// "-" (CGI/WSGI servers and some proxies fold them together).
func ownedHeader(name string) bool {
	// Folded into a stack buffer: this runs for every header of every
	// proxied request, and strings.Map would allocate for each.
	var buf [64]byte
	n := buf[:0]
	for i := 0; i < len(name); i++ {
		n = append(n, foldHeaderByte(name[i]))
	}
	switch string(n) {
	case "x-session-token", "x-session-id", "x-request-id", "cookie", "authorization", "proxy-authorization",
		"forwarded", "x-real-ip", "x-client-ip",
		"x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url", "x-original-method":
		return true
	}
	return bytes.HasPrefix(n, []byte("x-user-")) || bytes.HasPrefix(n, []byte("x-gateway-")) || bytes.HasPrefix(n, []byte("x-forwarded-"))
}

// foldHeaderByte lower-cases and reads "_" and "." as "-".
func foldHeaderByte(c byte) byte {
	switch {
	case c == '_' || c == '.':
		return '-'
	case c >= 'A' && c <= 'Z':
		return c + ('a' - 'A')
	}
	return c
}

// stripOwnedHeaders deletes every client header the gateway owns.
func stripOwnedHeaders(h http.Header) {
	for k := range h {
		if ownedHeader(k) {
			delete(h, k)
		}
	}
}

// setIdentityHeaders sets the identity the NoETL server may trust: it comes
// from the resolved session, never from the client.
func setIdentityHeaders(h http.Header, s *Session, requestID string) {
	h.Set("X-User-Id", strconv.FormatInt(s.User.UserID, 10))
	h.Set("X-User-Email", headerSafe(s.User.Email))
	roles := make([]string, 0, len(s.User.Roles))
	for _, r := range s.User.Roles {
		if r = headerSafe(strings.ReplaceAll(r, ",", "")); r != "" {
			roles = append(roles, r)
		}
	}
	h.Set("X-User-Roles", strings.Join(roles, ","))
	h.Set("X-Session-Token", s.Token)
	if requestID != "" {
		h.Set("X-Request-Id", requestID)
	}
}

// headerSafe drops characters that cannot appear in a header value, so a
// strange e-mail or role from the identity store cannot fail the request.
func headerSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, strings.TrimSpace(s))
}

// setForwarded sets X-Forwarded-For/Host/Proto. ReverseProxy has already
// removed the client's copies; they are restored only when the peer is a
// TRUSTED_PROXIES load balancer, which speaks for the original client.
func setForwarded(pr *httputil.ProxyRequest, cfg Config) {
	peerTrusted := trusted(cfg.TrustedProxies, peerAddr(pr.In))
	if peerTrusted {
		if v := pr.In.Header.Values("X-Forwarded-For"); len(v) > 0 {
			pr.Out.Header["X-Forwarded-For"] = append([]string(nil), v...)
		}
	}
	pr.SetXForwarded()
	if peerTrusted {
		if v := pr.In.Header.Get("X-Forwarded-Host"); v != "" {
			pr.Out.Header.Set("X-Forwarded-Host", v)
		}
		if v := pr.In.Header.Get("X-Forwarded-Proto"); v == "http" || v == "https" {
			pr.Out.Header.Set("X-Forwarded-Proto", v)
		}
	}
}

// cleanUpstreamResponse keeps the gateway's own answers authoritative: CORS
// is decided by the gateway (a second Access-Control-Allow-Origin from NoETL
// would make browsers refuse the response) and X-Request-Id is the gateway's.
func cleanUpstreamResponse(resp *http.Response) error {
	for k := range resp.Header {
		if len(k) >= len("access-control-") && strings.EqualFold(k[:len("access-control-")], "access-control-") {
			delete(resp.Header, k)
		}
	}
	resp.Header.Del("X-Request-Id")
	return nil
}

// proxyError answers a failed upstream exchange with a generic JSON error;
// the cause is logged only.
func proxyError(w http.ResponseWriter, r *http.Request, err error) {
	var mbe *http.MaxBytesError
	var ne net.Error
	switch {
	case errors.As(err, &mbe):
		writeError(w, r, http.StatusRequestEntityTooLarge, "request body too large", nil)
	case r.Context().Err() != nil:
		// The client went away; nobody reads this answer.
		loggerFrom(r).Debug("proxy: client gone", "err", err)
		w.WriteHeader(http.StatusBadGateway)
	case errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
		writeError(w, r, http.StatusGatewayTimeout, "upstream timeout", err)
	default:
		writeError(w, r, http.StatusBadGateway, "upstream unavailable", err)
	}
}
