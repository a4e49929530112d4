package main

// The GraphQL type system the executor runs against, and the introspection
// types (__Schema, __Type, ...) that let GraphiQL and client libraries
// discover it. The schema is built once per app by newGatewaySchema; nothing
// here is package state.

type typeKind string

const (
	kindScalar      typeKind = "SCALAR"
	kindObject      typeKind = "OBJECT"
	kindInterface   typeKind = "INTERFACE"
	kindUnion       typeKind = "UNION"
	kindEnum        typeKind = "ENUM"
	kindInputObject typeKind = "INPUT_OBJECT"
	kindList        typeKind = "LIST"
	kindNonNull     typeKind = "NON_NULL"
)

// gqlType is a named type or a wrapper (LIST, NON_NULL around ofType).
type gqlType struct {
	kind           typeKind
	name           string
	description    string
	fields         []*gqlField
	inputFields    []*gqlInputValue
	enumValues     []*gqlEnumValue
	ofType         *gqlType
	specifiedByURL string
}

func (t *gqlType) String() string {
	switch t.kind {
	case kindList:
		return "[" + t.ofType.String() + "]"
	case kindNonNull:
		return t.ofType.String() + "!"
	}
	return t.name
}

// named strips wrappers.
func (t *gqlType) named() *gqlType {
	for t.ofType != nil {
		t = t.ofType
	}
	return t
}

func (t *gqlType) field(name string) *gqlField {
	for _, f := range t.fields {
		if f.name == name {
			return f
		}
	}
	return nil
}

func (t *gqlType) isInput() bool {
	n := t.named()
	return n.kind == kindScalar || n.kind == kindEnum || n.kind == kindInputObject
}

func nonNull(t *gqlType) *gqlType { return &gqlType{kind: kindNonNull, ofType: t} }
func listOf(t *gqlType) *gqlType  { return &gqlType{kind: kindList, ofType: t} }

// resolveFunc computes a field from its parent value and coerced arguments.
// Errors become GraphQL field errors; their text is sent to the client, so
// resolvers return only messages meant for it (see publicError).
type resolveFunc func(ec *execCtx, parent any, args map[string]any) (any, error)

type gqlField struct {
	name              string
	description       string
	args              []*gqlInputValue
	typ               *gqlType
	deprecationReason *string
	resolve           resolveFunc // nil: parent.(map[string]any)[name]
}

type gqlInputValue struct {
	name         string
	description  string
	typ          *gqlType
	defaultValue *gqlValue // a constant literal, or nil
	defaultText  string    // defaultValue as GraphQL source, for introspection
}

type gqlEnumValue struct {
	name              string
	description       string
	deprecationReason *string
}

type gqlDirectiveDef struct {
	name        string
	description string
	locations   []string
	args        []*gqlInputValue
	repeatable  bool
}

type gqlSchema struct {
	description string
	query       *gqlType
	mutation    *gqlType
	types       []*gqlType // every named type, in the order given
	byName      map[string]*gqlType
	directives  []*gqlDirectiveDef
	meta        []*gqlField // __schema and __type on the query root
}

func (s *gqlSchema) directive(name string) *gqlDirectiveDef {
	for _, d := range s.directives {
		if d.name == name {
			return d
		}
	}
	return nil
}

// constValue parses a constant literal for a default value; the source is
// fixed in this file, so a failure is a programming error.
func constValue(src string) *gqlValue {
	p := &parser{lex: lexer{src: src, line: 1, col: 1}}
	p.advance()
	return p.value(true)
}

func inputValue(name, desc string, typ *gqlType, def string) *gqlInputValue {
	iv := &gqlInputValue{name: name, description: desc, typ: typ}
	if def != "" {
		iv.defaultValue, iv.defaultText = constValue(def), def
	}
	return iv
}

// builtinScalars are the spec's scalars; a schema and the types it holds
// must share these values.
func builtinScalars() map[string]*gqlType {
	return map[string]*gqlType{
		"String":  {kind: kindScalar, name: "String", description: "The `String` scalar type represents textual data, represented as UTF-8 character sequences."},
		"Boolean": {kind: kindScalar, name: "Boolean", description: "The `Boolean` scalar type represents `true` or `false`."},
		"Int":     {kind: kindScalar, name: "Int", description: "The `Int` scalar type represents non-fractional signed whole numeric values between -(2^31) and 2^31 - 1."},
		"Float":   {kind: kindScalar, name: "Float", description: "The `Float` scalar type represents signed double-precision fractional values as specified by IEEE 754."},
		"ID":      {kind: kindScalar, name: "ID", description: "The `ID` scalar type represents a unique identifier, serialized as a String."},
	}
}

// newSchema assembles the schema around query and mutation root types and
// adds the built-in scalars, the introspection types, the root
// introspection fields and the standard directives.
func newSchema(description string, builtins map[string]*gqlType, query, mutation *gqlType, types ...*gqlType) *gqlSchema {
	s := &gqlSchema{description: description, query: query, mutation: mutation, byName: map[string]*gqlType{}}
	for _, n := range []string{"String", "Boolean", "Int", "Float", "ID"} {
		s.add(builtins[n])
	}
	str, boolean := builtins["String"], builtins["Boolean"]
	for _, t := range append([]*gqlType{query, mutation}, types...) {
		s.add(t)
	}
	s.addIntrospection()
	s.meta = s.introspectionFields()
	s.directives = []*gqlDirectiveDef{
		{name: "include", description: "Directs the executor to include this field or fragment only when the `if` argument is true.",
			locations: []string{"FIELD", "FRAGMENT_SPREAD", "INLINE_FRAGMENT"},
			args:      []*gqlInputValue{inputValue("if", "Included when true.", nonNull(boolean), "")}},
		{name: "skip", description: "Directs the executor to skip this field or fragment when the `if` argument is true.",
			locations: []string{"FIELD", "FRAGMENT_SPREAD", "INLINE_FRAGMENT"},
			args:      []*gqlInputValue{inputValue("if", "Skipped when true.", nonNull(boolean), "")}},
		{name: "deprecated", description: "Marks an element of a GraphQL schema as no longer supported.",
			locations: []string{"FIELD_DEFINITION", "ARGUMENT_DEFINITION", "INPUT_FIELD_DEFINITION", "ENUM_VALUE"},
			args:      []*gqlInputValue{inputValue("reason", "Explains why this element was deprecated.", str, `"No longer supported"`)}},
		{name: "specifiedBy", description: "Exposes a URL that specifies the behavior of this scalar.",
			locations: []string{"SCALAR"},
			args:      []*gqlInputValue{inputValue("url", "The URL that specifies the behavior of this scalar.", nonNull(str), "")}},
	}
	return s
}

func (s *gqlSchema) add(t *gqlType) {
	if t == nil || s.byName[t.name] != nil {
		return
	}
	s.byName[t.name] = t
	s.types = append(s.types, t)
}

// addIntrospection adds the introspection types of the GraphQL spec (§4.5)
// with resolvers over the schema's own Go values.
func (s *gqlSchema) addIntrospection() {
	str, boolean := s.byName["String"], s.byName["Boolean"]
	typeKindEnum := &gqlType{kind: kindEnum, name: "__TypeKind", description: "An enum describing what kind of type a given `__Type` is."}
	for _, k := range []typeKind{kindScalar, kindObject, kindInterface, kindUnion, kindEnum, kindInputObject, kindList, kindNonNull} {
		typeKindEnum.enumValues = append(typeKindEnum.enumValues, &gqlEnumValue{name: string(k)})
	}
	locEnum := &gqlType{kind: kindEnum, name: "__DirectiveLocation", description: "A Directive can be adjacent to many parts of the GraphQL language, a __DirectiveLocation describes one such possible adjacencies."}
	for _, l := range []string{"QUERY", "MUTATION", "SUBSCRIPTION", "FIELD", "FRAGMENT_DEFINITION", "FRAGMENT_SPREAD", "INLINE_FRAGMENT", "VARIABLE_DEFINITION",
		"SCHEMA", "SCALAR", "OBJECT", "FIELD_DEFINITION", "ARGUMENT_DEFINITION", "INTERFACE", "UNION", "ENUM", "ENUM_VALUE", "INPUT_OBJECT", "INPUT_FIELD_DEFINITION"} {
		locEnum.enumValues = append(locEnum.enumValues, &gqlEnumValue{name: l})
	}
	typ := &gqlType{kind: kindObject, name: "__Type", description: "The fundamental unit of any GraphQL Schema is the type."}
	field := &gqlType{kind: kindObject, name: "__Field", description: "Object and Interface types are described by a list of Fields, each of which has a name, potentially a list of arguments, and a return type."}
	input := &gqlType{kind: kindObject, name: "__InputValue", description: "Arguments provided to Fields or Directives and the input fields of an InputObject are represented as Input Values which describe their type and optionally a default value."}
	enumValue := &gqlType{kind: kindObject, name: "__EnumValue", description: "One possible value for a given Enum."}
	directive := &gqlType{kind: kindObject, name: "__Directive", description: "A Directive provides a way to describe alternate runtime execution and type validation behavior in a GraphQL document."}
	schema := &gqlType{kind: kindObject, name: "__Schema", description: "A GraphQL Schema defines the capabilities of a GraphQL server."}

	includeDeprecated := func() []*gqlInputValue {
		return []*gqlInputValue{inputValue("includeDeprecated", "", boolean, "false")}
	}
	optStr := func(p *string) any {
		if p == nil {
			return nil
		}
		return *p
	}
	nilIfEmpty := func(s string) any {
		if s == "" {
			return nil
		}
		return s
	}
	inputList := func(ivs []*gqlInputValue) []any {
		out := make([]any, len(ivs))
		for i, iv := range ivs {
			out[i] = iv
		}
		return out
	}

	schema.fields = []*gqlField{
		{name: "description", typ: str, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return nilIfEmpty(p.(*gqlSchema).description), nil
		}},
		{name: "types", description: "A list of all types supported by this server.", typ: nonNull(listOf(nonNull(typ))),
			resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
				out := []any{}
				for _, t := range p.(*gqlSchema).types {
					out = append(out, t)
				}
				return out, nil
			}},
		{name: "queryType", description: "The type that query operations will be rooted at.", typ: nonNull(typ),
			resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) { return p.(*gqlSchema).query, nil }},
		{name: "mutationType", description: "If this server supports mutation, the type that mutation operations will be rooted at.", typ: typ,
			resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
				if m := p.(*gqlSchema).mutation; m != nil {
					return m, nil
				}
				return nil, nil
			}},
		{name: "subscriptionType", description: "If this server support subscription, the type that subscription operations will be rooted at.", typ: typ,
			resolve: func(*execCtx, any, map[string]any) (any, error) { return nil, nil }},
		{name: "directives", description: "A list of all directives supported by this server.", typ: nonNull(listOf(nonNull(directive))),
			resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
				out := []any{}
				for _, d := range p.(*gqlSchema).directives {
					out = append(out, d)
				}
				return out, nil
			}},
	}

	typ.fields = []*gqlField{
		{name: "kind", typ: nonNull(typeKindEnum), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) { return string(p.(*gqlType).kind), nil }},
		{name: "name", typ: str, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) { return nilIfEmpty(p.(*gqlType).name), nil }},
		{name: "description", typ: str, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return nilIfEmpty(p.(*gqlType).description), nil
		}},
		{name: "specifiedByURL", typ: str, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return nilIfEmpty(p.(*gqlType).specifiedByURL), nil
		}},
		{name: "fields", typ: listOf(nonNull(field)), args: includeDeprecated(), resolve: func(_ *execCtx, p any, args map[string]any) (any, error) {
			t := p.(*gqlType)
			if t.kind != kindObject && t.kind != kindInterface {
				return nil, nil
			}
			out := []any{}
			for _, f := range t.fields {
				if f.deprecationReason == nil || args["includeDeprecated"] == true {
					out = append(out, f)
				}
			}
			return out, nil
		}},
		{name: "interfaces", typ: listOf(nonNull(typ)), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			if k := p.(*gqlType).kind; k == kindObject || k == kindInterface {
				return []any{}, nil
			}
			return nil, nil
		}},
		{name: "possibleTypes", typ: listOf(nonNull(typ)), resolve: func(*execCtx, any, map[string]any) (any, error) {
			// No interfaces or unions in this schema.
			return nil, nil
		}},
		{name: "enumValues", typ: listOf(nonNull(enumValue)), args: includeDeprecated(), resolve: func(_ *execCtx, p any, args map[string]any) (any, error) {
			t := p.(*gqlType)
			if t.kind != kindEnum {
				return nil, nil
			}
			out := []any{}
			for _, v := range t.enumValues {
				if v.deprecationReason == nil || args["includeDeprecated"] == true {
					out = append(out, v)
				}
			}
			return out, nil
		}},
		{name: "inputFields", typ: listOf(nonNull(input)), args: includeDeprecated(), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			t := p.(*gqlType)
			if t.kind != kindInputObject {
				return nil, nil
			}
			return inputList(t.inputFields), nil
		}},
		{name: "ofType", typ: typ, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			if o := p.(*gqlType).ofType; o != nil {
				return o, nil
			}
			return nil, nil
		}},
		{name: "isOneOf", typ: boolean, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			if p.(*gqlType).kind == kindInputObject {
				return false, nil
			}
			return nil, nil
		}},
	}

	field.fields = []*gqlField{
		{name: "name", typ: nonNull(str), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) { return p.(*gqlField).name, nil }},
		{name: "description", typ: str, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return nilIfEmpty(p.(*gqlField).description), nil
		}},
		{name: "args", typ: nonNull(listOf(nonNull(input))), args: includeDeprecated(), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return inputList(p.(*gqlField).args), nil
		}},
		{name: "type", typ: nonNull(typ), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) { return p.(*gqlField).typ, nil }},
		{name: "isDeprecated", typ: nonNull(boolean), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return p.(*gqlField).deprecationReason != nil, nil
		}},
		{name: "deprecationReason", typ: str, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return optStr(p.(*gqlField).deprecationReason), nil
		}},
	}

	input.fields = []*gqlField{
		{name: "name", typ: nonNull(str), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) { return p.(*gqlInputValue).name, nil }},
		{name: "description", typ: str, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return nilIfEmpty(p.(*gqlInputValue).description), nil
		}},
		{name: "type", typ: nonNull(typ), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) { return p.(*gqlInputValue).typ, nil }},
		{name: "defaultValue", description: "A GraphQL-formatted string representing the default value for this input value.", typ: str,
			resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
				return nilIfEmpty(p.(*gqlInputValue).defaultText), nil
			}},
		{name: "isDeprecated", typ: nonNull(boolean), resolve: func(*execCtx, any, map[string]any) (any, error) { return false, nil }},
		{name: "deprecationReason", typ: str, resolve: func(*execCtx, any, map[string]any) (any, error) { return nil, nil }},
	}

	enumValue.fields = []*gqlField{
		{name: "name", typ: nonNull(str), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) { return p.(*gqlEnumValue).name, nil }},
		{name: "description", typ: str, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return nilIfEmpty(p.(*gqlEnumValue).description), nil
		}},
		{name: "isDeprecated", typ: nonNull(boolean), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return p.(*gqlEnumValue).deprecationReason != nil, nil
		}},
		{name: "deprecationReason", typ: str, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return optStr(p.(*gqlEnumValue).deprecationReason), nil
		}},
	}

	directive.fields = []*gqlField{
		{name: "name", typ: nonNull(str), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) { return p.(*gqlDirectiveDef).name, nil }},
		{name: "description", typ: str, resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return nilIfEmpty(p.(*gqlDirectiveDef).description), nil
		}},
		{name: "isRepeatable", typ: nonNull(boolean), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return p.(*gqlDirectiveDef).repeatable, nil
		}},
		{name: "locations", typ: nonNull(listOf(nonNull(locEnum))), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			out := []any{}
			for _, l := range p.(*gqlDirectiveDef).locations {
				out = append(out, l)
			}
			return out, nil
		}},
		{name: "args", typ: nonNull(listOf(nonNull(input))), args: includeDeprecated(), resolve: func(_ *execCtx, p any, _ map[string]any) (any, error) {
			return inputList(p.(*gqlDirectiveDef).args), nil
		}},
	}

	for _, t := range []*gqlType{schema, typ, field, input, enumValue, directive, typeKindEnum, locEnum} {
		s.add(t)
	}
}

// introspectionFields are the meta fields of the query root (__schema,
// __type); __typename is handled by the executor on every object.
func (s *gqlSchema) introspectionFields() []*gqlField {
	return []*gqlField{
		{name: "__schema", typ: nonNull(s.byName["__Schema"]), resolve: func(*execCtx, any, map[string]any) (any, error) { return s, nil }},
		{name: "__type", typ: s.byName["__Type"], args: []*gqlInputValue{inputValue("name", "", nonNull(s.byName["String"]), "")},
			resolve: func(_ *execCtx, _ any, args map[string]any) (any, error) {
				if t := s.byName[args["name"].(string)]; t != nil {
					return t, nil
				}
				return nil, nil
			}},
	}
}
