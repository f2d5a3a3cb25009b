// sand-boxer console: the gateway's HTTP API in a browser tab.
//
// The API key lives in sessionStorage (this tab only) and travels as an
// Authorization: Bearer header on every call, never in a URL. Everything
// the API returns is rendered with textContent and DOM nodes, never as
// HTML. Live updates: the view on screen polls its endpoints every
// POLL_MS; a sandbox's detail view also follows its lifecycle over
// server-sent events, read from a fetch() stream (EventSource cannot send
// an Authorization header).
'use strict';

(() => {
  const KEY = 'sandboxer.apiKey';
  const POLL_MS = 2000;
  // The list follows at most this many pages of 1000 and shows the newest
  // SHOW sandboxes of them.
  const MAX_PAGES = 5;
  const SHOW = 200;
  const STATES = ['requested', 'provisioning', 'ready', 'failed', 'expired', 'destroying', 'destroyed', 'rejected'];
  const TERMINAL = new Set(['destroyed', 'rejected']);
  const TYPE_PREFIX = 'dev.sandboxer.sandbox.';

  const $ = (id) => document.getElementById(id);

  // el builds an element: attrs are set as attributes (never as HTML),
  // children are nodes or strings (text nodes).
  function el(tag, attrs, ...children) {
    const n = document.createElement(tag);
    setAttrs(n, attrs);
    append(n, children);
    return n;
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, ...children) {
    const n = document.createElementNS(SVG, tag);
    setAttrs(n, attrs);
    append(n, children);
    return n;
  }

  function setAttrs(n, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      n.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function append(n, children) {
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      n.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function stateClass(s) { return STATES.includes(s) ? 'state state-' + s : 'state'; }

  function stateBadge(s) { return el('span', { class: stateClass(s), 'data-state': s }, s || '?'); }

  function isZeroTime(t) { return !t || t.startsWith('0001-01-01'); }

  function fmtTime(t) {
    if (isZeroTime(t)) return '';
    const d = new Date(t);
    return isNaN(d) ? String(t) : d.toLocaleString();
  }

  function ago(t) {
    if (isZeroTime(t)) return '';
    const s = Math.max(0, Math.round((Date.now() - new Date(t)) / 1000));
    if (s < 60) return s + 's ago';
    if (s < 3600) return Math.floor(s / 60) + 'm ago';
    return Math.floor(s / 3600) + 'h ago';
  }

  function stateOfType(type) {
    if (typeof type !== 'string' || !type.startsWith(TYPE_PREFIX)) return '';
    return type.slice(TYPE_PREFIX.length).split('.')[0];
  }

  // ---- the API -------------------------------------------------------

  class APIError extends Error {
    constructor(status, problem) {
      const p = problem || {};
      let msg = p.title || ('HTTP ' + status);
      if (p.detail) msg += ': ' + p.detail;
      for (const e of p.errors || []) msg += '; ' + e.field + ': ' + e.detail;
      super(msg);
      this.status = status;
    }
  }

  // apiURL resolves an API path against the console's location, so the
  // console works under a path prefix too (/console/ -> /v1/...).
  function apiURL(path) { return new URL('..' + path, location.href).toString(); }

  function token() { return sessionStorage.getItem(KEY) || ''; }

  async function problemOf(resp) {
    let p = null;
    try { p = await resp.json(); } catch (_) { p = { title: resp.statusText }; }
    return new APIError(resp.status, p);
  }

  async function call(method, path, opts = {}) {
    const key = token();
    if (!key) throw new APIError(401, { title: 'Unauthorized', detail: 'not signed in' });
    const resp = await fetch(apiURL(path), {
      method,
      headers: { 'Authorization': 'Bearer ' + key, 'Accept': 'application/json' },
      cache: 'no-store', credentials: 'omit', redirect: 'error', signal: opts.signal,
    });
    if (!resp.ok) {
      const err = await problemOf(resp);
      if (resp.status === 401 && !opts.probe) signOut('The gateway refused the key: ' + err.message);
      throw err;
    }
    return resp.json();
  }

  // followEvents reads GET /v1/sandboxes/{id}/events?follow=true and calls
  // onEvent for each event; it returns when the server ends the stream
  // (after a terminal state) and throws when the request fails or signal
  // aborts it. after is the last sequence seen: the stream resumes there.
  // onOpen is called once the server has answered.
  async function followEvents(id, after, signal, onOpen, onEvent) {
    const headers = { 'Authorization': 'Bearer ' + token(), 'Accept': 'text/event-stream' };
    if (after) headers['Last-Event-ID'] = String(after);
    const resp = await fetch(apiURL('/v1/sandboxes/' + encodeURIComponent(id) + '/events?follow=true'), {
      headers, cache: 'no-store', credentials: 'omit', redirect: 'error', signal,
    });
    if (!resp.ok) throw await problemOf(resp);
    onOpen();
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let i;
      while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i).replace(/^\r?\n\r?\n/, '');
        const ev = parseSSE(block);
        if (ev) onEvent(ev);
      }
    }
  }

  // parseSSE reads one server-sent event block: null for comments and
  // blocks without data.
  function parseSSE(block) {
    let seq = 0, type = '';
    const data = [];
    for (const raw of block.split('\n')) {
      const line = raw.replace(/\r$/, '');
      if (line === '' || line.startsWith(':')) continue;
      const c = line.indexOf(':');
      const field = c < 0 ? line : line.slice(0, c);
      let value = c < 0 ? '' : line.slice(c + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'id') seq = Number(value) || 0;
      else if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    }
    if (data.length === 0) return null;
    let event;
    try { event = JSON.parse(data.join('\n')); } catch (_) { return null; }
    return { seq, type: type || event.type, event };
  }

  // ---- status line and polling ---------------------------------------

  function setStatus(msg, kind) {
    const s = $('status');
    s.textContent = msg || '';
    s.className = msg ? (kind || 'error') : '';
  }

  // poll runs fn now and then POLL_MS after each run ends, until stopped;
  // fn gets an AbortSignal that stop aborts. now() runs it again at once.
  function poll(fn, ms = POLL_MS) {
    const ctl = new AbortController();
    let stopped = false, running = false, again = false, timer = 0;
    const tick = async () => {
      clearTimeout(timer);
      if (stopped) return;
      if (running) { again = true; return; }
      running = true;
      try {
        await fn(ctl.signal);
        if (!stopped) setStatus('');
      } catch (e) {
        if (!stopped && e.name !== 'AbortError') setStatus(e.message);
      }
      running = false;
      if (stopped) return;
      if (again) { again = false; tick(); return; }
      timer = setTimeout(tick, ms);
    };
    tick();
    return {
      stop() { stopped = true; clearTimeout(timer); ctl.abort(); },
      now: tick,
    };
  }

  // armDestroy makes a two-step destroy button: the first click arms it
  // for a few seconds, the second sends DELETE /v1/sandboxes/{id}.
  function armDestroy(button, id, done) {
    let timer = 0;
    const reset = () => {
      clearTimeout(timer);
      button.classList.remove('armed');
      button.textContent = 'Destroy';
      delete button.dataset.armed;
    };
    button.addEventListener('click', async () => {
      if (button.disabled) return;
      if (!button.dataset.armed) {
        button.dataset.armed = 'true';
        button.classList.add('armed');
        button.textContent = 'Confirm destroy';
        timer = setTimeout(reset, 5000);
        return;
      }
      clearTimeout(timer);
      button.disabled = true;
      button.textContent = 'Destroying…';
      try {
        await call('DELETE', '/v1/sandboxes/' + encodeURIComponent(id));
        setStatus('Destroy of ' + id + ' requested.', 'info');
      } catch (e) {
        setStatus('Destroying ' + id + ': ' + e.message);
        button.disabled = false;
        reset();
      }
      if (done) done();
    });
    return reset;
  }

  // ---- views ----------------------------------------------------------

  const VIEWS = ['signin', 'sandboxes', 'detail', 'workers', 'credits'];
  let current = null; // { stop() } of the view on screen

  function show(name) {
    for (const v of VIEWS) $('view-' + v).hidden = v !== name;
    const tab = name === 'detail' ? 'sandboxes' : name;
    for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.view === tab);
    document.body.dataset.view = name;
  }

  function route() {
    if (current) { current.stop(); current = null; }
    setStatus('');
    const signed = token() !== '';
    $('nav').hidden = !signed;
    $('who').hidden = !signed;
    if (!signed) { show('signin'); $('signin-key').focus(); return; }
    const h = location.hash.replace(/^#\/?/, '');
    const [name, ...rest] = h.split('/');
    switch (name) {
      case 'sandboxes':
        current = rest.length && rest[0] ? detailView(decodeURIComponent(rest.join('/'))) : listView();
        break;
      case 'workers': current = workersView(); break;
      case 'credits': current = creditsView(); break;
      default:
        location.replace('#/sandboxes');
        return; // hashchange routes again
    }
  }

  // ---- sign in --------------------------------------------------------

  async function signIn(ev) {
    ev.preventDefault();
    const input = $('signin-key');
    const key = input.value.trim();
    $('signin-error').textContent = '';
    if (!key) return;
    $('signin-submit').disabled = true;
    sessionStorage.setItem(KEY, key);
    try {
      await call('GET', '/v1/sandboxes?limit=1', { probe: true });
    } catch (e) {
      sessionStorage.removeItem(KEY);
      $('signin-error').textContent = e.status === 401 ? 'The gateway does not know this key.' : e.message;
      $('signin-submit').disabled = false;
      return;
    }
    input.value = '';
    $('signin-submit').disabled = false;
    await whoAmI();
    loadProfiles();
    if (!location.hash || location.hash === '#' || location.hash === '#/') location.hash = '#/sandboxes';
    else route();
  }

  let consumer = '';

  async function whoAmI() {
    consumer = '';
    $('who-name').textContent = 'signed in';
    try {
      const b = await call('GET', '/v1/credits/balance');
      consumer = b.consumer || '';
      $('who-name').textContent = consumer ? 'consumer ' + consumer : 'signed in';
    } catch (_) {
      // Credits may not be served: the console works without a name.
    }
  }

  function signOut(reason) {
    sessionStorage.removeItem(KEY);
    consumer = '';
    route();
    if (reason) $('signin-error').textContent = reason;
  }

  async function loadProfiles() {
    const sel = $('filter-profile');
    try {
      const list = await call('GET', '/v1/profiles');
      const keep = sel.value;
      sel.replaceChildren(el('option', { value: '' }, 'any'),
        ...(list.profiles || []).map((p) => el('option', { value: p.slug }, p.slug)));
      sel.value = keep;
    } catch (_) {
      // The filter still offers "any".
    }
  }

  // ---- the sandbox list -----------------------------------------------

  function filterQuery() {
    const q = new URLSearchParams();
    const state = $('filter-state').value, profile = $('filter-profile').value;
    if (state) q.set('state', state);
    if (profile) q.set('profile', profile);
    for (const l of $('filter-label').value.split(',')) {
      if (l.trim()) q.append('label', l.trim());
    }
    return q;
  }

  function listView() {
    show('sandboxes');
    const rows = new Map(); // id -> { tr, update(s) }
    const p = poll(async (signal) => {
      const q = filterQuery();
      q.set('limit', '1000');
      let all = [], after = '', more = false;
      for (let i = 0; i < MAX_PAGES; i++) {
        if (after) q.set('after', after);
        const page = await call('GET', '/v1/sandboxes?' + q.toString(), { signal });
        all = all.concat(page.sandboxes || []);
        more = !!page.next;
        if (!page.next) break;
        after = page.next;
      }
      all.reverse(); // newest first
      const shown = all.slice(0, SHOW);
      renderRows(rows, shown, () => p.now());
      $('sandboxes-empty').hidden = shown.length > 0;
      let meta = shown.length < all.length || more ? 'newest ' + shown.length + ' of ' + (more ? 'more than ' : '') + all.length : all.length + ' sandboxes';
      meta += ' · updated ' + new Date().toLocaleTimeString();
      $('list-meta').textContent = meta;
    });
    const onFilter = (ev) => { if (ev) ev.preventDefault(); p.now(); };
    const form = $('filters');
    form.addEventListener('submit', onFilter);
    form.addEventListener('change', onFilter);
    const clear = () => { form.reset(); p.now(); };
    $('filter-clear').addEventListener('click', clear);
    return {
      stop() {
        p.stop();
        form.removeEventListener('submit', onFilter);
        form.removeEventListener('change', onFilter);
        $('filter-clear').removeEventListener('click', clear);
      },
    };
  }

  // renderRows brings the table to list, in order, keeping the rows (and
  // an armed destroy button) of sandboxes still listed.
  function renderRows(rows, list, refresh) {
    const tbody = $('sandbox-rows');
    const want = new Set(list.map((s) => s.id));
    for (const [id, r] of rows) {
      if (!want.has(id)) { r.tr.remove(); rows.delete(id); }
    }
    let next = tbody.firstChild;
    for (const s of list) {
      let r = rows.get(s.id);
      if (!r) { r = sandboxRow(s.id, refresh); rows.set(s.id, r); }
      r.update(s);
      if (r.tr !== next) tbody.insertBefore(r.tr, next);
      else next = next.nextSibling;
    }
  }

  function sandboxRow(id, refresh) {
    const cells = {
      id: el('td', { class: 'mono' }, el('a', { href: '#/sandboxes/' + encodeURIComponent(id), class: 'open' }, id)),
      state: el('td'), profile: el('td'), extension: el('td'), host: el('td'), consumer: el('td'), created: el('td'),
      actions: el('td'),
    };
    const destroy = el('button', { type: 'button', class: 'danger destroy' }, 'Destroy');
    armDestroy(destroy, id, refresh);
    cells.actions.append(destroy);
    const tr = el('tr', { 'data-id': id }, Object.values(cells));
    let last = '';
    return {
      tr,
      update(s) {
        const sig = JSON.stringify([s.state, s.profile, s.extension, s.host, s.consumer, s.created_at]);
        if (sig === last) return;
        last = sig;
        tr.dataset.state = s.state;
        tr.classList.toggle('ended', TERMINAL.has(s.state));
        cells.state.replaceChildren(stateBadge(s.state));
        cells.profile.textContent = s.profile || '';
        cells.extension.textContent = s.extension || '';
        cells.host.textContent = s.host || '';
        cells.consumer.textContent = s.consumer || '';
        cells.created.textContent = fmtTime(s.created_at);
        destroy.hidden = TERMINAL.has(s.state) || s.state === 'destroying';
      },
    };
  }

  // ---- one sandbox ----------------------------------------------------

  function detailView(id) {
    show('detail');
    const view = $('view-detail');
    view.dataset.id = id;
    delete view.dataset.state;
    $('detail-id').textContent = id;
    $('detail-state').replaceChildren();
    $('detail-fields').replaceChildren();
    $('event-rows').replaceChildren();
    $('events-live').textContent = 'connecting…';

    // The destroy button is replaced per view, so no listener outlives it.
    const destroy = el('button', { id: 'detail-destroy', type: 'button', class: 'danger', hidden: true }, 'Destroy');
    $('detail-destroy').replaceWith(destroy);

    let stopped = false, lastSeq = 0, terminal = false, streamEnded = false;
    const seen = new Set();
    const ctl = new AbortController();
    const record = poll(async (signal) => {
      let s;
      try {
        s = await call('GET', '/v1/sandboxes/' + encodeURIComponent(id), { signal });
      } catch (e) {
        if (e.status === 404) {
          view.dataset.state = 'gone';
          $('detail-state').replaceChildren(el('span', { class: 'state' }, 'not found'));
          record.stop();
        }
        throw e;
      }
      renderDetail(s, destroy);
      if (TERMINAL.has(s.state) && streamEnded) record.stop();
    });
    armDestroy(destroy, id, () => record.now());

    const onEvent = ({ seq, type, event }) => {
      if (seq && seen.has(seq)) return;
      if (seq) { seen.add(seq); lastSeq = Math.max(lastSeq, seq); }
      const st = stateOfType(type);
      if (TERMINAL.has(st)) terminal = true;
      $('event-rows').append(eventRow(seq, type, st, event));
      record.now(); // the record follows the event within moments
    };
    (async () => {
      for (let attempt = 0; !stopped; attempt++) {
        try {
          $('events-live').textContent = attempt ? 'reconnecting…' : 'connecting…';
          await followEvents(id, lastSeq, ctl.signal, () => {
            $('events-live').textContent = 'live';
            attempt = 0;
          }, onEvent);
        } catch (e) {
          if (stopped || e.name === 'AbortError') return;
          if (e.status === 404 || e.status === 401) { $('events-live').textContent = ''; return; }
          setStatus('Event stream: ' + e.message);
        }
        // The stream ends by itself after a terminal state, and for a
        // sandbox that had already ended, after its history.
        if (terminal || view.dataset.state && TERMINAL.has(view.dataset.state)) break;
        await sleep(Math.min(500 * 2 ** attempt, 10000), ctl.signal);
      }
      if (stopped) return;
      streamEnded = true;
      $('events-live').textContent = 'ended';
      record.now();
    })();

    return {
      stop() {
        stopped = true;
        ctl.abort();
        record.stop();
      },
    };
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      if (signal) signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
    });
  }

  function renderDetail(s, destroy) {
    const view = $('view-detail');
    view.dataset.state = s.state;
    $('detail-state').replaceChildren(stateBadge(s.state));
    destroy.hidden = TERMINAL.has(s.state) || s.state === 'destroying';
    const f = [];
    const add = (k, v) => { if (v !== undefined && v !== null && v !== '') f.push(el('dt', null, k), el('dd', { 'data-field': k }, String(v))); };
    add('state', s.state);
    add('consumer', s.consumer);
    add('profile', s.profile);
    add('extension', s.extension);
    add('host', s.host);
    const r = s.reachability || {};
    add('ssh', r.ssh);
    add('remote_dir', r.remote_dir);
    add('compose_project', r.compose_project);
    for (const [k, v] of Object.entries(r.ports || {})) add('port ' + k, v);
    for (const [k, v] of Object.entries(s.labels || {})) add('label ' + k, v);
    for (const [k, v] of Object.entries(s.inputs || {})) add('input ' + k, v);
    if (s.ttl_seconds) add('ttl', s.ttl_seconds + 's');
    add('reason', s.reason);
    add('code', s.code);
    add('created', fmtTime(s.created_at));
    add('ready', fmtTime(s.ready_at));
    add('expires', fmtTime(s.expires_at));
    add('destroyed', fmtTime(s.destroyed_at));
    add('updated', fmtTime(s.updated_at));
    $('detail-fields').replaceChildren(...f);
  }

  function eventDetail(data) {
    if (!data || typeof data !== 'object') return '';
    const parts = [];
    if (data.worker) parts.push('worker ' + data.worker + (data.attempt ? ' (attempt ' + data.attempt + ')' : ''));
    const r = data.reachability;
    if (r) {
      if (r.ssh) parts.push('ssh ' + r.ssh);
      if (r.remote_dir) parts.push('dir ' + r.remote_dir);
      if (r.compose_project) parts.push('compose ' + r.compose_project);
    }
    if (data.phase) parts.push('phase ' + data.phase);
    if (data.code) parts.push('code ' + data.code);
    if (data.reason) parts.push(String(data.reason));
    if (data.cleanup) {
      const n = (data.cleanup.removed || []).length;
      parts.push(data.cleanup.already_gone ? 'already gone' : 'removed ' + n);
    }
    if (data.meter) parts.push('metered ' + data.meter.amount);
    return parts.join(' · ');
  }

  function eventRow(seq, type, st, event) {
    return el('tr', { 'data-seq': seq || '', 'data-state': st },
      el('td', { class: 'num' }, seq ? String(seq) : ''),
      el('td', null, fmtTime(event.time)),
      el('td', null, st ? stateBadge(st) : ''),
      el('td', { class: 'mono' }, type || ''),
      el('td', null, eventDetail(event.data)));
  }

  // ---- workers --------------------------------------------------------

  function workersView() {
    show('workers');
    const p = poll(async (signal) => {
      const list = await call('GET', '/v1/workers', { signal });
      const pools = list.pools || [];
      $('pools').replaceChildren(...pools.map(poolCard));
      if (pools.length === 0) $('pools').append(el('p', { class: 'empty' }, 'No backends in the catalog.'));
      $('workers-meta').textContent = 'updated ' + new Date().toLocaleTimeString();
    });
    return { stop: p.stop };
  }

  function stat(label, value, cls) {
    return el('div', { class: 'stat ' + (cls || '') }, el('span', { class: 'label' }, label), el('span', { class: 'value' }, String(value)));
  }

  function poolCard(p) {
    const live = p.live_workers || [];
    const card = el('section', { class: 'card pool', 'data-extension': p.extension, 'data-live': live.length },
      el('h2', null, p.extension),
      el('div', { class: 'stats' },
        stat('Live workers', live.length, 'live'),
        stat('In flight', p.in_flight, 'in-flight'),
        stat('Pending', p.pending, 'pending'),
        stat('Capacity', p.capacity ? p.capacity : 'unbounded', 'capacity')));
    if (p.queue_error) card.append(el('p', { class: 'error' }, p.queue_error));
    if (live.length === 0) {
      card.append(el('p', { class: 'empty' }, 'No live worker: commands wait in the queue.'));
      return card;
    }
    card.append(el('table', { class: 'grid workers' },
      el('thead', null, el('tr', null, ['Worker', 'Host', 'PID', 'Concurrency', 'In flight', 'Started', 'Seen'].map((h) => el('th', null, h)))),
      el('tbody', null, live.map((w) => el('tr', { 'data-worker': w.worker },
        el('td', { class: 'mono' }, w.worker),
        el('td', null, w.host),
        el('td', { class: 'num' }, String(w.pid)),
        el('td', { class: 'num' }, String(w.concurrency)),
        el('td', { class: 'num' }, String(w.in_flight)),
        el('td', null, fmtTime(w.started_at)),
        el('td', null, ago(w.seen_at)))))));
    return card;
  }

  // ---- credits --------------------------------------------------------

  function creditsView() {
    show('credits');
    const p = poll(async (signal) => {
      const b = await call('GET', '/v1/credits/balance', { signal });
      const who = b.consumer || consumer;
      const [ledger, usage] = await Promise.all([
        call('GET', '/v1/credits/ledger?' + new URLSearchParams({ consumer: who }).toString(), { signal }),
        call('GET', '/v1/credits/usage', { signal }),
      ]);
      renderBalance(b);
      renderLedger(ledger.entries || []);
      renderUsage(usage.records || [], usage.more);
      $('credits-meta').textContent = 'updated ' + new Date().toLocaleTimeString();
    });
    return { stop: p.stop };
  }

  function renderBalance(b) {
    $('credits-consumer').textContent = b.consumer ? '· ' + b.consumer : '';
    $('credit-balance').textContent = String(b.balance);
    $('credit-held').textContent = String(b.held);
    $('credit-available').textContent = String(b.available);
    $('grants-empty').hidden = (b.grants || []).length > 0;
    $('holds-empty').hidden = (b.holds || []).length > 0;
    $('grant-rows').replaceChildren(...(b.grants || []).map((g) => el('tr', null,
      el('td', { class: 'mono' }, g.id),
      el('td', { class: 'num' }, String(g.amount)),
      el('td', { class: 'num' }, String(g.remaining)),
      el('td', { class: 'num' }, String(g.priority)),
      el('td', null, g.promo ? 'promo' : 'paid'),
      el('td', null, fmtTime(g.granted_at)),
      el('td', null, fmtTime(g.expires_at) || 'never'))));
    $('hold-rows').replaceChildren(...(b.holds || []).map((h) => el('tr', null,
      el('td', { class: 'mono' }, h.hold),
      el('td', { class: 'mono' }, h.sandbox_id),
      el('td', null, h.profile),
      el('td', null, h.extension),
      el('td', { class: 'num' }, String(h.amount)),
      el('td', { class: 'num' }, String(h.debited)))));
  }

  function renderLedger(entries) {
    $('ledger-empty').hidden = entries.length > 0;
    $('ledger-rows').replaceChildren(...entries.slice().reverse().map((e) => el('tr', { 'data-seq': e.seq, 'data-kind': e.kind },
      el('td', { class: 'num' }, String(e.seq)),
      el('td', null, fmtTime(e.at)),
      el('td', null, e.kind),
      el('td', { class: 'num' }, String(e.amount)),
      el('td', { class: 'num' }, String(e.held)),
      el('td', { class: 'num' }, String(e.balance_after)),
      el('td', { class: 'num' }, String(e.held_after)),
      el('td', { class: 'mono' }, e.sandbox_id || ''),
      el('td', null, e.cause + (e.reason ? ' (' + e.reason + ')' : '')))));
    $('chart').replaceChildren(chart(entries));
  }

  function renderUsage(records, more) {
    $('usage-empty').hidden = records.length > 0;
    const rows = records.slice().reverse().map((u) => el('tr', { 'data-sandbox': u.sandbox_id },
      el('td', { class: 'mono' }, u.sandbox_id),
      el('td', null, u.profile),
      el('td', null, u.extension),
      el('td', null, fmtTime(u.destroyed_at)),
      el('td', { class: 'num' }, String(u.seconds)),
      el('td', { class: 'num' }, String((u.quote || {}).amount ?? '')),
      el('td', { class: 'num' }, String((u.actual || {}).amount ?? '')),
      el('td', { class: 'num' }, String(u.charged)),
      el('td', { class: 'num' }, String(u.refunded)),
      el('td', null, (u.actual || {}).source || '')));
    if (more) rows.push(el('tr', null, el('td', { colspan: 10, class: 'empty' }, 'More records than shown: the service cut the list.')));
    $('usage-rows').replaceChildren(...rows);
  }

  // chart draws balance_after and held_after over at as step lines, in
  // SVG built node by node.
  function chart(entries) {
    const W = 720, H = 230, L = 64, R = 16, T = 30, B = 30;
    const pts = entries
      .map((e) => ({ t: new Date(e.at).getTime(), b: e.balance_after, h: e.held_after, e }))
      .filter((p) => !isNaN(p.t));
    const root = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'balance over time', 'data-points': pts.length });
    if (pts.length === 0) {
      root.append(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'tick' }, 'No ledger entries yet.'));
      return root;
    }
    const now = Date.now();
    let t0 = pts[0].t, t1 = Math.max(now, pts[pts.length - 1].t);
    if (t1 - t0 < 1000) { t0 -= 500; t1 += 500; }
    let vmax = 0, vmin = 0;
    for (const p of pts) { vmax = Math.max(vmax, p.b, p.h); vmin = Math.min(vmin, p.b, p.h); }
    if (vmax === vmin) vmax = vmin + 1;
    const x = (t) => L + (t - t0) / (t1 - t0) * (W - L - R);
    const y = (v) => T + (vmax - v) / (vmax - vmin) * (H - T - B);

    for (let i = 0; i <= 4; i++) {
      const v = vmin + (vmax - vmin) * i / 4;
      root.append(
        svg('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'axis' }),
        svg('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'tick' }, String(Math.round(v))));
    }
    root.append(
      svg('text', { x: L, y: H - 8, class: 'tick' }, new Date(t0).toLocaleTimeString()),
      svg('text', { x: W - R, y: H - 8, 'text-anchor': 'end', class: 'tick' }, new Date(t1).toLocaleTimeString()));

    const step = (key) => {
      let d = 'M' + x(pts[0].t).toFixed(1) + ' ' + y(pts[0][key]).toFixed(1);
      for (let i = 1; i < pts.length; i++) d += ' H' + x(pts[i].t).toFixed(1) + ' V' + y(pts[i][key]).toFixed(1);
      return d + ' H' + x(t1).toFixed(1);
    };
    root.append(svg('path', { d: step('h'), class: 'held' }), svg('path', { d: step('b'), class: 'balance' }));
    for (const p of pts) {
      root.append(svg('circle', { cx: x(p.t).toFixed(1), cy: y(p.b).toFixed(1), r: 3, class: 'point' },
        svg('title', null, '#' + p.e.seq + ' ' + p.e.kind + ' ' + p.e.amount + ' → balance ' + p.b + ', held ' + p.h + ' · ' + fmtTime(p.e.at))));
    }
    root.append(
      svg('text', { x: W - R - 48, y: 14, 'text-anchor': 'end', class: 'legend-balance' }, 'balance'),
      svg('text', { x: W - R, y: 14, 'text-anchor': 'end', class: 'legend-held' }, 'held'));
    return root;
  }

  // ---- start ------------------------------------------------------------

  function start() {
    $('signin-form').addEventListener('submit', signIn);
    $('signout').addEventListener('click', () => signOut(''));
    window.addEventListener('hashchange', route);
    if (token()) { whoAmI(); loadProfiles(); }
    route();
  }

  start();
})();
