package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// natsConn is the gateway's one NATS connection (the original opened three).
// It never blocks start-up: with the server down it keeps reconnecting in
// the background forever, and readers see "down" meanwhile.
type natsConn struct {
	nc  *nats.Conn
	js  jetstream.JetStream
	log *slog.Logger
	// up is fired on every connection and reconnection.
	up *wakeup
}

// wakeup wakes everyone waiting on it each time it fires.
type wakeup struct {
	mu sync.Mutex
	ch chan struct{}
}

func newWakeup() *wakeup { return &wakeup{ch: make(chan struct{})} }

// wait returns a channel closed at the next fire.
func (s *wakeup) wait() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ch
}

func (s *wakeup) fire() {
	s.mu.Lock()
	defer s.mu.Unlock()
	close(s.ch)
	s.ch = make(chan struct{})
}

// connectNATS dials cfg.NATSURL (a comma list; nats:// or tls://; user:pass@
// in the URL, or NATS_USERNAME/NATS_PASSWORD, or NATS_CREDS).
func connectNATS(cfg Config, log *slog.Logger, m *metrics) (*natsConn, error) {
	log = log.With("component", "nats")
	up := m.natsConnected.with()
	connected := newWakeup()
	opts := []nats.Option{
		nats.Name("noetl-gateway"),
		// Keep trying from the first dial on, so start-up never waits for
		// NATS and a later outage is survived without a restart.
		nats.RetryOnFailedConnect(true),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.ReconnectJitter(250*time.Millisecond, time.Second),
		nats.Timeout(5 * time.Second),
		// Buffer publishes made while reconnecting (SSE events, callbacks)
		// rather than failing them at once.
		nats.ReconnectBufSize(8 << 20),
		nats.ConnectHandler(func(c *nats.Conn) {
			up.Set(1)
			connected.fire()
			log.Info("NATS connected", "server", c.ConnectedUrlRedacted())
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			up.Set(1)
			connected.fire()
			log.Info("NATS reconnected", "server", c.ConnectedUrlRedacted())
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			up.Set(0)
			log.Warn("NATS disconnected", "err", err)
		}),
		nats.ClosedHandler(func(*nats.Conn) {
			up.Set(0)
			log.Info("NATS connection closed")
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subj := ""
			if sub != nil {
				subj = sub.Subject
			}
			log.Warn("NATS error", "subject", subj, "err", err)
		}),
	}
	if cfg.NATSUser != "" {
		opts = append(opts, nats.UserInfo(cfg.NATSUser, cfg.NATSPassword))
	}
	if cfg.NATSCreds != "" {
		opts = append(opts, nats.UserCredentials(cfg.NATSCreds))
	}
	nc, err := nats.Connect(strings.Join(list(cfg.NATSURL), ","), opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to NATS: %w", err)
	}
	if nc.IsConnected() {
		up.Set(1)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("opening JetStream: %w", err)
	}
	return &natsConn{nc: nc, js: js, log: log, up: connected}, nil
}

// status is what /ready reports for NATS.
func (c *natsConn) status() string {
	if c == nil {
		return "disabled"
	}
	if c.nc.IsConnected() {
		return "ok"
	}
	return "down"
}

// kv returns a lazily created K/V bucket with the given TTL.
func (c *natsConn) kv(bucket, description string, ttl time.Duration) *natsKV {
	return newNatsKV(c.js, bucket, description, ttl, c.log, c.up.wait)
}

// stream gets or creates a JetStream stream. Like buckets, it is looked up
// again on the next call after a failure (NATS may be down at start).
type natsStream struct {
	js  jetstream.JetStream
	cfg jetstream.StreamConfig
	log *slog.Logger

	mu sync.Mutex
	s  jetstream.Stream
}

func (c *natsConn) stream(cfg jetstream.StreamConfig) *natsStream {
	return &natsStream{js: c.js, cfg: cfg, log: c.log}
}

func (s *natsStream) get(ctx context.Context) (jetstream.Stream, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.s != nil {
		return s.s, nil
	}
	st, err := s.js.Stream(ctx, s.cfg.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		st, err = s.js.CreateStream(ctx, s.cfg)
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			st, err = s.js.Stream(ctx, s.cfg.Name)
		}
		if err == nil {
			s.log.Info("created stream", "stream", s.cfg.Name, "subjects", s.cfg.Subjects, "max_age", s.cfg.MaxAge)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("opening stream %s: %w", s.cfg.Name, err)
	}
	s.s = st
	return st, nil
}

// drain flushes pending publishes and closes the connection, bounded by ctx.
func (c *natsConn) drain(ctx context.Context) {
	if c == nil {
		return
	}
	if !c.nc.IsConnected() {
		c.nc.Close()
		return
	}
	closed := make(chan struct{})
	c.nc.SetClosedHandler(func(*nats.Conn) { close(closed) })
	if err := c.nc.Drain(); err != nil {
		c.nc.Close()
		return
	}
	select {
	case <-closed:
	case <-ctx.Done():
		c.nc.Close()
	}
}
