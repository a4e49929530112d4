package main

import (
	"bytes"
	"encoding/json"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
)

// callbackErrors are the only error messages the worker routes may send:
// anything else would be internal text (a Go or NATS error) reaching the
// caller.
var callbackErrors = regexp.MustCompile(`^(Content-Type must be application/json|request body too large|invalid JSON|invalid JSON: empty body|` +
	`invalid JSON: field "[a-z_.]+" must be (string|boolean|integer|number|object|array)|request_id must be 1-128 characters of \[A-Za-z0-9_-\]|` +
	`execution_id must be a string or a number|error\.message is required|Request not found|request store unavailable|event store unavailable)$`)

// FuzzCallbackBody drives the real worker routes (async result and progress,
// through the gateway's whole handler chain) with arbitrary bodies and
// content types: never a panic, a status among 200/202/400/404/413/415/503,
// and always a JSON object with a known "error" message or a "status".
func FuzzCallbackBody(f *testing.F) {
	p := startInProcess(f, map[string]string{"CALLBACK_TOKEN": testCallbackToken, "MAX_BODY_BYTES": "8192"}, nil, nil)
	p.putRequest(f, "req-v", "client-v", "tok-v", "exec-v")
	routes := []string{"/api/internal/callback/async", "/api/internal/progress"}
	for _, tc := range callbackValidationCases {
		raw, ok := tc.body.(string)
		if !ok {
			b, _ := json.Marshal(tc.body)
			raw = string(b)
		}
		if len(raw) > 16<<10 {
			raw = raw[:16<<10]
		}
		f.Add(uint8(0), "application/json", []byte(raw))
		f.Add(uint8(1), "application/json", []byte(raw))
	}
	for _, s := range []string{
		`{"request_id":"req-v","execution_id":1e400}`, `{"request_id":"req-v","execution_id":"x\ny","status":"FAILED"}`,
		`{"request_id":"req-v","error":{"message":"m","code":"1"}}`, `{"request_id":"req-v","progress":"half"}`,
		`{"request_id":"req-v"} {}`, `[]`, `null`, `{"request_id":"req-v","data":` + strings.Repeat("[", 20000) + `}`,
		"\xef\xbb\xbf{\"request_id\":\"req-v\"}", `{"request_id":"req-v","step":"\u0000"}`,
	} {
		f.Add(uint8(0), "application/json", []byte(s))
		f.Add(uint8(1), "application/json; charset=utf-8", []byte(s))
	}
	f.Add(uint8(0), "text/plain", []byte(`{"request_id":"req-v"}`))
	f.Add(uint8(1), "", []byte(`{"request_id":"req-v"}`))
	f.Add(uint8(1), "application/json;;", []byte(`{"request_id":"req-v"}`))
	h := p.Config.Handler
	f.Fuzz(func(t *testing.T, route uint8, contentType string, body []byte) {
		req := httptest.NewRequest("POST", routes[int(route)%len(routes)], bytes.NewReader(body))
		if contentType != "" {
			req.Header.Set("Content-Type", contentType)
		}
		req.Header.Set("X-Callback-Token", testCallbackToken)
		req.RemoteAddr = "127.0.0.1:4000"
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		switch rec.Code {
		case 200, 202, 400, 404, 413, 415, 503:
		default:
			t.Fatalf("status %d: %s", rec.Code, rec.Body)
		}
		if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
			t.Fatalf("Content-Type %q", ct)
		}
		var m map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &m); err != nil {
			t.Fatalf("body is not a JSON object: %q", rec.Body)
		}
		msg, isErr := m["error"].(string)
		status, isStatus := m["status"].(string)
		switch {
		case isErr:
			if rec.Code < 400 || !callbackErrors.MatchString(msg) {
				t.Fatalf("%d with error %q", rec.Code, msg)
			}
		case isStatus:
			if !(rec.Code == 200 && status == "delivered" || rec.Code == 202 && status == "queued") {
				t.Fatalf("%d with status %q", rec.Code, status)
			}
		default:
			t.Fatalf("neither error nor status: %s", rec.Body)
		}
	})
}
