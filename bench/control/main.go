// Command control is the load program's baseline: a bare
// httputil.ReverseProxy of a few lines in front of the same backend as the
// gateway, mapping /noetl/... to /api/.... The load program builds it and
// starts it exactly as it builds and starts the gateway (go build, a child
// process, ROUTER_PORT and NOETL_BASE_URL, /ready), so that both pay the
// same costs of being a separate program.
package main

import (
	"io"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"time"
)

func main() {
	backend, err := url.Parse(os.Getenv("NOETL_BASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(backend)
			pr.Out.URL.Path = "/api/" + strings.TrimPrefix(pr.In.URL.Path, "/noetl/")
		},
		Transport: &http.Transport{MaxIdleConns: 512, MaxIdleConnsPerHost: 256, IdleConnTimeout: 90 * time.Second},
	}
	mux := http.NewServeMux()
	mux.Handle("/noetl/", rp)
	// The load program waits for the same readiness answer as the gateway's.
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"status":"ready","checks":{"nats":"ok"}}`)
	})
	srv := &http.Server{Addr: "127.0.0.1:" + os.Getenv("ROUTER_PORT"), Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.ListenAndServe())
}
