package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// runCLI runs one sandboxer command line as the binary would and returns
// its standard output and error, interleaved.
func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

// upInEmptyDir runs `sandboxer up args...` from an empty working
// directory, as someone who installed the binary would, and returns the
// gateway URL its banner announces and the banner. The command stops
// with the test.
func upInEmptyDir(t *testing.T, dataDir string, args ...string) (url, banner string) {
	t.Helper()
	t.Chdir(t.TempDir())
	// up sets the process's tracer provider up and shuts it down when it
	// ends; the other tests keep theirs.
	tp := otel.GetTracerProvider()
	t.Cleanup(func() { otel.SetTracerProvider(tp) })

	root := newRoot()
	pr, pw := io.Pipe()
	root.SetOut(pw)
	root.SetErr(io.Discard)
	root.SetArgs(append([]string{"up", "--data-dir", dataDir, "--http", "127.0.0.1:0", "--nats-listen=", "--log-level", "error"}, args...))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		err := root.ExecuteContext(ctx)
		_ = pw.CloseWithError(io.EOF)
		done <- err
	}()
	t.Cleanup(func() {
		cancel()
		go func() { _, _ = io.Copy(io.Discard, pr) }() // the shutdown line
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("sandboxer up: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Error("sandboxer up did not stop")
		}
	})
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			lines <- sc.Text()
			if strings.HasPrefix(strings.TrimSpace(sc.Text()), "pools") {
				return
			}
		}
	}()
	var b strings.Builder
	deadline := time.After(60 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("sandboxer up ended before it was up: %v\n%s", <-done, b.String())
			}
			b.WriteString(l + "\n")
			if f := strings.Fields(l); len(f) == 2 && f[0] == "gateway" {
				url = f[1]
			}
			if strings.HasPrefix(strings.TrimSpace(l), "pools") {
				return url, b.String()
			}
		case <-deadline:
			t.Fatalf("sandboxer up not up after 60s:\n%s", b.String())
		}
	}
}

// TestUpOutsideTheRepository starts `sandboxer up` from an empty working
// directory, which has no extensions/ or profiles/: it serves the
// catalog built into the binary, and the README's five lines work
// against it. --extension takes the name as manifests and docs spell
// it, ext.local.
func TestUpOutsideTheRepository(t *testing.T) {
	dataDir := t.TempDir()
	url, banner := upInEmptyDir(t, dataDir, "--extension", "ext.local")
	if !strings.Contains(banner, "extensions (built in), profiles (built in)") || !strings.Contains(banner, "pools      local\n") {
		t.Fatalf("banner does not show the built-in catalog and the local pool:\n%s", banner)
	}
	if _, err := os.Stat("extensions"); !os.IsNotExist(err) {
		t.Fatalf("up wrote an extensions directory in the working directory: %v", err)
	}
	cli := func(args ...string) string {
		t.Helper()
		out, err := runCLI(t, append(args, "--url", url, "--data-dir", dataDir)...)
		if err != nil {
			t.Fatalf("sandboxer %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	if out := cli("profiles"); !strings.Contains(out, "local ") || !strings.Contains(out, "saas ") {
		t.Fatalf("profiles lists\n%s\nwant the shipped ones", out)
	}
	var sb api.Sandbox
	if err := json.Unmarshal([]byte(cli("create", "--profile", "local", "--wait", "-o", "json")), &sb); err != nil {
		t.Fatal(err)
	}
	if sb.State != event.StateReady || sb.Reachability == nil || sb.Reachability.RemoteDir == "" {
		t.Fatalf("create --wait: %+v, want ready with a directory", sb)
	}
	if !strings.HasPrefix(sb.Reachability.RemoteDir, dataDir+string(filepath.Separator)) {
		t.Errorf("workspace %s is not under the data dir %s", sb.Reachability.RemoteDir, dataDir)
	}
	if out := cli("list"); !strings.Contains(out, sb.ID) {
		t.Fatalf("list does not show %s:\n%s", sb.ID, out)
	}
	if out := cli("events", sb.ID); !strings.Contains(out, string(event.TypeReady)) {
		t.Fatalf("events of %s:\n%s", sb.ID, out)
	}
	if out := cli("destroy", sb.ID, "--wait"); !strings.Contains(out, "destroyed") {
		t.Fatalf("destroy --wait:\n%s", out)
	}
	if _, err := os.Stat(sb.Reachability.RemoteDir); !os.IsNotExist(err) {
		t.Fatalf("workspace %s still there after destroy: %v", sb.Reachability.RemoteDir, err)
	}
}

// TestCatalogDirDefaults: a directory given by its flag is read even when
// it does not exist (so the error names it); an existing default
// directory wins over the built-in copy; a missing one falls back to it.
func TestCatalogDirDefaults(t *testing.T) {
	t.Chdir(t.TempDir())
	if d := catalogDir("extensions", true, "x"); d.FS != nil || d.Path != "extensions" {
		t.Errorf("given: %+v", d)
	}
	if d := catalogDir("extensions", false, "x"); d.FS == nil || d.Path != "x" {
		t.Errorf("missing default: %+v, want the built-in copy", d)
	}
	if err := os.Mkdir("extensions", 0o755); err != nil {
		t.Fatal(err)
	}
	if d := catalogDir("extensions", false, "x"); d.FS != nil || d.Path != "extensions" {
		t.Errorf("existing default: %+v, want the directory", d)
	}
}

// TestExtensionSpellings: every --extension takes local and ext.local
// alike, and keeps each extension once.
func TestExtensionSpellings(t *testing.T) {
	for _, path := range [][]string{{"up"}, {"serve", "provisioner"}} {
		root := newRoot()
		cmd, rest, err := root.Find(append(path, "--extension", "ext.local", "--extension", "local", "--extension", "ext.saas-stub"))
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.ParseFlags(rest); err != nil {
			t.Fatalf("%s: %v", cmd.CommandPath(), err)
		}
		got := cmd.Flags().Lookup("extension").Value.String()
		if got != "[local,saas-stub]" {
			t.Errorf("%s --extension ext.local --extension local --extension ext.saas-stub: %s, want [local,saas-stub]", cmd.CommandPath(), got)
		}
		if err := cmd.Flags().Set("extension", "ext."); err == nil {
			t.Errorf("%s: --extension ext. accepted", cmd.CommandPath())
		}
	}
}
