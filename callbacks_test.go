package main

import (
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestCallbacksResultAndProgress(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-r", sseUser, time.Now().Add(time.Hour))
	g := natsGateway(t, ns, noetl, nil)
	kv := requestsKV(t, ns)
	putRequest(t, kv, "req-1", "client-r", "tok-r", "exec-stored")
	putRequest(t, kv, "req-2", "client-r", "tok-r", "exec-stored-2")

	c := openSSE(t, g.URL+"/events?session_token=tok-r&client_id=client-r", nil)
	c.skipInit(t)

	status, m := callback(t, g.URL, "/api/internal/progress", map[string]any{"request_id": "req-1", "execution_id": 42, "step": "fetch", "progress": 0.5})
	if status != 200 || m["status"] != "delivered" {
		t.Fatalf("progress: %d %v", status, m)
	}
	ev := c.nextEvent(t, 10*time.Second)
	if ev.Event != "playbook/progress" || ev.ID == "" ||
		ev.Data != `{"jsonrpc":"2.0","method":"playbook/progress","params":{"requestId":"req-1","executionId":"42","step":"fetch","message":null,"progress":0.5}}` {
		t.Fatalf("progress frame %+v", ev)
	}
	progressID, _ := strconv.ParseUint(ev.ID, 10, 64)

	status, m = callback(t, g.URL, "/api/internal/callback/async", `{"request_id":"req-1","data":{"rows":[1,2],
		"note":"two\nlines"}}`)
	if status != 200 || m["status"] != "delivered" {
		t.Fatalf("result: %d %v", status, m)
	}
	ev = c.nextEvent(t, 10*time.Second)
	if ev.Event != "playbook/result" ||
		ev.Data != `{"jsonrpc":"2.0","method":"playbook/result","params":{"requestId":"req-1","executionId":"exec-stored","status":"COMPLETED","data":{"rows":[1,2],"note":"two\nlines"}}}` {
		t.Fatalf("result frame %+v", ev)
	}
	if id, _ := strconv.ParseUint(ev.ID, 10, 64); id <= progressID {
		t.Fatalf("result id %s not after progress id %d", ev.ID, progressID)
	}
	// Delivered: the request is done.
	if status, m = callback(t, g.URL, "/api/internal/callback/async", map[string]any{"request_id": "req-1"}); status != 404 || m["error"] != "Request not found" {
		t.Fatalf("second result: %d %v", status, m)
	}

	// The failure branch, with and without an error object.
	status, _ = callback(t, g.URL, "/api/internal/callback/async", map[string]any{"request_id": "req-2", "execution_id": "exec-9", "status": "COMPLETED",
		"error": map[string]any{"code": -32001, "message": "timed out", "data": map[string]any{"after": 30}}})
	if status != 200 {
		t.Fatalf("failed result: %d", status)
	}
	ev = c.nextEvent(t, 10*time.Second)
	if ev.Data != `{"jsonrpc":"2.0","method":"playbook/result","params":{"requestId":"req-2","executionId":"exec-9","status":"FAILED","error":{"code":-32001,"message":"timed out","data":{"after":30}}}}` {
		t.Fatalf("failed frame %s", ev.Data)
	}
	putRequest(t, kv, "req-3", "client-r", "tok-r", "exec-3")
	callback(t, g.URL, "/api/internal/callback/async", map[string]any{"request_id": "req-3", "status": "FAILED"})
	ev = c.nextEvent(t, 10*time.Second)
	if ev.Data != `{"jsonrpc":"2.0","method":"playbook/result","params":{"requestId":"req-3","executionId":"exec-3","status":"FAILED","error":{"code":-32000,"message":"Playbook execution failed","data":null}}}` {
		t.Fatalf("failed frame %s", ev.Data)
	}

	metrics := scrape(t, g.URL)
	for _, want := range []string{`gateway_callbacks_total{kind="async",outcome="delivered"} 3`, `gateway_callbacks_total{kind="progress",outcome="delivered"} 1`,
		`gateway_sse_connections 1`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s:\n%s", want, metrics)
		}
	}
	// The first event may race the end of the (empty) replay: it is then
	// sent as replayed, and skipped live.
	if n := metricValue(metrics, `gateway_sse_events_total{outcome="delivered"}`) + metricValue(metrics, `gateway_sse_events_total{outcome="replayed"}`); n != 4 {
		t.Errorf("events sent %v, want 4", n)
	}
}

const testCallbackToken = "s3cret-callback-token-for-tests"

var callbackAuth = map[string]string{"Authorization": "Bearer " + testCallbackToken}

// callbackValidationCases are TestCallbackValidation's table, and the seeds
// of FuzzCallbackBody. Each expects a pending request "req-v".
var callbackValidationCases = []struct {
	name, route string
	body        any
	headers     map[string]string
	status      int
	msg         string
}{
	{"no callback token", "/api/internal/callback/async", map[string]any{"request_id": "req-v"}, nil, 401, "callback token required"},
	{"wrong callback token", "/api/internal/progress", map[string]any{"request_id": "req-v"}, map[string]string{"X-Callback-Token": "nope"}, 401, "callback token required"},
	{"bad JSON", "/api/internal/callback/async", "{", callbackAuth, 400, "invalid JSON"},
	{"missing request_id", "/api/internal/callback/async", map[string]any{"status": "COMPLETED"}, callbackAuth, 400, "request_id must be 1-128 characters of [A-Za-z0-9_-]"},
	{"bad request_id", "/api/internal/progress", map[string]any{"request_id": "../x"}, callbackAuth, 400, "request_id must be 1-128 characters of [A-Za-z0-9_-]"},
	{"long request_id", "/api/internal/progress", map[string]any{"request_id": strings.Repeat("a", 129)}, callbackAuth, 400, "request_id must be 1-128 characters of [A-Za-z0-9_-]"},
	{"numeric request_id", "/api/internal/callback/async", map[string]any{"request_id": 5}, callbackAuth, 400, `invalid JSON: field "request_id" must be string`},
	{"object execution_id", "/api/internal/callback/async", map[string]any{"request_id": "req-v", "execution_id": map[string]any{}}, callbackAuth, 400, "execution_id must be a string or a number"},
	{"error without message", "/api/internal/callback/async", map[string]any{"request_id": "req-v", "error": map[string]any{"code": 1}}, callbackAuth, 400, "error.message is required"},
	{"unknown request", "/api/internal/callback/async", map[string]any{"request_id": "req-unknown"}, callbackAuth, 404, "Request not found"},
	{"unknown request progress", "/api/internal/progress", map[string]any{"request_id": "req-unknown"}, callbackAuth, 404, "Request not found"},
	{"too large", "/api/internal/callback/async", map[string]any{"request_id": "req-v", "data": strings.Repeat("x", 2<<20)}, callbackAuth, 413, "request body too large"},
}

func TestCallbackValidation(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	g := natsGateway(t, ns, noetl, map[string]string{"CALLBACK_TOKEN": testCallbackToken})
	kv := requestsKV(t, ns)
	putRequest(t, kv, "req-v", "client-v", "tok-v", "exec-v")

	for _, tc := range callbackValidationCases {
		t.Run(tc.name, func(t *testing.T) {
			status, _, m := doJSON(t, "POST", g.URL+tc.route, tc.body, tc.headers)
			if status != tc.status || m["error"] != tc.msg {
				t.Fatalf("got %d %v", status, m)
			}
		})
	}
	// A valid callback for a client that never connected is kept: 202.
	status, _, m := doJSON(t, "POST", g.URL+"/api/internal/progress", map[string]any{"request_id": "req-v"}, callbackAuth)
	if status != 202 || m["status"] != "queued" || m["clientDisconnected"] != true {
		t.Fatalf("queued: %d %v", status, m)
	}
}

// With GATEWAY_INTERNAL_ADDR the worker routes live on the internal listener
// only.
func TestCallbacksOnInternalListener(t *testing.T) {
	t.Parallel()
	ns, noetl := startNATS(t), startNoETL(t)
	noetl.addSession("tok-i", sseUser, time.Now().Add(time.Hour))
	g := natsGateway(t, ns, noetl, map[string]string{"GATEWAY_INTERNAL_ADDR": "127.0.0.1:0"})
	putRequest(t, requestsKV(t, ns), "req-i", "client-i", "tok-i", "e")
	c := openSSE(t, g.URL+"/events?session_token=tok-i&client_id=client-i", nil)
	c.skipInit(t)
	if status, _ := callback(t, g.URL, "/api/internal/progress", map[string]any{"request_id": "req-i"}); status != 404 {
		t.Fatalf("public listener: %d", status)
	}
	if status, m := callback(t, g.InternalURL, "/api/internal/progress", map[string]any{"request_id": "req-i", "step": "x"}); status != 200 || m["status"] != "delivered" {
		t.Fatalf("internal listener: %d %v", status, m)
	}
	if ev := c.nextEvent(t, 10*time.Second); ev.Event != "playbook/progress" {
		t.Fatalf("got %+v", ev)
	}
}
