package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// POST /graphql and GET /graphql (SPEC §8): the gateway's own GraphQL schema,
// as the original served it (REFERENCE §6), with the fixes of SPEC §8:
// executePlaybook checks access and binds clientId and the request record to
// the caller's session; proxyRequest only reaches NoETL's /api/ and carries
// the same identity headers as the REST proxy.

// maxProxyResponse bounds what proxyRequest reads from NoETL.
const maxProxyResponse = 8 << 20

// newGatewaySchema builds the schema with its resolvers. requests is the
// store the SSE callbacks read pending requests from.
func newGatewaySchema(cfg Config, noetl *noetlClient, access *accessChecker, requests kvStore) *gqlSchema {
	jsonScalar := &gqlType{kind: kindScalar, name: "JSON", description: "A scalar that can represent any JSON value."}
	builtins := builtinScalars()
	str, boolean := builtins["String"], builtins["Boolean"]

	executeResult := &gqlType{kind: kindObject, name: "ExecuteResult", description: "A started playbook execution. Results arrive later over SSE (/events) when clientId was given.",
		fields: []*gqlField{
			{name: "id", description: "Same as executionId.", typ: nonNull(str)},
			{name: "executionId", typ: nonNull(str)},
			{name: "requestId", description: "Set when clientId was given: the request_id the result will carry over SSE.", typ: str},
			{name: "name", description: "The upstream name, else the requested path.", typ: str},
			{name: "status", description: "The upstream status, e.g. \"started\".", typ: str},
			{name: "textOutput", description: "Always null: results come over SSE.", typ: str},
		}}
	proxyResponse := &gqlType{kind: kindObject, name: "ProxyResponse", fields: []*gqlField{
		{name: "success", typ: nonNull(boolean)},
		{name: "data", typ: jsonScalar},
		{name: "error", typ: str},
	}}
	proxyInput := &gqlType{kind: kindInputObject, name: "ProxyRequestInput", inputFields: []*gqlInputValue{
		inputValue("method", "GET, POST, PUT, DELETE or PATCH, any case.", nonNull(str), ""),
		inputValue("endpoint", "A NoETL API path starting with /api/, optionally with a query string.", nonNull(str), ""),
		inputValue("body", "Sent as the JSON request body when present.", jsonScalar, ""),
	}}
	upstream := &http.Client{
		Transport: newUpstreamTransport(cfg),
		Timeout:   cfg.NoETLTimeout,
		// The endpoint was checked; a redirect could lead anywhere.
		CheckRedirect: noRedirects,
	}
	query := &gqlType{kind: kindObject, name: "QueryRoot", fields: []*gqlField{
		{name: "health", description: "Always \"ok\".", typ: nonNull(str),
			resolve: func(*execCtx, any, map[string]any) (any, error) { return "ok", nil }},
		{name: "version", description: "The gateway's version.", typ: nonNull(str),
			resolve: func(*execCtx, any, map[string]any) (any, error) { return version, nil }},
	}}
	mutation := &gqlType{kind: kindObject, name: "MutationRoot", fields: []*gqlField{
		{name: "executePlaybook", description: "Starts a playbook. With clientId, its result is delivered to that SSE client.",
			args: []*gqlInputValue{
				inputValue("name", "The playbook's catalog path.", nonNull(str), ""),
				inputValue("variables", "The playbook payload.", jsonScalar, ""),
				inputValue("clientId", "The SSE client id (from /events) to deliver the result to.", str, ""),
			},
			typ: nonNull(executeResult),
			resolve: func(ec *execCtx, _ any, args map[string]any) (any, error) {
				return executePlaybook(ec, cfg, noetl, access, requests, args)
			}},
		{name: "proxyRequest", description: "Calls a NoETL API endpoint (/api/...) with the caller's identity.",
			args: []*gqlInputValue{inputValue("input", "", nonNull(proxyInput), "")},
			typ:  nonNull(proxyResponse),
			resolve: func(ec *execCtx, _ any, args map[string]any) (any, error) {
				return proxyRequest(ec, cfg, upstream, access, args["input"].(map[string]any)), nil
			}},
	}}
	return newSchema("NoETL Gateway", builtins, query, mutation, jsonScalar, executeResult, proxyResponse, proxyInput)
}

func executePlaybook(ec *execCtx, cfg Config, noetl *noetlClient, access *accessChecker, requests kvStore, args map[string]any) (any, error) {
	ctx := ec.ctx
	s := sessionFrom(ctx)
	if s == nil {
		return nil, publicError("authentication required")
	}
	name := args["name"].(string)
	if !playbookPath.MatchString(name) {
		return nil, publicError("invalid playbook name")
	}
	if cfg.AuthzEnforce {
		allowed, err := access.Allowed(ctx, s, name, "execute")
		if err != nil {
			loggerFrom(ec.r).Error("executePlaybook: access check failed", "playbook", name, "session", tokenID(s.Token), "err", err)
			return nil, publicError("access check unavailable")
		}
		if !allowed {
			return nil, publicError("permission denied")
		}
	}
	payload := args["variables"]
	if payload == nil {
		payload = map[string]any{}
	}
	clientID, withClient := args["clientId"].(string)
	var rid string
	var rec requestRecord
	if withClient {
		if !validClientID(clientID) {
			return nil, publicError("invalid clientId")
		}
		switch err := claimClient(ctx, requests, clientID, s.Token); {
		case errors.Is(err, errClientTaken):
			return nil, publicError("clientId belongs to another session")
		case err != nil:
			loggerFrom(ec.r).Error("executePlaybook: claiming client id", "client_id", clientID, "err", err)
			return nil, publicError("request store unavailable")
		}
		rid = newUUID()
		if m, ok := payload.(map[string]any); ok {
			m["request_id"] = rid
			m["gateway_url"] = cfg.PublicURL
		}
		// The record is written before the playbook starts, so a fast
		// worker's callback always finds it; the execution id follows.
		rec = requestRecord{ClientID: clientID, SessionToken: s.Token, PlaybookPath: name, CreatedAt: time.Now().Unix()}
		raw, _ := json.Marshal(rec)
		if err := requests.Put(ctx, rid, raw); err != nil {
			loggerFrom(ec.r).Error("executePlaybook: storing request record", "request", rid, "err", err)
			return nil, publicError("request store unavailable")
		}
	}
	res, err := noetl.execute(ctx, name, payload)
	if err != nil {
		if withClient {
			requests.Delete(context.WithoutCancel(ctx), rid)
		}
		loggerFrom(ec.r).Error("executePlaybook failed", "playbook", name, "session", tokenID(s.Token), "err", err)
		return nil, publicError("playbook execution failed")
	}
	out := map[string]any{"id": res.ExecutionID, "executionId": res.ExecutionID, "name": name, "status": nil, "textOutput": nil}
	if res.Name != "" {
		out["name"] = res.Name
	}
	if res.Status != "" {
		out["status"] = res.Status
	}
	if withClient {
		out["requestId"] = rid
		rec.ExecutionID = res.ExecutionID
		raw, _ := json.Marshal(rec)
		if err := requests.Put(context.WithoutCancel(ctx), rid, raw); err != nil {
			// The record without the execution id still routes the result.
			loggerFrom(ec.r).Warn("executePlaybook: updating request record", "request", rid, "err", err)
		}
	}
	return out, nil
}

// proxyEndpoint checks a proxyRequest endpoint (SPEC §8: /api/ only, no
// "..", "//", "\", scheme, host or control characters) and returns the path
// below /api/ and the raw query.
func proxyEndpoint(endpoint string) (path, query string, ok bool) {
	if !strings.HasPrefix(endpoint, "/api/") || strings.ContainsAny(endpoint, "#\\ ") {
		return "", "", false
	}
	for _, c := range endpoint {
		if c < 0x20 || c == 0x7f {
			return "", "", false
		}
	}
	raw, query, _ := strings.Cut(endpoint, "?")
	if strings.Contains(raw, "://") {
		return "", "", false
	}
	p, ok := canonicalProxyPath("/noetl/" + strings.TrimPrefix(raw, "/api/"))
	if !ok || strings.Contains(endpoint, "..") {
		return "", "", false
	}
	return p, query, true
}

func proxyRequest(ec *execCtx, cfg Config, client *http.Client, access *accessChecker, in map[string]any) map[string]any {
	fail := func(msg string) map[string]any { return map[string]any{"success": false, "data": nil, "error": msg} }
	s := sessionFrom(ec.ctx)
	if s == nil {
		return fail("authentication required")
	}
	method := strings.ToUpper(in["method"].(string))
	switch method {
	case http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodPatch:
	default:
		return fail("unsupported method")
	}
	p, query, ok := proxyEndpoint(in["endpoint"].(string))
	if !ok {
		return fail("invalid endpoint: must be a path under /api/")
	}
	base, _ := url.Parse(cfg.NoETLBaseURL)
	u := *base
	u.Path = strings.TrimSuffix(base.Path, "/") + "/api/" + p
	u.RawPath, u.RawQuery = "", query
	var body io.Reader
	var sent []byte
	if b, present := in["body"]; present && b != nil {
		var err error
		if sent, err = json.Marshal(b); err != nil {
			return fail("invalid body")
		}
		body = bytes.NewReader(sent)
	}
	// POST /api/execute starts a playbook: the same access decision as
	// executePlaybook and POST /noetl/execute, on the bytes that are sent.
	if cfg.AuthzEnforce && method == http.MethodPost && isExecutePath(p) {
		path, problem := executeBodyPath(sent)
		if problem != "" {
			return fail(problem)
		}
		allowed, err := access.Allowed(ec.ctx, s, path, "execute")
		if err != nil {
			loggerFrom(ec.r).Error("proxyRequest: access check failed", "playbook", path, "session", tokenID(s.Token), "err", err)
			return fail("access check unavailable")
		}
		if !allowed {
			return fail("permission denied")
		}
	}
	req, err := http.NewRequestWithContext(ec.ctx, method, u.String(), body)
	if err != nil {
		return fail("invalid endpoint")
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	setIdentityHeaders(req.Header, s, requestIDFrom(ec.ctx))
	req.Header.Set("X-Forwarded-For", clientIP(ec.r, cfg.TrustedProxies).String())
	req.Header.Set("X-Forwarded-Host", ec.r.Host)
	proto := "http"
	if ec.r.TLS != nil {
		proto = "https"
	}
	req.Header.Set("X-Forwarded-Proto", proto)
	log := loggerFrom(ec.r)
	resp, err := client.Do(req)
	if err != nil {
		// *url.Error quotes the whole URL, query included, and a query may
		// carry a token: log the cause only.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		log.Warn("proxyRequest failed", "endpoint", "/api/"+p, "err", err)
		return fail("upstream unavailable")
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxProxyResponse+1))
	if err != nil {
		log.Warn("proxyRequest: reading response", "endpoint", "/api/"+p, "err", err)
		return fail("upstream unavailable")
	}
	if len(raw) > maxProxyResponse {
		return fail("upstream response too large")
	}
	var data any
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if dec.Decode(&data) != nil || dec.More() {
		data = map[string]any{"data": string(raw)}
	}
	if resp.StatusCode/100 != 2 {
		return map[string]any{"success": false, "data": data, "error": "upstream returned status " + strconv.Itoa(resp.StatusCode)}
	}
	return map[string]any{"success": true, "data": data, "error": nil}
}

// handleGraphQL serves POST /graphql (GraphQL over HTTP, JSON); it must be
// wrapped in requireSession.
func handleGraphQL(schema *gqlSchema) http.Handler {
	type body struct {
		Query         *string         `json:"query"`
		OperationName *string         `json:"operationName"`
		Variables     json.RawMessage `json:"variables"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var b body
		if !decodeJSON(w, r, &b) {
			return
		}
		if b.Query == nil || strings.TrimSpace(*b.Query) == "" {
			writeError(w, r, http.StatusBadRequest, "query is required", nil)
			return
		}
		req := gqlRequest{Query: *b.Query}
		if b.OperationName != nil {
			req.OperationName = *b.OperationName
		}
		if len(b.Variables) > 0 && string(b.Variables) != "null" {
			dec := json.NewDecoder(bytes.NewReader(b.Variables))
			dec.UseNumber()
			if err := dec.Decode(&req.Variables); err != nil {
				writeError(w, r, http.StatusBadRequest, "variables must be a JSON object", nil)
				return
			}
		}
		res := schema.execute(r.Context(), r, req)
		w.Header().Set("Cache-Control", "no-store")
		writeJSON(w, http.StatusOK, res)
	})
}

// graphiqlScript is the page's only inline script; its hash goes into the
// Content-Security-Policy so nothing else inline can run.
const graphiqlScript = `
const fetcher = GraphiQL.createFetcher({
  url: '/graphql',
  fetch: (url, opts) => fetch(url, Object.assign({}, opts, { credentials: 'include' })),
});
ReactDOM.createRoot(document.getElementById('graphiql')).render(React.createElement(GraphiQL, { fetcher }));
`

// handleGraphiQL serves GET /graphql: GraphiQL from a public CDN, pointed at
// /graphql, sending the session cookie with every request.
func handleGraphiQL() http.Handler {
	const cdn = "https://unpkg.com"
	page := `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>NoETL Gateway · GraphiQL</title>
<link rel="stylesheet" href="` + cdn + `/graphiql@3.8.3/graphiql.min.css">
</head>
<body style="margin:0">
<div id="graphiql" style="height:100vh"></div>
<script crossorigin src="` + cdn + `/react@18.3.1/umd/react.production.min.js"></script>
<script crossorigin src="` + cdn + `/react-dom@18.3.1/umd/react-dom.production.min.js"></script>
<script crossorigin src="` + cdn + `/graphiql@3.8.3/graphiql.min.js"></script>
<script>` + graphiqlScript + `</script>
</body>
</html>
`
	sum := sha256.Sum256([]byte(graphiqlScript))
	csp := "default-src 'none'; script-src " + cdn + " 'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'; " +
		"style-src " + cdn + " 'unsafe-inline'; font-src " + cdn + " data:; img-src " + cdn + " data:; " +
		"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Content-Security-Policy", csp)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Cache-Control", "no-store")
		h.Set("Referrer-Policy", "no-referrer")
		io.WriteString(w, page)
	})
}
