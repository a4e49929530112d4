package main

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"path"
	"reflect"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
)

// reqInfo is the per-request record shared by the outer middleware and the
// handlers: the access-log line reads what inner layers filled in. It is put
// on the context once, so inner layers never need to clone the request for it.
type reqInfo struct {
	id     string
	base   *slog.Logger
	log    *slog.Logger // base with request_id, built on first use
	userID string       // set by the session middleware, for the access log
}

type reqInfoKey struct{}

func infoFrom(ctx context.Context) *reqInfo {
	if ri, ok := ctx.Value(reqInfoKey{}).(*reqInfo); ok {
		return ri
	}
	return nil
}

// loggerFrom returns the request-scoped logger, or a discarding one outside a
// request (tests calling handlers directly).
func loggerFrom(r *http.Request) *slog.Logger {
	if ri := infoFrom(r.Context()); ri != nil {
		// Most requests never log beyond the access line, so the
		// request-scoped logger is only built when someone asks.
		if ri.log == nil {
			ri.log = ri.base.With("request_id", ri.id)
		}
		return ri.log
	}
	return slog.New(slog.DiscardHandler)
}

// requestIDFrom returns the request's id ("" outside a request).
func requestIDFrom(ctx context.Context) string {
	if ri := infoFrom(ctx); ri != nil {
		return ri.id
	}
	return ""
}

// statusWriter records status and size for the access log. Unwrap lets
// http.ResponseController (and so ReverseProxy and SSE flushing) reach the
// real connection.
type statusWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.bytes += int64(n)
	return n, err
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// safeRequestID accepts a client's X-Request-Id only when it cannot corrupt
// logs or headers downstream.
func safeRequestID(s string) bool {
	if len(s) == 0 || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == ':') {
			return false
		}
	}
	return true
}

func newID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// withRequestLog assigns the request id, logs one line per request and counts
// it by route pattern. It is the outermost layer so it sees every answer,
// including recovered panics and CORS preflights.
func withRequestLog(log *slog.Logger, m *metrics, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		id := r.Header.Get("X-Request-Id")
		if !safeRequestID(id) {
			id = newID()
		}
		w.Header().Set("X-Request-Id", id)
		ri := &reqInfo{id: id, base: log}
		r = r.WithContext(context.WithValue(r.Context(), reqInfoKey{}, ri))
		sw := &statusWriter{ResponseWriter: w}
		defer func() {
			status := sw.status
			if status == 0 {
				status = http.StatusOK
			}
			route := r.Pattern
			if route == "" {
				route = "unmatched"
			}
			d := time.Since(start)
			code := strconv.Itoa(status)
			m.requests.with(route, r.Method, code).Inc()
			m.requestDuration.observe(d.Seconds(), route, code)
			// Only the route pattern is logged, never the raw path or query:
			// /events carries the session token in its query string.
			log.LogAttrs(r.Context(), slog.LevelInfo, "request",
				slog.String("method", r.Method),
				slog.String("route", route),
				slog.Int("status", status),
				slog.Duration("duration", d),
				slog.Int64("bytes", sw.bytes),
				slog.String("request_id", id),
				slog.String("user_id", ri.userID),
			)
		}()
		next.ServeHTTP(sw, r)
	})
}

// withRecover turns a handler panic into a 500 JSON error. http.ErrAbortHandler
// is how ReverseProxy aborts a broken stream; it passes through untouched.
func withRecover(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			v := recover()
			if v == nil {
				return
			}
			if v == http.ErrAbortHandler {
				panic(v)
			}
			loggerFrom(r).Error("panic", "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			writeError(w, r, http.StatusInternalServerError, "internal error", nil)
		}()
		next.ServeHTTP(w, r)
	})
}

// cors implements SPEC §3: exact origins, "*" without credentials, preflights
// answered before routing and authentication.
type cors struct {
	origins     map[string]bool
	any         bool
	credentials bool
	maxAge      string
}

func newCORS(c Config) *cors {
	cs := &cors{origins: map[string]bool{}, maxAge: strconv.Itoa(int(c.CORSMaxAge.Seconds()))}
	for _, o := range c.CORSOrigins {
		if o == "*" {
			cs.any = true
		}
		cs.origins[o] = true
	}
	// A wildcard with credentials would let any site act as the user.
	cs.credentials = c.CORSCredentials && !cs.any
	return cs
}

const (
	corsMethods = "GET, POST, PUT, DELETE, PATCH, OPTIONS"
	corsHeaders = "Content-Type, Authorization, X-Session-Id, X-Session-Token, X-User-Id, X-Request-Id, Last-Event-ID"
)

func (c *cors) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		origin := r.Header.Get("Origin")
		if origin == "" {
			next.ServeHTTP(w, r)
			return
		}
		h := w.Header()
		h.Add("Vary", "Origin")
		allowed := c.any || c.origins[origin]
		if allowed {
			if c.any {
				h.Set("Access-Control-Allow-Origin", "*")
			} else {
				h.Set("Access-Control-Allow-Origin", origin)
			}
			if c.credentials {
				h.Set("Access-Control-Allow-Credentials", "true")
			}
		}
		if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
			h.Add("Vary", "Access-Control-Request-Method")
			h.Add("Vary", "Access-Control-Request-Headers")
			if allowed {
				h.Set("Access-Control-Allow-Methods", corsMethods)
				h.Set("Access-Control-Allow-Headers", corsHeaders)
				h.Set("Access-Control-Max-Age", c.maxAge)
			}
			w.WriteHeader(http.StatusNoContent)
			return
		}
		if allowed {
			h.Set("Access-Control-Expose-Headers", "X-Request-Id")
		}
		next.ServeHTTP(w, r)
	})
}

// withBodyLimit caps every request body; a declared length over the limit is
// refused before any handler runs, a streamed one fails its read with
// *http.MaxBytesError (mapped to 413 by readers).
func withBodyLimit(limit int64, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength > limit {
			writeError(w, r, http.StatusRequestEntityTooLarge, "request body too large", nil)
			return
		}
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = http.MaxBytesReader(w, r.Body, limit)
		}
		next.ServeHTTP(w, r)
	})
}

// withJSONMuxErrors makes the mux's own answers JSON: 404 for unknown paths,
// 405 (with Allow) for known paths with another method, and 400 instead of
// the redirect ServeMux sends for unclean paths ("//", "/./", "/../"): a
// gateway never redirects an API client to a path it did not ask for, and
// authorization must see the path the upstream would.
func withJSONMuxErrors(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !isCleanPath(r.URL.Path) {
			writeError(w, r, http.StatusBadRequest, "invalid path", nil)
			return
		}
		mux.ServeHTTP(&muxErrorWriter{ResponseWriter: w, r: r}, r)
	})
}

// muxErrorWriter turns the mux's own plain-text 404 and 405 into JSON.
// ServeMux sets r.Pattern before it calls a registered handler, so an error
// written while the pattern is still empty can only be the mux's own (one
// routing pass, not a second lookup with mux.Handler).
type muxErrorWriter struct {
	http.ResponseWriter
	r       *http.Request
	swallow bool // the mux's text body is dropped
}

func (m *muxErrorWriter) WriteHeader(code int) {
	if m.r.Pattern == "" && !m.swallow && (code == http.StatusNotFound || code == http.StatusMethodNotAllowed) {
		m.swallow = true
		msg := "not found"
		if code == http.StatusMethodNotAllowed {
			msg = "method not allowed" // the mux has set Allow
		}
		writeError(m.ResponseWriter, m.r, code, msg, nil)
		return
	}
	m.ResponseWriter.WriteHeader(code)
}

func (m *muxErrorWriter) Write(p []byte) (int, error) {
	if m.swallow {
		return len(p), nil
	}
	return m.ResponseWriter.Write(p)
}

func (m *muxErrorWriter) Unwrap() http.ResponseWriter { return m.ResponseWriter }

// isCleanPath reports whether ServeMux would serve p as it is, without
// redirecting to a cleaned form.
func isCleanPath(p string) bool {
	if p == "" || p[0] != '/' {
		return false
	}
	c := path.Clean(p)
	if p[len(p)-1] == '/' && c != "/" {
		c += "/"
	}
	return c == p
}

// writeError is the one way the gateway answers with an error: JSON
// {"error": msg}, every header set before WriteHeader. err is logged (warn for
// 4xx, error for 5xx) and never sent to the client.
func writeError(w http.ResponseWriter, r *http.Request, status int, msg string, err error) {
	if err != nil {
		lvl := slog.LevelWarn
		if status >= 500 {
			lvl = slog.LevelError
		}
		loggerFrom(r).Log(r.Context(), lvl, msg, "status", status, "err", err)
	}
	writeJSON(w, status, map[string]string{"error": msg})
}

// writeJSON answers with v as JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status, body = http.StatusInternalServerError, []byte(`{"error":"internal error"}`)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)+1))
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}

// decodeJSON reads a JSON request body into dst and, on failure, answers
// with the right status (415, 413, 400) and returns false. Unknown fields are
// ignored, as the original did; one JSON value only.
func decodeJSON(w http.ResponseWriter, r *http.Request, dst any) bool {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (mt != "application/json" && !strings.HasSuffix(mt, "+json")) {
			writeError(w, r, http.StatusUnsupportedMediaType, "Content-Type must be application/json", nil)
			return false
		}
	} else {
		writeError(w, r, http.StatusUnsupportedMediaType, "Content-Type must be application/json", nil)
		return false
	}
	dec := json.NewDecoder(r.Body)
	err := dec.Decode(dst)
	if err == nil && dec.More() {
		err = errors.New("trailing data after JSON value")
	}
	if err == nil {
		if _, rerr := dec.Token(); rerr != io.EOF {
			err = errors.New("trailing data after JSON value")
		}
	}
	var mbe *http.MaxBytesError
	var te *json.UnmarshalTypeError
	switch {
	case err == nil:
		return true
	case errors.As(err, &mbe):
		writeError(w, r, http.StatusRequestEntityTooLarge, "request body too large", nil)
	case errors.As(err, &te) && te.Field != "":
		writeError(w, r, http.StatusBadRequest, fmt.Sprintf("invalid JSON: field %q must be %s", te.Field, jsonKind(te.Type)), nil)
	case errors.Is(err, io.EOF):
		writeError(w, r, http.StatusBadRequest, "invalid JSON: empty body", nil)
	default:
		writeError(w, r, http.StatusBadRequest, "invalid JSON", nil)
	}
	return false
}

// jsonKind names the JSON type a Go type decodes from; the Go type itself
// (main.errorIn, *int) is internal and never shown to clients.
func jsonKind(t reflect.Type) string {
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil {
		return "a JSON value"
	}
	switch t.Kind() {
	case reflect.String:
		return "string"
	case reflect.Bool:
		return "boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return "integer"
	case reflect.Float32, reflect.Float64:
		return "number"
	case reflect.Struct, reflect.Map:
		return "object"
	case reflect.Slice, reflect.Array:
		return "array"
	}
	return "a JSON value"
}

// peerAddr is the TCP peer of the request.
func peerAddr(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		a, _ := netip.ParseAddr(host)
		return a.Unmap()
	}
	return ap.Addr().Unmap()
}

// trusted reports whether addr is one of the TRUSTED_PROXIES.
func trusted(proxies []netip.Prefix, addr netip.Addr) bool {
	for _, p := range proxies {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// clientIP is the real client address: the peer, or, when the peer is a
// trusted proxy, the right-most X-Forwarded-For entry that is not itself a
// trusted proxy (entries further left are client-controlled).
func clientIP(r *http.Request, proxies []netip.Prefix) netip.Addr {
	peer := peerAddr(r)
	if !trusted(proxies, peer) {
		return peer
	}
	hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
	for i := len(hops) - 1; i >= 0; i-- {
		a, err := netip.ParseAddr(strings.TrimSpace(hops[i]))
		if err != nil {
			return peer
		}
		a = a.Unmap()
		if !trusted(proxies, a) {
			return a
		}
	}
	return peer
}

// localPeer reports whether a request comes from this host itself. A
// loopback peer that forwards requests for others (a reverse proxy or mesh
// sidecar on the same host, which adds Forwarded, X-Forwarded-For or
// X-Real-IP) is not local: trusting it would open loopback-only routes to
// everyone that proxy serves.
func localPeer(r *http.Request) bool {
	if !peerAddr(r).IsLoopback() {
		return false
	}
	for _, h := range []string{"Forwarded", "X-Forwarded-For", "X-Real-Ip"} {
		if len(r.Header.Values(h)) > 0 {
			return false
		}
	}
	return true
}

// internalOnly guards worker and operator routes (SPEC §7). With
// CALLBACK_TOKEN set the caller must present it. Without it, routes on the
// public listener accept loopback peers only; on the dedicated internal
// listener (onInternal) the network is the boundary.
func internalOnly(cfg Config, onInternal bool, next http.Handler) http.Handler {
	token := []byte(cfg.CallbackToken)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if len(token) > 0 {
			got := r.Header.Get("X-Callback-Token")
			if a := r.Header.Get("Authorization"); got == "" && strings.HasPrefix(a, "Bearer ") {
				got = a[len("Bearer "):]
			}
			if subtle.ConstantTimeCompare([]byte(got), token) != 1 {
				writeError(w, r, http.StatusUnauthorized, "callback token required", errors.New("internal route called without a valid CALLBACK_TOKEN"))
				return
			}
		} else if !onInternal && !localPeer(r) {
			writeError(w, r, http.StatusForbidden, "forbidden",
				errors.New("internal route refused for a non-loopback or proxied peer: set CALLBACK_TOKEN or GATEWAY_INTERNAL_ADDR"))
			return
		}
		next.ServeHTTP(w, r)
	})
}
