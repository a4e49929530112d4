package main

import (
	"fmt"
	"net/http"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestMain fails the run when goroutines outlive the tests: every server,
// stream, watcher and connection a test starts must be gone once its
// cleanups ran. Fuzzing and benchmarks are left alone.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 && !fuzzingOrBenchmarking() {
		if leaked := leakedGoroutines(10 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "goroutines leaked by the tests:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

func fuzzingOrBenchmarking() bool {
	for _, a := range os.Args[1:] {
		if strings.HasPrefix(a, "-test.fuzz=") || strings.HasPrefix(a, "-test.bench=") {
			return true
		}
	}
	return false
}

// leakedGoroutines waits up to timeout for every goroutine but the test
// binary's own to end, and returns the stacks of those that did not.
func leakedGoroutines(timeout time.Duration) string {
	// Keep-alive connections of the tests' shared client are not leaks.
	http.DefaultClient.CloseIdleConnections()
	deadline := time.Now().Add(timeout)
	for {
		var leaked []string
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		for _, g := range strings.Split(string(buf), "\n\n") {
			if !benignGoroutine(g) {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 {
			return ""
		}
		if time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func benignGoroutine(stack string) bool {
	for _, s := range []string{
		"gateway.TestMain(",
		"testing.(*M).",
		"testing.tRunner",
		"os/signal.signal_recv",
		"os/signal.loop",
		// Idle keep-alive connections of clients built inside tests end when
		// their server closes; closing is asynchronous.
		"net/http.(*persistConn).readLoop",
		"net/http.(*persistConn).writeLoop",
		// The test-only nats-server keeps a few file-store loops of a
		// restarted server alive after Shutdown; they are not ours.
		"github.com/nats-io/nats-server/v2/server",
	} {
		if strings.Contains(stack, s) {
			return true
		}
	}
	return false
}
