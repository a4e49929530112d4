package main

import (
	"context"
	"fmt"
)

// accessChecker decides whether a session may act on a playbook (SPEC §5.4).
type accessChecker struct {
	cfg   Config
	noetl *noetlClient
}

// Allowed reports the access decision for (session, playbook path, action),
// action being execute, view or modify.
//
// TODO(auth issue): cache by (token, path, action), playbook mode.
func (ac *accessChecker) Allowed(ctx context.Context, s *Session, path, action string) (bool, error) {
	var resp struct {
		Allowed bool `json:"allowed"`
	}
	err := ac.noetl.postJSON(ctx, "/api/auth/check-playbook-access",
		map[string]string{"session_token": s.Token, "playbook_path": path, "action": action}, &resp)
	if err != nil {
		return false, fmt.Errorf("check access: %w", err)
	}
	return resp.Allowed, nil
}
