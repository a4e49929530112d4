package main

import (
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// GraphQL lexer and parser for executable documents (GraphQL spec, October
// 2021, §2): operations, fragments, variables, directives and every value
// literal. Type-system definitions are refused: the gateway's schema is its
// own. Every failure is a *gqlError carrying the source location.

// gqlLoc is a 1-based line and column in the document, counted in Unicode
// characters.
type gqlLoc struct {
	Line   int `json:"line"`
	Column int `json:"column"`
}

// gqlError is a GraphQL error as the spec shapes it in responses.
type gqlError struct {
	Message   string   `json:"message"`
	Locations []gqlLoc `json:"locations,omitempty"`
	Path      []any    `json:"path,omitempty"`
}

func (e *gqlError) Error() string { return e.Message }

func errAt(loc gqlLoc, format string, args ...any) *gqlError {
	return &gqlError{Message: fmt.Sprintf(format, args...), Locations: []gqlLoc{loc}}
}

type tokKind int

const (
	tokEOF tokKind = iota
	tokPunct
	tokName
	tokInt
	tokFloat
	tokString
	tokBlockString
)

type token struct {
	kind tokKind
	val  string // punctuator, name, number text, or the decoded string
	loc  gqlLoc
}

func (t token) String() string {
	switch t.kind {
	case tokEOF:
		return "<EOF>"
	case tokString, tokBlockString:
		return "String " + strconv.Quote(t.val)
	case tokName:
		return "Name " + strconv.Quote(t.val)
	case tokInt, tokFloat:
		return "Number " + strconv.Quote(t.val)
	}
	return strconv.Quote(t.val)
}

type lexer struct {
	src  string
	pos  int
	line int
	col  int
}

func (l *lexer) loc() gqlLoc { return gqlLoc{Line: l.line, Column: l.col} }

// advance moves past n bytes that contain no line terminator.
func (l *lexer) advance(n int) {
	l.col += utf8.RuneCountInString(l.src[l.pos : l.pos+n])
	l.pos += n
}

func (l *lexer) newline(n int) {
	l.pos += n
	l.line++
	l.col = 1
}

func isNameStart(c byte) bool { return c == '_' || c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' }
func isNameCont(c byte) bool  { return isNameStart(c) || c >= '0' && c <= '9' }
func isDigit(c byte) bool     { return c >= '0' && c <= '9' }

// next returns the next significant token, skipping ignored tokens
// (whitespace, line terminators, commas, comments, the byte order mark).
func (l *lexer) next() (token, *gqlError) {
	for l.pos < len(l.src) {
		c := l.src[l.pos]
		switch {
		case c == ' ' || c == '\t' || c == ',':
			l.advance(1)
		case c == '\n':
			l.newline(1)
		case c == '\r':
			if l.pos+1 < len(l.src) && l.src[l.pos+1] == '\n' {
				l.newline(2)
			} else {
				l.newline(1)
			}
		case c == '#':
			for l.pos < len(l.src) && l.src[l.pos] != '\n' && l.src[l.pos] != '\r' {
				_, size := utf8.DecodeRuneInString(l.src[l.pos:])
				l.advance(size)
			}
		case strings.HasPrefix(l.src[l.pos:], "\uFEFF"):
			l.advance(3)
		default:
			return l.token()
		}
	}
	return token{kind: tokEOF, loc: l.loc()}, nil
}

func (l *lexer) token() (token, *gqlError) {
	start := l.loc()
	c := l.src[l.pos]
	switch {
	case strings.IndexByte("!$&():=@[]{}|", c) >= 0:
		l.advance(1)
		return token{kind: tokPunct, val: string(c), loc: start}, nil
	case c == '.':
		if strings.HasPrefix(l.src[l.pos:], "...") {
			l.advance(3)
			return token{kind: tokPunct, val: "...", loc: start}, nil
		}
		return token{}, errAt(start, `Syntax Error: Unexpected ".".`)
	case isNameStart(c):
		end := l.pos + 1
		for end < len(l.src) && isNameCont(l.src[end]) {
			end++
		}
		name := l.src[l.pos:end]
		l.advance(end - l.pos)
		return token{kind: tokName, val: name, loc: start}, nil
	case c == '-' || isDigit(c):
		return l.number()
	case c == '"':
		if strings.HasPrefix(l.src[l.pos:], `"""`) {
			return l.blockString()
		}
		return l.str()
	}
	r, _ := utf8.DecodeRuneInString(l.src[l.pos:])
	if r == utf8.RuneError {
		return token{}, errAt(start, "Syntax Error: Invalid UTF-8 in document.")
	}
	return token{}, errAt(start, "Syntax Error: Unexpected character %s.", quoteRune(r))
}

func quoteRune(r rune) string {
	if r < 0x20 || r == 0x7f || r > 0xffff {
		return fmt.Sprintf("U+%04X", r)
	}
	return strconv.QuoteRune(r)
}

func (l *lexer) number() (token, *gqlError) {
	start := l.loc()
	i := l.pos
	s := l.src
	float := false
	if s[i] == '-' {
		i++
	}
	digits := func() bool {
		j := i
		for i < len(s) && isDigit(s[i]) {
			i++
		}
		return i > j
	}
	if i < len(s) && s[i] == '0' {
		i++
		if i < len(s) && isDigit(s[i]) {
			return token{}, errAt(start, "Syntax Error: Invalid number, unexpected digit after 0.")
		}
	} else if !digits() {
		return token{}, errAt(start, "Syntax Error: Invalid number, expected digit.")
	}
	if i < len(s) && s[i] == '.' {
		float = true
		i++
		if !digits() {
			return token{}, errAt(start, "Syntax Error: Invalid number, expected digit after \".\".")
		}
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		float = true
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		if !digits() {
			return token{}, errAt(start, "Syntax Error: Invalid number, expected digit in exponent.")
		}
	}
	if i < len(s) && (s[i] == '.' || isNameStart(s[i])) {
		return token{}, errAt(start, "Syntax Error: Invalid number, unexpected character after number.")
	}
	text := s[l.pos:i]
	l.advance(i - l.pos)
	if float {
		return token{kind: tokFloat, val: text, loc: start}, nil
	}
	return token{kind: tokInt, val: text, loc: start}, nil
}

func (l *lexer) str() (token, *gqlError) {
	start := l.loc()
	l.advance(1)
	var b strings.Builder
	for l.pos < len(l.src) {
		c := l.src[l.pos]
		switch {
		case c == '"':
			l.advance(1)
			return token{kind: tokString, val: b.String(), loc: start}, nil
		case c == '\n' || c == '\r':
			return token{}, errAt(l.loc(), "Syntax Error: Unterminated string.")
		case c == '\\':
			if l.pos+1 >= len(l.src) {
				return token{}, errAt(l.loc(), "Syntax Error: Unterminated string.")
			}
			esc := l.src[l.pos+1]
			if r, ok := map[byte]rune{'"': '"', '\\': '\\', '/': '/', 'b': '\b', 'f': '\f', 'n': '\n', 'r': '\r', 't': '\t'}[esc]; ok {
				b.WriteRune(r)
				l.advance(2)
				continue
			}
			if esc != 'u' {
				return token{}, errAt(l.loc(), "Syntax Error: Invalid character escape sequence.")
			}
			r, n, ok := l.unicodeEscape()
			if !ok {
				return token{}, errAt(l.loc(), "Syntax Error: Invalid Unicode escape sequence.")
			}
			b.WriteRune(r)
			l.advance(n)
		case c < 0x20 && c != '\t':
			return token{}, errAt(l.loc(), "Syntax Error: Invalid character within String: %s.", quoteRune(rune(c)))
		default:
			r, size := utf8.DecodeRuneInString(l.src[l.pos:])
			if r == utf8.RuneError && size == 1 {
				return token{}, errAt(l.loc(), "Syntax Error: Invalid UTF-8 in document.")
			}
			b.WriteRune(r)
			l.advance(size)
		}
	}
	return token{}, errAt(l.loc(), "Syntax Error: Unterminated string.")
}

// unicodeEscape reads \uXXXX (with a surrogate pair as two escapes) or
// \u{X...} at l.pos and returns the rune and the bytes consumed.
func (l *lexer) unicodeEscape() (rune, int, bool) {
	s := l.src[l.pos:]
	if strings.HasPrefix(s, `\u{`) {
		end := strings.IndexByte(s, '}')
		if end < 4 || end > 11 {
			return 0, 0, false
		}
		v, err := strconv.ParseUint(s[3:end], 16, 32)
		if err != nil || v > 0x10FFFF || v >= 0xD800 && v <= 0xDFFF {
			return 0, 0, false
		}
		return rune(v), end + 1, true
	}
	hex4 := func(s string) (rune, bool) {
		if len(s) < 4 {
			return 0, false
		}
		v, err := strconv.ParseUint(s[:4], 16, 32)
		return rune(v), err == nil
	}
	r, ok := hex4(s[2:])
	if !ok {
		return 0, 0, false
	}
	if r >= 0xD800 && r <= 0xDBFF && strings.HasPrefix(s[6:], `\u`) {
		if lo, ok := hex4(s[8:]); ok && lo >= 0xDC00 && lo <= 0xDFFF {
			return (r-0xD800)<<10 + (lo - 0xDC00) + 0x10000, 12, true
		}
	}
	if r >= 0xD800 && r <= 0xDFFF {
		return 0, 0, false
	}
	return r, 6, true
}

func (l *lexer) blockString() (token, *gqlError) {
	start := l.loc()
	l.advance(3)
	var raw strings.Builder
	for l.pos < len(l.src) {
		s := l.src[l.pos:]
		switch {
		case strings.HasPrefix(s, `"""`):
			l.advance(3)
			return token{kind: tokBlockString, val: blockStringValue(raw.String()), loc: start}, nil
		case strings.HasPrefix(s, `\"""`):
			raw.WriteString(`"""`)
			l.advance(4)
		case s[0] == '\n':
			raw.WriteByte('\n')
			l.newline(1)
		case s[0] == '\r':
			raw.WriteByte('\n')
			if len(s) > 1 && s[1] == '\n' {
				l.newline(2)
			} else {
				l.newline(1)
			}
		case s[0] < 0x20 && s[0] != '\t':
			return token{}, errAt(l.loc(), "Syntax Error: Invalid character within String: %s.", quoteRune(rune(s[0])))
		default:
			r, size := utf8.DecodeRuneInString(s)
			if r == utf8.RuneError && size == 1 {
				return token{}, errAt(l.loc(), "Syntax Error: Invalid UTF-8 in document.")
			}
			raw.WriteString(s[:size])
			l.advance(size)
		}
	}
	return token{}, errAt(l.loc(), "Syntax Error: Unterminated string.")
}

// blockStringValue applies the spec's BlockStringValue: common indentation
// and leading/trailing blank lines removed.
func blockStringValue(raw string) string {
	lines := strings.Split(raw, "\n")
	common := -1
	for _, line := range lines[1:] {
		indent := len(line) - len(strings.TrimLeft(line, " \t"))
		if indent < len(line) && (common < 0 || indent < common) {
			common = indent
		}
	}
	if common > 0 {
		for i := 1; i < len(lines); i++ {
			if len(lines[i]) >= common {
				lines[i] = lines[i][common:]
			} else {
				lines[i] = ""
			}
		}
	}
	blank := func(s string) bool { return strings.TrimLeft(s, " \t") == "" }
	for len(lines) > 0 && blank(lines[0]) {
		lines = lines[1:]
	}
	for len(lines) > 0 && blank(lines[len(lines)-1]) {
		lines = lines[:len(lines)-1]
	}
	return strings.Join(lines, "\n")
}

// AST.

type gqlDocument struct {
	ops   []*gqlOperation
	frags []*gqlFragment
}

type gqlOperation struct {
	kind       string // query, mutation, subscription
	name       string
	vars       []*gqlVarDef
	directives []*gqlDirective
	sel        []*gqlSelection
	loc        gqlLoc
}

type gqlVarDef struct {
	name string
	typ  *gqlTypeRef
	def  *gqlValue
	loc  gqlLoc
}

// gqlTypeRef is a type as written in a variable definition.
type gqlTypeRef struct {
	name    string      // named type, when elem is nil
	elem    *gqlTypeRef // list element
	nonNull bool
	loc     gqlLoc
}

func (t *gqlTypeRef) String() string {
	s := t.name
	if t.elem != nil {
		s = "[" + t.elem.String() + "]"
	}
	if t.nonNull {
		s += "!"
	}
	return s
}

type selKind int

const (
	selField selKind = iota
	selSpread
	selInline
)

// gqlSelection is a field, a fragment spread (name) or an inline fragment
// (typeCond, sel).
type gqlSelection struct {
	kind       selKind
	alias      string
	name       string
	args       []*gqlArgument
	directives []*gqlDirective
	sel        []*gqlSelection
	typeCond   string
	loc        gqlLoc
}

func (s *gqlSelection) key() string {
	if s.alias != "" {
		return s.alias
	}
	return s.name
}

type gqlArgument struct {
	name string
	val  *gqlValue
	loc  gqlLoc
}

type gqlDirective struct {
	name string
	args []*gqlArgument
	loc  gqlLoc
}

type gqlFragment struct {
	name       string
	typeCond   string
	directives []*gqlDirective
	sel        []*gqlSelection
	loc        gqlLoc
}

type valKind int

const (
	valVar valKind = iota
	valInt
	valFloat
	valString
	valBool
	valNull
	valEnum
	valList
	valObject
)

type gqlValue struct {
	kind   valKind
	s      string // variable name, number text, string, enum name, "true"/"false"
	list   []*gqlValue
	fields []*gqlArgument // object fields
	loc    gqlLoc
}

// parser is a recursive-descent parser with one token of lookahead.
type parser struct {
	lex   lexer
	tok   token
	depth int
}

// maxParseNesting bounds recursion (selection sets, list/object values, list
// types) so a hostile document cannot exhaust the stack; the executable depth
// limit is checked later and is much lower.
const maxParseNesting = 64

func parseGraphQL(src string) (doc *gqlDocument, err *gqlError) {
	if !utf8.ValidString(src) {
		return nil, errAt(gqlLoc{1, 1}, "Syntax Error: Invalid UTF-8 in document.")
	}
	p := &parser{lex: lexer{src: src, line: 1, col: 1}}
	defer func() {
		if r := recover(); r != nil {
			pe, ok := r.(*gqlError)
			if !ok {
				panic(r)
			}
			doc, err = nil, pe
		}
	}()
	p.advance()
	return p.document(), nil
}

func (p *parser) advance() {
	t, err := p.lex.next()
	if err != nil {
		panic(err)
	}
	p.tok = t
}

func (p *parser) fail(format string, args ...any) {
	panic(errAt(p.tok.loc, format, args...))
}

func (p *parser) unexpected() {
	p.fail("Syntax Error: Unexpected %s.", p.tok)
}

func (p *parser) peek(punct string) bool { return p.tok.kind == tokPunct && p.tok.val == punct }

func (p *parser) expect(punct string) gqlLoc {
	if !p.peek(punct) {
		p.fail("Syntax Error: Expected %q, found %s.", punct, p.tok)
	}
	loc := p.tok.loc
	p.advance()
	return loc
}

func (p *parser) name() (string, gqlLoc) {
	if p.tok.kind != tokName {
		p.fail("Syntax Error: Expected Name, found %s.", p.tok)
	}
	n, loc := p.tok.val, p.tok.loc
	p.advance()
	return n, loc
}

func (p *parser) nest() {
	p.depth++
	if p.depth > maxParseNesting {
		p.fail("Syntax Error: Document nested too deeply.")
	}
}

func (p *parser) document() *gqlDocument {
	doc := &gqlDocument{}
	if p.tok.kind == tokEOF {
		p.fail("Syntax Error: Unexpected <EOF>.")
	}
	for p.tok.kind != tokEOF {
		switch {
		case p.peek("{"):
			loc := p.tok.loc
			doc.ops = append(doc.ops, &gqlOperation{kind: "query", sel: p.selectionSet(), loc: loc})
		case p.tok.kind == tokName && (p.tok.val == "query" || p.tok.val == "mutation" || p.tok.val == "subscription"):
			doc.ops = append(doc.ops, p.operation())
		case p.tok.kind == tokName && p.tok.val == "fragment":
			doc.frags = append(doc.frags, p.fragment())
		case p.tok.kind == tokName || p.tok.kind == tokString || p.tok.kind == tokBlockString:
			p.fail("Syntax Error: Type system definitions are not supported; send an executable document.")
		default:
			p.unexpected()
		}
	}
	return doc
}

func (p *parser) operation() *gqlOperation {
	op := &gqlOperation{kind: p.tok.val, loc: p.tok.loc}
	p.advance()
	if p.tok.kind == tokName {
		op.name, _ = p.name()
	}
	if p.peek("(") {
		p.advance()
		for !p.peek(")") {
			op.vars = append(op.vars, p.varDef())
		}
		if len(op.vars) == 0 {
			p.fail("Syntax Error: Expected $, found %s.", p.tok)
		}
		p.advance()
	}
	op.directives = p.directives(false)
	op.sel = p.selectionSet()
	return op
}

func (p *parser) varDef() *gqlVarDef {
	loc := p.expect("$")
	name, _ := p.name()
	p.expect(":")
	vd := &gqlVarDef{name: name, loc: loc, typ: p.typeRef()}
	if p.peek("=") {
		p.advance()
		vd.def = p.value(true)
	}
	// Directives on variable definitions are parsed and ignored: none of
	// the gateway's directives apply there.
	p.directives(true)
	return vd
}

func (p *parser) typeRef() *gqlTypeRef {
	t := &gqlTypeRef{loc: p.tok.loc}
	if p.peek("[") {
		p.nest()
		p.advance()
		t.elem = p.typeRef()
		p.expect("]")
		p.depth--
	} else {
		t.name, _ = p.name()
	}
	if p.peek("!") {
		p.advance()
		t.nonNull = true
	}
	return t
}

func (p *parser) directives(isConst bool) []*gqlDirective {
	var ds []*gqlDirective
	for p.peek("@") {
		loc := p.tok.loc
		p.advance()
		name, _ := p.name()
		ds = append(ds, &gqlDirective{name: name, loc: loc, args: p.arguments(isConst)})
	}
	return ds
}

func (p *parser) arguments(isConst bool) []*gqlArgument {
	if !p.peek("(") {
		return nil
	}
	p.advance()
	var args []*gqlArgument
	for !p.peek(")") {
		name, loc := p.name()
		p.expect(":")
		args = append(args, &gqlArgument{name: name, loc: loc, val: p.value(isConst)})
	}
	if len(args) == 0 {
		p.fail("Syntax Error: Expected Name, found %s.", p.tok)
	}
	p.advance()
	return args
}

func (p *parser) selectionSet() []*gqlSelection {
	p.nest()
	p.expect("{")
	var sel []*gqlSelection
	for !p.peek("}") {
		sel = append(sel, p.selection())
	}
	if len(sel) == 0 {
		p.fail("Syntax Error: Expected Name, found %s.", p.tok)
	}
	p.advance()
	p.depth--
	return sel
}

func (p *parser) selection() *gqlSelection {
	if p.peek("...") {
		loc := p.tok.loc
		p.advance()
		if p.tok.kind == tokName && p.tok.val != "on" {
			name, _ := p.name()
			return &gqlSelection{kind: selSpread, name: name, loc: loc, directives: p.directives(false)}
		}
		s := &gqlSelection{kind: selInline, loc: loc}
		if p.tok.kind == tokName && p.tok.val == "on" {
			p.advance()
			s.typeCond, _ = p.name()
		}
		s.directives = p.directives(false)
		s.sel = p.selectionSet()
		return s
	}
	name, loc := p.name()
	s := &gqlSelection{kind: selField, name: name, loc: loc}
	if p.peek(":") {
		p.advance()
		s.alias = name
		s.name, _ = p.name()
	}
	s.args = p.arguments(false)
	s.directives = p.directives(false)
	if p.peek("{") {
		s.sel = p.selectionSet()
	}
	return s
}

func (p *parser) fragment() *gqlFragment {
	loc := p.tok.loc
	p.advance()
	if p.tok.kind == tokName && p.tok.val == "on" {
		p.unexpected()
	}
	name, _ := p.name()
	if p.tok.kind != tokName || p.tok.val != "on" {
		p.fail("Syntax Error: Expected \"on\", found %s.", p.tok)
	}
	p.advance()
	cond, _ := p.name()
	return &gqlFragment{name: name, typeCond: cond, loc: loc, directives: p.directives(false), sel: p.selectionSet()}
}

func (p *parser) value(isConst bool) *gqlValue {
	t := p.tok
	v := &gqlValue{loc: t.loc, s: t.val}
	switch {
	case t.kind == tokPunct && t.val == "$":
		if isConst {
			p.fail("Syntax Error: Unexpected variable in a constant value.")
		}
		p.advance()
		v.kind = valVar
		v.s, _ = p.name()
		return v
	case t.kind == tokInt:
		v.kind = valInt
	case t.kind == tokFloat:
		v.kind = valFloat
	case t.kind == tokString || t.kind == tokBlockString:
		v.kind = valString
	case t.kind == tokName && (t.val == "true" || t.val == "false"):
		v.kind = valBool
	case t.kind == tokName && t.val == "null":
		v.kind = valNull
	case t.kind == tokName:
		v.kind = valEnum
	case t.kind == tokPunct && t.val == "[":
		p.nest()
		p.advance()
		v.kind = valList
		for !p.peek("]") {
			v.list = append(v.list, p.value(isConst))
		}
		p.advance()
		p.depth--
		return v
	case t.kind == tokPunct && t.val == "{":
		p.nest()
		p.advance()
		v.kind = valObject
		for !p.peek("}") {
			name, loc := p.name()
			p.expect(":")
			v.fields = append(v.fields, &gqlArgument{name: name, loc: loc, val: p.value(isConst)})
		}
		p.advance()
		p.depth--
		return v
	default:
		p.unexpected()
	}
	p.advance()
	return v
}
