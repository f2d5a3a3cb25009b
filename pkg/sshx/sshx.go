// Package sshx is the SSH layer of the SSH backends (ext.compose-ssh,
// ext.vm-packer), on golang.org/x/crypto/ssh.
//
// It owns host-key verification against a known_hosts file (an unknown or
// changed key is a [*HostKeyError]; nothing here can skip the check),
// key-file and ssh-agent authentication, connect timeouts, keepalives, one
// reused connection per user@host:port ([Pool]), remote commands built only
// from quoted arguments ([Client.Run] takes an argv, never a shell string),
// and local port forwards ([Tunnel]).
//
// The package knows nothing of sandboxes, events or extensions: it must
// never import the bus, the event contract or a service.
package sshx

import (
	"errors"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Target is an SSH destination: user@host:port.
type Target struct {
	User string
	Host string
	Port int
}

var (
	userRE = regexp.MustCompile(`^[a-z_][a-z0-9_.-]{0,31}$`)
	hostRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$`)
)

// ParseTarget parses [user@]host[:port], with IPv6 addresses in brackets.
// A missing user is defaultUser and a missing port is 22. The user and host
// must be plain names: no option (leading '-') or shell character can get
// through.
func ParseTarget(s, defaultUser string) (Target, error) {
	t := Target{User: defaultUser, Port: 22}
	rest := s
	if u, h, ok := strings.Cut(s, "@"); ok {
		t.User, rest = u, h
	}
	host, port := rest, ""
	switch {
	case strings.HasPrefix(rest, "["):
		end := strings.IndexByte(rest, ']')
		if end < 0 {
			return Target{}, fmt.Errorf("parsing ssh target %q: unclosed '['", s)
		}
		host = rest[1:end]
		if tail := rest[end+1:]; tail != "" {
			if !strings.HasPrefix(tail, ":") {
				return Target{}, fmt.Errorf("parsing ssh target %q: want [ipv6]:port", s)
			}
			port = tail[1:]
		}
		if ip := net.ParseIP(host); ip == nil || ip.To4() != nil {
			return Target{}, fmt.Errorf("parsing ssh target %q: %q is not an IPv6 address", s, host)
		}
	case strings.Count(rest, ":") == 1:
		host, port, _ = strings.Cut(rest, ":")
	}
	if port != "" {
		p, err := strconv.Atoi(port)
		if err != nil || p < 1 || p > 65535 {
			return Target{}, fmt.Errorf("parsing ssh target %q: port %q: want 1-65535", s, port)
		}
		t.Port = p
	}
	t.Host = host
	return t, t.Validate()
}

// Validate checks that t names a user, a host and a port.
func (t Target) Validate() error {
	if t.User == "" {
		return fmt.Errorf("ssh target %s: user required", t)
	}
	if !userRE.MatchString(t.User) {
		return fmt.Errorf("ssh target %s: invalid user %q", t, t.User)
	}
	if net.ParseIP(t.Host) == nil && !hostRE.MatchString(t.Host) {
		return fmt.Errorf("ssh target %s: invalid host %q", t, t.Host)
	}
	if t.Port < 1 || t.Port > 65535 {
		return fmt.Errorf("ssh target %s: port %d: want 1-65535", t, t.Port)
	}
	return nil
}

// Addr returns host:port, the address to dial.
func (t Target) Addr() string { return net.JoinHostPort(t.Host, strconv.Itoa(t.Port)) }

// String returns user@host:port, the key of a pooled connection.
func (t Target) String() string { return t.User + "@" + t.Addr() }

// Config says how to reach and trust one SSH host.
type Config struct {
	// Target is the host to connect to. Required.
	Target Target
	// KnownHostsFile is an OpenSSH known_hosts file holding the host's key.
	// Required: a host whose key is not in it is refused.
	KnownHostsFile string
	// IdentityFile is an unencrypted private key file (OpenSSH or PEM).
	IdentityFile string
	// Agent authenticates with the keys of the ssh-agent at AgentSocket.
	Agent bool
	// AgentSocket is the agent's socket. Default: $SSH_AUTH_SOCK, read when
	// connecting.
	AgentSocket string
	// ConnectTimeout bounds dialing and the SSH handshake (as does the
	// caller's ctx). Default 15s.
	ConnectTimeout time.Duration
	// KeepAliveInterval is how often an idle connection is probed. Default
	// 15s; negative disables keepalives.
	KeepAliveInterval time.Duration
	// KeepAliveMax is how many probes may go unanswered before the
	// connection is closed. Default 3.
	KeepAliveMax int
	// MaxSessions caps the commands running at once on one connection;
	// more wait their turn. It must stay below the server's MaxSessions
	// (OpenSSH's default is 10). Default 8.
	MaxSessions int
}

// Defaults.
const (
	DefaultConnectTimeout    = 15 * time.Second
	DefaultKeepAliveInterval = 15 * time.Second
	DefaultKeepAliveMax      = 3
	DefaultMaxSessions       = 8
)

func (c Config) withDefaults() Config {
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.KeepAliveInterval == 0 {
		c.KeepAliveInterval = DefaultKeepAliveInterval
	}
	if c.KeepAliveMax <= 0 {
		c.KeepAliveMax = DefaultKeepAliveMax
	}
	if c.MaxSessions <= 0 {
		c.MaxSessions = DefaultMaxSessions
	}
	return c
}

// Validate checks c without touching the network or the files.
func (c Config) Validate() error {
	if err := c.Target.Validate(); err != nil {
		return err
	}
	if c.KnownHostsFile == "" {
		return fmt.Errorf("ssh %s: known_hosts file required (host keys are always verified)", c.Target)
	}
	if c.IdentityFile == "" && !c.Agent {
		return fmt.Errorf("ssh %s: no authentication: set an identity file or use the agent", c.Target)
	}
	return nil
}

// ErrClosed is returned by a closed [Client], [Pool] or [Tunnel].
var ErrClosed = errors.New("sshx: closed")
