package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/nats-io/nats.go"
)

// Worker callbacks (SPEC §7.2, REFERENCE §8.4–8.5): a playbook started with
// a clientId posts its result (and progress) here; the gateway finds the
// pending request in the requests bucket, keeps the notification in the
// event log and the replica holding the browser's stream delivers it.
// Routing is by the client_id stored with the request, never by anything
// the worker sends.

// callbackLimit is the largest callback body accepted: the body limit, and
// in NATS mode what one NATS message can carry (the notification is kept in
// the events stream), less room for the envelope.
func (b *broker) callbackLimit() int64 {
	limit := b.cfg.MaxBodyBytes
	if b.nc != nil {
		mp := b.nc.MaxPayload()
		if mp <= 0 {
			mp = 1 << 20 // the server default, while disconnected
		}
		limit = min(limit, mp-8<<10)
	}
	return limit
}

// lookupRequest finds the pending request of a callback, answering 404 or
// 503 itself when it cannot.
func (b *broker) lookupRequest(w http.ResponseWriter, r *http.Request, kind, requestID string) (*requestRecord, bool) {
	raw, err := b.requests.Get(r.Context(), requestID)
	if errors.Is(err, errNotFound) {
		b.metrics.callbacks.with(kind, "not_found").Inc()
		writeError(w, r, http.StatusNotFound, "Request not found", nil)
		return nil, false
	}
	if err != nil {
		b.metrics.callbacks.with(kind, "error").Inc()
		writeError(w, r, http.StatusServiceUnavailable, "request store unavailable", err)
		return nil, false
	}
	var rec requestRecord
	if err := json.Unmarshal(raw, &rec); err != nil || !validClientID(rec.ClientID) {
		b.metrics.callbacks.with(kind, "not_found").Inc()
		writeError(w, r, http.StatusNotFound, "Request not found", fmt.Errorf("request record %s has no usable client_id (err %v)", requestID, err))
		return nil, false
	}
	return &rec, true
}

// deliver publishes a notification and answers the worker: 200 delivered
// when a live stream took it, 202 queued when it waits in the log.
func (b *broker) deliver(w http.ResponseWriter, r *http.Request, kind string, rec *requestRecord, requestID, method string, msg any) bool {
	delivered, err := b.publish(r.Context(), rec.ClientID, method, requestID, msg)
	if err != nil {
		b.metrics.callbacks.with(kind, "error").Inc()
		if errors.Is(err, nats.ErrMaxPayload) {
			writeError(w, r, http.StatusRequestEntityTooLarge, "request body too large", err)
			return false
		}
		writeError(w, r, http.StatusServiceUnavailable, "event store unavailable", err)
		return false
	}
	log := loggerFrom(r).With("callback_request_id", requestID, "client_id", rec.ClientID, "kind", kind)
	if delivered {
		b.metrics.callbacks.with(kind, "delivered").Inc()
		log.Debug("callback delivered")
		writeJSON(w, http.StatusOK, map[string]string{"status": "delivered"})
		return true
	}
	b.metrics.callbacks.with(kind, "queued").Inc()
	b.metrics.sseEvents.with("queued").Inc()
	log.Debug("callback queued for a disconnected client")
	writeJSON(w, http.StatusAccepted, struct {
		Status             string `json:"status"`
		ClientDisconnected bool   `json:"clientDisconnected"`
	}{"queued", true})
	return false
}

// executionIDArg reads an optional execution_id (string or number).
func executionIDArg(raw json.RawMessage) (id string, present, ok bool) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", false, true
	}
	id, ok = jsonID(raw)
	return id, true, ok
}

// decodeCallback reads a worker's JSON body within callbackLimit; on
// failure it has answered (413/415/400) and counted the call as invalid.
func (b *broker) decodeCallback(w http.ResponseWriter, r *http.Request, kind string, dst any) bool {
	r.Body = http.MaxBytesReader(w, r.Body, b.callbackLimit())
	if !decodeJSON(w, r, dst) {
		b.metrics.callbacks.with(kind, "invalid").Inc()
		return false
	}
	return true
}

// callbackProblem checks the fields both worker routes share: "" when they
// are fine, else the message for the 400.
func callbackProblem(requestID string, executionIDOK bool) string {
	switch {
	case !validRequestID(requestID):
		return "request_id must be 1-128 characters of [A-Za-z0-9_-]"
	case !executionIDOK:
		return "execution_id must be a string or a number"
	}
	return ""
}

func (b *broker) refuseCallback(w http.ResponseWriter, r *http.Request, kind, problem string) {
	b.metrics.callbacks.with(kind, "invalid").Inc()
	writeError(w, r, http.StatusBadRequest, problem, nil)
}

// handleCallbackAsync serves POST /api/internal/callback/async.
func handleCallbackAsync(b *broker) http.Handler {
	type errorIn struct {
		Code    *int            `json:"code"`
		Message *string         `json:"message"`
		Data    json.RawMessage `json:"data"`
	}
	type request struct {
		RequestID   string          `json:"request_id"`
		ExecutionID json.RawMessage `json:"execution_id"`
		Status      *string         `json:"status"`
		Data        json.RawMessage `json:"data"`
		Error       *errorIn        `json:"error"`
	}
	type errorOut struct {
		Code    int             `json:"code"`
		Message string          `json:"message"`
		Data    json.RawMessage `json:"data"`
	}
	type failed struct {
		RequestID   string   `json:"requestId"`
		ExecutionID string   `json:"executionId"`
		Status      string   `json:"status"`
		Error       errorOut `json:"error"`
	}
	type succeeded struct {
		RequestID   string          `json:"requestId"`
		ExecutionID string          `json:"executionId"`
		Status      string          `json:"status"`
		Data        json.RawMessage `json:"data"`
	}
	const kind = "async"
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var in request
		if !b.decodeCallback(w, r, kind, &in) {
			return
		}
		execID, hasExec, ok := executionIDArg(in.ExecutionID)
		problem := callbackProblem(in.RequestID, ok)
		if problem == "" && in.Error != nil && in.Error.Message == nil {
			problem = "error.message is required"
		}
		if problem != "" {
			b.refuseCallback(w, r, kind, problem)
			return
		}
		rec, found := b.lookupRequest(w, r, kind, in.RequestID)
		if !found {
			return
		}
		if !hasExec {
			execID = rec.ExecutionID
		}
		status := "COMPLETED"
		if in.Status != nil {
			status = *in.Status
		}
		var params any
		if status == "FAILED" || in.Error != nil {
			e := errorOut{Code: -32000, Message: "Playbook execution failed"}
			if in.Error != nil {
				e.Message, e.Data = *in.Error.Message, in.Error.Data
				if in.Error.Code != nil {
					e.Code = *in.Error.Code
				}
			}
			params = failed{RequestID: in.RequestID, ExecutionID: execID, Status: "FAILED", Error: e}
		} else {
			params = succeeded{RequestID: in.RequestID, ExecutionID: execID, Status: status, Data: in.Data}
		}
		msg := rpcNotification{JSONRPC: "2.0", Method: "playbook/result", Params: params}
		if b.deliver(w, r, kind, rec, in.RequestID, "playbook/result", msg) {
			// Delivered: the request is done. Queued requests stay listed as
			// pending until their result reaches the client.
			ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), confirmWait)
			defer cancel()
			b.requests.Delete(ctx, in.RequestID)
		}
	})
}

// handleProgress serves POST /api/internal/progress. The request stays
// pending.
func handleProgress(b *broker) http.Handler {
	type request struct {
		RequestID   string          `json:"request_id"`
		ExecutionID json.RawMessage `json:"execution_id"`
		Step        *string         `json:"step"`
		Message     *string         `json:"message"`
		Progress    *float64        `json:"progress"`
	}
	type params struct {
		RequestID   string   `json:"requestId"`
		ExecutionID *string  `json:"executionId"`
		Step        *string  `json:"step"`
		Message     *string  `json:"message"`
		Progress    *float64 `json:"progress"`
	}
	const kind = "progress"
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var in request
		if !b.decodeCallback(w, r, kind, &in) {
			return
		}
		execID, hasExec, ok := executionIDArg(in.ExecutionID)
		if problem := callbackProblem(in.RequestID, ok); problem != "" {
			b.refuseCallback(w, r, kind, problem)
			return
		}
		rec, found := b.lookupRequest(w, r, kind, in.RequestID)
		if !found {
			return
		}
		p := params{RequestID: in.RequestID, Step: in.Step, Message: in.Message, Progress: in.Progress}
		if hasExec {
			p.ExecutionID = &execID
		}
		b.deliver(w, r, kind, rec, in.RequestID, "playbook/progress", rpcNotification{JSONRPC: "2.0", Method: "playbook/progress", Params: p})
	})
}
