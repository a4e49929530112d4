package main

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"testing"
	"time"
)

// BenchmarkGatewayVsControl measures one request at a time through a bare
// httputil.ReverseProxy (the control) and through the real gateway (run,
// session from the near cache), both in this process in front of the same
// backend, so the difference of the two ns/op is the gateway's added
// latency without cross-process scheduling noise. bench/ measures the same
// across processes and under concurrency.
func BenchmarkGatewayVsControl(b *testing.B) {
	be := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/api/auth/session/validate" {
			io.WriteString(w, `{"status":"ok","valid":true,"user":{"user_id":1,"email":"a@b.c","display_name":"A","roles":["admin"]},"expires_at":"2099-01-01T00:00:00Z"}`)
			return
		}
		io.WriteString(w, `{"status":"ok","items":[1,2,3]}`)
	}))
	defer be.Close()
	u, _ := url.Parse(be.URL)
	control := httptest.NewServer(&httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(u)
			pr.Out.URL.Path = "/api/" + strings.TrimPrefix(pr.In.URL.Path, "/noetl/")
		},
	})
	defer control.Close()
	g := startGateway(b, map[string]string{"NOETL_BASE_URL": be.URL, "LOG_LEVEL": "info"})

	for _, tc := range []struct{ name, url string }{{"control", control.URL}, {"gateway", g.URL}} {
		b.Run(tc.name, func(b *testing.B) {
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}, Timeout: 10 * time.Second}
			req, _ := http.NewRequest("GET", tc.url+"/noetl/bench", nil)
			req.Header.Set("Authorization", "Bearer benchtoken0001")
			for b.Loop() {
				resp, err := client.Do(req)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Fatalf("status %d", resp.StatusCode)
				}
			}
		})
	}
}
