package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// noetlClient calls the NoETL server's API. Every call is bounded by
// NOETL_TIMEOUT_SECS and every response body by maxNoETLBody.
type noetlClient struct {
	base string
	http *http.Client
	cfg  Config
}

const maxNoETLBody = 1 << 20

func newNoETLClient(cfg Config) *noetlClient {
	return &noetlClient{base: cfg.NoETLBaseURL, cfg: cfg, http: &http.Client{
		Transport:     newUpstreamTransport(cfg),
		Timeout:       cfg.NoETLTimeout,
		CheckRedirect: noRedirects,
	}}
}

// noRedirects keeps gateway→NoETL calls where they were sent: the API never
// redirects, and following one could carry a body or a token elsewhere.
func noRedirects(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

// postJSON POSTs in as JSON to path and decodes a 2xx answer into out.
func (c *noetlClient) postJSON(ctx context.Context, path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	if id := requestIDFrom(ctx); id != "" {
		req.Header.Set("X-Request-Id", id)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("POST %s: %w", path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxNoETLBody+1))
	if err != nil {
		return fmt.Errorf("POST %s: reading response: %w", path, err)
	}
	if len(raw) > maxNoETLBody {
		return fmt.Errorf("POST %s: response larger than %d bytes", path, maxNoETLBody)
	}
	if resp.StatusCode/100 != 2 {
		return &noetlStatusError{Path: path, Status: resp.StatusCode}
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("POST %s: decoding response: %w", path, err)
	}
	return nil
}

// noetlStatusError is a non-2xx answer from NoETL; callers map some statuses
// (401/403 from the sync auth endpoints) to their own answers.
type noetlStatusError struct {
	Path   string
	Status int
}

func (e *noetlStatusError) Error() string { return fmt.Sprintf("POST %s: status %d", e.Path, e.Status) }

// validateSession asks NoETL about a token on a cache miss
// (POST /api/auth/session/validate, REFERENCE §3.3). An invalid session is
// a record with IsActive false, not an error.
func (c *noetlClient) validateSession(ctx context.Context, token string) (*sessionRecord, error) {
	var resp struct {
		Status    string    `json:"status"`
		Valid     bool      `json:"valid"`
		User      *userJSON `json:"user"`
		ExpiresAt *string   `json:"expires_at"`
		Error     *string   `json:"error"`
	}
	err := c.postJSON(ctx, "/api/auth/session/validate", map[string]string{"session_token": token, "credential": c.cfg.SessionDBCredential}, &resp)
	if err != nil {
		return nil, err
	}
	if resp.Status != "ok" {
		return nil, fmt.Errorf("validate session: NoETL status %q", resp.Status)
	}
	return validationRecord(token, resp.Valid, resp.User, resp.ExpiresAt)
}

// validationRecord turns a validation answer (API or playbook) into a
// record; an invalid session is a record with IsActive false.
func validationRecord(token string, valid bool, u *userJSON, expiresAt *string) (*sessionRecord, error) {
	if !valid {
		return &sessionRecord{SessionToken: token}, nil
	}
	if u == nil {
		return nil, fmt.Errorf("validate session: valid without user")
	}
	rec := &sessionRecord{SessionToken: token, IsActive: true, Email: u.Email, DisplayName: u.DisplayName, Roles: u.Roles}
	if expiresAt != nil {
		rec.ExpiresAt = *expiresAt
	}
	var err error
	if rec.UserID, err = u.id(); err != nil {
		return nil, fmt.Errorf("validate session: %w", err)
	}
	return rec, nil
}

// validateSession runs AUTH_PLAYBOOK_VALIDATE_SESSION (SESSION_VALIDATE_VIA=
// playbook) and reads its callback: data {valid, user, expires_at}.
func (rv *rendezvous) validateSession(ctx context.Context, nx *noetlClient, token string) (*sessionRecord, error) {
	msg, err := rv.runPlaybook(ctx, nx, rv.cfg.PlaybookValidateSession, map[string]any{"session_token": token})
	if err != nil {
		return nil, fmt.Errorf("validate session playbook: %w", err)
	}
	if msg.Status != "success" {
		return nil, fmt.Errorf("validate session playbook: callback status %q", msg.Status)
	}
	var data struct {
		Valid     bool      `json:"valid"`
		User      *userJSON `json:"user"`
		ExpiresAt *string   `json:"expires_at"`
	}
	if err := json.Unmarshal(msg.Data, &data); err != nil {
		return nil, fmt.Errorf("validate session playbook: decoding data: %w", err)
	}
	return validationRecord(token, data.Valid, data.User, data.ExpiresAt)
}

// userJSON is a user object as NoETL and the playbooks send it: user_id may
// be a number or a numeric string, roles in any of the parseRoles forms.
type userJSON struct {
	UserID      json.RawMessage `json:"user_id"`
	Email       string          `json:"email"`
	DisplayName string          `json:"display_name"`
	Roles       json.RawMessage `json:"roles"`
}

func (u *userJSON) id() (int64, error) {
	var n int64
	if json.Unmarshal(u.UserID, &n) == nil {
		return n, nil
	}
	var s string
	if json.Unmarshal(u.UserID, &s) == nil {
		if _, err := fmt.Sscan(s, &n); err == nil && fmt.Sprint(n) == s {
			return n, nil
		}
	}
	return 0, fmt.Errorf("invalid user_id")
}

// executeResult is NoETL's answer to POST /api/execute.
type executeResult struct {
	ExecutionID string `json:"execution_id"`
	Name        string `json:"name"`
	Status      string `json:"status"`
	Path        string `json:"path"`
}

// execute starts a playbook: POST /api/execute {"path", "payload"}.
// execution_id may come back as a string or a number.
func (c *noetlClient) execute(ctx context.Context, path string, payload any) (*executeResult, error) {
	var raw struct {
		ExecutionID json.RawMessage `json:"execution_id"`
		Name        string          `json:"name"`
		Status      string          `json:"status"`
		Path        string          `json:"path"`
	}
	if err := c.postJSON(ctx, "/api/execute", map[string]any{"path": path, "payload": payload}, &raw); err != nil {
		return nil, err
	}
	id, ok := jsonID(raw.ExecutionID)
	if !ok {
		return nil, fmt.Errorf("execute %s: response without execution_id", path)
	}
	return &executeResult{ExecutionID: id, Name: raw.Name, Status: raw.Status, Path: raw.Path}, nil
}

// cancel asks NoETL to stop an execution (best effort, used on timeouts).
func (c *noetlClient) cancel(ctx context.Context, executionID string) error {
	return c.postJSON(ctx, "/api/executions/"+url.PathEscape(executionID)+"/cancel", map[string]any{}, nil)
}

// jsonID reads an id sent as a JSON string or number.
func jsonID(raw json.RawMessage) (string, bool) {
	var s string
	if json.Unmarshal(raw, &s) == nil && s != "" {
		return s, true
	}
	var n json.Number
	if json.Unmarshal(raw, &n) == nil && n != "" {
		return n.String(), true
	}
	return "", false
}

// callbackMsg is an auth playbook's result (REFERENCE §1.4), as POSTed to
// /api/internal/callback or published on <prefix>.<request_id>.
type callbackMsg struct {
	RequestID   string          `json:"request_id"`
	ExecutionID json.RawMessage `json:"execution_id,omitempty"`
	Step        string          `json:"step,omitempty"`
	Status      string          `json:"status"`
	Data        json.RawMessage `json:"data"`
}

// validRequestID is the request_id shape: 1–128 of [A-Za-z0-9_-] (the
// gateway issues UUIDs); it keeps ids usable as K/V keys and NATS subject
// tokens.
func validRequestID(id string) bool { return validClientID(id) }

// rendezvous pairs auth playbook runs with their callbacks (SPEC §7.1). The
// waiter lives on the replica that started the playbook; a callback that
// lands elsewhere is forwarded over NATS request/reply on
// <NATS_CALLBACK_SUBJECT_PREFIX>.<request_id>, and only the waiting replica
// answers. Playbooks may also publish on that subject directly.
type rendezvous struct {
	cfg     Config
	nc      *nats.Conn // nil in in-process mode
	log     *slog.Logger
	metrics *metrics
	// forwardWait bounds how long a forwarded callback waits for the
	// waiting replica's reply: NATS answers in milliseconds, so a longer
	// silence means no replica is waiting.
	forwardWait time.Duration

	mu      sync.Mutex
	waiters map[string]chan callbackMsg
}

func newRendezvous(cfg Config, nc *nats.Conn, log *slog.Logger, m *metrics) *rendezvous {
	return &rendezvous{cfg: cfg, nc: nc, log: log.With("component", "rendezvous"), metrics: m,
		forwardWait: time.Second, waiters: map[string]chan callbackMsg{}}
}

// start subscribes to every callback subject (NATS mode) until ctx ends.
// The subscription survives reconnects: nats.go re-subscribes by itself.
func (rv *rendezvous) start(ctx context.Context) error {
	if rv.nc == nil {
		return nil
	}
	sub, err := rv.nc.Subscribe(rv.cfg.CallbackSubjectPrefix+".>", func(m *nats.Msg) {
		var msg callbackMsg
		if err := json.Unmarshal(m.Data, &msg); err != nil {
			rv.log.Warn("undecodable callback message dropped", "subject", m.Subject, "err", err)
			return
		}
		if msg.RequestID == "" {
			msg.RequestID = strings.TrimPrefix(m.Subject, rv.cfg.CallbackSubjectPrefix+".")
		}
		if msg.Status == "" {
			msg.Status = "success"
		}
		if rv.deliverLocal(msg) {
			rv.metrics.callbacks.with("auth", "delivered_nats").Inc()
			if m.Reply != "" {
				m.Respond([]byte(`{"delivered":true}`))
			}
		}
		// No local waiter: stay silent, the waiting replica answers.
	})
	if err != nil {
		return fmt.Errorf("subscribing to callbacks: %w", err)
	}
	context.AfterFunc(ctx, func() { sub.Unsubscribe() })
	return nil
}

// register creates a waiter under a fresh UUIDv4 request_id; done removes it.
func (rv *rendezvous) register() (id string, ch <-chan callbackMsg, done func()) {
	id = newUUID()
	c := make(chan callbackMsg, 1)
	rv.mu.Lock()
	rv.waiters[id] = c
	rv.mu.Unlock()
	return id, c, func() {
		rv.mu.Lock()
		delete(rv.waiters, id)
		rv.mu.Unlock()
	}
}

// deliverLocal hands msg to this replica's waiter, if any. A waiter takes one
// callback; later ones for the same id are refused.
func (rv *rendezvous) deliverLocal(msg callbackMsg) bool {
	rv.mu.Lock()
	c, ok := rv.waiters[msg.RequestID]
	if ok {
		delete(rv.waiters, msg.RequestID)
	}
	rv.mu.Unlock()
	if !ok {
		return false
	}
	c <- msg
	return true
}

// deliver hands msg to whichever replica waits for it.
func (rv *rendezvous) deliver(ctx context.Context, msg callbackMsg) bool {
	if rv.deliverLocal(msg) {
		rv.metrics.callbacks.with("auth", "delivered").Inc()
		return true
	}
	if rv.nc == nil || !rv.nc.IsConnected() {
		rv.metrics.callbacks.with("auth", "no_waiter").Inc()
		return false
	}
	data, err := json.Marshal(msg)
	if err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, rv.forwardWait)
	defer cancel()
	if _, err := rv.nc.RequestWithContext(ctx, rv.cfg.CallbackSubjectPrefix+"."+msg.RequestID, data); err != nil {
		rv.metrics.callbacks.with("auth", "no_waiter").Inc()
		return false
	}
	rv.metrics.callbacks.with("auth", "forwarded").Inc()
	return true
}

var errPlaybookTimeout = errors.New("playbook timed out")

// runPlaybook executes an auth playbook with the rendezvous fields added to
// payload and waits up to AUTH_PLAYBOOK_TIMEOUT_SECS for its callback. On a
// timeout (or the caller going away) the execution is cancelled, best effort,
// so it cannot create a session nobody receives.
func (rv *rendezvous) runPlaybook(ctx context.Context, nx *noetlClient, path string, payload map[string]any) (callbackMsg, error) {
	id, ch, done := rv.register()
	defer done()
	payload["request_id"] = id
	payload["callback_subject"] = rv.cfg.CallbackSubjectPrefix + "." + id
	payload["gateway_url"] = rv.cfg.PublicURL
	res, err := nx.execute(ctx, path, payload)
	if err != nil {
		return callbackMsg{}, err
	}
	timer := time.NewTimer(rv.cfg.PlaybookTimeout)
	defer timer.Stop()
	select {
	case msg := <-ch:
		return msg, nil
	case <-timer.C:
		err = errPlaybookTimeout
	case <-ctx.Done():
		err = ctx.Err()
	}
	go func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if cerr := nx.cancel(cctx, res.ExecutionID); cerr != nil {
			rv.log.Warn("cancelling timed-out playbook failed", "playbook", path, "execution_id", res.ExecutionID, "err", cerr)
		}
	}()
	rv.log.Warn("auth playbook gave no callback; execution cancelled", "playbook", path, "execution_id", res.ExecutionID, "err", err)
	return callbackMsg{}, err
}

// handleAuthCallback is POST /api/internal/callback (SPEC §7.1): workers
// deliver auth playbook results; the answer says whether a replica took it.
func handleAuthCallback(rv *rendezvous) http.Handler {
	type response struct {
		Delivered bool   `json:"delivered"`
		Message   string `json:"message"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var msg callbackMsg
		if !decodeJSON(w, r, &msg) {
			return
		}
		if msg.RequestID == "" {
			writeError(w, r, http.StatusBadRequest, "request_id is required", nil)
			return
		}
		if !validRequestID(msg.RequestID) {
			writeError(w, r, http.StatusBadRequest, "invalid request_id", nil)
			return
		}
		if len(msg.ExecutionID) > 0 && string(msg.ExecutionID) != "null" {
			if _, ok := jsonID(msg.ExecutionID); !ok {
				writeError(w, r, http.StatusBadRequest, "execution_id must be a string or a number", nil)
				return
			}
		}
		if msg.Status == "" {
			msg.Status = "success"
		}
		if rv.deliver(r.Context(), msg) {
			writeJSON(w, http.StatusOK, response{true, "Callback delivered successfully"})
			return
		}
		loggerFrom(r).Info("auth callback without a waiter", "request_id", msg.RequestID)
		writeJSON(w, http.StatusOK, response{false, "No pending request found for this request_id"})
	})
}

// newUUID returns a random (version 4) UUID, hyphenated.
func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
