package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestKubernetesManifests parses deploy/kubernetes and checks what operators
// rely on: 3 replicas, probes, hardening, a grace period longer than the
// drain, the public and internal services, the network policy, the PDB, and
// the secret/config split.
func TestKubernetesManifests(t *testing.T) {
	t.Parallel()
	files, _ := filepath.Glob("deploy/kubernetes/*.yaml")
	if len(files) == 0 {
		t.Fatal("no manifests")
	}
	byKind := map[string][]map[string]any{}
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range strings.Split(string(raw), "\n---\n") {
			obj, err := parseYAML(doc)
			if err != nil {
				t.Fatalf("%s document %d: %v", f, i, err)
			}
			m, _ := obj.(map[string]any)
			kind, _ := m["kind"].(string)
			if kind == "" || m["apiVersion"] == nil || get(m, "metadata.name") == nil {
				t.Fatalf("%s document %d lacks kind/apiVersion/metadata.name", f, i)
			}
			byKind[kind] = append(byKind[kind], m)
		}
	}
	for _, k := range []string{"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "ConfigMap", "Secret"} {
		if len(byKind[k]) == 0 {
			t.Errorf("no %s", k)
		}
	}
	if t.Failed() {
		return
	}

	d := byKind["Deployment"][0]
	want := map[string]any{
		"spec.replicas": "3",
		"spec.template.spec.securityContext.runAsNonRoot":                          "true",
		"spec.template.spec.containers.0.securityContext.readOnlyRootFilesystem":   "true",
		"spec.template.spec.containers.0.securityContext.allowPrivilegeEscalation": "false",
		"spec.template.spec.containers.0.readinessProbe.httpGet.path":              "/ready",
		"spec.template.spec.containers.0.livenessProbe.httpGet.path":               "/health",
		"spec.template.spec.containers.0.ports.0.containerPort":                    "8090",
		"spec.template.spec.containers.0.ports.1.containerPort":                    "8091",
		"spec.template.spec.containers.0.securityContext.capabilities.drop.0":      "ALL",
		"spec.template.spec.containers.0.envFrom.0.configMapRef.name":              "noetl-gateway",
		"spec.template.spec.containers.0.envFrom.1.secretRef.name":                 "noetl-gateway",
	}
	for path, v := range want {
		if got := get(d, path); fmt.Sprint(got) != v {
			t.Errorf("Deployment %s = %v, want %v", path, got, v)
		}
	}
	for _, path := range []string{"spec.template.spec.containers.0.resources.requests.cpu", "spec.template.spec.containers.0.resources.requests.memory", "spec.template.spec.containers.0.resources.limits.memory"} {
		if get(d, path) == nil {
			t.Errorf("Deployment lacks %s", path)
		}
	}

	cm := byKind["ConfigMap"][0]
	sec := byKind["Secret"][0]
	shutdown, _ := strconv.Atoi(fmt.Sprint(get(cm, "data.SHUTDOWN_TIMEOUT_SECS")))
	preStop, _ := strconv.Atoi(fmt.Sprint(get(d, "spec.template.spec.containers.0.lifecycle.preStop.sleep.seconds")))
	grace, _ := strconv.Atoi(fmt.Sprint(get(d, "spec.template.spec.terminationGracePeriodSeconds")))
	if shutdown == 0 || grace <= shutdown+preStop {
		t.Errorf("terminationGracePeriodSeconds %d must exceed SHUTDOWN_TIMEOUT_SECS %d + preStop %d", grace, shutdown, preStop)
	}
	if get(sec, "stringData.CALLBACK_TOKEN") == nil || get(cm, "data.CALLBACK_TOKEN") != nil || get(cm, "data.NATS_PASSWORD") != nil {
		t.Error("CALLBACK_TOKEN and NATS_PASSWORD belong in the Secret, not the ConfigMap")
	}
	if get(cm, "data.GATEWAY_INTERNAL_ADDR") != ":8091" {
		t.Error("the ConfigMap must set GATEWAY_INTERNAL_ADDR to the internal port")
	}
	// The ConfigMap must be a configuration the gateway accepts.
	env := map[string]string{"CALLBACK_TOKEN": fmt.Sprint(get(sec, "stringData.CALLBACK_TOKEN"))}
	for k, v := range get(cm, "data").(map[string]any) {
		env[k] = fmt.Sprint(v)
	}
	if _, err := loadConfig(envOf(env)); err != nil {
		t.Errorf("the ConfigMap is not a valid configuration: %v", err)
	}

	ports := map[string]string{}
	for _, s := range byKind["Service"] {
		ports[fmt.Sprint(get(s, "metadata.name"))] = fmt.Sprintf("%v→%v", get(s, "spec.ports.0.port"), get(s, "spec.ports.0.targetPort"))
	}
	if ports["noetl-gateway"] != "80→8090" || ports["noetl-gateway-internal"] != "8091→8091" {
		t.Errorf("services: %v", ports)
	}
	np := byKind["NetworkPolicy"][0]
	if get(np, "spec.ingress.1.ports.0.port") != "8091" || get(np, "spec.ingress.1.from.0.podSelector") == nil {
		t.Errorf("NetworkPolicy must limit 8091 to selected pods: %v", get(np, "spec.ingress"))
	}
	if get(byKind["PodDisruptionBudget"][0], "spec.minAvailable") == nil {
		t.Error("PDB without minAvailable")
	}
}

// get walks a dotted path through maps and lists ("a.b.0.c").
func get(v any, path string) any {
	for _, p := range strings.Split(path, ".") {
		switch n := v.(type) {
		case map[string]any:
			v = n[p]
		case []any:
			i, err := strconv.Atoi(p)
			if err != nil || i >= len(n) {
				return nil
			}
			v = n[i]
		default:
			return nil
		}
	}
	return v
}

// parseYAML reads the block-style YAML subset the manifests use: maps,
// lists ("- "), scalars (quotes stripped), comments. Flow style is refused
// so the manifests stay in that subset.
func parseYAML(doc string) (any, error) {
	type line struct {
		indent int
		text   string
	}
	var lines []line
	for _, raw := range strings.Split(doc, "\n") {
		s := strings.TrimRight(raw, " ")
		trimmed := strings.TrimLeft(s, " ")
		if trimmed == "" || strings.HasPrefix(trimmed, "#") || trimmed == "---" {
			continue
		}
		if strings.HasPrefix(trimmed, "[") || strings.HasPrefix(trimmed, "{") || strings.Contains(trimmed, ": [") || strings.Contains(trimmed, ": {") {
			return nil, fmt.Errorf("flow style not supported: %q", trimmed)
		}
		lines = append(lines, line{len(s) - len(trimmed), trimmed})
	}
	pos := 0
	var block func(indent int) (any, error)
	scalar := func(s string) any {
		if i := strings.Index(s, " #"); i >= 0 && !strings.HasPrefix(s, `"`) {
			s = strings.TrimSpace(s[:i])
		}
		return strings.Trim(s, `"'`)
	}
	// entry parses "key: value" or "key:" (nested block) at indent.
	entry := func(m map[string]any, text string, indent int) error {
		k, v, ok := strings.Cut(text, ":")
		if !ok {
			return fmt.Errorf("expected key: %q", text)
		}
		v = strings.TrimSpace(v)
		if v != "" {
			m[k] = scalar(v)
			return nil
		}
		if pos < len(lines) && lines[pos].indent > indent || pos < len(lines) && lines[pos].indent == indent && strings.HasPrefix(lines[pos].text, "- ") {
			child, err := block(lines[pos].indent)
			if err != nil {
				return err
			}
			m[k] = child
			return nil
		}
		m[k] = nil
		return nil
	}
	block = func(indent int) (any, error) {
		if strings.HasPrefix(lines[pos].text, "- ") {
			var list []any
			for pos < len(lines) && lines[pos].indent == indent && strings.HasPrefix(lines[pos].text, "- ") {
				item := strings.TrimPrefix(lines[pos].text, "- ")
				pos++
				if !strings.Contains(item, ": ") && !strings.HasSuffix(item, ":") {
					list = append(list, scalar(item))
					continue
				}
				m := map[string]any{}
				if err := entry(m, item, indent+2); err != nil {
					return nil, err
				}
				for pos < len(lines) && lines[pos].indent == indent+2 && !strings.HasPrefix(lines[pos].text, "- ") {
					text := lines[pos].text
					pos++
					if err := entry(m, text, indent+2); err != nil {
						return nil, err
					}
				}
				list = append(list, m)
			}
			return list, nil
		}
		m := map[string]any{}
		for pos < len(lines) && lines[pos].indent == indent && !strings.HasPrefix(lines[pos].text, "- ") {
			text := lines[pos].text
			pos++
			if err := entry(m, text, indent); err != nil {
				return nil, err
			}
		}
		return m, nil
	}
	if len(lines) == 0 {
		return nil, fmt.Errorf("empty document")
	}
	v, err := block(0)
	if err == nil && pos != len(lines) {
		err = fmt.Errorf("unparsed line %q", lines[pos].text)
	}
	return v, err
}
