package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/gateway/console"
)

// TestConsole uses the web console in headless Chromium as a person would,
// against the whole system: signs in with the dev key, watches a sandbox
// made with the CLI appear and turn ready without a reload, follows its
// events, destroys it from the page, filters the list, and reads the
// credits (with a chart) and the worker pools. Screenshots of each step go
// to the test's artifact directory (go test -artifacts keeps them).
//
// Every wait is on a DOM condition, bounded by its own context.
func TestConsole(t *testing.T) {
	chrome := chromium(t)
	cs := startCreditsSystem(t, nil)
	ctx := testContext(t)

	// A ledger with something in it: a grant, then a metered sandbox made
	// and destroyed (hold, debits, release), settled before the page opens.
	if _, err := cs.admin.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: 1000, ID: "console-test"}); err != nil {
		t.Fatal(err)
	}
	saas := sandboxOf(t, cs.mustCLI(t, "create", "--profile", "saas", "--wait", "-o", "json"))
	cs.mustCLI(t, "destroy", saas, "--wait")
	usageOf(t, cs.dev, saas)

	// The page needs no key, and comes with the console's policy.
	resp, err := http.Get(cs.sys.URL + "/console/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if h := resp.Header; resp.StatusCode != http.StatusOK || h.Get("Content-Security-Policy") != console.ContentSecurityPolicy ||
		h.Get("X-Content-Type-Options") != "nosniff" {
		t.Fatalf("GET /console/ = %d with headers %v; want 200 with the console's policy and nosniff", resp.StatusCode, h)
	}

	p := openBrowser(t, chrome)
	p.step("open the console", 30*time.Second,
		chromedp.Navigate(cs.sys.URL+"/console"),
		visible("#signin-key"))
	p.shot("sign-in")
	key, err := os.ReadFile(keyPath(cs.dir, "dev"))
	if err != nil {
		t.Fatal(err)
	}
	p.step("sign in with the dev key", 30*time.Second,
		chromedp.SendKeys(chromedp.CSS("#signin-key"), strings.TrimSpace(string(key))),
		chromedp.Click(chromedp.CSS("#signin-submit")),
		visible("#view-sandboxes"),
		visible(`#who-name`),
		chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			// Set once: still there at the end means the page never reloaded.
			_, err := chromedp.Evaluate[chromedp.Void](`window.consoleTestMark = 'one page'`)(ctx, tg)
			return err
		}),
		visible(row(saas, event.StateDestroyed)))
	if s := p.sessionKey(); s != strings.TrimSpace(string(key)) {
		t.Errorf("the key in session storage is %q, want the dev key", s)
	}

	// A sandbox made elsewhere shows up, then turns ready, by itself.
	local := sandboxOf(t, cs.mustCLI(t, "create", "--profile", "local", "--label", "console=test", "-o", "json"))
	p.step("see the CLI's sandbox appear", 30*time.Second, visible(`#sandbox-rows tr[data-id="`+local+`"]`))
	p.step("see it turn ready", 60*time.Second, visible(row(local, event.StateReady)))
	p.shot("list-ready")

	// Filters: by state, then by label.
	p.step("filter on destroyed", 30*time.Second,
		chooseFilter("#filter-state", "destroyed"),
		p.until(`rows().length === 1 && rows()[0].dataset.id === `+strconv.Quote(saas)))
	p.step("filter on the label", 30*time.Second,
		chooseFilter("#filter-state", ""),
		chooseFilter("#filter-label", "console=test"),
		p.until(`rows().length === 1 && rows()[0].dataset.id === `+strconv.Quote(local)))
	p.shot("list-filtered")
	p.step("clear the filters", 30*time.Second,
		chromedp.Click(chromedp.CSS("#filter-clear")),
		p.until(`rows().length === 2`))

	// Its detail, with its events so far.
	p.step("open its detail", 30*time.Second,
		chromedp.Click(chromedp.CSS(`#sandbox-rows tr[data-id="`+local+`"] a.open`)),
		visible(`#view-detail[data-id="`+local+`"][data-state="ready"]`),
		visible(`#event-rows tr[data-state="ready"]`),
		visible(`#detail-fields dd[data-field="remote_dir"]`),
		p.until(`document.getElementById('events-live').textContent === 'live'`))
	p.shot("detail-ready")

	// Destroyed from the page: a confirming second click, then the rest of
	// the lifecycle arrives over the event stream.
	p.step("destroy it from the page", 60*time.Second,
		chromedp.Click(chromedp.CSS("#detail-destroy")),
		visible("#detail-destroy.armed"),
		chromedp.Click(chromedp.CSS("#detail-destroy")),
		visible(`#event-rows tr[data-state="destroyed"]`),
		visible(`#view-detail[data-state="destroyed"]`),
		p.until(`document.getElementById('events-live').textContent === 'ended'`))
	p.shot("detail-destroyed")
	if got, err := cs.dev.Get(ctx, local); err != nil || got.State != event.StateDestroyed {
		t.Fatalf("after the page's destroy the API says %+v, %v; want destroyed", got, err)
	}
	states := p.texts(`#event-rows tr`, `r => r.dataset.state`)
	if want := "requested provisioning ready destroying destroyed"; strings.Join(states, " ") != want {
		t.Errorf("the page's events are %v, want %s, each once", states, want)
	}
	p.step("back to the list", 30*time.Second,
		chromedp.Click(chromedp.CSS("#nav-sandboxes")),
		visible(row(local, event.StateDestroyed)))

	// The ledger as the API has it once both sandboxes are settled (a free
	// one has entries too, of 0).
	usageOf(t, cs.dev, local)
	ledger, err := cs.dev.Ledger(ctx, api.LedgerQuery{})
	if err != nil {
		t.Fatal(err)
	}
	balance, err := cs.dev.CreditBalance(ctx, "")
	if err != nil {
		t.Fatal(err)
	}

	// Credits: the balance, the ledger entry by entry, the chart.
	p.step("open credits", 30*time.Second,
		chromedp.Click(chromedp.CSS("#nav-credits")),
		visible(`#ledger-rows tr[data-kind="grant"]`),
		p.until(fmt.Sprintf(`document.querySelectorAll('#ledger-rows tr').length === %d`, len(ledger.Entries))),
		p.until(fmt.Sprintf(`document.getElementById('credit-balance').textContent === '%d'`, balance.Balance)),
		p.until(fmt.Sprintf(`document.querySelector('#chart svg')?.dataset.points === '%d'`, len(ledger.Entries))),
		visible(`#chart svg path.balance`),
		visible(`#usage-rows tr[data-sandbox="`+saas+`"]`))
	p.shot("credits")

	// Worker pools, with their queues.
	p.step("open workers", 30*time.Second,
		chromedp.Click(chromedp.CSS("#nav-workers")),
		visible(`.pool[data-extension="local"]`),
		p.until(`['local', 'saas-stub'].every(x => Number(document.querySelector('.pool[data-extension="' + x + '"]')?.dataset.live) >= 1)`),
		visible(`.pool[data-extension="local"] .pending .value`))
	p.shot("workers")

	if mark := p.eval(`window.consoleTestMark`); mark != "one page" {
		t.Errorf("the page reloaded (mark %q)", mark)
	}
	p.step("sign out", 30*time.Second,
		chromedp.Click(chromedp.CSS("#signout")),
		visible("#signin-key"))
	if s := p.sessionKey(); s != "" {
		t.Errorf("signing out left %q in session storage", s)
	}
	if msgs := p.problems(); len(msgs) > 0 {
		t.Errorf("the page logged errors:\n%s", strings.Join(msgs, "\n"))
	}
}

// chromium is the browser binary, or the test fails saying how to install
// it: the console test never skips.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "/usr/bin/chromium"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("chromium not found (not on PATH, no /usr/bin/chromium): the console test drives it headless; run .ci/install-console.sh")
	return ""
}

// page is a headless browser tab on the console.
type page struct {
	t   *testing.T
	ctx context.Context // the tab's, which has run once
	dir string
	n   int

	mu   sync.Mutex
	logs []string // errors and exceptions the page logged
}

// openBrowser starts headless Chromium with one tab, closed when the test
// ends, and collects what the page logs as an error.
func openBrowser(t *testing.T, exe string) *page {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(exe),
		chromedp.NoSandbox, // root in a container
		chromedp.DisableGPU,
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.WindowSize(1280, 960),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	p := &page{t: t, ctx: ctx, dir: t.ArtifactDir()}

	// The first run starts the browser and lives as long as ctx, so it
	// takes no timeout of its own: a timer cancels it instead.
	timer := time.AfterFunc(60*time.Second, cancel)
	err := chromedp.Do(ctx)
	stopped := timer.Stop()
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cctx, ccancel := context.WithTimeout(ctx, 20*time.Second)
		defer ccancel()
		_ = chromedp.Cancel(cctx) // closes the browser, and ends the log reader
		cancel()
		cancelAlloc() // waits for the browser process
		wg.Wait()
	})
	if err != nil || !stopped {
		t.Fatalf("starting %s: %v (started in time: %v)", exe, err, stopped)
	}
	msgs := chromedp.Console(ctx)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for m, err := range msgs {
			if err != nil {
				return
			}
			if m.IsException() || m.Type == chromedp.ConsoleError {
				p.mu.Lock()
				p.logs = append(p.logs, fmt.Sprintf("%s (%s:%d)", m, m.URL, m.Line))
				p.mu.Unlock()
			}
		}
	}()
	t.Logf("screenshots in %s", p.dir)
	return p
}

// step runs actions within timeout; on failure it saves a screenshot and
// fails the test with what the console's status line says.
func (p *page) step(what string, timeout time.Duration, actions ...chromedp.Action[chromedp.Void]) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, timeout)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		p.shot("failed")
		p.t.Fatalf("%s: %v\nstatus line: %q\npage logs: %v", what, err, p.eval(`document.getElementById('status')?.textContent`), p.problems())
	}
}

// until waits for a JavaScript condition, checked every 50ms; rows() in it
// is the sandbox list's rows.
func (p *page) until(cond string) chromedp.Action[chromedp.Void] {
	expr := `(() => { const rows = () => [...document.querySelectorAll('#sandbox-rows tr')]; return !!(` + cond + `); })()`
	return chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
		_, err := chromedp.Poll[bool](expr, chromedp.WithPollingInterval(50*time.Millisecond), chromedp.WithPollingTimeout(0))(ctx, tg)
		if err != nil {
			return fmt.Errorf("waiting for %s: %w", cond, err)
		}
		return nil
	})
}

// eval returns a JavaScript expression as text, or the error's.
func (p *page) eval(expr string) string {
	ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[string](`String(`+expr+`)`))
	if err != nil {
		return "(" + err.Error() + ")"
	}
	return v
}

// texts maps the elements sel matches with the JavaScript function fn.
func (p *page) texts(sel, fn string) []string {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[[]string](`[...document.querySelectorAll(`+strconv.Quote(sel)+`)].map(`+fn+`)`))
	if err != nil {
		p.t.Fatalf("reading %s: %v", sel, err)
	}
	return v
}

func (p *page) sessionKey() string { return p.eval(`sessionStorage.getItem('sandboxer.apiKey') ?? ''`) }

// shot saves a screenshot of the whole page as NN-name.png.
func (p *page) shot(name string) {
	p.t.Helper()
	p.n++
	ctx, cancel := context.WithTimeout(p.ctx, 20*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		p.t.Errorf("screenshot %s: %v", name, err)
		return
	}
	if err := os.WriteFile(filepath.Join(p.dir, fmt.Sprintf("%02d-%s.png", p.n, name)), png, 0o644); err != nil {
		p.t.Error(err)
	}
}

func (p *page) problems() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.logs...)
}

// visible waits until an element matches the CSS selector and shows.
func visible(sel string) chromedp.Action[chromedp.Void] {
	return chromedp.WaitVisible(chromedp.CSS(sel), chromedp.RetryInterval(50*time.Millisecond))
}

// row selects the list's row of sandbox id in state s.
func row(id string, s event.State) string {
	return `#sandbox-rows tr[data-id="` + id + `"][data-state="` + string(s) + `"]`
}

// chooseFilter sets a filter control as a person would, which fires its
// change event.
func chooseFilter(sel, value string) chromedp.Action[chromedp.Void] {
	js := `(() => { const e = document.querySelector(` + strconv.Quote(sel) + `); e.value = ` + strconv.Quote(value) +
		`; e.dispatchEvent(new Event('change', { bubbles: true })); return true; })()`
	return chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
		_, err := chromedp.Evaluate[bool](js)(ctx, tg)
		return err
	})
}

// sandboxOf reads the id of the sandbox a CLI verb printed with -o json.
func sandboxOf(t *testing.T, out string) string {
	t.Helper()
	var s api.Sandbox
	if err := json.Unmarshal([]byte(out), &s); err != nil || s.ID == "" {
		t.Fatalf("reading a sandbox from %q: %v", out, err)
	}
	return s.ID
}
