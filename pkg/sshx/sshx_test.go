package sshx_test

import (
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/sshx"
)

func TestParseTarget(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in, user string
		want           sshx.Target
		wantErr        string
	}{
		{name: "full", in: "deploy@host.example:2222", want: sshx.Target{User: "deploy", Host: "host.example", Port: 2222}},
		{name: "default port", in: "deploy@10.0.0.5", want: sshx.Target{User: "deploy", Host: "10.0.0.5", Port: 22}},
		{name: "default user", in: "vm1:22", user: "dev", want: sshx.Target{User: "dev", Host: "vm1", Port: 22}},
		{name: "ipv6", in: "root@[::1]:2200", want: sshx.Target{User: "root", Host: "::1", Port: 2200}},
		{name: "bare ipv6", in: "root@::1", want: sshx.Target{User: "root", Host: "::1", Port: 22}},
		{name: "no user", in: "host", wantErr: "user required"},
		{name: "option as host", in: "root@-oProxyCommand=x", wantErr: "invalid host"},
		{name: "option as user", in: "-oProxyCommand=x@host", wantErr: "invalid user"},
		{name: "shell in host", in: "root@h;id", wantErr: "invalid host"},
		{name: "port range", in: "root@h:70000", wantErr: "want 1-65535"},
		{name: "port word", in: "root@h:ssh", wantErr: "want 1-65535"},
		{name: "ipv4 in brackets", in: "root@[10.0.0.1]:22", wantErr: "not an IPv6"},
		{name: "unclosed", in: "root@[::1:22", wantErr: "unclosed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := sshx.ParseTarget(tc.in, tc.user)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseTarget(%q) = %v, %v; want error containing %q", tc.in, got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseTarget(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestTargetString(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		t    sshx.Target
		want string
	}{
		{"ipv4", sshx.Target{User: "u", Host: "127.0.0.1", Port: 22}, "u@127.0.0.1:22"},
		{"ipv6", sshx.Target{User: "u", Host: "::1", Port: 2222}, "u@[::1]:2222"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := tc.t.String(); got != tc.want {
				t.Errorf("String() = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	target := sshx.Target{User: "u", Host: "h", Port: 22}
	for _, tc := range []struct {
		name    string
		cfg     sshx.Config
		wantErr string
	}{
		{"ok identity", sshx.Config{Target: target, KnownHostsFile: "/k", IdentityFile: "/id"}, ""},
		{"ok agent", sshx.Config{Target: target, KnownHostsFile: "/k", Agent: true}, ""},
		{"no known_hosts", sshx.Config{Target: target, IdentityFile: "/id"}, "known_hosts file required"},
		{"no auth", sshx.Config{Target: target, KnownHostsFile: "/k"}, "no authentication"},
		{"bad target", sshx.Config{Target: sshx.Target{Host: "h", Port: 22}, KnownHostsFile: "/k", Agent: true}, "user required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := tc.cfg.Validate()
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Validate = %v, want error containing %q", err, tc.wantErr)
			}
		})
	}
}
