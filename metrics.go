package main

import (
	"bufio"
	"fmt"
	"math"
	"net/http"
	rtmetrics "runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// registry is a small Prometheus registry written by hand (text exposition
// format 0.0.4) so the binary needs no client library. Series are created on
// first use and kept for the life of the process; callers keep label values
// bounded (route patterns, never raw paths).
type registry struct {
	mu       sync.Mutex
	families []*family
}

type family struct {
	name, help, kind string // kind: counter, gauge, histogram
	labels           []string
	buckets          []float64 // histograms only

	mu     sync.RWMutex
	series map[labelKey]*series
}

// labelKey is a series' label values as a map key: an array, so looking a
// series up on the request path allocates nothing.
type labelKey [maxLabels]string

const maxLabels = 4

type series struct {
	values []string
	value  atomic.Uint64 // float64 bits: counters and gauges
	counts []atomic.Uint64
	sum    atomic.Uint64 // float64 bits
	count  atomic.Uint64
}

func (r *registry) add(name, help, kind string, buckets []float64, labels ...string) *family {
	if len(labels) > maxLabels {
		panic("metrics: " + name + ": too many labels")
	}
	f := &family{name: name, help: help, kind: kind, labels: labels, buckets: buckets, series: map[labelKey]*series{}}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, g := range r.families {
		if g.name == name {
			panic("metrics: duplicate family " + name)
		}
	}
	r.families = append(r.families, f)
	return f
}

// with returns the series for the label values, creating it once.
func (f *family) with(values ...string) *series {
	if len(values) != len(f.labels) {
		panic("metrics: " + f.name + ": wrong number of label values")
	}
	var key labelKey
	copy(key[:], values)
	f.mu.RLock()
	s := f.series[key]
	f.mu.RUnlock()
	if s != nil {
		return s
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if s = f.series[key]; s == nil {
		s = &series{values: slices.Clone(values), counts: make([]atomic.Uint64, len(f.buckets))}
		f.series[key] = s
	}
	return s
}

func addFloat(u *atomic.Uint64, d float64) {
	for {
		old := u.Load()
		if u.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+d)) {
			return
		}
	}
}

// Inc adds one (counters, gauges).
func (s *series) Inc() { addFloat(&s.value, 1) }

// Add adds d (gauges may go down).
func (s *series) Add(d float64) { addFloat(&s.value, d) }

// Set sets a gauge.
func (s *series) Set(v float64) { s.value.Store(math.Float64bits(v)) }

// Value reads a counter or gauge (tests, readiness).
func (s *series) Value() float64 { return math.Float64frombits(s.value.Load()) }

// Observe records one histogram sample. The buckets are stored
// non-cumulatively and summed when written out.
func (s *series) Observe(f *family, v float64) {
	if i, _ := slices.BinarySearch(f.buckets, v); i < len(s.counts) {
		s.counts[i].Add(1)
	}
	addFloat(&s.sum, v)
	s.count.Add(1)
}

// observe is the usual way to record a histogram sample.
func (f *family) observe(v float64, values ...string) { f.with(values...).Observe(f, v) }

func (r *registry) write(w *bufio.Writer) {
	r.mu.Lock()
	fams := slices.Clone(r.families)
	r.mu.Unlock()
	for _, f := range fams {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", f.name, f.help, f.name, f.kind)
		f.mu.RLock()
		all := make([]*series, 0, len(f.series))
		for _, s := range f.series {
			all = append(all, s)
		}
		f.mu.RUnlock()
		slices.SortFunc(all, func(a, b *series) int { return slices.Compare(a.values, b.values) })
		for _, s := range all {
			lbl := labelString(f.labels, s.values, "", "")
			if f.kind != "histogram" {
				fmt.Fprintf(w, "%s%s %s\n", f.name, lbl, formatFloat(s.Value()))
				continue
			}
			var cum uint64
			for i, b := range f.buckets {
				cum += s.counts[i].Load()
				fmt.Fprintf(w, "%s_bucket%s %d\n", f.name, labelString(f.labels, s.values, "le", formatFloat(b)), cum)
			}
			fmt.Fprintf(w, "%s_bucket%s %d\n", f.name, labelString(f.labels, s.values, "le", "+Inf"), s.count.Load())
			fmt.Fprintf(w, "%s_sum%s %s\n", f.name, lbl, formatFloat(math.Float64frombits(s.sum.Load())))
			fmt.Fprintf(w, "%s_count%s %d\n", f.name, lbl, s.count.Load())
		}
	}
}

func labelString(names, values []string, extraName, extraValue string) string {
	if len(names) == 0 && extraName == "" {
		return ""
	}
	var b strings.Builder
	b.WriteByte('{')
	for i, n := range names {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(n)
		b.WriteString(`="`)
		b.WriteString(escapeLabel(values[i]))
		b.WriteByte('"')
	}
	if extraName != "" {
		if len(names) > 0 {
			b.WriteByte(',')
		}
		b.WriteString(extraName + `="` + extraValue + `"`)
	}
	b.WriteByte('}')
	return b.String()
}

func escapeLabel(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`).Replace(s)
}

func formatFloat(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// latencyBuckets suit a gateway: 100µs up to 30s.
var latencyBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// metrics are every series the gateway exports (SPEC §7.3).
type metrics struct {
	reg *registry

	requests        *family // route, method, status
	requestDuration *family // route, status
	sessionLookups  *family // outcome: near_hit, kv_hit, noetl_valid, noetl_invalid, error, revoked, malformed
	jwksFetches     *family // outcome: ok, error
	tokenChecks     *family // outcome: ok, invalid
	logins          *family // outcome
	accessChecks    *family // outcome: allowed, denied, cached, error
	sseConnections  *family // gauge
	sseEvents       *family // outcome: delivered, queued, overflow_disconnect, replayed
	callbacks       *family // kind, outcome
	natsConnected   *family // gauge
	authBypass      *family // gauge
}

func newMetrics() *metrics {
	r := &registry{}
	m := &metrics{
		reg:             r,
		requests:        r.add("gateway_http_requests_total", "HTTP requests by route pattern, method and status.", "counter", nil, "route", "method", "status"),
		requestDuration: r.add("gateway_http_request_duration_seconds", "HTTP request latency by route pattern and status.", "histogram", latencyBuckets, "route", "status"),
		sessionLookups:  r.add("gateway_session_lookups_total", "Session resolutions by outcome.", "counter", nil, "outcome"),
		jwksFetches:     r.add("gateway_jwks_fetches_total", "JWKS fetches by outcome.", "counter", nil, "outcome"),
		tokenChecks:     r.add("gateway_id_token_verifications_total", "ID token verifications by outcome.", "counter", nil, "outcome"),
		logins:          r.add("gateway_logins_total", "Logins by outcome.", "counter", nil, "outcome"),
		accessChecks:    r.add("gateway_access_checks_total", "Access decisions by outcome.", "counter", nil, "outcome"),
		sseConnections:  r.add("gateway_sse_connections", "Open SSE connections on this replica.", "gauge", nil),
		sseEvents:       r.add("gateway_sse_events_total", "SSE events by outcome.", "counter", nil, "outcome"),
		callbacks:       r.add("gateway_callbacks_total", "Worker callbacks by kind and outcome.", "counter", nil, "kind", "outcome"),
		natsConnected:   r.add("gateway_nats_connected", "1 when the NATS connection is up.", "gauge", nil),
		authBypass:      r.add("gateway_auth_bypass_enabled", "1 when GATEWAY_AUTH_BYPASS is on.", "gauge", nil),
	}
	// Unlabelled gauges exist from the start, so dashboards see 0, not nothing.
	m.sseConnections.with()
	m.natsConnected.with()
	m.authBypass.with()
	return m
}

// handleMetrics serves the registry. Who may reach it is decided by
// internalOnly where the route is registered.
func handleMetrics(m *metrics) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		bw := bufio.NewWriter(w)
		m.reg.write(bw)
		writeRuntime(bw)
		bw.Flush()
	})
}

// writeRuntime adds the few process figures an operator alerts on
// (goroutine leaks, heap growth), read at scrape time.
func writeRuntime(w *bufio.Writer) {
	samples := []rtmetrics.Sample{
		{Name: "/sched/goroutines:goroutines"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/total:bytes"},
		{Name: "/memory/classes/heap/stacks:bytes"},
	}
	rtmetrics.Read(samples)
	value := func(s rtmetrics.Sample) uint64 {
		if s.Value.Kind() == rtmetrics.KindUint64 {
			return s.Value.Uint64()
		}
		return 0
	}
	fmt.Fprintf(w, "# HELP go_goroutines Number of goroutines.\n# TYPE go_goroutines gauge\ngo_goroutines %d\n", value(samples[0]))
	fmt.Fprintf(w, "# HELP go_heap_objects_bytes Bytes of live and not yet swept heap objects.\n# TYPE go_heap_objects_bytes gauge\ngo_heap_objects_bytes %d\n", value(samples[1]))
	fmt.Fprintf(w, "# HELP go_memory_total_bytes All memory mapped by the Go runtime.\n# TYPE go_memory_total_bytes gauge\ngo_memory_total_bytes %d\n", value(samples[2]))
	fmt.Fprintf(w, "# HELP go_stack_bytes Memory used by goroutine stacks.\n# TYPE go_stack_bytes gauge\ngo_stack_bytes %d\n", value(samples[3]))
}
