package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The shipped example parses, with every key it shows uncommented.
func TestConfigExample(t *testing.T) {
	b, err := os.ReadFile("../../config.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := loadConfig("../../config.toml.example"); err != nil {
		t.Fatalf("config.toml.example: %v", err)
	}
	// Uncomment the "# key = value" lines (not prose) and parse again.
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		t := strings.TrimSpace(l)
		if strings.HasPrefix(t, "# ") && (strings.Contains(t, " = ") || strings.HasPrefix(t, "# [[")) &&
			!strings.Contains(t, "default") && !strings.Contains(t, ":") {
			l = strings.TrimPrefix(t, "# ")
		}
		out = append(out, l)
	}
	p := filepath.Join(t.TempDir(), "full.toml")
	os.WriteFile(p, []byte(strings.Join(out, "\n")), 0o600)
	if _, err := loadConfig(p); err != nil {
		t.Fatalf("config.toml.example with its keys uncommented: %v\n%s", err, strings.Join(out, "\n"))
	}
}
