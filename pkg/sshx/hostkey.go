package sshx

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// Host-key failures, matched with errors.Is on a [*HostKeyError].
var (
	// ErrHostKeyUnknown: the known_hosts file has no key for the host.
	ErrHostKeyUnknown = errors.New("host key unknown")
	// ErrHostKeyChanged: the host offered a key other than the one known
	// for it, which can signify a man-in-the-middle attack.
	ErrHostKeyChanged = errors.New("host key changed")
	// ErrHostKeyRevoked: the host offered a key marked @revoked.
	ErrHostKeyRevoked = errors.New("host key revoked")
)

// HostKeyError is a host key the known_hosts file does not vouch for. The
// connection is refused before authentication: no credential was sent.
type HostKeyError struct {
	// Host is the host:port dialled.
	Host string
	// KeyType and Fingerprint (SHA256) describe the key the host offered.
	KeyType     string
	Fingerprint string
	// KnownHostsFile is the file the key was checked against.
	KnownHostsFile string
	// Known lists the keys the file holds for the host, as
	// "type fingerprint (file:line)"; empty when the host is unknown.
	Known []string
	// Reason is one of ErrHostKeyUnknown, ErrHostKeyChanged,
	// ErrHostKeyRevoked.
	Reason error
}

// Error names the host, the offered key and the reason.
func (e *HostKeyError) Error() string {
	switch e.Reason {
	case ErrHostKeyChanged:
		return fmt.Sprintf("host key of %s changed: it offered %s %s but %s knows it as %s (possible man-in-the-middle; if the key was rotated, update the file)",
			e.Host, e.KeyType, e.Fingerprint, e.KnownHostsFile, strings.Join(e.Known, ", "))
	case ErrHostKeyRevoked:
		return fmt.Sprintf("host key of %s is revoked: it offered %s %s, marked @revoked in %s", e.Host, e.KeyType, e.Fingerprint, e.KnownHostsFile)
	default:
		return fmt.Sprintf("host key of %s unknown: it offered %s %s, which is not in %s (add the host's key to trust it)",
			e.Host, e.KeyType, e.Fingerprint, e.KnownHostsFile)
	}
}

// Unwrap returns the reason.
func (e *HostKeyError) Unwrap() error { return e.Reason }

// hostKeys is the known_hosts check of one connection: the callback that
// turns every refusal into a [*HostKeyError], and the host-key algorithms
// to ask for (those of the keys known for the host, so that a host with
// several keys is not reported as changed when it offers another type).
type hostKeys struct {
	callback   ssh.HostKeyCallback
	algorithms []string
}

func loadHostKeys(file, addr string) (hostKeys, error) {
	cb, err := knownhosts.New(file)
	if err != nil {
		return hostKeys{}, fmt.Errorf("reading known_hosts: %w", err)
	}
	check := func(hostname string, remote net.Addr, key ssh.PublicKey) error {
		err := cb(hostname, remote, key)
		if err == nil {
			return nil
		}
		hke := &HostKeyError{Host: hostname, KeyType: key.Type(), Fingerprint: ssh.FingerprintSHA256(key), KnownHostsFile: file}
		var ke *knownhosts.KeyError
		var re *knownhosts.RevokedError
		switch {
		case errors.As(err, &re):
			hke.Reason = ErrHostKeyRevoked
		case errors.As(err, &ke) && len(ke.Want) > 0:
			hke.Reason = ErrHostKeyChanged
			for _, k := range ke.Want {
				hke.Known = append(hke.Known, fmt.Sprintf("%s %s (%s:%d)", k.Key.Type(), ssh.FingerprintSHA256(k.Key), k.Filename, k.Line))
			}
		case errors.As(err, &ke):
			hke.Reason = ErrHostKeyUnknown
		default:
			return fmt.Errorf("checking host key of %s: %w", hostname, err)
		}
		return hke
	}
	return hostKeys{callback: check, algorithms: knownAlgorithms(cb, addr)}, nil
}

// probeKey is a key no known_hosts line can hold: checking it reports every
// key known for a host.
type probeKey struct{}

func (probeKey) Type() string                        { return "sandboxer-probe" }
func (probeKey) Marshal() []byte                     { return []byte("\x00\x00\x00\x0fsandboxer-probe") }
func (probeKey) Verify([]byte, *ssh.Signature) error { return errors.New("probe key verifies nothing") }

// knownAlgorithms lists the host-key algorithms of the keys cb knows for
// addr, strongest first; nil (the library's default) when it knows none.
func knownAlgorithms(cb ssh.HostKeyCallback, addr string) []string {
	tcp, _ := net.ResolveTCPAddr("tcp", addr)
	var remote net.Addr = tcp
	if tcp == nil {
		remote = &net.TCPAddr{}
	}
	var ke *knownhosts.KeyError
	if !errors.As(cb(addr, remote, probeKey{}), &ke) {
		return nil
	}
	var out []string
	for _, k := range ke.Want {
		for _, a := range algorithmsForKeyType(k.Key.Type()) {
			if !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
	}
	return out
}

func algorithmsForKeyType(t string) []string {
	switch t {
	case ssh.KeyAlgoRSA:
		return []string{ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, ssh.KeyAlgoRSA}
	case ssh.CertAlgoRSAv01:
		return []string{ssh.CertAlgoRSASHA512v01, ssh.CertAlgoRSASHA256v01, ssh.CertAlgoRSAv01}
	default:
		return []string{t}
	}
}
