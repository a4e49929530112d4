package main

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// introspectionQuery is the standard query GraphiQL sends (graphql-js
// getIntrospectionQuery with descriptions, specifiedByURL, isRepeatable,
// schema description, input value deprecation and oneOf enabled).
const introspectionQuery = `
    query IntrospectionQuery {
      __schema {
        description
        queryType { name kind }
        mutationType { name kind }
        subscriptionType { name kind }
        types {
          ...FullType
        }
        directives {
          name
          description
          isRepeatable
          locations
          args(includeDeprecated: true) {
            ...InputValue
          }
        }
      }
    }

    fragment FullType on __Type {
      kind
      name
      description
      specifiedByURL
      isOneOf
      fields(includeDeprecated: true) {
        name
        description
        args(includeDeprecated: true) {
          ...InputValue
        }
        type {
          ...TypeRef
        }
        isDeprecated
        deprecationReason
      }
      inputFields(includeDeprecated: true) {
        ...InputValue
      }
      interfaces {
        ...TypeRef
      }
      enumValues(includeDeprecated: true) {
        name
        description
        isDeprecated
        deprecationReason
      }
      possibleTypes {
        ...TypeRef
      }
    }

    fragment InputValue on __InputValue {
      name
      description
      type { ...TypeRef }
      defaultValue
      isDeprecated
      deprecationReason
    }

    fragment TypeRef on __Type {
      kind
      name
      ofType {
        kind
        name
        ofType {
          kind
          name
          ofType {
            kind
            name
            ofType {
              kind
              name
              ofType {
                kind
                name
                ofType {
                  kind
                  name
                  ofType {
                    kind
                    name
                    ofType {
                      kind
                      name
                      ofType {
                        kind
                        name
                      }
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
`

func TestGraphQLIntrospection(t *testing.T) {
	t.Parallel()
	s := testSchema(t)
	res := runGQL(t, s, introspectionQuery, nil, "IntrospectionQuery")
	if res["errors"] != nil {
		t.Fatalf("errors: %v", res["errors"])
	}
	var out struct {
		Schema struct {
			Description  *string
			QueryType    struct{ Name, Kind string }
			MutationType *struct{ Name, Kind string }
			Subscription *struct{ Name string } `json:"subscriptionType"`
			Types        []introType
			Directives   []struct {
				Name         string
				IsRepeatable *bool
				Locations    []string
				Args         []introInput
			}
		} `json:"__schema"`
	}
	if err := json.Unmarshal([]byte(jsonOf(res["data"])), &out); err != nil {
		t.Fatal(err)
	}
	sc := out.Schema
	types := map[string]introType{}
	for _, ty := range sc.Types {
		if ty.Name == nil {
			t.Fatalf("named type without name: %+v", ty)
		}
		if _, dup := types[*ty.Name]; dup {
			t.Errorf("type %s listed twice", *ty.Name)
		}
		types[*ty.Name] = ty
	}
	kinds := map[string]bool{"SCALAR": true, "OBJECT": true, "INTERFACE": true, "UNION": true, "ENUM": true, "INPUT_OBJECT": true}
	// checkRef: every reference resolves to a listed type of a fitting kind.
	var checkRef func(where string, r *introRef, input bool)
	checkRef = func(where string, r *introRef, input bool) {
		if r == nil {
			t.Errorf("%s: missing type", where)
			return
		}
		switch r.Kind {
		case "NON_NULL", "LIST":
			if r.Name != nil || r.OfType == nil {
				t.Errorf("%s: malformed wrapper %+v", where, r)
				return
			}
			if r.Kind == "NON_NULL" && r.OfType.Kind == "NON_NULL" {
				t.Errorf("%s: non-null of non-null", where)
			}
			checkRef(where, r.OfType, input)
			return
		}
		if r.Name == nil {
			t.Errorf("%s: named type without name", where)
			return
		}
		ty, ok := types[*r.Name]
		if !ok {
			t.Errorf("%s: references unknown type %s", where, *r.Name)
			return
		}
		if ty.Kind != r.Kind {
			t.Errorf("%s: %s has kind %s, referenced as %s", where, *r.Name, ty.Kind, r.Kind)
		}
		if input && ty.Kind != "SCALAR" && ty.Kind != "ENUM" && ty.Kind != "INPUT_OBJECT" {
			t.Errorf("%s: input position uses output type %s", where, *r.Name)
		}
		if !input && ty.Kind == "INPUT_OBJECT" {
			t.Errorf("%s: output position uses input type %s", where, *r.Name)
		}
	}
	for name, ty := range types {
		if !kinds[ty.Kind] {
			t.Errorf("%s: kind %s", name, ty.Kind)
		}
		switch ty.Kind {
		case "OBJECT":
			if len(ty.Fields) == 0 || ty.Interfaces == nil {
				t.Errorf("%s: object needs fields and an interfaces list", name)
			}
			for _, f := range ty.Fields {
				checkRef(name+"."+f.Name, f.Type, false)
				for _, a := range f.Args {
					checkRef(name+"."+f.Name+"("+a.Name+")", a.Type, true)
				}
			}
		case "INPUT_OBJECT":
			if len(ty.InputFields) == 0 || ty.Fields != nil {
				t.Errorf("%s: input object shape", name)
			}
			for _, f := range ty.InputFields {
				checkRef(name+"."+f.Name, f.Type, true)
			}
		case "ENUM":
			if len(ty.EnumValues) == 0 {
				t.Errorf("%s: enum without values", name)
			}
		case "SCALAR":
			if ty.Fields != nil || ty.InputFields != nil || ty.EnumValues != nil || ty.Interfaces != nil {
				t.Errorf("%s: scalar with members", name)
			}
		}
	}
	for _, want := range []string{"String", "Boolean", "Int", "Float", "ID", "JSON", "QueryRoot", "MutationRoot", "ExecuteResult",
		"ProxyResponse", "ProxyRequestInput", "__Schema", "__Type", "__Field", "__InputValue", "__EnumValue", "__Directive", "__TypeKind", "__DirectiveLocation"} {
		if _, ok := types[want]; !ok {
			t.Errorf("type %s missing", want)
		}
	}
	if sc.QueryType.Name != "QueryRoot" || sc.MutationType == nil || sc.MutationType.Name != "MutationRoot" || sc.Subscription != nil {
		t.Errorf("roots: %+v %+v %+v", sc.QueryType, sc.MutationType, sc.Subscription)
	}
	dirs := map[string]bool{}
	for _, d := range sc.Directives {
		dirs[d.Name] = true
		if d.IsRepeatable == nil || len(d.Locations) == 0 {
			t.Errorf("directive %s shape", d.Name)
		}
		for _, a := range d.Args {
			checkRef("@"+d.Name+"("+a.Name+")", a.Type, true)
		}
	}
	if !dirs["skip"] || !dirs["include"] || !dirs["deprecated"] {
		t.Errorf("directives: %v", dirs)
	}
	// The original's schema, field by field (REFERENCE §6).
	mut := types["MutationRoot"]
	var sig []string
	for _, f := range mut.Fields {
		var args []string
		for _, a := range f.Args {
			args = append(args, a.Name+":"+a.Type.String())
		}
		sig = append(sig, f.Name+"("+strings.Join(args, ",")+"):"+f.Type.String())
	}
	want := []string{"executePlaybook(name:String!,variables:JSON,clientId:String):ExecuteResult!", "proxyRequest(input:ProxyRequestInput!):ProxyResponse!"}
	if !reflect.DeepEqual(sig, want) {
		t.Errorf("mutations %v", sig)
	}
	var er []string
	for _, f := range types["ExecuteResult"].Fields {
		er = append(er, f.Name+":"+f.Type.String())
	}
	if strings.Join(er, " ") != "id:String! executionId:String! requestId:String name:String status:String textOutput:String" {
		t.Errorf("ExecuteResult %v", er)
	}
	if d := types["__Type"]; d.Fields == nil {
		t.Error("__Type has no fields")
	}
	for _, f := range types["__Type"].Fields {
		if f.Name == "fields" && (len(f.Args) != 1 || f.Args[0].DefaultValue == nil || *f.Args[0].DefaultValue != "false") {
			t.Errorf("__Type.fields args %+v", f.Args)
		}
	}
}

type introRef struct {
	Kind   string
	Name   *string
	OfType *introRef
}

func (r *introRef) String() string {
	switch r.Kind {
	case "NON_NULL":
		return r.OfType.String() + "!"
	case "LIST":
		return "[" + r.OfType.String() + "]"
	}
	return *r.Name
}

type introInput struct {
	Name         string
	Type         *introRef
	DefaultValue *string
}

type introType struct {
	Kind   string
	Name   *string
	Fields []struct {
		Name string
		Args []introInput
		Type *introRef
	}
	InputFields []introInput
	Interfaces  []*introRef
	EnumValues  []struct{ Name string }
}

func BenchmarkGraphQLIntrospection(b *testing.B) {
	s := testSchema(b)
	for b.Loop() {
		runGQLRaw(b, s, introspectionQuery, nil, "")
	}
}

func BenchmarkGraphQLSmallQuery(b *testing.B) {
	s := testSchema(b)
	for b.Loop() {
		runGQLRaw(b, s, `query Q($s: Boolean = false) { health @skip(if: $s) v: version ...F } fragment F on QueryRoot { __typename }`, nil, "")
	}
}
