// runc-wrapper sits between a container manager (dockerd's containerd shim on the host,
// containerd inside the kind node) and the real runc. Our machines run with a capability
// bounding set that lacks CAP_SYS_RESOURCE, and a privileged container asks runc for every
// capability, so stock runc fails with "unable to apply caps: operation not permitted".
// Before `create`/`run` (bundle config.json) and `exec` (the --process file) this removes from
// every capability list each capability our own bounding set lacks (we cannot hand out what
// we do not hold), then execs the real runc with the arguments unchanged. Every other
// subcommand is a plain exec. Static, stdlib only, so the same binary serves host and node.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// capNames follows linux/capability.h: index = capability number.
var capNames = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
	"CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
	"CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
	"CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
	"CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
	"CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
	"CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
	"CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
	"CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
}

// runc's global flags that take a value (urfave/cli: "--root x" or "--root=x").
var globalWithValue = map[string]bool{
	"--root": true, "--log": true, "--log-format": true, "--criu": true, "--rootless": true,
}

func main() {
	if err := run(os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "keylimit runc-wrapper: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	real, err := realRunc()
	if err != nil {
		return err
	}
	sub, rest := subcommand(args[1:])
	switch sub {
	case "create", "run":
		bundle := flagValue(rest, "--bundle", "-b")
		if bundle == "" {
			bundle = "."
		}
		if err := patch(filepath.Join(bundle, "config.json"), true); err != nil {
			return err
		}
	case "exec":
		if p := flagValue(rest, "--process", "-p"); p != "" {
			if err := patch(p, false); err != nil {
				return err
			}
		}
	}
	argv := append([]string{real}, args[1:]...)
	if err := syscall.Exec(real, argv, os.Environ()); err != nil {
		return fmt.Errorf("exec %s: %w", real, err)
	}
	return nil
}

// realRunc finds the runc to exec: $KEYLIMIT_REAL_RUNC, else the usual places, skipping
// ourselves so that installing the wrapper as "runc" cannot loop.
func realRunc() (string, error) {
	candidates := []string{"/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc", "/usr/local/bin/runc"}
	if env := os.Getenv("KEYLIMIT_REAL_RUNC"); env != "" {
		candidates = []string{env}
	}
	self, _ := os.Executable()
	selfInfo, _ := os.Stat(self)
	for _, c := range candidates {
		info, err := os.Stat(c)
		if err != nil || info.IsDir() || info.Mode()&0o111 == 0 {
			continue
		}
		if selfInfo != nil && os.SameFile(info, selfInfo) {
			continue
		}
		return c, nil
	}
	return "", fmt.Errorf("no real runc found in %v (set KEYLIMIT_REAL_RUNC)", candidates)
}

// subcommand returns the first non-flag argument after runc's global flags, and what follows.
func subcommand(args []string) (string, []string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			return a, args[i+1:]
		}
		if globalWithValue[a] {
			i++ // skip the value
		}
	}
	return "", nil
}

// flagValue finds "--long x", "--long=x", "-s x" or "-s=x" among a subcommand's arguments.
func flagValue(args []string, long, short string) string {
	for i, a := range args {
		if a == "--" {
			break
		}
		for _, name := range []string{long, short} {
			if a == name && i+1 < len(args) {
				return args[i+1]
			}
			if strings.HasPrefix(a, name+"=") {
				return a[len(name)+1:]
			}
		}
	}
	return ""
}

// missingCaps lists the capabilities absent from our bounding set; on a normal machine it is
// empty and the wrapper changes nothing.
func missingCaps() ([]string, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "CapBnd:") {
			continue
		}
		bnd, err := strconv.ParseUint(strings.TrimSpace(line[len("CapBnd:"):]), 16, 64)
		if err != nil {
			return nil, fmt.Errorf("parse CapBnd %q: %w", line, err)
		}
		var missing []string
		for n, name := range capNames {
			if bnd&(1<<uint(n)) == 0 {
				missing = append(missing, name)
			}
		}
		return missing, nil
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("no CapBnd line in /proc/self/status")
}

// patch removes the missing capabilities from process.capabilities (bundle config, nested
// under "process") or capabilities (exec process spec, top level). Everything else in the
// file is kept byte for byte (json.RawMessage), and the file is replaced atomically.
func patch(path string, nested bool) error {
	missing, err := missingCaps()
	if err != nil {
		return fmt.Errorf("reading capability bounding set: %w", err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var drop []string
	for _, c := range missing {
		if bytes.Contains(data, []byte(`"`+c+`"`)) {
			drop = append(drop, c)
		}
	}
	if len(drop) == 0 {
		return nil // fast path: nothing to remove
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	proc := top
	if nested {
		raw, ok := top["process"]
		if !ok {
			return nil
		}
		if err := json.Unmarshal(raw, &proc); err != nil {
			return fmt.Errorf("%s: process: %w", path, err)
		}
	}
	rawCaps, ok := proc["capabilities"]
	if !ok || string(rawCaps) == "null" {
		return nil
	}
	var caps map[string]json.RawMessage
	if err := json.Unmarshal(rawCaps, &caps); err != nil {
		return fmt.Errorf("%s: capabilities: %w", path, err)
	}
	changed := false
	for set, raw := range caps {
		var list []string
		if err := json.Unmarshal(raw, &list); err != nil || list == nil {
			continue
		}
		kept := list[:0:0]
		for _, c := range list {
			if !contains(drop, c) {
				kept = append(kept, c)
			}
		}
		if len(kept) != len(list) {
			if caps[set], err = json.Marshal(kept); err != nil {
				return err
			}
			changed = true
		}
	}
	if !changed {
		return nil
	}
	if proc["capabilities"], err = json.Marshal(caps); err != nil {
		return err
	}
	if nested {
		if top["process"], err = json.Marshal(proc); err != nil {
			return err
		}
	}
	out, err := json.Marshal(top)
	if err != nil {
		return err
	}
	return writeAtomic(path, out)
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func writeAtomic(path string, data []byte) error {
	mode := os.FileMode(0o644)
	if info, err := os.Stat(path); err == nil {
		mode = info.Mode().Perm()
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".runc-wrapper-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
