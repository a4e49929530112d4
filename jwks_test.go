package main

import (
	"bytes"
	"context"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestVerifierKeyTypes exercises every key type and the alg/key binding
// directly on the verifier.
func TestVerifierKeyTypes(t *testing.T) {
	t.Parallel()
	es256 := newECKey("e256", elliptic.P256(), "ES256")
	es384 := newECKey("e384", elliptic.P384(), "ES384")
	es512 := newECKey("e521", elliptic.P521(), "ES512")
	ed := newEdKey("ed")
	ps := testKey{kid: "ps", alg: "PS256", priv: rsaKeyB()}
	p := startIdP(t, keyA(), es256, es384, es512, ed, ps)
	cfg, err := loadConfig(envOf(map[string]string{"OIDC_ISSUER": p.issuer(), "OIDC_JWKS_URL": p.URL + "/jwks",
		"AUTH0_AUDIENCE": "api-1,client-1", "JWT_ALGORITHMS": "RS256,PS256,ES256,ES384,ES512,EdDSA"}))
	if err != nil {
		t.Fatal(err)
	}
	v := newVerifier(cfg, discardLogger(), newMetrics(), time.Now)
	ctx := context.Background()
	for _, k := range []testKey{keyA(), es256, es384, es512, ed, ps} {
		if _, err := v.Verify(ctx, sign(t, k, p.claims(map[string]any{"aud": []string{"x", "client-1"}}))); err != nil {
			t.Errorf("%s: %v", k.alg, err)
		}
	}
	// Within leeway is fine.
	if _, err := v.Verify(ctx, sign(t, keyA(), p.claims(map[string]any{"exp": time.Now().Add(-30 * time.Second).Unix()}))); err != nil {
		t.Errorf("exp within leeway: %v", err)
	}
	// An ES384 signature under the P-256 key's kid: the curve decides.
	if _, err := v.Verify(ctx, sign(t, testKey{kid: "e256", alg: "ES384", priv: es384.priv}, p.claims(nil))); err == nil {
		t.Error("ES384 accepted for a P-256 key")
	}
	// RS256 under the PS256-pinned key.
	if _, err := v.Verify(ctx, sign(t, testKey{kid: "ps", alg: "RS256", priv: rsaKeyB()}, p.claims(nil))); err == nil {
		t.Error("RS256 accepted for a key pinned to PS256")
	}

	// Only RS256 allowed: an ES256 token is refused even with a good key.
	cfg.JWTAlgorithms = []string{"RS256"}
	v = newVerifier(cfg, discardLogger(), newMetrics(), time.Now)
	if _, err := v.Verify(ctx, sign(t, es256, p.claims(nil))); err == nil || !strings.Contains(err.Error(), "algorithm not allowed") {
		t.Errorf("ES256 with RS256 only: %v", err)
	}

	// A single key without kid matches a token without kid.
	p1 := startIdP(t, testKey{alg: "RS256", priv: rsaKeyA()})
	cfg.JWKSURL = p1.URL + "/jwks"
	cfg.Issuer = p.issuer()
	v = newVerifier(cfg, discardLogger(), newMetrics(), time.Now)
	if _, err := v.Verify(ctx, sign(t, testKey{alg: "RS256", priv: rsaKeyA()}, p.claims(nil))); err != nil {
		t.Errorf("kid-less single key: %v", err)
	}
}

// jwkCase is one JWK and whether parseJWK must accept it.
type jwkCase struct {
	name string
	key  map[string]any
	ok   bool
}

// parseJWKCases are TestParseJWK's table, and seeds of FuzzParseKeySet.
func parseJWKCases() []jwkCase {
	ec := newECKey("e", elliptic.P256(), "ES256").jwk()
	offCurve := map[string]any{}
	for k, v := range ec {
		offCurve[k] = v
	}
	offCurve["y"] = b64(bytes.Repeat([]byte{1}, 32))
	rsaJWK := keyA().jwk()
	withAlg := func(m map[string]any, alg string) map[string]any {
		c := map[string]any{}
		for k, v := range m {
			c[k] = v
		}
		c["alg"] = alg
		return c
	}
	return []jwkCase{
		{"rsa 2048", rsaJWK, true},
		{"rsa 1024", testKey{kid: "w", priv: rsaWeak()}.jwk(), false},
		{"rsa with fitting alg", withAlg(rsaJWK, "RS256"), true},
		{"rsa with EC alg", withAlg(rsaJWK, "ES256"), false},
		{"rsa with HS256 alg", withAlg(rsaJWK, "HS256"), false},
		{"ec p-256", ec, true},
		{"ec off curve", offCurve, false},
		{"ed25519", newEdKey("d").jwk(), true},
		{"encryption key", map[string]any{"kty": "RSA", "use": "enc", "n": rsaJWK["n"], "e": rsaJWK["e"]}, false},
		{"symmetric", map[string]any{"kty": "oct", "k": "c2VjcmV0"}, false},
		{"bad base64", map[string]any{"kty": "RSA", "n": "!!", "e": "AQAB"}, false},
	}
}

func TestParseJWK(t *testing.T) {
	t.Parallel()
	for _, tc := range parseJWKCases() {
		raw, _ := json.Marshal(tc.key)
		var k jwk
		json.Unmarshal(raw, &k)
		if _, err := parseJWK(k); (err == nil) != tc.ok {
			t.Errorf("%s: err %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

// FuzzParseKeySet: the JWKS decoder never panics and never yields a key
// that is unfit for every allowed algorithm.
func FuzzParseKeySet(f *testing.F) {
	for _, k := range []testKey{keyA(), newECKey("e", elliptic.P384(), "ES384"), newEdKey("d")} {
		raw, _ := json.Marshal(map[string]any{"keys": []any{k.jwk()}})
		f.Add(raw)
	}
	f.Add([]byte(`{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"},{"kty":"EC","crv":"P-256","x":"","y":""}]}`))
	f.Add([]byte(`{"keys":null}`))
	for _, tc := range parseJWKCases() {
		raw, _ := json.Marshal(map[string]any{"keys": []any{tc.key}})
		f.Add(raw)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		ks, err := parseKeySet(raw, discardLogger())
		if err != nil {
			return
		}
		for _, k := range ks.byKid {
			if len(k.algs) == 0 || k.pub == nil {
				t.Fatalf("unusable key %+v", k)
			}
			if rk, ok := k.pub.(*rsa.PublicKey); ok && rk.N.BitLen() < 2048 {
				t.Fatal("small RSA key accepted")
			}
		}
	})
}

// FuzzVerify: whatever the token, verification never panics, never fetches
// more than the cooldown allows, and only a token signed by the key passes.
func FuzzVerify(f *testing.F) {
	// The provider of forgedTokenCases, whose tokens seed the corpus.
	p := startIdP(f, keyA(), testKey{kid: "weak", alg: "RS256", priv: rsaWeak()}, newECKey("e1", elliptic.P256(), "ES256"))
	cfg, _ := loadConfig(envOf(map[string]string{"OIDC_ISSUER": p.issuer(), "OIDC_JWKS_URL": p.URL + "/jwks", "JWKS_MIN_REFRESH_SECS": "3600", "AUTH0_CLIENT_ID": "client-1"}))
	v := newVerifier(cfg, discardLogger(), newMetrics(), time.Now)
	good := sign(f, keyA(), p.claims(nil))
	if _, err := v.Verify(context.Background(), good); err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(strings.Replace(good, ".", "..", 1))
	f.Add(`eyJhbGciOiJub25lIn0.e30.`)
	f.Add(b64([]byte(`{"alg":"RS256","kid":["k1"]}`)) + ".e30.")
	_, forged := forgedTokenCases(f, p)
	for _, tc := range forged {
		f.Add(tc.token)
	}
	f.Fuzz(func(t *testing.T, tok string) {
		_, err := v.Verify(context.Background(), tok)
		if err == nil && tok != good {
			// Only re-encodings of the genuine token may pass.
			if strings.Split(tok, ".")[2] != strings.Split(good, ".")[2] {
				t.Fatalf("forged token accepted: %q", tok)
			}
		}
		if p.jwksHits.Load() > 2 {
			t.Fatalf("%d JWKS fetches", p.jwksHits.Load())
		}
	})
}
