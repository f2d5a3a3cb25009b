package natstest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
)

// ClusterName is the name of the cluster [StartCluster] forms.
const ClusterName = "sandboxer"

// clusterReadyTimeout bounds how long [StartCluster] waits for the
// JetStream meta group to form.
const clusterReadyTimeout = 30 * time.Second

// Cluster is a running test cluster: real nats-servers in this process,
// routed to each other, with clustered JetStream, every node trusting one
// authority as the nodes of a real deployment do. Unlike [Start], it
// declares nothing: a test declares the topology it needs, at the
// replicas it needs.
type Cluster struct {
	// Auth is the authority every node trusts.
	Auth *auth.Authority

	servers []*server.Server
	logs    *nodeLogs
	// routesPerPeer is how many route connections a node keeps to each
	// other node: its pool and one per pinned account.
	routesPerPeer int

	users
}

// StartCluster starts n (at least two) nats-servers named n1..nN in the
// cluster [ClusterName], each with JetStream on its own temporary
// directory, a client listener on a random loopback port and routes to
// every other node, and waits until the routes are all up, the JetStream
// meta group has a leader that sees every node, every node is current,
// and every node serves JetStream to the SANDBOXER account. The nodes are
// shut down by t.Cleanup; if the test failed, their logs are printed.
func StartCluster(tb testing.TB, n int) *Cluster {
	tb.Helper()
	if n < 2 {
		// A meta group expects at least two peers; one node is [Start].
		tb.Fatalf("starting a cluster of %d nodes: need at least two", n)
	}
	dir := tb.TempDir()
	a, err := auth.Open(filepath.Join(dir, "auth"))
	if err != nil {
		tb.Fatalf("opening authority: %v", err)
	}
	c := &Cluster{Auth: a, logs: &nodeLogs{}}
	c.users = newUsers(a, "cluster", c.ClientURLs)
	// Runs after the nodes stopped (cleanups run last first).
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("nats-server logs of the cluster:\n%s", c.logs)
		}
	})
	// The cluster ports are picked free before the servers bind them, so
	// another process may take one in between: try again on fresh ports.
	var errs []error
	for try := 1; try <= 3 && c.servers == nil; try++ {
		servers, perPeer, err := startNodes(a, filepath.Join(dir, "try"+strconv.Itoa(try)), n, c.logs)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		c.servers, c.routesPerPeer = servers, perPeer
	}
	if c.servers == nil {
		tb.Fatalf("starting a %d-node cluster: %v", n, errors.Join(errs...))
	}
	tb.Cleanup(c.shutdown)
	if err := c.awaitReady(clusterReadyTimeout); err != nil {
		tb.Fatalf("starting a %d-node cluster: %v", n, err)
	}
	return c
}

// startNodes starts n routed nodes under dir, logging to logs, and waits
// until each accepts clients and routes. It returns them and how many
// route connections each keeps to each other. On error, none is left
// running.
func startNodes(a *auth.Authority, dir string, n int, logs *nodeLogs) ([]*server.Server, int, error) {
	ports, err := freePorts(n)
	if err != nil {
		return nil, 0, err
	}
	// Routes authenticate with a secret of this cluster's, so that a node
	// of another test's cluster that happens to dial one of these ports
	// cannot join it.
	secret := make([]byte, 16)
	if _, err := rand.Read(secret); err != nil {
		return nil, 0, fmt.Errorf("making the route secret: %w", err)
	}
	user, pass := "route", hex.EncodeToString(secret)
	// Every node lists every node, itself included (a server ignores a
	// route to itself): each then expects n peers in the meta group.
	routes := make([]*url.URL, n)
	for i, p := range ports {
		routes[i] = &url.URL{Scheme: "nats-route", User: url.UserPassword(user, pass), Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(p))}
	}
	var servers []*server.Server
	var perPeer int
	stop := func() { shutdownAll(servers) } // the ones started so far
	for i := range n {
		name := "n" + strconv.Itoa(i+1)
		o := &server.Options{}
		if err := o.ProcessConfigString(a.ServerConfig(filepath.Join(dir, name, "jwt"))); err != nil {
			stop()
			return nil, 0, fmt.Errorf("reading auth configuration of %s: %w", name, err)
		}
		o.ServerName = name
		o.Host, o.Port = "127.0.0.1", -1
		o.NoSigs, o.NoLog = true, true
		o.JetStream = true
		o.StoreDir = filepath.Join(dir, name, "jetstream")
		// Clustered JetStream places replicas by the limits each node
		// reports; these are bookkeeping, not allocations.
		o.JetStreamMaxMemory, o.JetStreamMaxStore = 1<<30, 10<<30
		o.Cluster.Name = ClusterName
		o.Cluster.Host, o.Cluster.Port = "127.0.0.1", ports[i]
		o.Cluster.Username, o.Cluster.Password = user, pass
		o.Routes = routes
		s, err := server.NewServer(o)
		if err != nil {
			stop()
			return nil, 0, fmt.Errorf("configuring %s: %w", name, err)
		}
		// NewServer filled in the defaults: a pool of route connections,
		// and one more for each pinned account (the system account's).
		perPeer = max(o.Cluster.PoolSize, 1) + len(o.Cluster.PinnedAccounts)
		s.SetLogger(logs.node(name), false, false)
		s.Start()
		servers = append(servers, s)
	}
	for _, s := range servers {
		if !s.ReadyForConnections(10 * time.Second) {
			stop()
			return nil, 0, fmt.Errorf("%s not ready for clients and routes after 10s (cluster port %v taken?)", s.Name(), ports)
		}
	}
	return servers, perPeer, nil
}

// freePorts returns n loopback ports that were free a moment ago.
func freePorts(n int) ([]int, error) {
	var ports []int
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			_ = ln.Close()
		}
	}()
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("picking a free port: %w", err)
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// awaitReady waits until every node keeps all its route connections to
// every other, the JetStream meta group has one leader that sees every
// node, every node is current with it, and every node has JetStream
// enabled for the SANDBOXER account.
func (c *Cluster) awaitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		last := c.notReady()
		if last == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("jetstream not ready after %s: %s", timeout, last)
		}
		<-tick.C
	}
}

// notReady says why the cluster is not ready, or "" when it is.
func (c *Cluster) notReady() string {
	// Every route first: a node that registers its first route connection
	// to a peer (as when two nodes dialled each other at once, both
	// connections were dropped, and one redials a second later) forgets
	// what it knew of the peer, which JetStream then cannot place
	// replicas on ("peer offline") until the peer's next statistics.
	for _, s := range c.servers {
		rz, err := s.Routez(nil)
		if err != nil {
			return fmt.Sprintf("%s: routes: %v", s.Name(), err)
		}
		perPeer := map[string]int{}
		for _, r := range rz.Routes {
			perPeer[r.RemoteName]++
		}
		for _, p := range c.servers {
			if p != s && perPeer[p.Name()] != c.routesPerPeer {
				return fmt.Sprintf("%s has %d route connections to %s, want %d", s.Name(), perPeer[p.Name()], p.Name(), c.routesPerPeer)
			}
		}
	}
	var leaders []*server.Server
	for _, s := range c.servers {
		if s.JetStreamIsLeader() {
			leaders = append(leaders, s)
		}
	}
	if len(leaders) != 1 {
		return fmt.Sprintf("%d meta leaders, want one", len(leaders))
	}
	if peers := leaders[0].JetStreamClusterPeers(); len(peers) != len(c.servers) {
		return fmt.Sprintf("meta leader %s sees peers %v, want %d", leaders[0].Name(), peers, len(c.servers))
	}
	for _, s := range c.servers {
		if !s.JetStreamIsCurrent() {
			return s.Name() + " is not current with the meta leader"
		}
		// A node registers an account when first asked about it and
		// enables its JetStream a moment later; a request routed to it
		// in between is told JetStream is not enabled for the account.
		acc, err := s.LookupAccount(c.Auth.AccountPublicKey())
		if err != nil {
			return fmt.Sprintf("%s: looking up account %s: %v", s.Name(), auth.AccountName, err)
		}
		if !acc.JetStreamEnabled() {
			return fmt.Sprintf("%s: jetstream not yet enabled for account %s", s.Name(), auth.AccountName)
		}
	}
	return ""
}

// quiesceTimeout bounds how long shutdown waits for the nodes to settle.
const quiesceTimeout = 5 * time.Second

// shutdown stops every node and waits until they have stopped. It first
// waits, for a bounded time, until every running node is healthy (its
// streams and consumers set up and current): a node stopped while it
// still sets up a stream it was just assigned can leave that stream's
// goroutines behind.
func (c *Cluster) shutdown() {
	deadline := time.Now().Add(quiesceTimeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for _, s := range c.servers {
		for s.Running() && s.Healthz(nil).Status != "ok" && time.Now().Before(deadline) {
			<-tick.C
		}
	}
	shutdownAll(c.servers)
}

func shutdownAll(servers []*server.Server) {
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Go(func() {
			s.Shutdown()
			s.WaitForShutdown()
		})
	}
	wg.Wait()
}

// nodeLogs keeps the last lines the nodes logged (notices, warnings and
// errors), which StartCluster prints when the test fails.
type nodeLogs struct {
	mu    sync.Mutex
	lines []string
}

// maxLogLines bounds what nodeLogs keeps.
const maxLogLines = 2000

func (l *nodeLogs) add(name, level, format string, v []any) {
	line := time.Now().Format("15:04:05.000") + " " + name + " " + level + " " + fmt.Sprintf(format, v...)
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lines) == maxLogLines {
		l.lines = append(l.lines[:0], l.lines[maxLogLines/2:]...)
	}
	l.lines = append(l.lines, line)
}

func (l *nodeLogs) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

func (l *nodeLogs) node(name string) server.Logger { return nodeLogger{l, name} }

// nodeLogger is one node's server.Logger.
type nodeLogger struct {
	logs *nodeLogs
	name string
}

func (n nodeLogger) Noticef(format string, v ...any) { n.logs.add(n.name, "INF", format, v) }
func (n nodeLogger) Warnf(format string, v ...any)   { n.logs.add(n.name, "WRN", format, v) }
func (n nodeLogger) Errorf(format string, v ...any)  { n.logs.add(n.name, "ERR", format, v) }
func (n nodeLogger) Fatalf(format string, v ...any)  { n.logs.add(n.name, "FTL", format, v) }
func (n nodeLogger) Debugf(format string, v ...any)  {}
func (n nodeLogger) Tracef(format string, v ...any)  {}

// Servers are the nodes, n1 first.
func (c *Cluster) Servers() []*server.Server { return c.servers }

// Leader is the node that leads the JetStream meta group now, or nil
// while there is none.
func (c *Cluster) Leader() *server.Server {
	for _, s := range c.servers {
		if s.JetStreamIsLeader() {
			return s
		}
	}
	return nil
}

// Setup declares durable consumers, as `sandboxer setup` does; the
// streams they read must be declared first.
func (c *Cluster) Setup(tb TB, specs ...bus.ConsumerSpec) {
	tb.Helper()
	ensureConsumers(tb, c.JetStream(tb), specs)
}

// ClientURLs are the nodes' nats:// client URLs, comma-separated, as
// nats.Connect takes them.
func (c *Cluster) ClientURLs() string {
	urls := make([]string, len(c.servers))
	for i, s := range c.servers {
		urls[i] = s.ClientURL()
	}
	return strings.Join(urls, ",")
}
