package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestSubcommandSkipsGlobalFlags(t *testing.T) {
	args := []string{"--root", "/run/runc", "--log=/x.log", "--log-format", "json", "--systemd-cgroup",
		"create", "--bundle", "/b", "id"}
	sub, rest := subcommand(args)
	if sub != "create" || flagValue(rest, "--bundle", "-b") != "/b" {
		t.Fatalf("got %q %v", sub, rest)
	}
	for _, a := range [][]string{{"exec", "-p=/p.json", "id"}, {"exec", "--process", "/p.json", "id"}} {
		sub, rest := subcommand(a)
		if sub != "exec" || flagValue(rest, "--process", "-p") != "/p.json" {
			t.Fatalf("%v: got %q %v", a, sub, rest)
		}
	}
}

// patch must drop exactly the capabilities our bounding set lacks, from every list, and keep
// the rest of the document (big numbers included) unchanged.
func TestPatchDropsMissingCapsOnly(t *testing.T) {
	missing, err := missingCaps()
	if err != nil {
		t.Fatal(err)
	}
	if len(missing) == 0 {
		t.Skip("this machine's bounding set holds every capability: nothing to drop")
	}
	all := append([]string{}, capNames...)
	dir := t.TempDir()
	cfg := map[string]any{
		"ociVersion": "1.0.2",
		"linux":      map[string]any{"resources": map[string]any{"memory": map[string]any{"limit": json.Number("9223372036854771712")}}},
		"process": map[string]any{"capabilities": map[string]any{
			"bounding": all, "effective": all, "permitted": all, "inheritable": all, "ambient": []string{},
		}},
	}
	data, _ := json.Marshal(cfg)
	path := filepath.Join(dir, "config.json")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := patch(path, true); err != nil {
		t.Fatal(err)
	}
	out, _ := os.ReadFile(path)
	var got struct {
		Linux   json.RawMessage `json:"linux"`
		Process struct {
			Capabilities map[string][]string `json:"capabilities"`
		} `json:"process"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatal(err)
	}
	want := []string{}
	for _, c := range all {
		if !contains(missing, c) {
			want = append(want, c)
		}
	}
	for _, set := range []string{"bounding", "effective", "permitted", "inheritable"} {
		if !reflect.DeepEqual(got.Process.Capabilities[set], want) {
			t.Errorf("%s = %v, want %v", set, got.Process.Capabilities[set], want)
		}
	}
	if string(got.Linux) != `{"resources":{"memory":{"limit":9223372036854771712}}}` {
		t.Errorf("linux changed: %s", got.Linux)
	}
	if info, _ := os.Stat(path); info.Mode().Perm() != 0o600 {
		t.Errorf("mode changed to %v", info.Mode())
	}

	// The exec process spec has capabilities at the top level.
	proc := filepath.Join(dir, "process.json")
	if err := os.WriteFile(proc, []byte(`{"args":["sh"],"capabilities":{"bounding":["`+missing[0]+`","CAP_KILL"]}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := patch(proc, false); err != nil {
		t.Fatal(err)
	}
	out, _ = os.ReadFile(proc)
	if string(out) != `{"args":["sh"],"capabilities":{"bounding":["CAP_KILL"]}}` {
		t.Errorf("process spec = %s", out)
	}
}
