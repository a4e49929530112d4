package main

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestREADMEConfigTable keeps the README's configuration table equal to the
// variables config.go reads: none missing, none invented.
func TestREADMEConfigTable(t *testing.T) {
	t.Parallel()
	src, err := os.ReadFile("config.go")
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	read := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?:getenv|str|integer|secs|boolean|oneOf|match|httpURL)\("([A-Z0-9_]+)"|port := "([A-Z0-9_]+)"`).FindAllStringSubmatch(string(src), -1) {
		read[m[1]+m[2]] = true
	}
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `([A-Z0-9_]+)` \\|").FindAllStringSubmatch(string(readme), -1) {
		documented[m[1]] = true
	}
	if len(read) < 50 {
		t.Fatalf("found only %d variables in config.go; the pattern is stale", len(read))
	}
	var missing, invented []string
	for v := range read {
		if !documented[v] {
			missing = append(missing, v)
		}
	}
	for v := range documented {
		if !read[v] {
			invented = append(invented, v)
		}
	}
	slices.Sort(missing)
	slices.Sort(invented)
	if len(missing) > 0 {
		t.Errorf("README lacks: %s", strings.Join(missing, ", "))
	}
	if len(invented) > 0 {
		t.Errorf("README documents variables config.go does not read: %s", strings.Join(invented, ", "))
	}
	if !strings.HasPrefix(string(readme), "# NoETL Gateway (Go)\n\n```sh\ngo run .") || !strings.Contains(string(readme)[:200], "go test ./...") {
		t.Error("README must open with the two commands")
	}
}
