//go:build linux

package main

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// chromiumPath finds a Chromium. Missing, the test skips, except in CI
// (CI set), where a missing browser is a failure.
func chromiumPath(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("Chromium not found and CI is set: install the Debian package chromium")
	}
	t.Skip("Chromium not found (install the Debian package chromium); skipped outside CI")
	return ""
}

// TestEventsBrowser runs the real EventSource of headless Chromium against
// /events: it receives a result, the test cuts the connection, results
// arrive while the browser is away, and the browser's own reconnect (with
// its own Last-Event-ID) receives them, once each and in order.
func TestEventsBrowser(t *testing.T) {
	t.Parallel()
	chromium := chromiumPath(t)
	noetl := startNoETL(t)
	noetl.addSession("tok-browser", sseUser, time.Now().Add(time.Hour))

	type report struct {
		Kind string `json:"kind"`
		ID   string `json:"id"`
		Data string `json:"data"`
		N    int    `json:"n"` // order of arrival in the page (the POSTs may overtake each other)
	}
	var (
		mu       sync.Mutex
		reports  []report
		lastIDs  []string // Last-Event-ID of each /events request
		reported = func(kind string) []report {
			mu.Lock()
			defer mu.Unlock()
			var out []report
			for _, r := range reports {
				if r.Kind == kind {
					out = append(out, r)
				}
			}
			return out
		}
	)
	page := `<!doctype html><html><body><pre id="log"></pre><script>
let n = 0;
const report = (kind, e) => fetch('/results', {method: 'POST', headers: {'Content-Type': 'application/json'},
  body: JSON.stringify({kind: kind, id: e.lastEventId || '', data: e.data || '', n: ++n})});
const es = new EventSource('/events?session_token=tok-browser&client_id=browser-1');
es.addEventListener('open', e => report('open', e));
es.addEventListener('playbook/result', e => {
  document.getElementById('log').textContent += e.data + '\n';
  report('result', e);
});
</script></body></html>`
	p := startInProcess(t, map[string]string{"NOETL_BASE_URL": noetl.URL}, func(mux *http.ServeMux) {
		mux.HandleFunc("GET /page", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			w.Write([]byte(page))
		})
		mux.HandleFunc("POST /results", func(w http.ResponseWriter, r *http.Request) {
			var rep report
			if json.NewDecoder(r.Body).Decode(&rep) == nil {
				mu.Lock()
				// Chromium resends a POST whose keep-alive connection the
				// forced disconnect cut before the answer: count it once.
				if !slices.ContainsFunc(reports, func(o report) bool { return o.N == rep.N }) {
					reports = append(reports, rep)
				}
				mu.Unlock()
			}
			w.WriteHeader(http.StatusNoContent)
		})
	}, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/events" {
				mu.Lock()
				lastIDs = append(lastIDs, r.Header.Get("Last-Event-ID"))
				mu.Unlock()
			}
			next.ServeHTTP(w, r)
		})
	})
	for _, rid := range []string{"req-b1", "req-b2", "req-b3"} {
		p.putRequest(t, rid, "browser-1", "tok-browser", "exec-"+rid)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--no-first-run", "--no-default-browser-check", "--user-data-dir="+t.TempDir(), p.URL+"/page")
	// Chromium forks helpers: run it in its own process group and end the
	// whole group (and only it) at cleanup.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", chromium, err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
	})

	waitFor(t, 30*time.Second, "the browser's stream to open", func() bool { return p.app.broker.lookup("browser-1") != nil })
	if status, m := callback(t, p.URL, "/api/internal/callback/async", map[string]any{"request_id": "req-b1", "data": "one"}); status != 200 {
		t.Fatalf("first result: %d %v", status, m)
	}
	waitFor(t, 10*time.Second, "the first result in the page", func() bool { return len(reported("result")) == 1 })

	// Cut the browser's connection, then publish while it is away.
	p.cutConnections()
	// This test's own keep-alive connections went too.
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	waitFor(t, 10*time.Second, "the stream to be gone", func() bool { return p.app.broker.lookup("browser-1") == nil })
	for i, rid := range []string{"req-b2", "req-b3"} {
		if status, m := callback(t, p.URL, "/api/internal/callback/async", map[string]any{"request_id": rid, "data": []string{"two", "three"}[i]}); status != 202 {
			t.Fatalf("result while away: %d %v", status, m)
		}
	}
	waitFor(t, 20*time.Second, "the results after the browser's reconnect", func() bool { return len(reported("result")) >= 3 })

	res := reported("result")
	slices.SortFunc(res, func(a, b report) int { return a.N - b.N })
	var got []string
	for _, r := range res {
		var m map[string]any
		json.Unmarshal([]byte(r.Data), &m)
		got = append(got, m["params"].(map[string]any)["data"].(string))
	}
	if strings.Join(got, ",") != "one,two,three" {
		t.Fatalf("page received %v", got)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(lastIDs) < 2 || lastIDs[0] != "" || lastIDs[1] != res[0].ID {
		t.Fatalf("Last-Event-ID of the /events requests %q, want \"\" then %q", lastIDs, res[0].ID)
	}
}
