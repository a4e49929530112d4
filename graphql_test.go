package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// testSchema is the gateway schema with no upstream: enough for queries,
// introspection and validation.
func testSchema(t testing.TB) *gqlSchema {
	t.Helper()
	cfg, err := loadConfig(func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	return newGatewaySchema(cfg, nil, nil, nil)
}

// runGQL executes a request directly and returns the wire JSON decoded.
func runGQL(t testing.TB, s *gqlSchema, query string, vars map[string]any, op string) map[string]any {
	t.Helper()
	var out map[string]any
	if err := json.Unmarshal(runGQLRaw(t, s, query, vars, op), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// runGQLRaw executes a request directly and returns the wire JSON.
func runGQLRaw(t testing.TB, s *gqlSchema, query string, vars map[string]any, op string) []byte {
	t.Helper()
	raw, _ := json.Marshal(vars)
	var v map[string]any
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.UseNumber()
	dec.Decode(&v)
	res := s.execute(context.Background(), httptest.NewRequest("POST", "/graphql", nil), gqlRequest{Query: query, Variables: v, OperationName: op})
	b, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func jsonOf(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// errorsOf returns the messages and checks every error's shape.
func errorsOf(t *testing.T, res map[string]any) []map[string]any {
	t.Helper()
	raw, _ := res["errors"].([]any)
	var out []map[string]any
	for _, e := range raw {
		m := e.(map[string]any)
		if _, ok := m["message"].(string); !ok {
			t.Errorf("error without message: %v", m)
		}
		out = append(out, m)
	}
	return out
}

// graphqlQueryCases are TestGraphQLQueries' table, and seeds of FuzzGraphQLParse.
var graphqlQueryCases = []struct {
	name, query, op string
	vars            map[string]any
	want            string // JSON of data
}{
	{"shorthand", `{ health }`, "", nil, `{"health":"ok"}`},
	{"typename and version", `query { __typename version }`, "", nil, `{"__typename":"QueryRoot","version":"dev"}`},
	{"aliases", `{ a: health b: health v: version }`, "", nil, `{"a":"ok","b":"ok","v":"dev"}`},
	{"named fragment", `query Q { ...F a: health } fragment F on QueryRoot { version __typename }`, "", nil, `{"version":"dev","__typename":"QueryRoot","a":"ok"}`},
	{"inline fragment", `{ ... on QueryRoot { health } ... { version } }`, "", nil, `{"health":"ok","version":"dev"}`},
	{"skip literal", `{ health @skip(if: true) version }`, "", nil, `{"version":"dev"}`},
	{"include literal", `{ health @include(if: false) version @include(if: true) }`, "", nil, `{"version":"dev"}`},
	{"skip variable", `query ($s: Boolean!) { health @skip(if: $s) version }`, "", map[string]any{"s": false}, `{"health":"ok","version":"dev"}`},
	{"default variable", `query ($s: Boolean = true) { health @skip(if: $s) version }`, "", nil, `{"version":"dev"}`},
	{"default overridden", `query ($s: Boolean = true) { health @skip(if: $s) }`, "", map[string]any{"s": false}, `{"health":"ok"}`},
	{"skip on spread", `{ ...F @skip(if: true) version } fragment F on QueryRoot { health }`, "", nil, `{"version":"dev"}`},
	{"include on inline", `query ($i: Boolean!) { ... @include(if: $i) { health } }`, "", map[string]any{"i": true}, `{"health":"ok"}`},
	{"merged fields", `{ health health ... { health } }`, "", nil, `{"health":"ok"}`},
	{"operation name", `query A { health } query B { version }`, "B", nil, `{"version":"dev"}`},
	{"nested fragments", `{ ...A } fragment A on QueryRoot { ...B } fragment B on QueryRoot { health }`, "", nil, `{"health":"ok"}`},
	{"type lookup", `{ __type(name: "ProxyResponse") { name kind fields { name } } }`, "", nil,
		`{"__type":{"name":"ProxyResponse","kind":"OBJECT","fields":[{"name":"success"},{"name":"data"},{"name":"error"}]}}`},
	{"unknown type lookup", `{ __type(name: "Nope") { name } }`, "", nil, `{"__type":null}`},
	{"comments commas and block string", "# c\n{ __type(name: \"\"\"\n   ExecuteResult\n\"\"\"), { name, } }", "", nil, `{"__type":{"name":"ExecuteResult"}}`},
}

func TestGraphQLQueries(t *testing.T) {
	t.Parallel()
	s := testSchema(t)
	for _, tc := range graphqlQueryCases {
		t.Run(tc.name, func(t *testing.T) {
			// The raw JSON: fields must come in selection order.
			if got := string(runGQLRaw(t, s, tc.query, tc.vars, tc.op)); got != `{"data":`+tc.want+`}` {
				t.Fatalf("got %s, want data %s", got, tc.want)
			}
		})
	}
}

// graphqlErrorCases are TestGraphQLErrors' table, and seeds of FuzzGraphQLParse.
var graphqlErrorCases = []struct {
	name, query, op string
	vars            map[string]any
	msg             string // substring of the first error
	line, col       int    // its location; 0: none expected
}{
	{"syntax", "{\n  health(\n}", "", nil, "Syntax Error", 3, 1},
	{"unexpected character", "{ health ^ }", "", nil, "Unexpected character", 1, 10},
	{"unterminated string", `{ __type(name: "abc) { name } }`, "", nil, "Unterminated string", 1, 32},
	{"empty", "  ", "", nil, "Unexpected <EOF>", 1, 3},
	{"type system", "type Foo { a: String }", "", nil, "not supported", 1, 1},
	{"unknown field", "{\n  health\n  nope\n}", "", nil, `Cannot query field "nope" on type "QueryRoot".`, 3, 3},
	{"unknown nested field", `{ __schema { nope } }`, "", nil, `Cannot query field "nope" on type "__Schema".`, 1, 14},
	{"leaf with selection", `{ health { x } }`, "", nil, "must not have a selection", 1, 3},
	{"object without selection", `{ __schema }`, "", nil, "must have a selection of subfields", 1, 3},
	{"unknown argument", `{ health(x: 1) }`, "", nil, `Unknown argument "x"`, 1, 10},
	{"wrong argument type", `{ __type(name: 5) { name } }`, "", nil, `Expected value of type "String!", found 5.`, 1, 16},
	{"missing argument", `{ __type { name } }`, "", nil, `Argument "name" of type "String!" is required`, 1, 3},
	{"null for non-null", `{ __type(name: null) { name } }`, "", nil, `found null`, 1, 16},
	{"missing variable", `query Q($n: String!) { __type(name: $n) { name } }`, "", nil, `Variable "$n" of required type "String!" was not provided.`, 1, 9},
	{"null variable", `query Q($n: String!) { __type(name: $n) { name } }`, "", map[string]any{"n": nil}, `must not be null`, 1, 9},
	{"wrong variable type", `query Q($n: String!) { __type(name: $n) { name } }`, "", map[string]any{"n": 5}, `Variable "$n" got invalid value 5`, 1, 9},
	{"wrong variable int", `query Q($b: Boolean!) { health @skip(if: $b) }`, "", map[string]any{"b": "yes"}, `Boolean cannot represent`, 1, 9},
	{"bad default", `query Q($b: Boolean = "x") { health @skip(if: $b) }`, "", nil, `Expected value of type "Boolean"`, 1, 23},
	{"undefined variable", `{ health @skip(if: $b) }`, "", nil, `Variable "$b" is not defined`, 1, 20},
	{"unused variable", `query Q($b: Boolean) { health }`, "", nil, `Variable "$b" is never used in operation "Q".`, 1, 9},
	{"variable position", `query Q($b: Boolean) { health @skip(if: $b) }`, "", nil, `Variable "$b" of type "Boolean" used in position expecting type "Boolean!".`, 1, 41},
	{"output type variable", `query Q($b: ExecuteResult) { health }`, "", nil, `cannot be non-input type`, 1, 9},
	{"unknown variable type", `query Q($b: Nope) { health }`, "", nil, `Unknown type "Nope".`, 1, 13},
	{"subscription", `subscription S { health }`, "", nil, "Subscriptions are not supported.", 1, 1},
	{"unknown fragment", `{ ...Nope }`, "", nil, `Unknown fragment "Nope".`, 1, 3},
	{"unused fragment", `{ health } fragment F on QueryRoot { health }`, "", nil, `Fragment "F" is never used.`, 1, 12},
	{"fragment cycle", `{ ...A } fragment A on QueryRoot { ...B } fragment B on QueryRoot { ...A }`, "", nil, "within itself", 0, 0},
	{"fragment wrong type", `{ ...F } fragment F on __Schema { description }`, "", nil, "cannot be spread here", 1, 3},
	{"fragment on unknown type", `{ ...F } fragment F on Nope { health }`, "", nil, `Unknown type "Nope".`, 1, 10},
	{"unknown directive", `{ health @nope }`, "", nil, `Unknown directive "@nope".`, 1, 10},
	{"misplaced directive", `query Q @skip(if: true) { health }`, "", nil, `may not be used on QUERY`, 1, 9},
	{"directive without if", `{ health @skip }`, "", nil, `Argument "if" of type "Boolean!" is required`, 1, 10},
	{"conflicting aliases", `{ a: health a: version }`, "", nil, `Fields "a" conflict`, 1, 3},
	{"two anonymous", `{ health } { version }`, "", nil, "anonymous operation must be the only", 1, 1},
	{"duplicate operation", `query A { health } query A { version }`, "A", nil, `only one operation named "A"`, 1, 20},
	{"operation name needed", `query A { health } query B { version }`, "", nil, "Must provide operation name", 0, 0},
	{"unknown operation", `query A { health }`, "Z", nil, `Unknown operation named "Z".`, 0, 0},
	{"mutation wrong args", `mutation { executePlaybook(name: 1) { id } }`, "", nil, `Expected value of type "String!", found 1.`, 1, 34},
	{"input unknown field", `mutation { proxyRequest(input: {method: "GET", endpoint: "/api/x", nope: 1}) { success } }`, "", nil, `Field "nope" is not defined by type "ProxyRequestInput".`, 1, 68},
	{"input missing field", `mutation { proxyRequest(input: {method: "GET"}) { success } }`, "", nil, `Field "ProxyRequestInput.endpoint" of required type "String!" was not provided.`, 1, 32},
	{"input variable missing field", `mutation M($i: ProxyRequestInput!) { proxyRequest(input: $i) { success } }`, "", map[string]any{"i": map[string]any{"method": "GET"}}, `of required type "String!" was not provided`, 1, 12},
}

func TestGraphQLErrors(t *testing.T) {
	t.Parallel()
	s := testSchema(t)
	for _, tc := range graphqlErrorCases {
		t.Run(tc.name, func(t *testing.T) {
			res := runGQL(t, s, tc.query, tc.vars, tc.op)
			if _, has := res["data"]; has {
				t.Errorf("request error answered with data: %v", res)
			}
			errs := errorsOf(t, res)
			if len(errs) == 0 {
				t.Fatalf("no error: %v", res)
			}
			if msg := errs[0]["message"].(string); !strings.Contains(msg, tc.msg) {
				t.Fatalf("message %q, want it to contain %q (all: %v)", msg, tc.msg, errs)
			}
			if tc.line == 0 {
				return
			}
			locs, _ := errs[0]["locations"].([]any)
			if len(locs) == 0 {
				t.Fatalf("no location: %v", errs[0])
			}
			loc := locs[0].(map[string]any)
			if loc["line"] != float64(tc.line) || loc["column"] != float64(tc.col) {
				t.Fatalf("location %v, want %d:%d", loc, tc.line, tc.col)
			}
		})
	}
}

func TestGraphQLLimits(t *testing.T) {
	t.Parallel()
	s := testSchema(t)
	big := "{ health " + strings.Repeat("# padding\n", maxDocumentBytes/10) + "}"
	res := runGQL(t, s, big, nil, "")
	if errs := errorsOf(t, res); len(errs) != 1 || !strings.Contains(errs[0]["message"].(string), "Document too large") {
		t.Fatalf("size limit: %v", res)
	}
	deep := "{ __schema { types { " + strings.Repeat("ofType { ", maxQueryDepth) + "name" + strings.Repeat(" }", maxQueryDepth) + " } } }"
	res = runGQL(t, s, deep, nil, "")
	if errs := errorsOf(t, res); len(errs) != 1 || !strings.Contains(errs[0]["message"].(string), "nested too deeply") {
		t.Fatalf("depth limit: %v", res)
	}
	// Depth through fragments counts too.
	frag := "{ __schema { types { ...T } } } fragment T on __Type { " + strings.Repeat("ofType { ", maxQueryDepth) + "name" + strings.Repeat(" }", maxQueryDepth) + " }"
	if errs := errorsOf(t, runGQL(t, s, frag, nil, "")); len(errs) != 1 || !strings.Contains(errs[0]["message"].(string), "nested too deeply") {
		t.Fatalf("depth limit through fragments: %v", errs)
	}
	// Parser nesting far beyond any limit is an error, not a stack overflow.
	res = runGQL(t, s, "{ __type(name: "+strings.Repeat("[", 10000)+") { name } }", nil, "")
	if errs := errorsOf(t, res); len(errs) != 1 || !strings.Contains(errs[0]["message"].(string), "nested too deeply") {
		t.Fatalf("parser nesting: %v", res)
	}
	// Fan-out through fragments: each level doubles the fields.
	var b strings.Builder
	b.WriteString("{ __schema { ...F0 } }\n")
	for i := 0; i < 18; i++ {
		fmt.Fprintf(&b, "fragment F%d on __Schema { a%d: queryType { name } x%d: __typename ...F%d }\n", i, i, i, i+1)
	}
	fmt.Fprintf(&b, "fragment F18 on __Schema { types { name fields { name type { name } } } t1: types { name fields { name args { name } } } }\n")
	res = runGQL(t, s, b.String(), nil, "")
	if res["errors"] != nil {
		t.Fatalf("fragment chain (each spread once): %v", res["errors"])
	}
	var wide strings.Builder
	wide.WriteString("{ __schema { ")
	for i := 0; i < 400; i++ {
		fmt.Fprintf(&wide, "t%d: types { name fields { name args { name type { name } } type { name } } } ", i)
	}
	wide.WriteString("} }")
	res = runGQL(t, s, wide.String(), nil, "")
	errs := errorsOf(t, res)
	if len(errs) != 1 || !strings.Contains(errs[0]["message"].(string), "too complex") || res["data"] != nil {
		t.Fatalf("field budget: %d errors, data %v", len(errs), res["data"] != nil)
	}
}

// gqlEnv is a gateway in front of a fake NoETL that runs playbooks and
// answers access checks (allowed unless the path starts with "secret/").
type gqlEnv struct {
	noetl *fakeNoETL
	gw    *gateway

	mu       sync.Mutex
	executed []map[string]any
	headers  []http.Header
}

func startGQLEnv(t *testing.T, env map[string]string) *gqlEnv {
	t.Helper()
	e := &gqlEnv{noetl: startNoETL(t)}
	e.noetl.addSession(testToken, testUser, time.Now().Add(time.Hour))
	e.noetl.Handle("POST /api/execute", func(w http.ResponseWriter, r *http.Request) {
		var in map[string]any
		json.NewDecoder(r.Body).Decode(&in)
		e.mu.Lock()
		e.executed = append(e.executed, in)
		e.mu.Unlock()
		if in["path"] == "missing/playbook" {
			http.Error(w, `{"detail":"Playbook not found: secret internal detail"}`, http.StatusNotFound)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"execution_id":"532409473459847","status":"started","commands_generated":3}`)
	})
	e.noetl.Handle("POST /api/auth/check-playbook-access", func(w http.ResponseWriter, r *http.Request) {
		var in map[string]string
		json.NewDecoder(r.Body).Decode(&in)
		w.Header().Set("Content-Type", "application/json")
		if in["playbook_path"] == "broken/playbook" {
			http.Error(w, "database down", http.StatusInternalServerError)
			return
		}
		fmt.Fprintf(w, `{"allowed":%v}`, !strings.HasPrefix(in["playbook_path"], "secret/") && in["session_token"] != "")
	})
	e.noetl.Handle("/api/", func(w http.ResponseWriter, r *http.Request) {
		e.mu.Lock()
		e.headers = append(e.headers, r.Header.Clone())
		e.mu.Unlock()
		body, _ := io.ReadAll(r.Body)
		switch r.URL.Path {
		case "/api/text":
			w.Header().Set("Content-Type", "text/plain")
			io.WriteString(w, "plain words")
		case "/api/fail":
			http.Error(w, `{"detail":"nope"}`, http.StatusInternalServerError)
		default:
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(map[string]any{"method": r.Method, "path": r.URL.Path, "query": r.URL.RawQuery, "body": string(body)})
		}
	})
	cfg := map[string]string{"NOETL_BASE_URL": e.noetl.URL, "AUTH_MODE": "sync", "GATEWAY_PUBLIC_URL": "http://gw.example:8090"}
	for k, v := range env {
		cfg[k] = v
	}
	e.gw = startGateway(t, cfg)
	return e
}

// post sends a GraphQL request with the test session.
func (e *gqlEnv) post(t *testing.T, query string, vars map[string]any) map[string]any {
	t.Helper()
	return postGQL(t, e.gw.URL, testToken, query, vars)
}

func postGQL(t *testing.T, url, token, query string, vars map[string]any) map[string]any {
	t.Helper()
	status, h, body := doJSON(t, "POST", url+"/graphql", map[string]any{"query": query, "variables": vars}, map[string]string{"Authorization": "Bearer " + token})
	if status != 200 || !strings.HasPrefix(h.Get("Content-Type"), "application/json") {
		t.Fatalf("status %d %v", status, body)
	}
	return body
}

// uiMutation is the exact operation the existing UIs send.
const uiMutation = `mutation ExecutePlaybook($name: String!, $variables: JSON, $clientId: String) {
  executePlaybook(name: $name, variables: $variables, clientId: $clientId) {
    id
    executionId
    requestId
    name
    status
    textOutput
  }
}`

func TestGraphQLExecutePlaybookUI(t *testing.T) {
	t.Parallel()
	ns := startNATS(t)
	e := startGQLEnv(t, map[string]string{"NATS_URL": ns.URL()})
	res := e.post(t, uiMutation, map[string]any{
		"name": "tests/hello", "clientId": "client-1",
		"variables": map[string]any{"x": 1, "request_id": "spoofed", "gateway_url": "http://evil"},
	})
	if res["errors"] != nil {
		t.Fatalf("errors: %v", res["errors"])
	}
	r := res["data"].(map[string]any)["executePlaybook"].(map[string]any)
	rid, _ := r["requestId"].(string)
	if r["id"] != "532409473459847" || r["executionId"] != "532409473459847" || r["name"] != "tests/hello" ||
		r["status"] != "started" || r["textOutput"] != nil || len(rid) != 36 || rid[14] != '4' {
		t.Fatalf("result %v", r)
	}
	e.mu.Lock()
	got := e.executed[len(e.executed)-1]
	e.mu.Unlock()
	payload := got["payload"].(map[string]any)
	if got["path"] != "tests/hello" || payload["request_id"] != rid || payload["gateway_url"] != "http://gw.example:8090" || payload["x"] != float64(1) {
		t.Fatalf("NoETL got %v", got)
	}
	// The request record is in the shared store, with the caller's session.
	nc, err := nats.Connect(ns.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	kv, err := js.KeyValue(ctx, "requests")
	if err != nil {
		t.Fatal(err)
	}
	entry, err := kv.Get(ctx, rid)
	if err != nil {
		t.Fatal(err)
	}
	var rec requestRecord
	json.Unmarshal(entry.Value(), &rec)
	if rec.ClientID != "client-1" || rec.SessionToken != testToken || rec.ExecutionID != "532409473459847" ||
		rec.PlaybookPath != "tests/hello" || time.Since(time.Unix(rec.CreatedAt, 0)) > time.Minute {
		t.Fatalf("record %+v", rec)
	}

	// Another session, on a second replica, cannot use the same clientId.
	const other = "tok-other-0123456789abcdef0123456"
	e.noetl.addSession(other, User{UserID: 7, Email: "eve@example.com"}, time.Now().Add(time.Hour))
	g2 := startGateway(t, map[string]string{"NOETL_BASE_URL": e.noetl.URL, "AUTH_MODE": "sync", "NATS_URL": ns.URL()})
	res = postGQL(t, g2.URL, other, uiMutation, map[string]any{"name": "tests/hello", "clientId": "client-1"})
	errs := errorsOf(t, res)
	if len(errs) != 1 || errs[0]["message"] != "clientId belongs to another session" || jsonOf(errs[0]["path"]) != `["executePlaybook"]` {
		t.Fatalf("taken clientId: %v", res)
	}
	if d, has := res["data"]; !has || d != nil {
		t.Fatalf("data should be null (non-null field failed): %v", res)
	}
	// The owner can reuse it, through either replica.
	res = postGQL(t, g2.URL, testToken, uiMutation, map[string]any{"name": "tests/hello", "clientId": "client-1", "variables": nil})
	if res["errors"] != nil {
		t.Fatalf("owner reuse: %v", res["errors"])
	}
}

func TestGraphQLExecutePlaybook(t *testing.T) {
	t.Parallel()
	e := startGQLEnv(t, nil)
	// Without clientId: no request id, no injection, payload defaults to {}.
	res := e.post(t, `mutation { executePlaybook(name: "tests/hello") { id requestId name } }`, nil)
	if r, _ := res["data"].(map[string]any)["executePlaybook"].(map[string]any); r == nil || r["id"] != "532409473459847" ||
		r["requestId"] != nil || r["name"] != "tests/hello" || len(r) != 3 {
		t.Fatalf("result %v", res)
	}
	e.mu.Lock()
	if p := e.executed[len(e.executed)-1]["payload"]; jsonOf(p) != `{}` {
		t.Errorf("payload %v", p)
	}
	e.mu.Unlock()
	// A literal JSON object with a variable inside, and a non-object payload.
	res = e.post(t, `mutation M($v: Int) { executePlaybook(name: "tests/hello", variables: {a: [1, 2.5, "s", true, null, ENUMISH], b: {c: $v}}, clientId: "c2") { requestId } }`, map[string]any{"v": 9})
	if res["errors"] != nil {
		t.Fatalf("errors %v", res["errors"])
	}
	e.mu.Lock()
	p := e.executed[len(e.executed)-1]["payload"].(map[string]any)
	e.mu.Unlock()
	if jsonOf(p["a"]) != `[1,2.5,"s",true,null,"ENUMISH"]` || jsonOf(p["b"]) != `{"c":9}` || p["request_id"] == nil {
		t.Fatalf("payload %v", p)
	}
	res = e.post(t, `mutation { executePlaybook(name: "tests/hello", variables: [1], clientId: "c3") { requestId } }`, nil)
	if res["errors"] != nil {
		t.Fatalf("list payload: %v", res["errors"])
	}
	cases := []struct{ query, msg string }{
		{`mutation { executePlaybook(name: "secret/payroll") { id } }`, "permission denied"},
		{`mutation { executePlaybook(name: "bad name; drop") { id } }`, "invalid playbook name"},
		{`mutation { executePlaybook(name: "tests/hello", clientId: "no spaces") { id } }`, "invalid clientId"},
		{`mutation { executePlaybook(name: "missing/playbook") { id } }`, "playbook execution failed"},
		{`mutation { executePlaybook(name: "broken/playbook") { id } }`, "access check unavailable"},
	}
	for _, tc := range cases {
		res := e.post(t, tc.query, nil)
		errs := errorsOf(t, res)
		if len(errs) != 1 || errs[0]["message"] != tc.msg || errs[0]["locations"] == nil || jsonOf(errs[0]["path"]) != `["executePlaybook"]` {
			t.Errorf("%s: %v", tc.query, res)
		}
		if strings.Contains(jsonOf(res), "secret internal detail") {
			t.Errorf("upstream text leaked: %v", res)
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, x := range e.executed {
		if x["path"] == "secret/payroll" {
			t.Fatal("denied playbook was executed")
		}
	}
}

func TestGraphQLProxyRequest(t *testing.T) {
	t.Parallel()
	e := startGQLEnv(t, nil)
	const q = `mutation P($m: String!, $e: String!, $b: JSON) { proxyRequest(input: {method: $m, endpoint: $e, body: $b}) { success data error } }`
	call := func(method, endpoint string, body any) map[string]any {
		res := e.post(t, q, map[string]any{"m": method, "e": endpoint, "b": body})
		if res["errors"] != nil {
			t.Fatalf("%s %s: errors %v", method, endpoint, res["errors"])
		}
		return res["data"].(map[string]any)["proxyRequest"].(map[string]any)
	}
	r := call("post", "/api/catalog/list?limit=5&x=%2F", map[string]any{"resource_type": "Playbook"})
	data, _ := r["data"].(map[string]any)
	if r["success"] != true || data["method"] != "POST" || data["path"] != "/api/catalog/list" || data["query"] != "limit=5&x=%2F" ||
		data["body"] != `{"resource_type":"Playbook"}`+"\n" && data["body"] != `{"resource_type":"Playbook"}` {
		t.Fatalf("proxyRequest: %v", r)
	}
	e.mu.Lock()
	h := e.headers[len(e.headers)-1]
	e.mu.Unlock()
	if h.Get("X-User-Id") != "42" || h.Get("X-Session-Token") != testToken || h.Get("X-User-Roles") != "admin,dev" || h.Get("Authorization") != "" {
		t.Fatalf("identity headers: %v", h)
	}
	if r := call("GET", "/api/text", nil); r["success"] != true || jsonOf(r["data"]) != `{"data":"plain words"}` {
		t.Fatalf("text: %v", r)
	}
	if r := call("Delete", "/api/fail", nil); r["success"] != false || r["error"] != "upstream returned status 500" {
		t.Fatalf("failure: %v", r)
	}
	before := len(e.headers)
	for _, bad := range []struct{ method, endpoint string }{
		{"GET", "@evil.example/x"},
		{"GET", "http://evil.example/api/x"},
		{"GET", "//evil.example/api/x"},
		{"GET", "/api//evil"},
		{"GET", "/api/../health"},
		{"GET", "/api/x/..%2f..%2fhealth"},
		{"GET", "/api/%2e%2e/health"},
		{"GET", "/api/x\\..\\y"},
		{"GET", "/api/x\r\nHost: evil"},
		{"GET", "/api/x#frag"},
		{"GET", "/health"},
		{"GET", "api/x"},
		{"GET", "/api/http://evil/"},
		{"TRACE", "/api/x"},
		{"CONNECT", "/api/x"},
	} {
		r := call(bad.method, bad.endpoint, nil)
		msg, _ := r["error"].(string)
		if r["success"] != false || msg == "" {
			t.Errorf("%s %q: %v", bad.method, bad.endpoint, r)
		}
	}
	if len(e.headers) != before {
		t.Fatalf("%d SSRF attempts reached the upstream", len(e.headers)-before)
	}
}

func TestGraphQLHTTP(t *testing.T) {
	t.Parallel()
	e := startGQLEnv(t, nil)
	url := e.gw.URL + "/graphql"
	auth := map[string]string{"Authorization": "Bearer " + testToken}
	// No session: 401, GraphiQL included.
	if status, _, _ := doJSON(t, "POST", url, map[string]any{"query": "{ health }"}, nil); status != http.StatusUnauthorized {
		t.Errorf("no session: %d", status)
	}
	if status, _, _ := doJSON(t, "GET", url, nil, nil); status != http.StatusUnauthorized {
		t.Errorf("GraphiQL without session: %d", status)
	}
	for _, tc := range []struct {
		body   any
		status int
	}{
		{"{not json", 400},
		{map[string]any{}, 400},
		{map[string]any{"query": ""}, 400},
		{map[string]any{"query": 5}, 400},
		{map[string]any{"query": "{ health }", "variables": []any{1}}, 400},
		{map[string]any{"query": "{ health }", "variables": nil, "operationName": nil}, 200},
		{map[string]any{"query": "{ nope }"}, 200},
	} {
		status, h, body := doJSON(t, "POST", url, tc.body, auth)
		if status != tc.status || !strings.HasPrefix(h.Get("Content-Type"), "application/json") {
			t.Errorf("%v: status %d %v", tc.body, status, body)
		}
		if status == 400 && body["error"] == nil {
			t.Errorf("%v: 400 without error body", tc.body)
		}
	}
	req, _ := http.NewRequest("POST", url, strings.NewReader(`{"query":"{ health }"}`))
	req.Header.Set("Content-Type", "text/plain")
	req.Header.Set("Authorization", "Bearer "+testToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnsupportedMediaType {
		t.Errorf("text/plain body: %d", resp.StatusCode)
	}
	// Cookie sessions work, as browsers use them with GraphiQL.
	req, _ = http.NewRequest("GET", url, nil)
	req.AddCookie(&http.Cookie{Name: "session_token", Value: testToken})
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") ||
		!strings.Contains(string(page), "url: '/graphql'") || !strings.Contains(string(page), "credentials: 'include'") ||
		!strings.Contains(string(page), "graphiql.min.js") || !strings.Contains(resp.Header.Get("Content-Security-Policy"), "sha256-") {
		t.Fatalf("GraphiQL page: %d %s", resp.StatusCode, page)
	}
}

func FuzzGraphQLParse(f *testing.F) {
	for _, s := range []string{
		"{ health }", uiMutation, introspectionQuery, `query ($a: [Int!]! = [1]) { x(a: {b: "c\u00e9", d: """block"""}) @skip(if: $a) }`,
		"fragment F on T { ...G ... on U { a } }", `{ a(b: -1.5e3, c: 0, d: null, e: ENUM, f: [true false]) }`, "{", `"`, "\"\"\"", "query Q(", "{ a: b: c }",
		"subscription { x }", "\xff", "{ a(x: \"\\u{1F600}\\uD83D\\uDE00\") }",
	} {
		f.Add(s)
	}
	for _, tc := range graphqlQueryCases {
		f.Add(tc.query)
	}
	for _, tc := range graphqlErrorCases {
		f.Add(tc.query)
	}
	schema := testSchema(f)
	f.Fuzz(func(t *testing.T, src string) {
		doc, err := parseGraphQL(src)
		if err != nil {
			if doc != nil {
				t.Fatal("document and error")
			}
			if err.Message == "" || len(err.Locations) != 1 || err.Locations[0].Line < 1 || err.Locations[0].Column < 1 {
				t.Fatalf("bad error %+v", err)
			}
			return
		}
		for _, e := range validateDocument(schema, doc) {
			if e.Message == "" || len(e.Locations) == 0 {
				t.Fatalf("validation error without location: %+v", e)
			}
		}
		// Queries have no side effects here: run them all the way.
		if len(src) <= maxDocumentBytes && !strings.Contains(src, "mutation") {
			res := schema.execute(context.Background(), httptest.NewRequest("POST", "/graphql", nil), gqlRequest{Query: src})
			if _, err := json.Marshal(res); err != nil {
				t.Fatal(err)
			}
			for _, e := range res.Errors {
				if e.Message == "" {
					t.Fatalf("empty error: %+v", e)
				}
			}
		}
	})
}
