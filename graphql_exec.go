package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
)

// Execution of a validated document (GraphQL spec §6): operation selection,
// variable coercion, field collection with @skip/@include and fragments,
// argument coercion, resolvers, value completion with null propagation.

// maxDocumentBytes bounds the query text; maxResolvedFields bounds the work
// one request may cause (aliases and fragments can multiply fields);
// maxMutationFields bounds the side effects: every mutation field is a
// NoETL call or a playbook run, and aliases would otherwise turn one HTTP
// request into a thousand of them, past any per-request rate limit.
const (
	maxDocumentBytes  = 64 << 10
	maxResolvedFields = 100_000
	maxMutationFields = 10
)

// publicError is a resolver error whose message is meant for the client.
// Any other resolver error is logged and reported as "internal error".
type publicError string

func (e publicError) Error() string { return string(e) }

// execCtx is the state of one GraphQL request.
type execCtx struct {
	ctx    context.Context
	r      *http.Request
	schema *gqlSchema
	frags  map[string]*gqlFragment
	vars   map[string]any
	errs   []*gqlError
	budget int
}

func (ec *execCtx) fieldError(loc gqlLoc, path []any, msg string) {
	ec.errs = append(ec.errs, &gqlError{Message: msg, Locations: []gqlLoc{loc}, Path: append([]any(nil), path...)})
}

// gqlObject is a response object that keeps its fields in selection order.
type gqlObject struct {
	keys []string
	vals []any
}

// MarshalJSON writes the whole tree in one pass: letting encoding/json
// recurse through nested MarshalJSON calls would re-compact every nested
// object once per level.
func (o *gqlObject) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	if err := o.encode(&b); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

func (o *gqlObject) encode(b *bytes.Buffer) error {
	b.WriteByte('{')
	for i, k := range o.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		b.Write(kb)
		b.WriteByte(':')
		if err := encodeResult(b, o.vals[i]); err != nil {
			return err
		}
	}
	b.WriteByte('}')
	return nil
}

func encodeResult(b *bytes.Buffer, v any) error {
	switch x := v.(type) {
	case *gqlObject:
		return x.encode(b)
	case []any:
		b.WriteByte('[')
		for i, item := range x {
			if i > 0 {
				b.WriteByte(',')
			}
			if err := encodeResult(b, item); err != nil {
				return err
			}
		}
		b.WriteByte(']')
		return nil
	case nil:
		b.WriteString("null")
		return nil
	case string:
		sb, _ := json.Marshal(x)
		b.Write(sb)
		return nil
	}
	vb, err := json.Marshal(v)
	b.Write(vb)
	return err
}

// gqlRequest is the GraphQL-over-HTTP request body.
type gqlRequest struct {
	Query         string
	OperationName string
	Variables     map[string]any // numbers as json.Number
}

// gqlResult is the response: Data is omitted (not null) when the request
// failed before execution, as the spec requires.
type gqlResult struct {
	Data   any         `json:"data"`
	Errors []*gqlError `json:"errors,omitempty"`
	// executed distinguishes "data": null after execution from no data.
	executed bool
}

func (res *gqlResult) MarshalJSON() ([]byte, error) {
	if !res.executed {
		return json.Marshal(struct {
			Errors []*gqlError `json:"errors"`
		}{res.Errors})
	}
	return json.Marshal(struct {
		Data   any         `json:"data"`
		Errors []*gqlError `json:"errors,omitempty"`
	}{res.Data, res.Errors})
}

func requestError(errs ...*gqlError) *gqlResult { return &gqlResult{Errors: errs} }

// execute runs one request against the schema.
func (s *gqlSchema) execute(ctx context.Context, r *http.Request, req gqlRequest) *gqlResult {
	if len(req.Query) > maxDocumentBytes {
		return requestError(&gqlError{Message: fmt.Sprintf("Document too large: %d bytes exceeds the limit of %d.", len(req.Query), maxDocumentBytes)})
	}
	doc, perr := parseGraphQL(req.Query)
	if perr != nil {
		return requestError(perr)
	}
	if errs := validateDocument(s, doc); len(errs) > 0 {
		return requestError(errs...)
	}
	var op *gqlOperation
	for _, o := range doc.ops {
		if req.OperationName == "" && len(doc.ops) == 1 || o.name == req.OperationName && req.OperationName != "" {
			op = o
		}
	}
	if op == nil {
		if req.OperationName != "" {
			return requestError(&gqlError{Message: fmt.Sprintf("Unknown operation named %q.", req.OperationName)})
		}
		return requestError(&gqlError{Message: "Must provide operation name if query contains multiple operations."})
	}
	ec := &execCtx{ctx: ctx, r: r, schema: s, frags: map[string]*gqlFragment{}, budget: maxResolvedFields}
	for _, f := range doc.frags {
		ec.frags[f.name] = f
	}
	vars, verrs := s.coerceVariables(op, req.Variables)
	if len(verrs) > 0 {
		return requestError(verrs...)
	}
	ec.vars = vars
	root := s.query
	if op.kind == "mutation" {
		root = s.mutation
	}
	fields, cerr := ec.collectFields(root, op.sel)
	if cerr != nil {
		return requestError(cerr)
	}
	if op.kind == "mutation" && len(fields) > maxMutationFields {
		return requestError(&gqlError{Message: fmt.Sprintf("Too many mutation fields: %d exceeds the limit of %d.", len(fields), maxMutationFields)})
	}
	data, ok := ec.executeFields(root, nil, fields, nil)
	res := &gqlResult{executed: true, Errors: ec.errs}
	if ok {
		res.Data = data
	}
	return res
}

// coerceVariables applies the operation's variable definitions to the
// request's values (GraphQL spec §6.1.2).
func (s *gqlSchema) coerceVariables(op *gqlOperation, given map[string]any) (map[string]any, []*gqlError) {
	out := map[string]any{}
	var errs []*gqlError
	for _, vd := range op.vars {
		t := s.typeFromRef(vd.typ)
		raw, present := given[vd.name]
		switch {
		case !present && vd.def != nil:
			v, err := coerceLiteral(vd.def, t, nil)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			out[vd.name] = v
		case !present && t.kind == kindNonNull:
			errs = append(errs, errAt(vd.loc, "Variable \"$%s\" of required type %q was not provided.", vd.name, t))
		case !present:
		case raw == nil && t.kind == kindNonNull:
			errs = append(errs, errAt(vd.loc, "Variable \"$%s\" of non-null type %q must not be null.", vd.name, t))
		default:
			v, msg := coerceInput(raw, t)
			if msg != "" {
				shown, _ := json.Marshal(raw)
				if len(shown) > 100 {
					shown = append(shown[:97], "..."...)
				}
				errs = append(errs, errAt(vd.loc, "Variable \"$%s\" got invalid value %s; %s", vd.name, shown, msg))
				continue
			}
			out[vd.name] = v
		}
	}
	return out, errs
}

// coerceInput coerces a JSON variable value to type t; a non-empty message
// explains a failure.
func coerceInput(v any, t *gqlType) (any, string) {
	if t.kind == kindNonNull {
		if v == nil {
			return nil, fmt.Sprintf("Expected non-nullable type %q not to be null.", t)
		}
		return coerceInput(v, t.ofType)
	}
	if v == nil {
		return nil, ""
	}
	switch t.kind {
	case kindList:
		items, ok := v.([]any)
		if !ok {
			x, msg := coerceInput(v, t.ofType)
			if msg != "" {
				return nil, msg
			}
			return []any{x}, ""
		}
		out := make([]any, len(items))
		for i, item := range items {
			x, msg := coerceInput(item, t.ofType)
			if msg != "" {
				return nil, fmt.Sprintf("at index %d: %s", i, msg)
			}
			out[i] = x
		}
		return out, ""
	case kindInputObject:
		obj, ok := v.(map[string]any)
		if !ok {
			return nil, fmt.Sprintf("Expected type %q to be an object.", t.name)
		}
		for k := range obj {
			known := false
			for _, iv := range t.inputFields {
				known = known || iv.name == k
			}
			if !known {
				return nil, fmt.Sprintf("Field %q is not defined by type %q.", k, t.name)
			}
		}
		out := map[string]any{}
		for _, iv := range t.inputFields {
			x, present := obj[iv.name]
			switch {
			case !present && iv.defaultValue != nil:
				out[iv.name], _ = coerceLiteral(iv.defaultValue, iv.typ, nil)
			case !present && iv.typ.kind == kindNonNull:
				return nil, fmt.Sprintf("Field %q of required type %q was not provided.", iv.name, iv.typ)
			case present:
				c, msg := coerceInput(x, iv.typ)
				if msg != "" {
					return nil, fmt.Sprintf("at %q: %s", iv.name, msg)
				}
				out[iv.name] = c
			}
		}
		return out, ""
	case kindEnum:
		if s, ok := v.(string); ok {
			for _, ev := range t.enumValues {
				if ev.name == s {
					return s, ""
				}
			}
		}
		return nil, fmt.Sprintf("Value is not a valid %s.", t.name)
	}
	switch t.name {
	case "String":
		if s, ok := v.(string); ok {
			return s, ""
		}
		return nil, "String cannot represent a non string value."
	case "ID":
		if s, ok := v.(string); ok {
			return s, ""
		}
		if n, ok := v.(json.Number); ok {
			if _, err := n.Int64(); err == nil {
				return n.String(), ""
			}
		}
		return nil, "ID cannot represent a non-string and non-integer value."
	case "Boolean":
		if b, ok := v.(bool); ok {
			return b, ""
		}
		return nil, "Boolean cannot represent a non boolean value."
	case "Int":
		if n, ok := v.(json.Number); ok {
			if i, err := n.Int64(); err == nil && i >= math.MinInt32 && i <= math.MaxInt32 {
				return int(i), ""
			}
			if f, err := n.Float64(); err == nil && f == math.Trunc(f) && f >= math.MinInt32 && f <= math.MaxInt32 {
				return int(f), ""
			}
		}
		return nil, "Int cannot represent a non 32-bit signed integer value."
	case "Float":
		if n, ok := v.(json.Number); ok {
			if f, err := n.Float64(); err == nil {
				return f, ""
			}
		}
		return nil, "Float cannot represent a non numeric value."
	case "JSON":
		return v, ""
	}
	return nil, fmt.Sprintf("Unknown type %q.", t.name)
}

// collectedField is one response key with every field node that feeds it.
type collectedField struct {
	key   string
	nodes []*gqlSelection
}

// collectFields flattens a selection set for an object type (GraphQL spec
// §6.3.2), applying @skip/@include and fragments. Two fields under one
// response key must be the same field with the same arguments.
func (ec *execCtx) collectFields(t *gqlType, sels []*gqlSelection) ([]*collectedField, *gqlError) {
	var out []*collectedField
	index := map[string]*collectedField{}
	visited := map[string]bool{}
	var walk func(sels []*gqlSelection) *gqlError
	walk = func(sels []*gqlSelection) *gqlError {
		for _, sel := range sels {
			if !ec.included(sel.directives) {
				continue
			}
			switch sel.kind {
			case selField:
				cf := index[sel.key()]
				if cf == nil {
					cf = &collectedField{key: sel.key()}
					index[sel.key()] = cf
					out = append(out, cf)
				} else if first := cf.nodes[0]; first.name != sel.name || printArgs(first.args) != printArgs(sel.args) {
					return &gqlError{
						Message:   fmt.Sprintf("Fields %q conflict because they are different fields or have different arguments. Use different aliases on the fields to fetch both if this was intentional.", sel.key()),
						Locations: []gqlLoc{first.loc, sel.loc},
					}
				}
				cf.nodes = append(cf.nodes, sel)
			case selSpread:
				if visited[sel.name] {
					continue
				}
				visited[sel.name] = true
				f := ec.frags[sel.name]
				if f == nil || f.typeCond != t.name {
					continue
				}
				if err := walk(f.sel); err != nil {
					return err
				}
			case selInline:
				if sel.typeCond != "" && sel.typeCond != t.name {
					continue
				}
				if err := walk(sel.sel); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return out, walk(sels)
}

func printArgs(args []*gqlArgument) string {
	parts := make([]string, len(args))
	for i, a := range args {
		parts[i] = a.name + ":" + printValue(a.val)
	}
	// Argument order does not matter.
	for i := 1; i < len(parts); i++ {
		for j := i; j > 0 && parts[j] < parts[j-1]; j-- {
			parts[j], parts[j-1] = parts[j-1], parts[j]
		}
	}
	return strings.Join(parts, ",")
}

// included evaluates @skip and @include (validated: if: Boolean!).
func (ec *execCtx) included(ds []*gqlDirective) bool {
	for _, d := range ds {
		if d.name != "skip" && d.name != "include" {
			continue
		}
		cond := false
		for _, a := range d.args {
			if a.name == "if" {
				v, _ := coerceLiteral(a.val, nonNull(ec.schema.byName["Boolean"]), ec.vars)
				cond, _ = v.(bool)
			}
		}
		if d.name == "skip" && cond || d.name == "include" && !cond {
			return false
		}
	}
	return true
}

// executeFields resolves collected fields in order (serially, which is what
// mutations require and queries allow). ok is false when a non-null field
// failed, so the object itself becomes null in its parent.
func (ec *execCtx) executeFields(t *gqlType, parent any, fields []*collectedField, path []any) (*gqlObject, bool) {
	obj := &gqlObject{}
	for _, cf := range fields {
		node := cf.nodes[0]
		fpath := append(path[:len(path):len(path)], cf.key)
		if node.name == "__typename" {
			obj.keys, obj.vals = append(obj.keys, cf.key), append(obj.vals, t.name)
			continue
		}
		if ec.budget--; ec.budget < 0 {
			if ec.budget == -1 {
				ec.fieldError(node.loc, fpath, "Query is too complex: it resolves too many fields.")
			}
			return nil, false
		}
		f := ec.schema.fieldOf(t, node.name)
		v, ok := ec.resolveField(t, f, parent, node, fpath)
		if !ok {
			if f.typ.kind == kindNonNull {
				return nil, false
			}
			v = nil
		} else {
			var sub []*gqlSelection
			for _, n := range cf.nodes {
				sub = append(sub, n.sel...)
			}
			if v, ok = ec.complete(f.typ, sub, v, fpath, node.loc, t.name+"."+f.name); !ok {
				return nil, false
			}
		}
		obj.keys, obj.vals = append(obj.keys, cf.key), append(obj.vals, v)
	}
	return obj, true
}

// resolveField coerces the arguments and calls the resolver; ok is false
// after a field error has been recorded.
func (ec *execCtx) resolveField(t *gqlType, f *gqlField, parent any, node *gqlSelection, path []any) (any, bool) {
	args := map[string]any{}
	for _, def := range f.args {
		var lit *gqlArgument
		for _, a := range node.args {
			if a.name == def.name {
				lit = a
			}
		}
		absent := lit == nil
		if lit != nil && lit.val.kind == valVar {
			_, present := ec.vars[lit.val.s]
			absent = !present
		}
		switch {
		case absent && def.defaultValue != nil:
			args[def.name], _ = coerceLiteral(def.defaultValue, def.typ, nil)
		case absent && def.typ.kind == kindNonNull:
			ec.fieldError(node.loc, path, fmt.Sprintf("Argument %q of required type %q was not provided.", def.name, def.typ))
			return nil, false
		case absent:
		default:
			v, err := coerceLiteral(lit.val, def.typ, ec.vars)
			if err != nil {
				ec.fieldError(err.Locations[0], path, err.Message)
				return nil, false
			}
			args[def.name] = v
		}
	}
	if f.resolve == nil {
		m, _ := parent.(map[string]any)
		return m[f.name], true
	}
	v, err := f.resolve(ec, parent, args)
	if err != nil {
		var pe publicError
		msg := "internal error"
		if errors.As(err, &pe) {
			msg = string(pe)
		} else {
			loggerFrom(ec.r).Error("graphql resolver failed", "field", t.name+"."+f.name, "err", err)
		}
		ec.fieldError(node.loc, path, msg)
		return nil, false
	}
	return v, true
}

// complete turns a resolved value into response data of type t. ok false
// means a null where t is non-null: the error is recorded and the null
// propagates to the nearest nullable parent.
func (ec *execCtx) complete(t *gqlType, sels []*gqlSelection, v any, path []any, loc gqlLoc, field string) (any, bool) {
	if t.kind == kindNonNull {
		out, ok := ec.completeNullable(t.ofType, sels, v, path, loc, field)
		if !ok {
			return nil, false
		}
		if out == nil {
			ec.fieldError(loc, path, fmt.Sprintf("Cannot return null for non-nullable field %s.", field))
			return nil, false
		}
		return out, true
	}
	out, ok := ec.completeNullable(t, sels, v, path, loc, field)
	if !ok {
		return nil, true
	}
	return out, true
}

func (ec *execCtx) completeNullable(t *gqlType, sels []*gqlSelection, v any, path []any, loc gqlLoc, field string) (any, bool) {
	if v == nil {
		return nil, true
	}
	switch t.kind {
	case kindList:
		items, ok := v.([]any)
		if !ok {
			ec.fieldError(loc, path, fmt.Sprintf("Expected a list for field %s.", field))
			return nil, false
		}
		out := make([]any, len(items))
		for i, item := range items {
			c, ok := ec.complete(t.ofType, sels, item, append(path[:len(path):len(path)], i), loc, field)
			if !ok {
				return nil, false
			}
			out[i] = c
		}
		return out, true
	case kindObject:
		fields, err := ec.collectFields(t, sels)
		if err != nil {
			ec.errs = append(ec.errs, &gqlError{Message: err.Message, Locations: err.Locations, Path: append([]any(nil), path...)})
			return nil, false
		}
		obj, ok := ec.executeFields(t, v, fields, path)
		if !ok {
			return nil, false
		}
		return obj, true
	}
	if out, ok := serializeScalar(t, v); ok {
		return out, true
	}
	ec.fieldError(loc, path, fmt.Sprintf("%s cannot represent value of field %s.", t.name, field))
	return nil, false
}

// serializeScalar checks a resolver's value against a leaf type.
func serializeScalar(t *gqlType, v any) (any, bool) {
	switch t.name {
	case "String", "ID":
		s, ok := v.(string)
		return s, ok
	case "Boolean":
		b, ok := v.(bool)
		return b, ok
	case "Int":
		switch n := v.(type) {
		case int:
			return n, n >= math.MinInt32 && n <= math.MaxInt32
		case int64:
			return n, n >= math.MinInt32 && n <= math.MaxInt32
		}
		return nil, false
	case "Float":
		switch n := v.(type) {
		case float64:
			return n, !math.IsInf(n, 0) && !math.IsNaN(n)
		case int:
			return float64(n), true
		}
		return nil, false
	case "JSON":
		return v, true
	}
	if t.kind == kindEnum {
		s, ok := v.(string)
		return s, ok
	}
	return nil, false
}
