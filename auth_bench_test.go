package main

import (
	"context"
	"crypto"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"strings"
	"testing"
	"time"
)

func benchVerify(b *testing.B, k testKey) {
	p := startIdP(b, k)
	cfg, err := loadConfig(envOf(map[string]string{"OIDC_ISSUER": p.issuer(), "AUTH0_CLIENT_ID": "client-1", "JWT_ALGORITHMS": k.alg}))
	if err != nil {
		b.Fatal(err)
	}
	v := newVerifier(cfg, discardLogger(), newMetrics(), time.Now)
	tok := sign(b, k, p.claims(nil))
	ctx := context.Background()
	if _, err := v.Verify(ctx, tok); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.Verify(ctx, tok); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyRS256 is ID token verification with the key cached.
func BenchmarkVerifyRS256(b *testing.B) { benchVerify(b, keyA()) }

// BenchmarkVerifyES256 is the same with a P-256 key.
func BenchmarkVerifyES256(b *testing.B) {
	benchVerify(b, newECKey("e", elliptic.P256(), "ES256"))
}

// BenchmarkResolveNearHit is the hot path of every authenticated request.
func BenchmarkResolveNearHit(b *testing.B) {
	f := startNoETL(b)
	tok := "0123456789abcdef0123456789abcdef"
	f.addSession(tok, ada, time.Now().Add(time.Hour))
	res := inProcessResolver(b, f, nil)
	ctx := context.Background()
	if _, err := res.Resolve(ctx, tok); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := res.Resolve(ctx, tok); err != nil {
			b.Fatal(err)
		}
	}
}

func benchKVHit(b *testing.B, res *resolver) {
	tok := "0123456789abcdef0123456789abcdef"
	ctx := context.Background()
	res.store(ctx, &Session{Token: tok, User: ada, ExpiresAt: time.Now().Add(time.Hour)})
	if _, err := res.lookup(ctx, tok); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := res.lookup(ctx, tok); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkResolveKVHit is a near-cache miss served by the K/V session
// cache (tombstone check, record read and decode), in memory and on a real
// NATS JetStream server.
func BenchmarkResolveKVHit(b *testing.B) {
	b.Run("memory", func(b *testing.B) {
		benchKVHit(b, inProcessResolver(b, startNoETL(b), nil))
	})
	b.Run("nats", func(b *testing.B) {
		ns := startNATS(b)
		cfg, _ := loadConfig(envOf(map[string]string{"NATS_URL": ns.URL()}))
		m := newMetrics()
		c, err := connectNATS(cfg, discardLogger(), m)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(c.nc.Close)
		res := newResolver(cfg, c.kv(cfg.SessionBucket, "", cfg.SessionCacheTTL), c.kv(cfg.RevocationBucket, "", cfg.SessionMaxLifetime),
			newNoETLClient(cfg), nil, m, discardLogger(), c.nc.IsConnected)
		benchKVHit(b, res)
	})
}

// BenchmarkRSAVerifyAlone is the RSA PKCS#1 v1.5 verification of the same
// signed token and key with nothing around it: the floor that
// BenchmarkVerifyRS256 is compared against (their ratio is the cost of
// parsing, key lookup and claim checks on top of the cryptography).
func BenchmarkRSAVerifyAlone(b *testing.B) {
	k := keyA()
	p := startIdP(b, k)
	tok := sign(b, k, p.claims(nil))
	i := strings.LastIndexByte(tok, '.')
	sig, err := base64.RawURLEncoding.DecodeString(tok[i+1:])
	if err != nil {
		b.Fatal(err)
	}
	pub := k.priv.Public().(*rsa.PublicKey)
	b.ReportAllocs()
	for b.Loop() {
		sum := sha256.Sum256([]byte(tok[:i]))
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, sum[:], sig); err != nil {
			b.Fatal(err)
		}
	}
}
