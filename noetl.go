package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
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
	tr := &http.Transport{
		Proxy:                 nil,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: cfg.NoETLTimeout,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		ForceAttemptHTTP2:     true,
	}
	return &noetlClient{base: cfg.NoETLBaseURL, cfg: cfg, http: &http.Client{Transport: tr, Timeout: cfg.NoETLTimeout,
		// The API never redirects; following one could leak the body elsewhere.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
}

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
		return fmt.Errorf("POST %s: status %d", path, resp.StatusCode)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("POST %s: decoding response: %w", path, err)
	}
	return nil
}

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
	if !resp.Valid {
		return &sessionRecord{SessionToken: token}, nil
	}
	if resp.User == nil {
		return nil, fmt.Errorf("validate session: valid without user")
	}
	rec := &sessionRecord{SessionToken: token, IsActive: true, Email: resp.User.Email, DisplayName: resp.User.DisplayName, Roles: resp.User.Roles}
	if resp.ExpiresAt != nil {
		rec.ExpiresAt = *resp.ExpiresAt
	}
	if rec.UserID, err = resp.User.id(); err != nil {
		return nil, fmt.Errorf("validate session: %w", err)
	}
	return rec, nil
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
