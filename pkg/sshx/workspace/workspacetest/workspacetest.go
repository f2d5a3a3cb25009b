// Package workspacetest holds the real parts the tests of repository
// clones run against: git repositories, a smart-HTTP git server (git's own
// http-backend), HTTP redirects, and TCP listeners that record every
// connection they accept, so a test can assert that a refused repository
// was refused before anything connected.
//
// It is imported by tests only and must never be imported by production
// code.
package workspacetest

import (
	"net"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// GitRepo makes a git repository in a new directory under dir (a
// t.TempDir() when dir is "") with one commit holding README ("hello\n"),
// and returns its path.
func GitRepo(t testing.TB, dir string) string {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Fatalf("git is required: %v", err)
	}
	if dir == "" {
		dir = t.TempDir()
	}
	repo, err := os.MkdirTemp(dir, "repo-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(repo, "README"), []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	Git(t, "init", "-q", "-b", "main", repo)
	Git(t, "-C", repo, "add", "README")
	Git(t, "-C", repo, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "readme")
	return repo
}

// Git runs git with args or fails t.
func Git(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("git", args...).CombinedOutput(); err != nil {
		t.Fatalf("git %v: %v: %s", args, err, out)
	}
}

// Listener is a TCP listener on 127.0.0.1 that accepts every connection,
// records it, writes its banner (if any), reads what the client sends
// first and closes it, as a service that is not what the client expected
// would.
type Listener struct {
	ln     net.Listener
	banner string
	seen   chan string // remote address of each accepted connection
	done   chan struct{}
	conns  sync.WaitGroup

	mu      sync.Mutex
	counted int // connections before the last sentinel
}

// Listen starts a Listener closed when t ends.
func Listen(t testing.TB, banner string) *Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &Listener{ln: ln, banner: banner, seen: make(chan string, 1024), done: make(chan struct{})}
	go l.loop()
	t.Cleanup(func() {
		_ = ln.Close()
		<-l.done
	})
	return l
}

func (l *Listener) loop() {
	defer close(l.done)
	defer l.conns.Wait()
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		l.seen <- c.RemoteAddr().String()
		l.conns.Add(1)
		go func() {
			defer l.conns.Done()
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			if l.banner != "" {
				_, _ = c.Write([]byte(l.banner))
			}
			// Read before closing: closing with unread data resets the
			// connection, and a client killed by SIGPIPE says nothing.
			_, _ = c.Read(make([]byte, 4096))
		}()
	}
}

// Port is the listener's port.
func (l *Listener) Port() int { return l.ln.Addr().(*net.TCPAddr).Port }

// HostPort is 127.0.0.1:port.
func (l *Listener) HostPort() string { return l.ln.Addr().String() }

// Accepts returns how many connections the listener has accepted, not
// counting its own probes. It waits for no timer: it connects once
// itself and counts what was accepted before that probe, which the
// kernel's accept queue, first in first out, delivers after every
// connection made before it.
func (l *Listener) Accepts(t testing.TB) int {
	t.Helper()
	c, err := net.DialTimeout("tcp", l.HostPort(), 10*time.Second)
	if err != nil {
		t.Fatalf("probing %s: %v", l.HostPort(), err)
	}
	defer c.Close()
	probe := c.LocalAddr().String()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		select {
		case a := <-l.seen:
			if a == probe {
				return l.counted
			}
			l.counted++
		case <-deadline.C:
			t.Fatalf("listener %s never accepted its probe", l.HostPort())
			return -1
		}
	}
}

// HTTPGit is a smart-HTTP git server (git http-backend through CGI)
// serving the repositories under a directory, counting the requests it
// answers.
type HTTPGit struct {
	*httptest.Server
	requests atomic.Int64
}

// ServeGit serves the repositories under root over HTTP on 127.0.0.1
// until t ends: repository root/x is at URL/x.
func ServeGit(t testing.TB, root string) *HTTPGit {
	t.Helper()
	out, err := exec.Command("git", "--exec-path").Output()
	if err != nil {
		t.Fatalf("git --exec-path: %v", err)
	}
	backend := filepath.Join(strings.TrimSpace(string(out)), "git-http-backend")
	if _, err := os.Stat(backend); err != nil {
		t.Fatalf("git http-backend is required: %v", err)
	}
	g := &HTTPGit{}
	cgiH := &cgi.Handler{Path: backend, Env: []string{"GIT_PROJECT_ROOT=" + root, "GIT_HTTP_EXPORT_ALL=1"}}
	g.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.requests.Add(1)
		cgiH.ServeHTTP(w, r)
	}))
	t.Cleanup(g.Close)
	return g
}

// Requests is how many requests the server has answered.
func (g *HTTPGit) Requests() int64 { return g.requests.Load() }

// Port is the server's port.
func (g *HTTPGit) Port() int { return g.Listener.Addr().(*net.TCPAddr).Port }

// Redirector answers every request with a 301 to the same path at
// another base URL, counting the requests.
type Redirector struct {
	*httptest.Server
	requests atomic.Int64
}

// Redirect starts a Redirector on 127.0.0.1 sending everything to base
// (such as http://127.0.0.1:port), until t ends.
func Redirect(t testing.TB, base string) *Redirector {
	t.Helper()
	r := &Redirector{}
	r.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.requests.Add(1)
		http.Redirect(w, req, base+req.URL.RequestURI(), http.StatusMovedPermanently)
	}))
	t.Cleanup(r.Close)
	return r
}

// Requests is how many requests the redirector has answered.
func (r *Redirector) Requests() int64 { return r.requests.Load() }

// Port is the redirector's port.
func (r *Redirector) Port() int { return r.Listener.Addr().(*net.TCPAddr).Port }

// HostPort returns host:port for port on 127.0.0.1.
func HostPort(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }
