// Command gateway is the NoETL Gateway: the API gateway between browsers and
// the NoETL workflow platform, a drop-in replacement for the Rust gateway.
//
// It logs users in with an OIDC provider (verifying the ID token itself),
// keeps sessions in a NATS K/V cache in front of the NoETL server, authorizes
// playbook runs, proxies REST (/noetl/...) and GraphQL (/graphql) calls to
// NoETL, and pushes asynchronous playbook results to browsers over
// Server-Sent Events (/events) when NoETL workers call back.
//
// Configuration is the environment only; see Config for every variable and
// its default. With NATS_URL empty the gateway runs alone with its state in
// memory (go run .); with NATS_URL set any number of replicas share state
// through NATS JetStream.
//
// Probes: GET /health is liveness (200 "ok", no dependency checked); GET
// /ready is readiness: 503 once shutdown has begun, and it reports the NATS
// connection ("ok", "down", "disabled"). A NATS outage does not make a
// replica unready, because sessions still resolve through NoETL.
//
// Logs are slog JSON (or text) on stdout: one line per request with the
// route pattern (never the raw path or query, which may carry a token),
// status, duration, bytes, request id and user id.
//
// On SIGINT or SIGTERM /ready turns 503, SSE streams end so browsers
// reconnect to another replica, in-flight requests get SHUTDOWN_TIMEOUT_SECS
// to finish, and the NATS connection is drained.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if err := run(context.Background(), os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "gateway:", err)
		os.Exit(1)
	}
}

// app holds everything run builds; handlers receive the pieces they need.
type app struct {
	cfg     Config
	log     *slog.Logger
	metrics *metrics
	nats    *natsConn // nil in in-process mode
	// shuttingDown turns /ready to 503 first thing on shutdown.
	shuttingDown atomic.Bool

	sessions kvStore // NATS_SESSION_BUCKET
	revoked  kvStore // NATS_REVOCATION_BUCKET
	requests kvStore // NATS_REQUEST_BUCKET

	noetl      *noetlClient
	resolver   *resolver
	access     *accessChecker
	verifier   *verifier   // nil when no identity provider is configured
	rendezvous *rendezvous // auth playbook callbacks (SPEC §7.1)
	broker     *broker     // SSE connections and the event log (events.go)
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	showVersion := fs.Bool("version", false, "print the version and exit")
	healthcheck := fs.Bool("healthcheck", false, "GET /health on the configured port; exit 0 when it answers 200")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *showVersion {
		fmt.Fprintln(stdout, "noetl-gateway", version)
		return nil
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return fmt.Errorf("invalid configuration:\n%w", err)
	}
	if *healthcheck {
		return checkHealth(cfg)
	}

	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	log := newLogger(cfg, stdout)
	// streams ends every long-lived handler (SSE) at shutdown; Shutdown
	// itself never interrupts active connections.
	streams, endStreams := context.WithCancel(context.Background())
	defer endStreams()
	a, err := newApp(ctx, streams, cfg, log)
	if err != nil {
		return err
	}
	log.Info("starting", "version", version, "config", cfg)

	public := http.NewServeMux()
	internal := public
	if cfg.InternalAddr != "" {
		internal = http.NewServeMux()
	}
	routes(public, internal, a)

	servers := []*http.Server{newServer(cfg, log, a.metrics, public)}
	addrs := []string{net.JoinHostPort(cfg.Bind, strconv.Itoa(cfg.Port))}
	if internal != public {
		servers = append(servers, newServer(cfg, log, a.metrics, internal))
		addrs = append(addrs, cfg.InternalAddr)
	}
	var listeners []net.Listener
	for i, addr := range addrs {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, l := range listeners {
				l.Close()
			}
			a.nats.drain(context.Background())
			return fmt.Errorf("listening on %s: %w", addr, err)
		}
		listeners = append(listeners, ln)
		log.Info("listening", "listener", []string{"public", "internal"}[i], "addr", ln.Addr().String())
	}

	errc := make(chan error, len(servers))
	for i, srv := range servers {
		go func() {
			if err := srv.Serve(listeners[i]); !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		}()
	}

	select {
	case err = <-errc:
		log.Error("server failed", "err", err)
	case <-ctx.Done():
		log.Info("shutting down", "timeout", cfg.ShutdownTimeout)
	}
	a.shuttingDown.Store(true)
	endStreams()

	// A fresh context: the one that told us to stop is already done.
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, srv := range servers {
		wg.Go(func() {
			if serr := srv.Shutdown(sctx); serr != nil {
				log.Warn("shutdown did not finish in time; closing connections", "err", serr)
				srv.Close()
			}
		})
	}
	wg.Wait()
	// Streams run on hijacked connections, which Shutdown does not track;
	// they were told to end with endStreams.
	if err := a.broker.wait(sctx); err != nil {
		log.Warn("SSE streams did not end in time", "err", err)
	}
	a.nats.drain(sctx)
	log.Info("stopped")
	return err
}

// newApp builds every piece of the gateway from cfg: stores (memory or NATS
// JetStream), the NoETL client, the auth rendezvous, the session resolver
// and its watchers, access decisions, the ID token verifier and the SSE
// broker. Background work runs until ctx ends; SSE streams until streams
// ends.
func newApp(ctx, streams context.Context, cfg Config, log *slog.Logger) (*app, error) {
	a := &app{cfg: cfg, log: log, metrics: newMetrics()}
	if cfg.AuthBypass {
		a.metrics.authBypass.with().Set(1)
		log.Warn("GATEWAY_AUTH_BYPASS is on: every request is the dev user")
	}
	if !cfg.IdentityConfigured() {
		log.Warn("no identity provider configured (AUTH0_DOMAIN or OIDC_ISSUER): /api/auth/login answers 503")
	}

	if cfg.InProcess() {
		log.Info("in-process mode: state kept in memory, one replica only (set NATS_URL to run several)")
		a.sessions = newMemKV(cfg.SessionCacheTTL)
		a.revoked = newMemKV(cfg.SessionMaxLifetime)
		a.requests = newMemKV(cfg.RequestTTL)
	} else {
		var err error
		if a.nats, err = connectNATS(cfg, log, a.metrics); err != nil {
			return nil, err
		}
		log.Info("NATS mode: state shared through JetStream")
		a.sessions = a.nats.kv(cfg.SessionBucket, "Session cache for gateway authentication", cfg.SessionCacheTTL)
		a.revoked = a.nats.kv(cfg.RevocationBucket, "Revoked gateway sessions (logout tombstones)", cfg.SessionMaxLifetime)
		a.requests = a.nats.kv(cfg.RequestBucket, "Pending async playbook requests", cfg.RequestTTL)
	}
	a.noetl = newNoETLClient(cfg)
	var nc *nats.Conn
	kvUp := func() bool { return true }
	if a.nats != nil {
		nc = a.nats.nc
		kvUp = nc.IsConnected
	}
	a.rendezvous = newRendezvous(cfg, nc, log, a.metrics)
	if err := a.rendezvous.start(ctx); err != nil {
		a.nats.drain(context.Background())
		return nil, err
	}
	a.resolver = newResolver(cfg, a.sessions, a.revoked, a.noetl, a.rendezvous, a.metrics, log, kvUp)
	a.resolver.start(ctx)
	a.access = newAccessChecker(cfg, a.noetl, a.rendezvous, a.metrics)
	a.resolver.OnRevoke(a.access.forget)
	if cfg.IdentityConfigured() {
		a.verifier = newVerifier(cfg, log, a.metrics, time.Now)
		go a.verifier.jwks.run(ctx)
	}
	a.broker = newBroker(streams, cfg, log, a.metrics, a.resolver, a.requests, a.nats)
	// A logout on any replica ends that session's streams at once.
	a.resolver.OnRevoke(a.broker.closeSession)
	return a, nil
}

// newServer wraps a mux in the middleware stack, outermost first: request log
// and id, panic recovery, CORS (preflights answered before routing), body
// limit, then the mux with JSON 404/405.
func newServer(cfg Config, log *slog.Logger, m *metrics, mux *http.ServeMux) *http.Server {
	var h http.Handler = withJSONMuxErrors(mux)
	h = withBodyLimit(cfg.MaxBodyBytes, h)
	h = newCORS(cfg).wrap(h)
	h = withRecover(h)
	h = withRequestLog(log, m, h)
	return &http.Server{
		Handler: h,
		// Slowloris protection: headers must arrive promptly.
		ReadHeaderTimeout: 10 * time.Second,
		// Whole request bodies (uploads up to MAX_BODY_BYTES through the
		// proxy) get a generous but finite time.
		ReadTimeout: 5 * time.Minute,
		// No WriteTimeout: it would cut every SSE stream. Streams set
		// per-write deadlines; other handlers are bounded by their contexts
		// and NOETL_TIMEOUT_SECS.
		IdleTimeout:    2 * time.Minute,
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
}

func newLogger(cfg Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// checkHealth is the -healthcheck mode for scratch images, which have no
// curl: GET /health on the configured port.
func checkHealth(cfg Config) error {
	host := cfg.Bind
	if host == "0.0.0.0" || host == "::" || host == "" {
		host = "127.0.0.1"
	}
	c := &http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://" + net.JoinHostPort(host, strconv.Itoa(cfg.Port)) + "/health")
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: status %d", resp.StatusCode)
	}
	return nil
}

// routes registers every route of SPEC §3. Internal routes (worker callbacks
// and /metrics) go on internal, which is public itself unless
// GATEWAY_INTERNAL_ADDR is set.
func routes(public, internal *http.ServeMux, a *app) {
	cfg := a.cfg
	onInternal := internal != public

	public.Handle("GET /health", handleHealth())
	public.Handle("GET /ready", handleReady(a))

	public.Handle("POST /api/auth/login", handleLogin(cfg, a.verifier, a.noetl, a.rendezvous, a.resolver, a.metrics))
	public.Handle("POST /api/auth/validate", handleValidate(a.resolver))
	public.Handle("POST /api/auth/check-access", handleCheckAccess(a.resolver, a.access))
	public.Handle("POST /api/auth/logout", handleLogout(cfg, a.resolver, a.noetl))
	public.Handle("GET /events", handleEvents(a.broker))
	schema := newGatewaySchema(cfg, a.noetl, a.access, a.requests)
	public.Handle("GET /graphql", requireSession(a.resolver, handleGraphiQL()))
	public.Handle("POST /graphql", requireSession(a.resolver, handleGraphQL(schema)))
	public.Handle("/noetl/{path...}", requireSession(a.resolver, handleProxy(cfg, a.log, a.access)))

	internal.Handle("POST /api/internal/callback", internalOnly(cfg, onInternal, handleAuthCallback(a.rendezvous)))
	internal.Handle("POST /api/internal/callback/async", internalOnly(cfg, onInternal, handleCallbackAsync(a.broker)))
	internal.Handle("POST /api/internal/progress", internalOnly(cfg, onInternal, handleProgress(a.broker)))
	metricsH := handleMetrics(a.metrics)
	if !onInternal {
		// On the public listener the metrics are for the local scraper only.
		metricsH = loopbackOnly(metricsH)
	}
	internal.Handle("GET /metrics", metricsH)
}

func handleHealth() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		io.WriteString(w, "ok")
	})
}

func handleReady(a *app) http.Handler {
	type checks struct {
		NATS         string `json:"nats"`
		ShuttingDown bool   `json:"shutting_down"`
	}
	type response struct {
		Status string `json:"status"`
		Checks checks `json:"checks"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		resp := response{Status: "ready", Checks: checks{NATS: a.nats.status(), ShuttingDown: a.shuttingDown.Load()}}
		status := http.StatusOK
		if resp.Checks.ShuttingDown {
			resp.Status, status = "not_ready", http.StatusServiceUnavailable
		}
		w.Header().Set("Cache-Control", "no-store")
		writeJSON(w, status, resp)
	})
}

func loopbackOnly(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !localPeer(r) {
			writeError(w, r, http.StatusForbidden, "forbidden", errors.New("metrics refused for a non-loopback or proxied peer: set GATEWAY_INTERNAL_ADDR"))
			return
		}
		next.ServeHTTP(w, r)
	})
}
