package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"
)

// sseEncodeCases are TestSSEEncode's table, and seeds of FuzzSSEEncode.
var sseEncodeCases = []struct {
	name, id, event string
	data            any
	want            string
	wantErr         bool
}{
	{name: "full", id: "7", event: "playbook/result", data: map[string]any{"a": "x\ny"}, want: "id: 7\nevent: playbook/result\ndata: {\"a\":\"x\\ny\"}\n\n"},
	{name: "no id", event: "ping", data: pingFrame, want: "event: ping\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"params\":{}}\n\n"},
	{name: "bytes are base64", event: "m", data: []byte("x"), want: "event: m\ndata: \"eA==\"\n\n"},
	{name: "multi-line raw message", event: "m", data: json.RawMessage("{\n \"a\": 1\r\n}"), want: "event: m\ndata: {\"a\":1}\n\n"},
	{name: "LF in id", id: "1\ndata: x", event: "m", data: 1, wantErr: true},
	{name: "CR in event", event: "m\rid: 9", data: 1, wantErr: true},
	{name: "NUL in id", id: "1\x00", data: 1, wantErr: true},
	{name: "invalid raw JSON", event: "m", data: json.RawMessage("{\n"), wantErr: true},
	{name: "unencodable", event: "m", data: func() {}, wantErr: true},
}

func TestSSEEncode(t *testing.T) {
	t.Parallel()
	for _, tt := range sseEncodeCases {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			err := encodeSSE(&buf, tt.id, tt.event, tt.data)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if err == nil && buf.String() != tt.want {
				t.Fatalf("got %q, want %q", buf.String(), tt.want)
			}
			if err != nil && buf.Len() != 0 {
				t.Fatalf("an error wrote %q", buf.String())
			}
		})
	}
}

// FuzzSSEEncode: whatever the id, event and data, the encoder either refuses
// or writes exactly one frame that parses back to the same id, event and
// data, with no other field.
func FuzzSSEEncode(f *testing.F) {
	f.Add("7", "playbook/result", "x\ny")
	f.Add("1\ndata: x", "m", "")
	f.Add("", "m\rid: 9", "\x00")
	f.Add("", "", "\u2028\r\n")
	for _, tc := range sseEncodeCases {
		data, ok := tc.data.(string)
		if !ok {
			raw, _ := json.Marshal(tc.data)
			data = string(raw)
		}
		f.Add(tc.id, tc.event, data)
	}
	f.Fuzz(func(t *testing.T, id, event, data string) {
		var buf bytes.Buffer
		err := encodeSSE(&buf, id, event, map[string]string{"v": data})
		if strings.ContainsAny(id+event, "\r\n\x00") {
			if err == nil {
				t.Fatalf("accepted id %q event %q", id, event)
			}
			return
		}
		if err != nil {
			t.Fatalf("refused id %q event %q: %v", id, event, err)
		}
		out := buf.String()
		if !strings.HasSuffix(out, "\n\n") || strings.Count(out, "\n\n") != 1 || strings.Contains(out, "\r") {
			t.Fatalf("not exactly one frame: %q", out)
		}
		var gotID, gotEvent, gotData string
		n := 0
		for _, line := range strings.Split(strings.TrimSuffix(out, "\n\n"), "\n") {
			name, value, _ := strings.Cut(line, ": ")
			switch name {
			case "id":
				gotID = value
			case "event":
				gotEvent = value
			case "data":
				gotData = value
				n++
			default:
				t.Fatalf("injected field %q in %q", name, out)
			}
		}
		var back map[string]string
		var want string
		enc, _ := json.Marshal(data)
		json.Unmarshal(enc, &want)
		if n != 1 || gotID != id || gotEvent != event || json.Unmarshal([]byte(gotData), &back) != nil || back["v"] != want {
			t.Fatalf("round trip failed: %q", out)
		}
	})
}

func TestMemLogBounds(t *testing.T) {
	t.Parallel()
	now := time.Unix(1000, 0)
	var delivered []uint64
	var base uint64
	l := newMemLog(time.Minute, 3, func(_ string, ev event) { delivered = append(delivered, ev.ID-base) })
	l.now = func() time.Time { return now }
	base = l.seq
	for i := 0; i < 5; i++ {
		l.append(t.Context(), []string{"a", "b"}[i%2], event{Method: "m", Data: json.RawMessage("1")})
	}
	ids := func(client string, after uint64) (out []uint64) {
		if after > 0 {
			after += base
		}
		l.replay(t.Context(), client, after, func(ev event) error { out = append(out, ev.ID-base); return nil })
		return out
	}
	if got := fmt.Sprint(ids("a", 0), ids("b", 0), ids("a", 3)); got != "[3 5] [4] [5]" {
		t.Fatalf("kept %s", got)
	}
	now = now.Add(2 * time.Minute)
	l.append(t.Context(), "c", event{Method: "m", Data: json.RawMessage("1")})
	if got := fmt.Sprint(ids("a", 0), ids("b", 0), ids("c", 0), delivered); got != "[] [] [6] [1 2 3 4 5 6]" {
		t.Fatalf("after expiry %s", got)
	}
}

func TestPendingIndex(t *testing.T) {
	t.Parallel()
	store := newMemKV(time.Hour)
	ix := newPendingIndex(time.Hour, store, nil)
	ix.follow(t.Context())
	put := func(rid, client string, created int64) {
		b, _ := json.Marshal(requestRecord{ClientID: client, ExecutionID: "x-" + rid, PlaybookPath: "p", CreatedAt: created})
		store.Put(t.Context(), rid, b)
	}
	now := time.Now().Unix()
	put("r2", "c1", now-10)
	put("r1", "c1", now-20)
	put("r3", "c2", now)
	put("r-old", "c1", now-7200) // older than the TTL: expired
	store.Put(t.Context(), "cursor.c1", []byte("5"))
	store.Put(t.Context(), "client.c1", []byte("owner"))
	ids := func(client string) (out []string) {
		for _, p := range ix.list(t.Context(), client) {
			out = append(out, p.RequestID+"/"+p.ExecutionID)
		}
		return out
	}
	if got := fmt.Sprint(ids("c1"), ids("c2"), ids("c3")); got != "[r1/x-r1 r2/x-r2] [r3/x-r3] []" {
		t.Fatalf("got %s", got)
	}
	store.Delete(t.Context(), "r1")
	put("r3", "c1", now) // moved to another client
	if got := fmt.Sprint(ids("c1"), ids("c2")); got != "[r2/x-r2 r3/x-r3] []" {
		t.Fatalf("after changes %s", got)
	}
}

func BenchmarkEncodeSSE(b *testing.B) {
	msg := rpcNotification{JSONRPC: "2.0", Method: "playbook/result", Params: map[string]any{"requestId": "r", "executionId": "e", "status": "COMPLETED", "data": map[string]any{"rows": []int{1, 2, 3}}}}
	var buf bytes.Buffer
	for b.Loop() {
		buf.Reset()
		if err := encodeSSE(&buf, "123456", "playbook/result", msg); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkBrokerPublish is the in-process path of one callback: keep the
// event, hand it to the live connection's queue, confirm it was taken.
func BenchmarkBrokerPublish(b *testing.B) {
	// A queue large enough that the reader below never lags into an
	// overflow: this measures the publish path, not a slow client.
	cfg, err := loadConfig(func(k string) string { return map[string]string{"SSE_CLIENT_BUFFER": "65536"}[k] })
	if err != nil {
		b.Fatal(err)
	}
	m := newMetrics()
	requests := newMemKV(cfg.RequestTTL)
	br := newBroker(b.Context(), cfg, newLogger(cfg, io.Discard), m, nil, requests, nil)
	c, _, err := br.register("bench-client", "tok")
	if err != nil {
		b.Fatal(err)
	}
	go func() {
		for range c.queue {
		}
	}()
	msg := rpcNotification{JSONRPC: "2.0", Method: "playbook/progress", Params: map[string]any{"requestId": "r", "progress": 0.5}}
	for b.Loop() {
		if ok, err := br.publish(b.Context(), "bench-client", "playbook/progress", "r", msg); err != nil || !ok {
			b.Fatalf("publish: %v %v", ok, err)
		}
	}
}

// streamCount may grow while shutdown waits on it (a hijacked stream is
// still starting), which a sync.WaitGroup forbids; the race detector checks
// it here.
func TestStreamCount(t *testing.T) {
	var sc streamCount
	if err := sc.wait(context.Background()); err != nil {
		t.Fatalf("empty: %v", err)
	}
	sc.add(1)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := sc.wait(ctx); err == nil {
		t.Fatal("wait returned with a stream running")
	}
	done := make(chan error)
	go func() { done <- sc.wait(context.Background()) }()
	go func() {
		sc.add(1) // a stream starting while shutdown waits
		sc.add(-1)
		sc.add(-1)
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("wait did not return once every stream ended")
	}
}
