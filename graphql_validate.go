package main

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Validation of a parsed document against the schema (GraphQL spec §5), the
// rules real clients run into: operations, fields, arguments, fragments,
// variables, directives, leaf selections, plus the gateway's depth limit.
// Field-merge conflicts are caught while collecting fields at execution.

// maxQueryDepth bounds nested field selections. The standard introspection
// query needs 13 with graphql-js 16's seven-level TypeRef fragment, 15 with
// the nine levels newer clients send.
const maxQueryDepth = 20

type varUsage struct {
	name       string
	locType    *gqlType // nil inside a JSON literal: any variable fits
	locDefault bool     // the argument or input field has a default
	loc        gqlLoc
}

type validator struct {
	s       *gqlSchema
	doc     *gqlDocument
	frags   map[string]*gqlFragment
	errs    []*gqlError
	usages  []varUsage // of the selection set being walked
	fragUse map[string][]varUsage
	fragDep map[string]int
	spreads map[string][]string // fragment → fragments it spreads
	current string              // fragment being validated ("" for an operation)
}

func (v *validator) fail(loc gqlLoc, format string, args ...any) {
	v.errs = append(v.errs, errAt(loc, format, args...))
}

// validateDocument returns every validation error of doc.
func validateDocument(s *gqlSchema, doc *gqlDocument) []*gqlError {
	v := &validator{s: s, doc: doc, frags: map[string]*gqlFragment{}, fragUse: map[string][]varUsage{},
		fragDep: map[string]int{}, spreads: map[string][]string{}}
	if len(doc.ops) == 0 {
		v.fail(gqlLoc{1, 1}, "The document contains no operation to execute.")
	}
	for _, f := range doc.frags {
		if v.frags[f.name] != nil {
			v.fail(f.loc, "There can be only one fragment named %q.", f.name)
			continue
		}
		v.frags[f.name] = f
	}
	// Fragments are validated once each, against their own type condition
	// (every type here is an object, so a spread is valid only on exactly
	// that type); operations then reuse the recorded variable usages.
	for _, f := range doc.frags {
		if v.frags[f.name] != f {
			continue
		}
		t := s.byName[f.typeCond]
		switch {
		case t == nil:
			v.fail(f.loc, "Unknown type %q.", f.typeCond)
		case t.kind != kindObject:
			v.fail(f.loc, "Fragment %q cannot condition on non composite type %q.", f.name, f.typeCond)
		default:
			v.usages, v.current = nil, f.name
			v.directives(f.directives, "FRAGMENT_DEFINITION")
			v.selections(t, f.sel)
			v.fragUse[f.name] = v.usages
		}
	}
	v.current = ""
	v.checkCycles()
	used := map[string]bool{}
	names := map[string]bool{}
	for _, op := range doc.ops {
		if op.name == "" && len(doc.ops) > 1 {
			v.fail(op.loc, "This anonymous operation must be the only defined operation.")
		}
		if op.name != "" {
			if names[op.name] {
				v.fail(op.loc, "There can be only one operation named %q.", op.name)
			}
			names[op.name] = true
		}
		v.operation(op, used)
	}
	for _, f := range doc.frags {
		if !used[f.name] {
			v.fail(f.loc, "Fragment %q is never used.", f.name)
		}
	}
	return v.errs
}

func (v *validator) operation(op *gqlOperation, usedFrags map[string]bool) {
	var root *gqlType
	switch op.kind {
	case "query":
		root = v.s.query
	case "mutation":
		root = v.s.mutation
	case "subscription":
		v.fail(op.loc, "Subscriptions are not supported.")
		return
	}
	v.directives(op.directives, strings.ToUpper(op.kind))
	vars := map[string]*gqlVarDef{}
	varTypes := map[string]*gqlType{}
	for _, vd := range op.vars {
		if vars[vd.name] != nil {
			v.fail(vd.loc, "There can be only one variable named \"$%s\".", vd.name)
			continue
		}
		vars[vd.name] = vd
		t := v.s.typeFromRef(vd.typ)
		if t == nil {
			v.fail(vd.typ.loc, "Unknown type %q.", vd.typ.named())
			continue
		}
		if !t.isInput() {
			v.fail(vd.loc, "Variable \"$%s\" cannot be non-input type %q.", vd.name, t)
			continue
		}
		varTypes[vd.name] = t
		if vd.def != nil {
			if _, err := coerceLiteral(vd.def, t, nil); err != nil {
				v.errs = append(v.errs, err)
			}
		}
	}
	v.usages = nil
	v.selections(root, op.sel)
	if d := v.depth(op.sel, map[string]bool{}); d > maxQueryDepth {
		v.fail(op.loc, "Query is nested too deeply: depth %d exceeds the limit of %d.", d, maxQueryDepth)
	}
	usages := v.usages
	seen := map[string]bool{}
	var walk func(name string)
	walk = func(name string) {
		if seen[name] || v.frags[name] == nil {
			return
		}
		seen[name] = true
		usedFrags[name] = true
		usages = append(usages, v.fragUse[name]...)
		for _, n := range v.spreads[name] {
			walk(n)
		}
	}
	for _, n := range v.spreads[""] {
		walk(n)
	}
	v.spreads[""] = nil
	opName := ""
	if op.name != "" {
		opName = fmt.Sprintf(" by operation %q", op.name)
	}
	usedVars := map[string]bool{}
	for _, u := range usages {
		vd := vars[u.name]
		if vd == nil {
			v.fail(u.loc, "Variable \"$%s\" is not defined%s.", u.name, opName)
			continue
		}
		usedVars[u.name] = true
		vt := varTypes[u.name]
		if vt == nil || u.locType == nil {
			continue
		}
		loc := u.locType
		if loc.kind == kindNonNull && vt.kind != kindNonNull && (u.locDefault || vd.def != nil && vd.def.kind != valNull) {
			loc = loc.ofType
		}
		if !typeFits(vt, loc) {
			v.fail(u.loc, "Variable \"$%s\" of type %q used in position expecting type %q.", u.name, vt, u.locType)
		}
	}
	for _, vd := range op.vars {
		if !usedVars[vd.name] {
			name := ""
			if op.name != "" {
				name = fmt.Sprintf(" in operation %q", op.name)
			}
			v.fail(vd.loc, "Variable \"$%s\" is never used%s.", vd.name, name)
		}
	}
}

// typeFits reports whether a variable of type vt may be used where lt is
// expected.
func typeFits(vt, lt *gqlType) bool {
	switch {
	case lt.kind == kindNonNull:
		return vt.kind == kindNonNull && typeFits(vt.ofType, lt.ofType)
	case vt.kind == kindNonNull:
		return typeFits(vt.ofType, lt)
	case lt.kind == kindList:
		return vt.kind == kindList && typeFits(vt.ofType, lt.ofType)
	case vt.kind == kindList:
		return false
	}
	return vt.name == lt.name
}

func (v *validator) selections(t *gqlType, sels []*gqlSelection) {
	for _, sel := range sels {
		switch sel.kind {
		case selField:
			v.directives(sel.directives, "FIELD")
			v.field(t, sel)
		case selSpread:
			v.directives(sel.directives, "FRAGMENT_SPREAD")
			f := v.frags[sel.name]
			if f == nil {
				v.fail(sel.loc, "Unknown fragment %q.", sel.name)
				continue
			}
			v.spreads[v.current] = append(v.spreads[v.current], sel.name)
			if ft := v.s.byName[f.typeCond]; ft != nil && ft != t {
				v.fail(sel.loc, "Fragment %q cannot be spread here as objects of type %q can never be of type %q.", sel.name, t.name, f.typeCond)
			}
		case selInline:
			v.directives(sel.directives, "INLINE_FRAGMENT")
			it := t
			if sel.typeCond != "" {
				it = v.s.byName[sel.typeCond]
				switch {
				case it == nil:
					v.fail(sel.loc, "Unknown type %q.", sel.typeCond)
					continue
				case it.kind != kindObject:
					v.fail(sel.loc, "Fragment cannot condition on non composite type %q.", sel.typeCond)
					continue
				case it != t:
					v.fail(sel.loc, "Fragment cannot be spread here as objects of type %q can never be of type %q.", t.name, sel.typeCond)
					continue
				}
			}
			v.selections(it, sel.sel)
		}
	}
}

func (v *validator) field(t *gqlType, sel *gqlSelection) {
	if sel.name == "__typename" {
		if len(sel.args) > 0 {
			v.fail(sel.args[0].loc, "Unknown argument %q on field \"%s.__typename\".", sel.args[0].name, t.name)
		}
		if sel.sel != nil {
			v.fail(sel.loc, "Field \"__typename\" must not have a selection since type \"String!\" has no subfields.")
		}
		return
	}
	f := v.s.fieldOf(t, sel.name)
	if f == nil {
		v.fail(sel.loc, "Cannot query field %q on type %q.", sel.name, t.name)
		return
	}
	v.arguments(sel.args, f.args, sel.loc, fmt.Sprintf("field \"%s.%s\"", t.name, f.name))
	nt := f.typ.named()
	switch {
	case nt.kind == kindObject && sel.sel == nil:
		v.fail(sel.loc, "Field %q of type %q must have a selection of subfields. Did you mean \"%s { ... }\"?", sel.name, f.typ, sel.name)
	case nt.kind != kindObject && sel.sel != nil:
		v.fail(sel.loc, "Field %q must not have a selection since type %q has no subfields.", sel.name, f.typ)
	case sel.sel != nil:
		v.selections(nt, sel.sel)
	}
}

func (v *validator) arguments(args []*gqlArgument, defs []*gqlInputValue, loc gqlLoc, owner string) {
	given := map[string]bool{}
	for _, a := range args {
		if given[a.name] {
			v.fail(a.loc, "There can be only one argument named %q.", a.name)
			continue
		}
		given[a.name] = true
		var def *gqlInputValue
		for _, d := range defs {
			if d.name == a.name {
				def = d
			}
		}
		if def == nil {
			v.fail(a.loc, "Unknown argument %q on %s.", a.name, owner)
			continue
		}
		v.value(a.val, def.typ, def.defaultValue != nil)
	}
	for _, d := range defs {
		if d.typ.kind == kindNonNull && d.defaultValue == nil && !given[d.name] {
			v.fail(loc, "Argument %q of type %q is required on %s, but it was not provided.", d.name, d.typ, owner)
		}
	}
}

// value checks a literal against its expected type, recording variable
// usages for the operation-level checks.
func (v *validator) value(val *gqlValue, t *gqlType, hasDefault bool) {
	var record func(val *gqlValue, t *gqlType, hasDefault bool)
	record = func(val *gqlValue, t *gqlType, hasDefault bool) {
		switch {
		case val.kind == valVar:
			v.usages = append(v.usages, varUsage{name: val.s, locType: t, locDefault: hasDefault, loc: val.loc})
		case t == nil || t.named().name == "JSON":
			for _, item := range val.list {
				record(item, nil, false)
			}
			for _, f := range val.fields {
				record(f.val, nil, false)
			}
		case val.kind == valList:
			it := t
			if it.kind == kindNonNull {
				it = it.ofType
			}
			if it.kind == kindList {
				it = it.ofType
			}
			for _, item := range val.list {
				record(item, it, false)
			}
		case val.kind == valObject:
			if n := t.named(); n.kind == kindInputObject {
				for _, f := range val.fields {
					for _, iv := range n.inputFields {
						if iv.name == f.name {
							record(f.val, iv.typ, iv.defaultValue != nil)
						}
					}
				}
			}
		}
	}
	record(val, t, hasDefault)
	if _, err := coerceLiteral(val, t, nil); err != nil {
		v.errs = append(v.errs, err)
	}
}

func (v *validator) directives(ds []*gqlDirective, location string) {
	seen := map[string]bool{}
	for _, d := range ds {
		def := v.s.directive(d.name)
		if def == nil {
			v.fail(d.loc, "Unknown directive \"@%s\".", d.name)
			continue
		}
		ok := false
		for _, l := range def.locations {
			ok = ok || l == location
		}
		if !ok {
			v.fail(d.loc, "Directive \"@%s\" may not be used on %s.", d.name, location)
			continue
		}
		if seen[d.name] && !def.repeatable {
			v.fail(d.loc, "The directive \"@%s\" can only be used once at this location.", d.name)
		}
		seen[d.name] = true
		v.arguments(d.args, def.args, d.loc, "directive \"@"+d.name+"\"")
	}
}

// checkCycles refuses fragments that spread themselves, directly or not.
func (v *validator) checkCycles() {
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, loc gqlLoc) bool
	visit = func(name string, loc gqlLoc) bool {
		switch state[name] {
		case 1:
			v.fail(loc, "Cannot spread fragment %q within itself.", name)
			return false
		case 2:
			return true
		}
		state[name] = 1
		for _, n := range v.spreads[name] {
			if v.frags[n] != nil && !visit(n, v.frags[n].loc) {
				state[name] = 2
				return false
			}
		}
		state[name] = 2
		return true
	}
	for _, f := range v.doc.frags {
		visit(f.name, f.loc)
	}
}

// depth is the deepest field nesting of sels, fragments included; a
// fragment on the current path counts 0 (the cycle is reported elsewhere).
func (v *validator) depth(sels []*gqlSelection, path map[string]bool) int {
	d := 0
	for _, sel := range sels {
		n := 0
		switch sel.kind {
		case selField:
			n = 1 + v.depth(sel.sel, path)
		case selInline:
			n = v.depth(sel.sel, path)
		case selSpread:
			f := v.frags[sel.name]
			if f == nil || path[sel.name] {
				continue
			}
			if memo, ok := v.fragDep[sel.name]; ok {
				n = memo
				break
			}
			path[sel.name] = true
			n = v.depth(f.sel, path)
			delete(path, sel.name)
			v.fragDep[sel.name] = n
		}
		d = max(d, n)
	}
	return d
}

func (t *gqlTypeRef) named() string {
	for t.elem != nil {
		t = t.elem
	}
	return t.name
}

// typeFromRef resolves a written type, or nil when its name is unknown.
func (s *gqlSchema) typeFromRef(r *gqlTypeRef) *gqlType {
	var t *gqlType
	if r.elem != nil {
		inner := s.typeFromRef(r.elem)
		if inner == nil {
			return nil
		}
		t = listOf(inner)
	} else if t = s.byName[r.name]; t == nil {
		return nil
	}
	if r.nonNull {
		t = nonNull(t)
	}
	return t
}

// fieldOf finds a field of t, including the root meta fields of the query
// type (__schema, __type).
func (s *gqlSchema) fieldOf(t *gqlType, name string) *gqlField {
	if t == s.query {
		for _, f := range s.meta {
			if f.name == name {
				return f
			}
		}
	}
	return t.field(name)
}

// coerceLiteral turns a literal into a Go value of type t (GraphQL spec
// §3.10 input coercion). vars holds the coerced variables at execution; with
// vars nil (validation) a variable is accepted and yields nil.
func coerceLiteral(val *gqlValue, t *gqlType, vars map[string]any) (any, *gqlError) {
	bad := func() (any, *gqlError) {
		return nil, errAt(val.loc, "Expected value of type %q, found %s.", t, printValue(val))
	}
	if val.kind == valVar {
		if vars == nil {
			return nil, nil
		}
		x, ok := vars[val.s]
		if !ok {
			return nil, nil
		}
		if x == nil && t.kind == kindNonNull {
			return nil, errAt(val.loc, "Variable \"$%s\" of type %q must not be null here.", val.s, t)
		}
		return x, nil
	}
	if t.kind == kindNonNull {
		if val.kind == valNull {
			return bad()
		}
		x, err := coerceLiteral(val, t.ofType, vars)
		if err != nil && err.Locations[0] == val.loc && strings.HasPrefix(err.Message, "Expected value of type") {
			// Name the type as written, "String!" rather than "String".
			return bad()
		}
		return x, err
	}
	if val.kind == valNull {
		return nil, nil
	}
	switch t.kind {
	case kindList:
		if val.kind != valList {
			x, err := coerceLiteral(val, t.ofType, vars)
			if err != nil {
				return nil, err
			}
			return []any{x}, nil
		}
		out := make([]any, 0, len(val.list))
		for _, item := range val.list {
			x, err := coerceLiteral(item, t.ofType, vars)
			if err != nil {
				return nil, err
			}
			out = append(out, x)
		}
		return out, nil
	case kindInputObject:
		if val.kind != valObject {
			return bad()
		}
		out := map[string]any{}
		for _, f := range val.fields {
			if _, dup := out[f.name]; dup {
				return nil, errAt(f.loc, "There can be only one input field named %q.", f.name)
			}
			var def *gqlInputValue
			for _, iv := range t.inputFields {
				if iv.name == f.name {
					def = iv
				}
			}
			if def == nil {
				return nil, errAt(f.loc, "Field %q is not defined by type %q.", f.name, t.name)
			}
			x, err := coerceLiteral(f.val, def.typ, vars)
			if err != nil {
				return nil, err
			}
			if f.val.kind == valVar && vars != nil {
				if _, ok := vars[f.val.s]; !ok {
					continue
				}
			}
			out[f.name] = x
		}
		for _, iv := range t.inputFields {
			if _, ok := out[iv.name]; ok {
				continue
			}
			if iv.defaultValue != nil {
				out[iv.name], _ = coerceLiteral(iv.defaultValue, iv.typ, nil)
			} else if iv.typ.kind == kindNonNull {
				return nil, errAt(val.loc, "Field \"%s.%s\" of required type %q was not provided.", t.name, iv.name, iv.typ)
			}
		}
		return out, nil
	case kindEnum:
		if val.kind == valEnum {
			for _, ev := range t.enumValues {
				if ev.name == val.s {
					return val.s, nil
				}
			}
		}
		return bad()
	}
	switch t.name {
	case "String":
		if val.kind == valString {
			return val.s, nil
		}
	case "ID":
		if val.kind == valString || val.kind == valInt {
			return val.s, nil
		}
	case "Boolean":
		if val.kind == valBool {
			return val.s == "true", nil
		}
	case "Int":
		if val.kind == valInt {
			if n, err := strconv.ParseInt(val.s, 10, 32); err == nil {
				return int(n), nil
			}
		}
	case "Float":
		if val.kind == valInt || val.kind == valFloat {
			if f, err := strconv.ParseFloat(val.s, 64); err == nil && !math.IsInf(f, 0) {
				return f, nil
			}
		}
	case "JSON":
		return jsonLiteral(val, vars), nil
	}
	return bad()
}

// jsonLiteral converts any literal to the JSON scalar's Go value; numbers
// keep their exact text.
func jsonLiteral(val *gqlValue, vars map[string]any) any {
	switch val.kind {
	case valVar:
		return vars[val.s]
	case valInt, valFloat:
		return json.Number(val.s)
	case valString, valEnum:
		return val.s
	case valBool:
		return val.s == "true"
	case valList:
		out := make([]any, 0, len(val.list))
		for _, item := range val.list {
			out = append(out, jsonLiteral(item, vars))
		}
		return out
	case valObject:
		out := map[string]any{}
		for _, f := range val.fields {
			out[f.name] = jsonLiteral(f.val, vars)
		}
		return out
	}
	return nil
}

// printValue renders a literal as GraphQL source, for messages and for
// comparing arguments of merged fields.
func printValue(val *gqlValue) string {
	switch val.kind {
	case valVar:
		return "$" + val.s
	case valString:
		b, _ := json.Marshal(val.s)
		return string(b)
	case valList:
		parts := make([]string, len(val.list))
		for i, item := range val.list {
			parts[i] = printValue(item)
		}
		return "[" + strings.Join(parts, ", ") + "]"
	case valObject:
		parts := make([]string, len(val.fields))
		for i, f := range val.fields {
			parts[i] = f.name + ": " + printValue(f.val)
		}
		return "{" + strings.Join(parts, ", ") + "}"
	}
	return val.s
}
