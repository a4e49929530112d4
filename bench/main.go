// Command bench measures the gateway side by side with its baselines in one
// run on one machine: the backend alone, a bare httputil.ReverseProxy (the
// control), and the real gateway binary in NATS mode, plus a cold-token
// stampede, idle SSE connections with a callback load, and logins.
//
//	go run ./bench                 # full run
//	go run ./bench -quick          # under a minute
//	go run ./bench -target URL     # also load another proxy you already run
//
// Everything it needs is started here: an in-process nats-server with
// JetStream, a backend standing in for NoETL, an identity provider, the
// control proxy, and the gateway built from this module and run as a child
// process (so its heap and RSS can be read on their own).
package main

import (
	"bufio"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

type options struct {
	duration   time.Duration
	warmup     time.Duration
	rounds     int
	conns      []int
	stampede   int
	sseConns   int
	sseRate    int
	sseSeconds int
	sseSettle  time.Duration
	target     string
	bin        string
	backend    string
	only       map[string]bool
}

// run reports whether a part was selected with -only (all by default).
func (o options) run(part string) bool { return len(o.only) == 0 || o.only[part] }

func main() {
	var o options
	var conns string
	quick := flag.Bool("quick", false, "a run under a minute: short rounds, fewer SSE connections")
	flag.DurationVar(&o.duration, "duration", 3*time.Second, "measured time per scenario round")
	flag.DurationVar(&o.warmup, "warmup", 500*time.Millisecond, "warm-up per scenario round")
	flag.IntVar(&o.rounds, "rounds", 3, "interleaved A/B rounds (medians are reported)")
	flag.StringVar(&conns, "conns", "1,16,64", "connection counts")
	flag.IntVar(&o.stampede, "stampede", 500, "concurrent requests with one unseen token")
	flag.IntVar(&o.sseConns, "sse", 10000, "idle SSE connections")
	flag.IntVar(&o.sseRate, "sse-rate", 1000, "worker callbacks per second over the SSE connections")
	flag.IntVar(&o.sseSeconds, "sse-seconds", 10, "seconds of callback load")
	flag.DurationVar(&o.sseSettle, "sse-settle", 2*time.Second, "idle time before reading the memory of the idle SSE connections (the Go runtime forces a GC every 2 minutes, so 130s shows the settled cost)")
	flag.StringVar(&o.backend, "backend-addr", "127.0.0.1:0", "listen address of the stand-in NoETL backend (fix it to point another proxy at it for -target)")
	flag.StringVar(&o.bin, "bin", "", "use this gateway binary instead of building one (e.g. a profiling build)")
	only := flag.String("only", "", "comma list of parts to run: load, stampede, login, sse (default all)")
	flag.StringVar(&o.target, "target", "", "URL of another proxy in front of the backend (-backend-addr), mapping /noetl/bench to /api/bench (optional)")
	flag.Parse()
	if *quick {
		o.duration, o.warmup, o.rounds, o.sseConns, o.sseSeconds = time.Second, 200*time.Millisecond, 3, 2000, 3
	}
	o.only = map[string]bool{}
	for _, p := range strings.Split(*only, ",") {
		if p = strings.TrimSpace(p); p != "" {
			o.only[p] = true
		}
	}
	for _, c := range strings.Split(conns, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(c))
		if err != nil || n < 1 {
			log.Fatalf("bad -conns %q", conns)
		}
		o.conns = append(o.conns, n)
	}
	if err := runBench(o); err != nil {
		log.Fatal(err)
	}
}

func runBench(o options) error {
	raiseFileLimit()
	tmp, err := os.MkdirTemp("", "gateway-bench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: filepath.Join(tmp, "js"), NoLog: true, NoSigs: true})
	if err != nil {
		return err
	}
	ns.Start()
	defer ns.Shutdown()
	if !ns.ReadyForConnections(10 * time.Second) {
		return fmt.Errorf("nats not ready")
	}
	natsURL := ns.ClientURL()

	idp, err := startIdP()
	if err != nil {
		return err
	}
	be := startBackend(idp, o.backend)
	fmt.Println("backend (stand-in NoETL):", be.url)
	// The control and the gateway are built and started the same way, so
	// the comparison holds only what the gateway does: an A/A check (a
	// second control) run alongside shows how far two identical proxies
	// differ on this machine. (A control started differently, as a mode of
	// this program, measured 15–20 µs faster at one connection than the
	// same code in the gateway's place.)
	controlBin := filepath.Join(tmp, "control")
	if err := goBuild(controlBin, "./bench/control"); err != nil {
		return fmt.Errorf("building the control: %w", err)
	}
	var controls [2]*child
	for i := range controls {
		if controls[i], err = startChild(controlBin, map[string]string{"NOETL_BASE_URL": be.url}); err != nil {
			return err
		}
		defer controls[i].stop()
	}

	bin := o.bin
	if bin == "" {
		bin = filepath.Join(tmp, "gateway")
		if err := goBuild(bin, "."); err != nil {
			return fmt.Errorf("building the gateway: %w", err)
		}
	}
	env := map[string]string{
		"NATS_URL": natsURL, "NOETL_BASE_URL": be.url, "GATEWAY_BIND": "127.0.0.1",
		"AUTH_MODE": "sync", "OIDC_ISSUER": idp.url, "AUTH0_CLIENT_ID": "bench-client",
		"CALLBACK_TOKEN": "bench-callback-token-0123456789", "SSE_MAX_CLIENTS": "100000",
		"SSE_MAX_CLIENTS_PER_SESSION": "100000", "LOG_LEVEL": "warn",
	}
	gw, err := startChild(bin, env)
	if err != nil {
		return err
	}
	defer gw.stop()
	envKV := maps(env, map[string]string{"SESSION_NEAR_CACHE_TTL_SECS": "0"})
	gwKV, err := startChild(bin, envKV)
	if err != nil {
		return err
	}
	defer gwKV.stop()

	token := "benchsession"
	for i := range slices.Max(o.conns) {
		be.addSession(fmt.Sprintf("%s%04d", token, i))
	}
	fmt.Printf("machine: %d CPUs, %s; gateway pid %d (NATS mode), near-cache-off gateway pid %d\n\n", runtimeCPUs(), goVersion(), gw.cmd.Process.Pid, gwKV.cmd.Process.Pid)

	scenarios := []scenario{
		{"1 direct backend", be.url + "/api/bench", "", 0},
		{"2 control proxy", controls[0].url + "/noetl/bench", "", controls[0].cmd.Process.Pid},
		{"3 gateway (near cache)", gw.url + "/noetl/bench", token, gw.cmd.Process.Pid},
		{"4 gateway (K/V every request)", gwKV.url + "/noetl/bench", token, gwKV.cmd.Process.Pid},
		{"2' control again (A/A check)", controls[1].url + "/noetl/bench", "", controls[1].cmd.Process.Pid},
	}
	if o.target != "" {
		scenarios = append(scenarios, scenario{"x your proxy (-target)", strings.TrimRight(o.target, "/") + "/noetl/bench", token, 0})
	}
	if o.run("load") {
		runLoad(o, scenarios)
	}
	if o.run("stampede") {
		if err := stampede(o, gw, be, ns); err != nil {
			fmt.Println("stampede:", err)
		}
	}
	if o.run("login") {
		if err := logins(o, gw, idp); err != nil {
			fmt.Println("logins:", err)
		}
	}
	if o.run("sse") {
		if err := sse(o, gw, be, natsURL, token+"0000"); err != nil {
			fmt.Println("sse:", err)
		}
	}
	return nil
}

// runLoad runs scenarios 1–4 (and -target) at every connection count, in
// interleaved rounds, and prints medians and ratios.
func runLoad(o options, scenarios []scenario) {
	results := map[string]map[int][]loadResult{}
	for _, c := range o.conns {
		for r := 0; r < o.rounds; r++ {
			// Interleave the scenarios in every round so drift on a noisy
			// machine hits them all alike.
			for _, s := range scenarios {
				res := load(s, c, o.warmup, o.duration)
				if results[s.name] == nil {
					results[s.name] = map[int][]loadResult{}
				}
				results[s.name][c] = append(results[s.name][c], res)
			}
		}
	}
	fmt.Printf("%-32s %6s %12s %10s %10s %10s %8s %12s\n", "scenario", "conns", "req/s", "p50", "p99", "p99.9", "errors", "proxy CPU/req")
	med := map[string]map[int]loadResult{}
	for _, s := range scenarios {
		med[s.name] = map[int]loadResult{}
		for _, c := range o.conns {
			m := median(results[s.name][c])
			med[s.name][c] = m
			cpu := "-"
			if s.pid != 0 {
				cpu = fmtDur(m.cpuPerReq)
			}
			fmt.Printf("%-32s %6d %12.0f %10s %10s %10s %8d %12s\n", s.name, c, m.rps, fmtDur(m.p50), fmtDur(m.p99), fmtDur(m.p999), m.errors, cpu)
		}
	}
	fmt.Println()
	for _, c := range o.conns {
		g, ctl, kv, aa := med[scenarios[2].name][c], med[scenarios[1].name][c], med[scenarios[3].name][c], med[scenarios[4].name][c]
		fmt.Printf("conns %-3d gateway/control req/s = %.2f   K/V path/near path req/s = %.2f   added p50 vs control = %s   CPU/req gateway/control = %.2f\n",
			c, g.rps/ctl.rps, kv.rps/g.rps, fmtDur(g.p50-ctl.p50), float64(g.cpuPerReq)/float64(max(ctl.cpuPerReq, 1)))
		fmt.Printf("          A/A check: control again/control req/s = %.2f   p50 difference = %s\n", aa.rps/ctl.rps, fmtDur(aa.p50-ctl.p50))
	}
	fmt.Println()
}

func maps(a, b map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

// --- load generator -------------------------------------------------------

type scenario struct {
	name, url, token string
	pid              int // the proxy's process, for CPU time per request (0: none)
}

type loadResult struct {
	rps            float64
	p50, p99, p999 time.Duration
	errors         int
	cpuPerReq      time.Duration // CPU time of the proxy process per request
}

// load runs a closed loop: c workers, each on its own keep-alive
// connection, sending the next request as soon as the last one is answered.
func load(s scenario, c int, warmup, d time.Duration) loadResult {
	tr := &http.Transport{MaxIdleConns: c, MaxIdleConnsPerHost: c, MaxConnsPerHost: c, IdleConnTimeout: time.Minute, DisableCompression: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	var measuring atomic.Bool
	stop := make(chan struct{})
	lat := make([][]time.Duration, c)
	errs := make([]int, c)
	var wg sync.WaitGroup
	for i := range c {
		lat[i] = make([]time.Duration, 0, 1<<16)
		wg.Go(func() {
			req, _ := http.NewRequest("GET", s.url, nil)
			if s.token != "" {
				// One session per connection, like real users: concurrent
				// requests of one token would share a single K/V lookup.
				req.Header.Set("Authorization", "Bearer "+fmt.Sprintf("%s%04d", s.token, i))
			}
			for {
				select {
				case <-stop:
					return
				default:
				}
				t0 := time.Now()
				resp, err := client.Do(req)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				el := time.Since(t0)
				if !measuring.Load() {
					continue
				}
				if err != nil || resp.StatusCode != 200 {
					errs[i]++
					continue
				}
				lat[i] = append(lat[i], el)
			}
		})
	}
	time.Sleep(warmup)
	measuring.Store(true)
	start := time.Now()
	cpu0 := cpuTime(s.pid)
	time.Sleep(d)
	measuring.Store(false)
	elapsed := time.Since(start)
	cpu := cpuTime(s.pid) - cpu0
	close(stop)
	wg.Wait()
	var all []time.Duration
	res := loadResult{}
	for i := range c {
		all = append(all, lat[i]...)
		res.errors += errs[i]
	}
	slices.Sort(all)
	res.rps = float64(len(all)) / elapsed.Seconds()
	if len(all) > 0 && s.pid != 0 {
		res.cpuPerReq = cpu / time.Duration(len(all))
	}
	res.p50, res.p99, res.p999 = pct(all, 0.50), pct(all, 0.99), pct(all, 0.999)
	return res
}

func pct(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)-1) * p)
	return sorted[i]
}

func median(rs []loadResult) loadResult {
	pick := func(f func(loadResult) float64) float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	errs := 0
	for _, r := range rs {
		errs += r.errors
	}
	return loadResult{
		rps:       pick(func(r loadResult) float64 { return r.rps }),
		p50:       time.Duration(pick(func(r loadResult) float64 { return float64(r.p50) })),
		p99:       time.Duration(pick(func(r loadResult) float64 { return float64(r.p99) })),
		p999:      time.Duration(pick(func(r loadResult) float64 { return float64(r.p999) })),
		errors:    errs,
		cpuPerReq: time.Duration(pick(func(r loadResult) float64 { return float64(r.cpuPerReq) })),
	}
}

// cpuTime is the user+system CPU time a process has used (Linux).
func cpuTime(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name (which may hold spaces): utime is the
	// 14th field, stime the 15th, in clock ticks of 1/100 s.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

func fmtDur(d time.Duration) string {
	switch {
	case d < 0:
		return "-" + fmtDur(-d)
	case d < time.Millisecond:
		return fmt.Sprintf("%dµs", d.Microseconds())
	default:
		return fmt.Sprintf("%.2fms", float64(d.Microseconds())/1000)
	}
}

// --- scenario 5: cold stampede ---------------------------------------------

func stampede(o options, gw *child, be *backend, ns *server.Server) error {
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		return err
	}
	defer nc.Close()
	// Every K/V get is a JetStream API request: count them on the wire.
	var kvGets atomic.Int64
	for _, subj := range []string{"$JS.API.DIRECT.GET.KV_sessions.>", "$JS.API.DIRECT.GET.KV_sessions", "$JS.API.STREAM.MSG.GET.KV_sessions"} {
		sub, err := nc.Subscribe(subj, func(*nats.Msg) { kvGets.Add(1) })
		if err != nil {
			return err
		}
		defer sub.Unsubscribe()
	}
	nc.Flush()
	token := "benchstampede" + strconv.FormatInt(time.Now().UnixNano(), 10)
	be.addSession(token)
	before := be.validateCalls.Load()
	tr := &http.Transport{MaxIdleConnsPerHost: o.stampede}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	start := make(chan struct{})
	var wg sync.WaitGroup
	var ok atomic.Int64
	for range o.stampede {
		wg.Go(func() {
			req, _ := http.NewRequest("GET", gw.url+"/noetl/bench", nil)
			req.Header.Set("Authorization", "Bearer "+token)
			<-start
			resp, err := client.Do(req)
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 {
					ok.Add(1)
				}
			}
		})
	}
	close(start)
	wg.Wait()
	nc.Flush()
	fmt.Printf("scenario 5 cold stampede: %d concurrent requests, one unseen token: %d OK, NoETL validate calls %d, K/V gets %d\n\n",
		o.stampede, ok.Load(), be.validateCalls.Load()-before, kvGets.Load())
	return nil
}

// --- scenario 7: logins ------------------------------------------------------

func logins(o options, gw *child, idp *idp) error {
	tok, err := idp.sign("user-1")
	if err != nil {
		return err
	}
	body := `{"auth0_token":"` + tok + `"}`
	for _, c := range []int{1, 16} {
		tr := &http.Transport{MaxIdleConnsPerHost: c, MaxConnsPerHost: c}
		client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
		var n, bad atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for range c {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					resp, err := client.Post(gw.url+"/api/auth/login", "application/json", strings.NewReader(body))
					if err != nil {
						bad.Add(1)
						continue
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode == 200 {
						n.Add(1)
					} else {
						bad.Add(1)
					}
				}
			})
		}
		time.Sleep(o.duration)
		close(stop)
		wg.Wait()
		tr.CloseIdleConnections()
		fmt.Printf("scenario 7 login (RS256 verify, sync mode), %2d conns: %.0f logins/s (%d failed)\n", c, float64(n.Load())/o.duration.Seconds(), bad.Load())
	}
	fmt.Println()
	return nil
}

// --- scenario 6: SSE ---------------------------------------------------------

func sse(o options, gw *child, be *backend, natsURL, token string) error {
	rss0, heap0, stack0 := gw.rss(), gw.heap(), gw.stacks()
	type conn struct {
		id   string
		body io.ReadCloser
	}
	conns := make([]conn, 0, o.sseConns)
	tr := &http.Transport{MaxIdleConnsPerHost: o.sseConns, MaxConnsPerHost: 0, DisableCompression: true}
	client := &http.Client{Transport: tr}
	var received atomic.Int64
	var latMu sync.Mutex
	var lats []time.Duration
	for i := range o.sseConns {
		id := fmt.Sprintf("benchclient%06d", i)
		resp, err := client.Get(gw.url + "/events?session_token=" + token + "&client_id=" + id)
		if err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		if resp.StatusCode != 200 {
			resp.Body.Close()
			return fmt.Errorf("connection %d: status %d", i, resp.StatusCode)
		}
		conns = append(conns, conn{id, resp.Body})
		go func(r io.Reader) {
			sc := bufio.NewScanner(r)
			sc.Buffer(make([]byte, 4096), 1<<20)
			for sc.Scan() {
				line := sc.Text()
				if !strings.HasPrefix(line, "data:") || !strings.Contains(line, "playbook/result") {
					continue
				}
				var msg struct {
					Params struct {
						Data struct {
							T int64 `json:"t"`
						} `json:"data"`
					} `json:"params"`
				}
				if json.Unmarshal([]byte(strings.TrimSpace(line[5:])), &msg) == nil && msg.Params.Data.T > 0 {
					d := time.Since(time.Unix(0, msg.Params.Data.T))
					received.Add(1)
					latMu.Lock()
					lats = append(lats, d)
					latMu.Unlock()
				}
			}
		}(resp.Body)
	}
	defer func() {
		for _, c := range conns {
			c.body.Close()
		}
	}()
	// Let the gateway settle, then read its memory.
	time.Sleep(o.sseSettle)
	rss1, heap1, stack1 := gw.rss(), gw.heap(), gw.stacks()
	n := float64(o.sseConns)
	fmt.Printf("scenario 6 SSE: %d idle connections, after %s idle: RSS %+.1f KiB/conn, of which heap objects %+.1f KiB/conn and goroutine stacks %+.1f KiB/conn (RSS %d→%d MiB)\n",
		o.sseConns, o.sseSettle, float64(rss1-rss0)/n/1024, float64(heap1-heap0)/n/1024, float64(stack1-stack0)/n/1024, rss0>>20, rss1>>20)

	// Request records are written as executePlaybook would, straight into
	// the requests bucket, before the clock starts.
	nc, err := nats.Connect(natsURL)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := nc.JetStream()
	if err != nil {
		return err
	}
	kv, err := js.KeyValue("requests")
	if err != nil {
		return fmt.Errorf("requests bucket: %w", err)
	}
	total := o.sseRate * o.sseSeconds
	for i := range total {
		rec, _ := json.Marshal(map[string]any{"client_id": conns[i%len(conns)].id, "session_token": token, "execution_id": strconv.Itoa(i), "playbook_path": "bench/p", "created_at": time.Now().Unix()})
		if _, err := kv.Put(fmt.Sprintf("benchreq-%d", i), rec); err != nil {
			return err
		}
	}
	cbClient := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}, Timeout: 10 * time.Second}
	var sent, cbErr atomic.Int64
	tick := time.NewTicker(time.Second / time.Duration(o.sseRate))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := range total {
		<-tick.C
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			body := fmt.Sprintf(`{"request_id":"benchreq-%d","execution_id":"%d","status":"COMPLETED","data":{"t":%d}}`, i, i, time.Now().UnixNano())
			req, _ := http.NewRequest("POST", gw.url+"/api/internal/callback/async", strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("X-Callback-Token", "bench-callback-token-0123456789")
			resp, err := cbClient.Do(req)
			if err != nil {
				cbErr.Add(1)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				sent.Add(1)
			} else {
				cbErr.Add(1)
			}
		})
	}
	tick.Stop()
	wg.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for received.Load() < sent.Load() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	latMu.Lock()
	slices.Sort(lats)
	p50, p99 := pct(lats, 0.5), pct(lats, 0.99)
	latMu.Unlock()
	fmt.Printf("scenario 6 SSE: %d callbacks at %d/s over %d s: accepted %d, refused %d, delivered %d, lost %d, callback→client p50 %s p99 %s\n\n",
		total, o.sseRate, o.sseSeconds, sent.Load(), cbErr.Load(), received.Load(), sent.Load()-received.Load(), fmtDur(p50), fmtDur(p99))
	return nil
}

// --- the processes and servers ----------------------------------------------

type child struct {
	cmd *exec.Cmd
	url string
}

// startChild runs a built proxy (the gateway or the control) on a free port
// and waits until its /ready says NATS is ok.
func startChild(bin string, env map[string]string) (*child, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "ROUTER_PORT="+strconv.Itoa(port))
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, url: fmt.Sprintf("http://127.0.0.1:%d", port)}
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(c.url + "/ready")
		if err == nil {
			var body struct {
				Checks struct{ NATS string } `json:"checks"`
			}
			json.NewDecoder(resp.Body).Decode(&body)
			resp.Body.Close()
			if body.Checks.NATS == "ok" {
				return c, nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.stop()
	return nil, fmt.Errorf("gateway did not become ready")
}

func (c *child) stop() {
	c.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		c.cmd.Process.Kill()
	}
}

// rss is the child's resident set size in bytes.
func (c *child) rss() int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", c.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// heap reads go_heap_objects_bytes from the gateway's /metrics.
func (c *child) heap() int64 { return c.gauge("go_heap_objects_bytes") }

// stacks reads go_stack_bytes from the gateway's /metrics.
func (c *child) stacks() int64 { return c.gauge("go_stack_bytes") }

func (c *child) gauge(name string) int64 {
	resp, err := http.Get(c.url + "/metrics")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}

// backend stands in for NoETL: a small JSON reply on /api/..., session
// validation, sync login and access checks, with call counters.
type backend struct {
	url           string
	mu            sync.Mutex
	sessions      map[string]bool
	validateCalls atomic.Int64
}

func (b *backend) addSession(t string) {
	b.mu.Lock()
	b.sessions[t] = true
	b.mu.Unlock()
}

func startBackend(idp *idp, addr string) *backend {
	b := &backend{sessions: map[string]bool{}}
	mux := http.NewServeMux()
	user := map[string]any{"user_id": 7, "email": "bench@example.com", "display_name": "Bench", "roles": []string{"admin"}}
	exp := time.Now().Add(24 * time.Hour).UTC().Format(time.RFC3339)
	mux.HandleFunc("POST /api/auth/session/validate", func(w http.ResponseWriter, r *http.Request) {
		b.validateCalls.Add(1)
		var in struct {
			SessionToken string `json:"session_token"`
		}
		json.NewDecoder(r.Body).Decode(&in)
		b.mu.Lock()
		ok := b.sessions[in.SessionToken]
		b.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if !ok {
			io.WriteString(w, `{"status":"ok","valid":false,"user":null,"expires_at":null}`)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"status": "ok", "valid": true, "user": user, "expires_at": exp})
	})
	var n atomic.Int64
	mux.HandleFunc("POST /api/auth/login", func(w http.ResponseWriter, r *http.Request) {
		tok := fmt.Sprintf("benchlogin%012d", n.Add(1))
		b.addSession(tok)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"status": "authenticated", "session_token": tok, "user": user, "expires_at": exp})
	})
	mux.HandleFunc("POST /api/auth/check-playbook-access", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"allowed":true,"message":"Access granted"}`)
	})
	mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"status":"ok","items":[1,2,3]}`)
	})
	b.url = serveOn(addr, mux)
	return b
}

func serve(h http.Handler) string { return serveOn("127.0.0.1:0", h) }

func serveOn(addr string, h http.Handler) string {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	go (&http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}).Serve(ln)
	return "http://" + ln.Addr().String()
}

// idp is an OIDC identity provider: discovery, JWKS, and an RS256 key.
type idp struct {
	url string
	key *rsa.PrivateKey
}

func startIdP() (*idp, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	p := &idp{key: key}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]string{"issuer": p.url, "jwks_uri": p.url + "/jwks.json"})
	})
	mux.HandleFunc("GET /jwks.json", func(w http.ResponseWriter, r *http.Request) {
		b64 := func(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }
		json.NewEncoder(w).Encode(map[string]any{"keys": []map[string]string{{
			"kty": "RSA", "kid": "bench", "use": "sig", "alg": "RS256",
			"n": b64(key.N.Bytes()), "e": b64(big.NewInt(int64(key.E)).Bytes()),
		}}})
	})
	p.url = serve(mux)
	return p, nil
}

func (p *idp) sign(sub string) (string, error) {
	t := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{
		"iss": p.url, "aud": "bench-client", "sub": sub, "email": sub + "@example.com", "name": sub,
		"iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix(),
	})
	t.Header["kid"] = "bench"
	return t.SignedString(p.key)
}

func raiseFileLimit() {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil && l.Cur < l.Max {
		l.Cur = l.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	}
}

// goBuild builds a package of this module into out.
func goBuild(out, pkg string) error {
	build := exec.Command("go", "build", "-o", out, pkg)
	build.Dir = moduleRoot()
	build.Stderr = os.Stderr
	return build.Run()
}

func moduleRoot() string {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		log.Fatal(err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

func runtimeCPUs() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(b), "processor\t:")
}

func goVersion() string {
	out, _ := exec.Command("go", "version").Output()
	return strings.TrimSpace(string(out))
}
