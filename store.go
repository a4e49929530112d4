package main

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// kvStore is the shared-state seam (SPEC §9): the sessions, revocations and
// requests buckets. NATS mode uses JetStream K/V so every replica sees the
// same state; in-process mode uses memory. Values expire after the bucket's
// TTL in both.
type kvStore interface {
	// Get returns errNotFound when the key is absent or expired.
	Get(ctx context.Context, key string) ([]byte, error)
	Put(ctx context.Context, key string, value []byte) error
	// Create writes only when the key is absent, else errExists: the atomic
	// "first one wins" that ownership checks need across replicas.
	Create(ctx context.Context, key string, value []byte) error
	Delete(ctx context.Context, key string) error
	// Watch calls fn for every later change (value nil for a delete) until
	// ctx ends; it keeps near caches coherent across replicas.
	Watch(ctx context.Context, fn func(key string, value []byte)) error
}

var (
	errNotFound = errors.New("not found")
	errExists   = errors.New("key exists")
)

var (
	_ kvStore = (*memKV)(nil)
	_ kvStore = (*natsKV)(nil)
)

// memKV is the in-process kvStore.
type memKV struct {
	ttl time.Duration
	now func() time.Time

	mu       sync.Mutex
	m        map[string]memEntry
	puts     int
	watchers map[*func(string, []byte)]struct{}
}

type memEntry struct {
	value   []byte
	expires time.Time
}

func newMemKV(ttl time.Duration) *memKV {
	return &memKV{ttl: ttl, now: time.Now, m: map[string]memEntry{}, watchers: map[*func(string, []byte)]struct{}{}}
}

func (s *memKV) Get(_ context.Context, key string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.m[key]
	if !ok || !s.now().Before(e.expires) {
		return nil, errNotFound
	}
	return e.value, nil
}

func (s *memKV) Put(_ context.Context, key string, value []byte) error {
	s.set(key, value, false)
	return nil
}

func (s *memKV) Create(_ context.Context, key string, value []byte) error {
	if !s.set(key, value, true) {
		return errExists
	}
	return nil
}

func (s *memKV) set(key string, value []byte, onlyNew bool) bool {
	s.mu.Lock()
	now := s.now()
	if e, ok := s.m[key]; onlyNew && ok && now.Before(e.expires) {
		s.mu.Unlock()
		return false
	}
	s.m[key] = memEntry{value: append([]byte(nil), value...), expires: now.Add(s.ttl)}
	// Sweep expired entries now and then so memory stays bounded by what
	// was written within one TTL.
	if s.puts++; s.puts%1024 == 0 {
		for k, e := range s.m {
			if !now.Before(e.expires) {
				delete(s.m, k)
			}
		}
	}
	fns := s.watchFns()
	s.mu.Unlock()
	for _, fn := range fns {
		fn(key, value)
	}
	return true
}

func (s *memKV) Delete(_ context.Context, key string) error {
	s.mu.Lock()
	delete(s.m, key)
	fns := s.watchFns()
	s.mu.Unlock()
	for _, fn := range fns {
		fn(key, nil)
	}
	return nil
}

func (s *memKV) watchFns() []func(string, []byte) {
	fns := make([]func(string, []byte), 0, len(s.watchers))
	for fn := range s.watchers {
		fns = append(fns, *fn)
	}
	return fns
}

func (s *memKV) Watch(ctx context.Context, fn func(string, []byte)) error {
	p := &fn
	s.mu.Lock()
	s.watchers[p] = struct{}{}
	s.mu.Unlock()
	context.AfterFunc(ctx, func() {
		s.mu.Lock()
		delete(s.watchers, p)
		s.mu.Unlock()
	})
	return nil
}

// natsKV is a JetStream K/V bucket, created with its TTL on first use. NATS
// may be down at start, so the bucket is looked up lazily and the lookup is
// retried on the next call after a failure.
type natsKV struct {
	js  jetstream.JetStream
	cfg jetstream.KeyValueConfig
	log *slog.Logger

	// reconnected returns a channel closed at the next (re)connection to
	// NATS; nil when there is no such signal.
	reconnected func() <-chan struct{}
	lookup      chan struct{} // held while the bucket is looked up

	mu sync.Mutex
	kv jetstream.KeyValue
}

func newNatsKV(js jetstream.JetStream, bucket, description string, ttl time.Duration, log *slog.Logger, reconnected func() <-chan struct{}) *natsKV {
	return &natsKV{js: js, log: log, reconnected: reconnected, lookup: make(chan struct{}, 1), cfg: jetstream.KeyValueConfig{
		Bucket:       bucket,
		Description:  description,
		TTL:          ttl,
		History:      1,
		MaxValueSize: 64 << 10,
		Storage:      jetstream.FileStorage,
	}}
}

func (s *natsKV) bucket(ctx context.Context) (jetstream.KeyValue, error) {
	s.mu.Lock()
	kv := s.kv
	s.mu.Unlock()
	if kv != nil {
		return kv, nil
	}
	// One lookup at a time, and waiting for it honours ctx: a slow NATS
	// must not hold a request (bounded by kvTimeout) behind a lookup
	// started without a deadline, such as a watcher's.
	select {
	case s.lookup <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-s.lookup }()
	s.mu.Lock()
	kv = s.kv
	s.mu.Unlock()
	if kv != nil {
		return kv, nil
	}
	// An existing bucket keeps its own settings (as the original did): the
	// operator may have tuned it.
	kv, err := s.js.KeyValue(ctx, s.cfg.Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = s.js.CreateKeyValue(ctx, s.cfg)
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = s.js.KeyValue(ctx, s.cfg.Bucket)
		}
		if err == nil {
			s.log.Info("created K/V bucket", "bucket", s.cfg.Bucket, "ttl", s.cfg.TTL)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("opening K/V bucket %s: %w", s.cfg.Bucket, err)
	}
	s.mu.Lock()
	s.kv = kv
	s.mu.Unlock()
	return kv, nil
}

func (s *natsKV) Get(ctx context.Context, key string) ([]byte, error) {
	kv, err := s.bucket(ctx)
	if err != nil {
		return nil, err
	}
	e, err := kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, errNotFound
	}
	if err != nil {
		return nil, err
	}
	return e.Value(), nil
}

func (s *natsKV) Put(ctx context.Context, key string, value []byte) error {
	kv, err := s.bucket(ctx)
	if err != nil {
		return err
	}
	_, err = kv.Put(ctx, key, value)
	return err
}

func (s *natsKV) Create(ctx context.Context, key string, value []byte) error {
	kv, err := s.bucket(ctx)
	if err != nil {
		return err
	}
	_, err = kv.Create(ctx, key, value)
	if errors.Is(err, jetstream.ErrKeyExists) {
		return errExists
	}
	return err
}

func (s *natsKV) Delete(ctx context.Context, key string) error {
	kv, err := s.bucket(ctx)
	if err != nil {
		return err
	}
	err = kv.Delete(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	}
	return err
}

// Watch follows the bucket until ctx ends. NATS may be down when it starts
// and the watcher may end when the connection is lost, so it re-opens the
// watch in the background with backoff; only ctx stops it. On every
// reconnection the watch is re-opened at once, from the revision after the
// last one seen: the library's own recovery of a watch whose server went
// away waits for missed heartbeats (10 s and more), during which near caches
// would miss logouts made on other replicas.
func (s *natsKV) Watch(ctx context.Context, fn func(string, []byte)) error {
	go s.follow(ctx, fn, nil)
	return nil
}

// follow keeps one watch of the bucket open until ctx ends, re-opening it
// after failures (with backoff) and at once after every reconnection. With
// reset set, every opening starts from the bucket's current values, after
// reset is called (for readers that rebuild their own index of it);
// otherwise it resumes after the last revision seen.
func (s *natsKV) follow(ctx context.Context, fn func(string, []byte), reset func()) {
	var last uint64
	retryForever(ctx, s.reconnected, func(again <-chan struct{}) bool {
		return s.watchOnce(ctx, again, &last, fn, reset)
	})
}

// retryForever runs once until ctx ends, pausing between runs with a
// backoff from 100 ms to 5 s; a run that reports it got going resets the
// backoff. When wake is set, the channel it gives is handed to the run and
// also cuts the pause short (a reconnection). It is how watchers and
// consumers outlive NATS outages.
func retryForever(ctx context.Context, wake func() <-chan struct{}, once func(again <-chan struct{}) (started bool)) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		var again <-chan struct{}
		if wake != nil {
			again = wake()
		}
		if once(again) {
			backoff = 100 * time.Millisecond
		}
		select {
		case <-ctx.Done():
		case <-again:
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// watchOnce runs one watcher until it ends, ctx ends or again is closed; it
// reports whether it got started. last is the revision of the last update
// seen, 0 for none yet.
func (s *natsKV) watchOnce(ctx context.Context, again <-chan struct{}, last *uint64, fn func(string, []byte), reset func()) bool {
	kv, err := s.bucket(ctx)
	if err != nil {
		return false
	}
	var opts []jetstream.WatchOpt
	switch {
	case reset != nil:
	case *last > 0:
		opts = append(opts, jetstream.ResumeFromRevision(*last+1))
	default:
		opts = append(opts, jetstream.UpdatesOnly())
	}
	w, err := kv.WatchAll(ctx, opts...)
	if err != nil {
		s.log.Debug("K/V watch failed", "bucket", s.cfg.Bucket, "err", err)
		return false
	}
	defer w.Stop()
	if reset != nil {
		reset()
	}
	for {
		select {
		case <-ctx.Done():
			return true
		case <-again:
			return true
		case e, ok := <-w.Updates():
			if !ok {
				return true
			}
			if e == nil {
				continue // end of the initial values
			}
			*last = e.Revision()
			switch e.Operation() {
			case jetstream.KeyValuePut:
				fn(e.Key(), e.Value())
			default:
				fn(e.Key(), nil)
			}
		}
	}
}

// requestRecord is the value layout of the "requests" bucket (REFERENCE §6):
// one pending async playbook run, keyed by request_id, written by
// executePlaybook and read by the worker callbacks.
type requestRecord struct {
	ClientID     string `json:"client_id"`
	SessionToken string `json:"session_token"`
	ExecutionID  string `json:"execution_id"`
	PlaybookPath string `json:"playbook_path"`
	CreatedAt    int64  `json:"created_at"`
}

var errClientTaken = errors.New("client_id belongs to another session")

// validClientID keeps client ids usable as NATS keys and subject tokens.
func validClientID(id string) bool {
	if len(id) == 0 || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// claimClient binds clientID to the session of token the first time any
// replica sees it (an atomic create in the requests bucket, so it lives as
// long as pending requests do). Later claims by the same session succeed;
// by another session they fail with errClientTaken.
func claimClient(ctx context.Context, requests kvStore, clientID, token string) error {
	sum := sha256.Sum256([]byte(token))
	owner := []byte(hex.EncodeToString(sum[:]))
	key := "client." + clientID
	err := requests.Create(ctx, key, owner)
	if !errors.Is(err, errExists) {
		return err
	}
	got, err := requests.Get(ctx, key)
	if errors.Is(err, errNotFound) {
		// Expired between the two calls: claim again.
		return requests.Create(ctx, key, owner)
	}
	if err != nil {
		return err
	}
	if subtle.ConstantTimeCompare(got, owner) != 1 {
		return errClientTaken
	}
	// Refresh the TTL so an active client keeps its id.
	return requests.Put(ctx, key, owner)
}
