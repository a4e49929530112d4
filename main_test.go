package main

import (
	"net/http"
	"testing"
)

func TestHealthSmoke(t *testing.T) {
	g := startGateway(t, nil)
	resp, err := http.Get(g.URL + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
}
