package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Limits on what an identity provider may send us: a JWKS or discovery
// document is a few KiB; anything far bigger is a misconfiguration or an
// attack, and an ID token is never 16 KiB.
const (
	maxJWKSBody   = 1 << 20
	maxJWKSKeys   = 64
	maxIDTokenLen = 16 << 10
	jwksTimeout   = 10 * time.Second
)

// jwk is one JSON Web Key as an identity provider publishes it (RFC 7517/7518/8037).
type jwk struct {
	Kty string `json:"kty"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	Use string `json:"use"`
	N   string `json:"n"`
	E   string `json:"e"`
	Crv string `json:"crv"`
	X   string `json:"x"`
	Y   string `json:"y"`
}

// verifyKey is a parsed public key with the algorithms it may verify. The
// token header's alg is checked against this list, so an RSA key can never be
// used as an HMAC secret and an ES256 key never verifies an ES512 signature.
type verifyKey struct {
	kid  string
	pub  crypto.PublicKey
	algs []string
}

// parseJWK builds a verifyKey by hand. RSA keys under 2048 bits, unknown
// curves, off-curve points and keys whose own alg does not fit their type
// are refused.
func parseJWK(k jwk) (*verifyKey, error) {
	if k.Use != "" && k.Use != "sig" {
		return nil, fmt.Errorf("key use %q is not sig", k.Use)
	}
	b64 := base64.RawURLEncoding
	var vk verifyKey
	switch k.Kty {
	case "RSA":
		n, err := b64.DecodeString(k.N)
		if err != nil || len(n) == 0 {
			return nil, errors.New("bad RSA modulus")
		}
		e, err := b64.DecodeString(k.E)
		if err != nil || len(e) == 0 || len(e) > 4 {
			return nil, errors.New("bad RSA exponent")
		}
		pub := &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}
		if pub.N.BitLen() < 2048 {
			return nil, fmt.Errorf("RSA key of %d bits is too small", pub.N.BitLen())
		}
		if pub.E < 3 || pub.E%2 == 0 {
			return nil, errors.New("bad RSA exponent")
		}
		vk.pub, vk.algs = pub, []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
	case "EC":
		var curve elliptic.Curve
		var alg string
		switch k.Crv {
		case "P-256":
			curve, alg = elliptic.P256(), "ES256"
		case "P-384":
			curve, alg = elliptic.P384(), "ES384"
		case "P-521":
			curve, alg = elliptic.P521(), "ES512"
		default:
			return nil, fmt.Errorf("unsupported curve %q", k.Crv)
		}
		size := (curve.Params().BitSize + 7) / 8
		x, errX := b64.DecodeString(k.X)
		y, errY := b64.DecodeString(k.Y)
		if errX != nil || errY != nil || len(x) != size || len(y) != size {
			return nil, errors.New("bad EC point")
		}
		// ParseUncompressedPublicKey rejects points not on the curve.
		pub, err := ecdsa.ParseUncompressedPublicKey(curve, append(append([]byte{4}, x...), y...))
		if err != nil {
			return nil, fmt.Errorf("bad EC point: %w", err)
		}
		vk.pub, vk.algs = pub, []string{alg}
	case "OKP":
		if k.Crv != "Ed25519" {
			return nil, fmt.Errorf("unsupported OKP curve %q", k.Crv)
		}
		x, err := b64.DecodeString(k.X)
		if err != nil || len(x) != ed25519.PublicKeySize {
			return nil, errors.New("bad Ed25519 key")
		}
		vk.pub, vk.algs = ed25519.PublicKey(x), []string{"EdDSA"}
	default:
		return nil, fmt.Errorf("unsupported key type %q", k.Kty)
	}
	if k.Alg != "" {
		if !contains(vk.algs, k.Alg) {
			return nil, fmt.Errorf("key alg %q does not fit key type %s", k.Alg, k.Kty)
		}
		vk.algs = []string{k.Alg}
	}
	vk.kid = k.Kid
	return &vk, nil
}

// keySet is an immutable snapshot of the provider's keys, swapped whole.
type keySet struct {
	byKid   map[string]*verifyKey
	only    *verifyKey // the key when the set has exactly one
	fetched time.Time
}

// lookup finds the key for a token's kid. A token without kid (or a set
// whose single key has none) matches only when the set has exactly one key:
// with several, picking one would be a guess.
func (ks *keySet) lookup(kid string) *verifyKey {
	if ks == nil {
		return nil
	}
	if kid != "" {
		if k := ks.byKid[kid]; k != nil {
			return k
		}
	}
	if ks.only != nil && (kid == "" || ks.only.kid == "") {
		return ks.only
	}
	return nil
}

func parseKeySet(raw []byte, log *slog.Logger) (*keySet, error) {
	var doc struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, fmt.Errorf("decoding JWKS: %w", err)
	}
	if len(doc.Keys) > maxJWKSKeys {
		return nil, fmt.Errorf("JWKS has %d keys, more than %d", len(doc.Keys), maxJWKSKeys)
	}
	ks := &keySet{byKid: map[string]*verifyKey{}}
	var all []*verifyKey
	for _, rk := range doc.Keys {
		var k jwk
		if err := json.Unmarshal(rk, &k); err != nil {
			log.Warn("JWKS key skipped", "err", err)
			continue
		}
		vk, err := parseJWK(k)
		if err != nil {
			// One odd key (an encryption key, a new type) must not take the
			// others down with it.
			log.Warn("JWKS key skipped", "kid", k.Kid, "err", err)
			continue
		}
		if vk.kid != "" {
			if ks.byKid[vk.kid] != nil {
				log.Warn("JWKS key skipped: duplicate kid", "kid", vk.kid)
				continue
			}
			ks.byKid[vk.kid] = vk
		}
		all = append(all, vk)
	}
	if len(all) == 0 {
		return nil, errors.New("JWKS has no usable signing key")
	}
	if len(all) == 1 {
		ks.only = all[0]
	}
	return ks, nil
}

// jwksCache holds the identity provider's keys: fetched at start and every
// JWKS_REFRESH_SECS, and again when a token names an unknown kid — one fetch
// at a time, at most once per JWKS_MIN_REFRESH_SECS. A failed fetch keeps the
// keys we had.
type jwksCache struct {
	cfg     Config
	client  *http.Client
	log     *slog.Logger
	metrics *metrics
	now     func() time.Time

	keys atomic.Pointer[keySet]

	mu          sync.Mutex
	jwksURL     string        // cfg.JWKSURL, or found by discovery
	inflight    chan struct{} // closed when the running fetch ends
	lastKidPull time.Time     // last fetch triggered by an unknown kid
}

func newJWKSCache(cfg Config, log *slog.Logger, m *metrics) *jwksCache {
	tr := &http.Transport{
		Proxy:                 nil, // configuration comes from Config only, never the environment
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		TLSHandshakeTimeout:   5 * time.Second,
		ResponseHeaderTimeout: jwksTimeout,
		MaxIdleConns:          4,
		IdleConnTimeout:       time.Minute,
	}
	c := &http.Client{Transport: tr, Timeout: jwksTimeout,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 3 {
				return errors.New("too many redirects")
			}
			return nil
		}}
	return &jwksCache{cfg: cfg, client: c, log: log.With("component", "jwks"), metrics: m, now: time.Now, jwksURL: cfg.JWKSURL}
}

// run fetches the keys now and then every JWKS_REFRESH_SECS until ctx ends.
// A failed first fetch is retried with backoff, so a provider that is down at
// start is picked up soon after it comes back.
func (c *jwksCache) run(ctx context.Context) {
	backoff := time.Second
	for ctx.Err() == nil {
		wait := c.cfg.JWKSRefresh
		if err := c.refresh(ctx); err != nil && c.keys.Load() == nil {
			wait, backoff = backoff, min(2*backoff, time.Minute)
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
}

// refresh runs one fetch, or waits for the one already running.
func (c *jwksCache) refresh(ctx context.Context) error {
	c.mu.Lock()
	if ch := c.inflight; ch != nil {
		c.mu.Unlock()
		select {
		case <-ch:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	ch := make(chan struct{})
	c.inflight = ch
	c.mu.Unlock()
	// The fetch is shared: it must not die with the caller that started it.
	err := c.fetch(context.WithoutCancel(ctx))
	c.mu.Lock()
	c.inflight = nil
	c.mu.Unlock()
	close(ch)
	return err
}

// key returns the key for kid. An unknown kid triggers a refetch unless one
// was triggered within the cooldown; then it fails at once, never queueing
// behind the cooldown.
func (c *jwksCache) key(ctx context.Context, kid string) (*verifyKey, error) {
	if k := c.keys.Load().lookup(kid); k != nil {
		return k, nil
	}
	c.mu.Lock()
	ch := c.inflight
	if ch == nil {
		if !c.lastKidPull.IsZero() && c.now().Sub(c.lastKidPull) < c.cfg.JWKSMinRefresh {
			c.mu.Unlock()
			return nil, errUnknownKey
		}
		c.lastKidPull = c.now()
	}
	c.mu.Unlock()
	if ch != nil {
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	} else if err := c.refresh(ctx); err != nil {
		c.log.Warn("JWKS refetch for unknown kid failed", "err", err)
	}
	if k := c.keys.Load().lookup(kid); k != nil {
		return k, nil
	}
	return nil, errUnknownKey
}

var errUnknownKey = errors.New("unknown key")

func (c *jwksCache) fetch(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, jwksTimeout)
	defer cancel()
	err := c.fetchOnce(ctx)
	if err != nil {
		c.metrics.jwksFetches.with("error").Inc()
		c.log.Warn("JWKS fetch failed; keeping the keys we have", "err", err)
		return err
	}
	c.metrics.jwksFetches.with("ok").Inc()
	return nil
}

func (c *jwksCache) fetchOnce(ctx context.Context) error {
	c.mu.Lock()
	u := c.jwksURL
	c.mu.Unlock()
	if u == "" {
		var err error
		if u, err = c.discover(ctx); err != nil {
			return err
		}
		c.mu.Lock()
		c.jwksURL = u
		c.mu.Unlock()
	}
	raw, err := c.get(ctx, u)
	if err != nil {
		return err
	}
	ks, err := parseKeySet(raw, c.log)
	if err != nil {
		return err
	}
	ks.fetched = c.now()
	c.keys.Store(ks)
	c.log.Debug("JWKS loaded", "keys", len(ks.byKid))
	return nil
}

// discover reads the issuer's OpenID configuration for its jwks_uri. The
// document must name the same issuer: otherwise a redirect or a misconfigured
// proxy could hand us someone else's keys.
func (c *jwksCache) discover(ctx context.Context) (string, error) {
	raw, err := c.get(ctx, strings.TrimSuffix(c.cfg.Issuer, "/")+"/.well-known/openid-configuration")
	if err != nil {
		return "", fmt.Errorf("OIDC discovery: %w", err)
	}
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return "", fmt.Errorf("OIDC discovery: decoding: %w", err)
	}
	if strings.TrimSuffix(doc.Issuer, "/") != strings.TrimSuffix(c.cfg.Issuer, "/") {
		return "", fmt.Errorf("OIDC discovery: document is for issuer %q", doc.Issuer)
	}
	if !isHTTPURL(doc.JWKSURI) {
		return "", errors.New("OIDC discovery: jwks_uri is not an http(s) URL")
	}
	return doc.JWKSURI, nil
}

func (c *jwksCache) get(ctx context.Context, u string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", u, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: status %d", u, resp.StatusCode)
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBody+1))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", u, err)
	}
	if len(raw) > maxJWKSBody {
		return nil, fmt.Errorf("GET %s: body larger than %d bytes", u, maxJWKSBody)
	}
	return raw, nil
}

// idClaims are the ID token claims the gateway uses.
type idClaims struct {
	jwt.RegisteredClaims
	Email         string `json:"email"`
	Name          string `json:"name"`
	EmailVerified any    `json:"email_verified"`
}

// verifier checks OIDC ID tokens (SPEC §5.1): signature by a key of the
// configured issuer, alg in JWT_ALGORITHMS and fitting the key, iss exact,
// aud accepted, exp required, exp/nbf/iat with leeway.
type verifier struct {
	cfg     Config
	jwks    *jwksCache
	parser  *jwt.Parser
	metrics *metrics
}

func newVerifier(cfg Config, log *slog.Logger, m *metrics, now func() time.Time) *verifier {
	opts := []jwt.ParserOption{
		jwt.WithValidMethods(cfg.JWTAlgorithms),
		jwt.WithIssuer(cfg.Issuer),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithLeeway(cfg.JWTLeeway),
		jwt.WithTimeFunc(now),
		jwt.WithStrictDecoding(),
	}
	if len(cfg.Audiences) > 0 {
		opts = append(opts, jwt.WithAudience(cfg.Audiences...))
	}
	c := newJWKSCache(cfg, log, m)
	c.now = now
	return &verifier{cfg: cfg, jwks: c, parser: jwt.NewParser(opts...), metrics: m}
}

// tokenError is a verification failure with a short reason fit for the client.
type tokenError struct {
	reason string
	err    error
}

func (e *tokenError) Error() string { return e.reason + ": " + e.err.Error() }
func (e *tokenError) Unwrap() error { return e.err }

// Verify checks raw and returns its claims, or a *tokenError.
func (v *verifier) Verify(ctx context.Context, raw string) (*idClaims, error) {
	claims, err := v.verify(ctx, raw)
	if err != nil {
		v.metrics.tokenChecks.with("invalid").Inc()
		return nil, err
	}
	v.metrics.tokenChecks.with("ok").Inc()
	return claims, nil
}

func (v *verifier) verify(ctx context.Context, raw string) (*idClaims, error) {
	if raw == "" || len(raw) > maxIDTokenLen || strings.Count(raw, ".") != 2 {
		return nil, &tokenError{"malformed token", jwt.ErrTokenMalformed}
	}
	claims := &idClaims{}
	_, err := v.parser.ParseWithClaims(raw, claims, func(t *jwt.Token) (any, error) {
		kid, ok := t.Header["kid"].(string)
		if _, present := t.Header["kid"]; present && !ok {
			return nil, errUnknownKey
		}
		k, err := v.jwks.key(ctx, kid)
		if err != nil {
			return nil, err
		}
		// The header's alg is already in JWT_ALGORITHMS (WithValidMethods);
		// it must also be one this key is for.
		if !contains(k.algs, t.Method.Alg()) {
			return nil, errAlgKeyMismatch
		}
		return k.pub, nil
	})
	if err != nil {
		return nil, &tokenError{tokenReason(err), err}
	}
	return claims, nil
}

var errAlgKeyMismatch = errors.New("algorithm does not match the key")

// tokenReason maps a verification error to the short reason clients see.
func tokenReason(err error) string {
	switch {
	case errors.Is(err, errUnknownKey):
		return "unknown key"
	case errors.Is(err, errAlgKeyMismatch):
		return "algorithm does not match the key"
	case errors.Is(err, jwt.ErrTokenMalformed):
		return "malformed token"
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		if strings.Contains(err.Error(), "signing method") {
			return "algorithm not allowed"
		}
		return "invalid signature"
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		return "algorithm not allowed"
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return "missing required claim"
	case errors.Is(err, jwt.ErrTokenExpired):
		return "token expired"
	case errors.Is(err, jwt.ErrTokenNotValidYet):
		return "token not valid yet"
	case errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return "token issued in the future"
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return "wrong issuer"
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return "wrong audience"
	case errors.Is(err, jwt.ErrTokenInvalidClaims):
		return "invalid claims"
	}
	return "invalid token"
}
