// The fleet page. It reads `api/v1/fleet?watch=true` (server-sent events: a snapshot,
// then only what changed; registry/fleet.rs) and keeps one element per workspace in
// the org tree. Events are gathered and applied at most once per frame, and an update
// touches only the text that changed, so 500 workspaces stay cheap. Everything from
// the server reaches the page as text (textContent), never as markup.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const tree = $('tree'), log = $('log'), summary = $('summary'), conn = $('conn');
  const banner = $('banner'), filter = $('filter'), teamsEl = $('teams'), empty = $('empty');
  const PER_WORKSPACE = 3;   // decisions shown under each workspace
  const LOG_LENGTH = 60;     // decisions in the fleet's log
  const LABELS = { pause: 'Pause', resume: 'Resume', restart: 'Restart', wake: 'Wake' };
  const SETTLED = ['Paused', 'Stopped'];

  const nodes = new Map();       // "ns/name" -> node
  const waiting = new Map();     // parent key -> Set of child keys placed at the root meanwhile
  const decisionsOf = new Map(); // key -> that workspace's last decisions, newest first
  let actions = [];              // [{action, path}] the operator offers
  let skew = 0;                  // the operator's clock minus ours (ms)
  let pending = emptyPending();
  let frame = 0, timer = 0;

  function emptyPending() {
    return { workspaces: new Map(), removed: new Set(), beats: new Map(), usage: new Map(), decisions: [], teams: null };
  }

  const keyOf = (w) => `${w.namespace}/${w.name}`;
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  // "3s ago", as the CLI writes it.
  function ago(at) {
    if (!at) return '–';
    const s = Math.max(0, Math.floor((Date.now() + skew - Date.parse(at)) / 1000));
    if (s < 60) return `${s}s ago`;
    if (s < 3600) return `${Math.floor(s / 60)}m ago`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
    return `${Math.floor(s / 86400)}d ago`;
  }
  // Usage as the CLI writes it: cores ("0.012") and bytes in powers of 1024 ("3.4Mi").
  function cores(c) {
    if (c === null || c === undefined) return '–';
    if (c < 0.0005) return '0';
    return c.toFixed(c < 0.1 ? 3 : c < 10 ? 2 : 1);
  }
  function bytes(b) {
    if (b === null || b === undefined) return '–';
    if (b < 1024) return `${b}B`;
    let v = b, unit = '';
    for (const u of ['Ki', 'Mi', 'Gi', 'Ti', 'Pi']) {
      if (v < 1024) break;
      v /= 1024;
      unit = u;
    }
    return `${v.toFixed(v < 10 ? 1 : 0)}${unit}`;
  }
  function renderUsage(node, u) {
    setText(node, 'cpu', cores(u ? u.cpuCores : null));
    setText(node, 'memory', bytes(u ? u.memoryBytes : null));
    node.cpu.title = u && u.windowSeconds ? `cores, averaged over ${Math.round(u.windowSeconds)}s` : '';
  }

  function clock(at) {
    const d = new Date(at);
    return isNaN(d) ? '' : d.toLocaleTimeString([], { hour12: false });
  }

  // ---- one workspace ----------------------------------------------------------------

  function createNode(w) {
    const key = keyOf(w);
    const li = el('li', 'node');
    li.dataset.key = key;
    li.dataset.sort = `${w.name}\u0000${w.namespace}`;
    const card = el('div', 'ws');
    card.addEventListener('animationend', () => card.classList.remove('flash'));
    const head = el('div', 'head');
    const twisty = el('button', 'twisty', '▾');
    twisty.type = 'button';
    twisty.hidden = true;
    twisty.setAttribute('aria-expanded', 'true');
    twisty.setAttribute('aria-label', `collapse ${w.name}`);
    const name = el('span', 'name', w.name);
    name.dataset.field = 'name';
    if (w.namespace !== 'default') name.append(el('span', 'ns', ` · ${w.namespace}`));
    const team = el('span', 'teamtag');
    team.dataset.field = 'team';
    const phase = el('span', 'phase');
    phase.dataset.field = 'phase';
    head.append(twisty, name, team, phase);
    const facts = el('dl', 'facts');
    const fact = (label, field) => {
      const div = el('div'), dd = el('dd');
      dd.dataset.field = field;
      div.append(el('dt', null, label), dd);
      facts.append(div);
      return dd;
    };
    const node = {
      key, li, card, twisty, team, phase,
      incarnation: fact('incarnation', 'incarnation'),
      token: fact('token', 'token'),
      heartbeat: fact('heartbeat', 'heartbeat'),
      restarts: fact('restarts', 'restarts'),
      cpu: fact('cpu', 'cpu'),
      memory: fact('mem', 'memory'),
      why: el('p', 'why'),
      outcome: el('output', 'outcome'),
      decisions: el('ol', 'decisions'),
      children: el('ul', 'children'),
      buttons: {},
      shown: {},
      data: null,
    };
    node.why.dataset.field = 'why';
    node.outcome.dataset.field = 'outcome';
    node.decisions.dataset.field = 'decisions';
    const bar = el('div', 'actions');
    for (const a of actions) {
      const b = el('button', null, LABELS[a.action] || a.action);
      b.type = 'button';
      b.dataset.action = a.action;
      bar.append(b);
      node.buttons[a.action] = b;
    }
    card.append(head, facts, bar, node.why, node.outcome, node.decisions);
    li.append(card, node.children);
    return node;
  }

  function setText(node, field, text) {
    if (node.shown[field] === text) return;
    node.shown[field] = text;
    node[field].textContent = text;
  }

  // Why a workspace is not where it should be: an invalid or conflicting declaration,
  // else the Ready condition's message while it is not running.
  function why(w) {
    const conds = w.conditions || [];
    const bad = conds.find((c) => (c.type === 'InvalidSpec' || c.type === 'SourceConflict') && c.status === 'True');
    if (bad) return bad.message;
    if (w.phase === 'Running' || SETTLED.includes(w.phase)) return '';
    const ready = conds.find((c) => c.type === 'Ready' && c.status === 'False');
    return ready ? ready.message : '';
  }

  function render(node, w) {
    const before = node.data;
    node.data = w;
    if (node.card.dataset.phase !== w.phase) node.card.dataset.phase = w.phase;
    setText(node, 'phase', w.phase);
    setText(node, 'team', w.team || '');
    node.team.hidden = !w.team;
    setText(node, 'incarnation', String(w.incarnation));
    setText(node, 'token', w.token && w.token.prefix ? `${w.token.prefix}…` : '–');
    setText(node, 'restarts', String(w.restartCount || 0));
    node.restarts.title = w.lastRestartReason || '';
    setText(node, 'heartbeat', ago(w.lastHeartbeatAt));
    renderUsage(node, w.usage);
    setText(node, 'why', why(w));
    const paused = SETTLED.includes(w.phase) || SETTLED.includes(w.modeOverride);
    for (const [action, b] of Object.entries(node.buttons)) {
      if (action === 'pause') b.hidden = paused;
      else if (action === 'resume') b.hidden = !paused;
      else if (action === 'wake') b.hidden = w.phase === 'Running';
      b.disabled = !w.declared || b.dataset.busy === '1';
    }
    if (before && (before.incarnation !== w.incarnation || before.phase !== w.phase)) flash(node.card);
  }

  function flash(card) {
    if (card.classList.contains('flash')) {
      card.classList.remove('flash');
      requestAnimationFrame(() => card.classList.add('flash'));
    } else {
      card.classList.add('flash');
    }
  }

  function renderDecisions(node) {
    const list = decisionsOf.get(node.key) || [];
    node.decisions.replaceChildren(...list.map((d) => decisionItem(d, false)));
  }

  function decisionItem(d, withWho) {
    const li = el('li');
    const t = el('time', null, clock(d.at));
    t.dateTime = d.at;
    li.append(t, ' ');
    if (withWho) li.append(el('span', 'who', d.workspace.replace(/^default\//, '')), ' ');
    li.append(el('b', null, d.rule), ` ${d.cause}`);
    if (d.actions && d.actions.length) li.append(` → ${d.actions.join(', ')}`);
    if (d.outcome && d.outcome !== 'ok') li.append(' ', el('span', 'err-text', `[${d.outcome}]`));
    return li;
  }

  // ---- the tree ---------------------------------------------------------------------

  function parentKey(w) {
    return w.parent ? `${w.namespace}/${w.parent}` : null;
  }

  function containerFor(node) {
    const pk = parentKey(node.data);
    if (!pk) return tree;
    const parent = nodes.get(pk);
    if (!parent || node.li.contains(parent.li)) {
      if (!waiting.has(pk)) waiting.set(pk, new Set());
      waiting.get(pk).add(node.key);
      return tree;
    }
    return parent.children;
  }

  // Siblings in name order; appending in order (the snapshot) costs one comparison.
  function insertSorted(container, li) {
    const last = container.lastElementChild;
    if (!last || last.dataset.sort <= li.dataset.sort) {
      container.append(li);
      return;
    }
    for (const sib of container.children) {
      if (sib !== li && sib.dataset.sort > li.dataset.sort) {
        container.insertBefore(li, sib);
        return;
      }
    }
    container.append(li);
  }

  function place(node) {
    const target = containerFor(node);
    if (node.li.parentNode !== target) insertSorted(target, node.li);
  }

  function upsert(w) {
    const key = keyOf(w);
    let node = nodes.get(key);
    const fresh = !node;
    if (fresh) {
      node = createNode(w);
      nodes.set(key, node);
    }
    const moved = fresh || parentKey(node.data) !== parentKey(w);
    render(node, w);
    if (moved) place(node);
    if (fresh && waiting.has(key)) {
      const kids = waiting.get(key);
      waiting.delete(key);
      for (const k of kids) {
        const kid = nodes.get(k);
        if (kid && parentKey(kid.data) === key) place(kid);
      }
    }
  }

  function removeNode(key) {
    const node = nodes.get(key);
    if (!node) return;
    nodes.delete(key);
    decisionsOf.delete(key);
    node.li.remove();
    for (const kid of [...node.children.children]) {
      const k = nodes.get(kid.dataset.key);
      if (k) place(k);
    }
  }

  function updateTwisties() {
    for (const node of nodes.values()) {
      const leaf = node.children.childElementCount === 0;
      if (node.twisty.hidden !== leaf) node.twisty.hidden = leaf;
    }
  }

  // ---- what applies to the whole page -----------------------------------------------

  function renderSummary() {
    const counts = new Map();
    for (const n of nodes.values()) counts.set(n.data.phase, (counts.get(n.data.phase) || 0) + 1);
    const running = counts.get('Running') || 0;
    const parts = [`${running}/${nodes.size} running`];
    for (const [phase, n] of [...counts].sort()) if (phase !== 'Running') parts.push(`${n} ${phase.toLowerCase()}`);
    summary.textContent = parts.join(' · ');
    empty.hidden = nodes.size > 0;
  }

  function renderTeams(teams) {
    teamsEl.replaceChildren(...teams.map((t) => {
      const card = el('div', 'teamcard');
      card.dataset.team = `${t.namespace}/${t.name}`;
      card.append(el('b', null, t.name), el('span', null, `${t.members} member${t.members === 1 ? '' : 's'}`));
      for (const [phase, n] of Object.entries(t.phases || {})) if (n > 0) card.append(el('span', null, `${n} ${phase.toLowerCase()}`));
      if (t.operatingMode && t.operatingMode !== 'Running') card.append(el('span', null, `mode ${t.operatingMode}`));
      return card;
    }));
  }

  function addToLog(decisions) {
    const items = decisions.slice(-LOG_LENGTH).reverse().map((d) => decisionItem(d, true));
    log.prepend(...items);
    while (log.childElementCount > LOG_LENGTH) log.lastElementChild.remove();
  }

  function noteDecisions(decisions) {
    const touched = new Set();
    for (const d of decisions) {
      const list = decisionsOf.get(d.workspace) || [];
      list.unshift(d);
      if (list.length > PER_WORKSPACE) list.length = PER_WORKSPACE;
      decisionsOf.set(d.workspace, list);
      touched.add(d.workspace);
    }
    for (const k of touched) {
      const node = nodes.get(k);
      if (node) renderDecisions(node);
    }
    addToLog(decisions);
  }

  // Shows only the workspaces whose name, team or phase holds the filter text, with
  // the ancestors that lead to them.
  function applyFilter() {
    const q = filter.value.trim().toLowerCase();
    const matches = (w) => !q || [w.name, w.team || '', w.phase, w.namespace].some((s) => s.toLowerCase().includes(q));
    const visit = (ul) => {
      let any = false;
      for (const li of ul.children) {
        const node = nodes.get(li.dataset.key);
        if (!node) continue;
        const shown = visit(node.children) || matches(node.data);
        if (li.hidden === shown) li.hidden = !shown;
        any = any || shown;
      }
      return any;
    };
    visit(tree);
  }

  function snapshot(s) {
    skew = Date.parse(s.now) - Date.now();
    const same = JSON.stringify(s.actions) === JSON.stringify(actions);
    actions = s.actions || [];
    const keys = new Set(s.workspaces.map(keyOf));
    if (!same) for (const k of [...nodes.keys()]) removeNode(k);
    for (const k of [...nodes.keys()]) if (!keys.has(k)) removeNode(k);
    pending = emptyPending();
    const sorted = [...s.workspaces].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const w of sorted) upsert(w);
    decisionsOf.clear();
    log.replaceChildren();
    noteDecisions(s.decisions || []);
    for (const node of nodes.values()) if (!decisionsOf.has(node.key)) renderDecisions(node);
    renderTeams(s.teams || []);
    finish();
  }

  function finish() {
    updateTwisties();
    renderSummary();
    if (filter.value.trim()) applyFilter();
  }

  // ---- applying what arrives, once per frame ----------------------------------------

  function schedule() {
    if (frame) return;
    frame = requestAnimationFrame(flush);
    // A hidden tab gets no frames: apply anyway, a little later.
    timer = setTimeout(flush, 500);
  }

  function flush() {
    cancelAnimationFrame(frame);
    clearTimeout(timer);
    frame = 0;
    const p = pending;
    pending = emptyPending();
    for (const k of p.removed) removeNode(k);
    for (const w of p.workspaces.values()) upsert(w);
    for (const [k, at] of p.beats) {
      const node = nodes.get(k);
      if (node) {
        node.data = { ...node.data, lastHeartbeatAt: at };
        setText(node, 'heartbeat', ago(at));
      }
    }
    for (const [k, u] of p.usage) {
      const node = nodes.get(k);
      if (node) {
        node.data = { ...node.data, usage: u };
        renderUsage(node, u);
      }
    }
    if (p.decisions.length) noteDecisions(p.decisions);
    if (p.teams) renderTeams(p.teams);
    finish();
  }

  // The ages move on by themselves.
  setInterval(() => {
    if (document.hidden) return;
    for (const node of nodes.values()) setText(node, 'heartbeat', ago(node.data.lastHeartbeatAt));
  }, 1000);

  // ---- the stream -------------------------------------------------------------------

  let source = null;
  let retries = 0;

  function setConn(state, text) {
    conn.dataset.state = state;
    conn.textContent = text || state;
  }

  function loggedOut() {
    if (source) source.close();
    setConn('down', 'logged out');
    banner.textContent = 'Not logged in (the session expired, or the operator restarted): run `molecule-operator open` again.';
    banner.hidden = false;
  }

  function on(name, apply) {
    source.addEventListener(name, (e) => {
      apply(JSON.parse(e.data));
      schedule();
    });
  }

  function connect() {
    setConn('connecting', 'connecting…');
    source = new EventSource('api/v1/fleet?watch=true');
    source.addEventListener('snapshot', (e) => {
      retries = 0;
      banner.hidden = true;
      setConn('live');
      snapshot(JSON.parse(e.data));
    });
    on('workspaces', (list) => {
      for (const w of list) {
        pending.workspaces.set(keyOf(w), w);
        pending.removed.delete(keyOf(w));
      }
    });
    on('removed', (keys) => {
      for (const k of keys) {
        pending.removed.add(k);
        pending.workspaces.delete(k);
      }
    });
    on('heartbeats', (beats) => { for (const [k, at] of Object.entries(beats)) pending.beats.set(k, at); });
    on('decisions', (list) => { pending.decisions.push(...list); });
    on('teams', (teams) => { pending.teams = teams; });
    on('usage', (usage) => { for (const [k, u] of Object.entries(usage)) pending.usage.set(k, u); });
    source.onerror = () => {
      if (source.readyState !== EventSource.CLOSED) {
        setConn('connecting', 'reconnecting…');
        return;
      }
      // Closed for good (the operator refused the stream): find out why, then retry.
      setConn('down', 'disconnected');
      fetch('api/v1/fleet', { method: 'HEAD', credentials: 'same-origin' })
        .then((r) => (r.status === 401 ? loggedOut() : later()))
        .catch(later);
    };
  }

  function later() {
    retries = Math.min(retries + 1, 5);
    setTimeout(connect, 500 * 2 ** retries);
  }

  // ---- the buttons ------------------------------------------------------------------

  function showOutcome(node, kind, text) {
    node.outcome.className = `outcome ${kind}`;
    node.outcome.textContent = text;
  }

  tree.addEventListener('click', async (ev) => {
    const b = ev.target.closest('button');
    const li = b && b.closest('li.node');
    const node = li && nodes.get(li.dataset.key);
    if (!node) return;
    if (b === node.twisty) {
      const collapsed = li.classList.toggle('collapsed');
      b.textContent = collapsed ? '▸' : '▾';
      b.setAttribute('aria-expanded', String(!collapsed));
      return;
    }
    const a = actions.find((x) => x.action === b.dataset.action);
    if (!a) return;
    const w = node.data;
    const url = a.path.replace('{name}', encodeURIComponent(w.name)).replace('{namespace}', encodeURIComponent(w.namespace));
    b.dataset.busy = '1';
    b.disabled = true;
    showOutcome(node, '', `${LABELS[a.action] || a.action}…`);
    try {
      // The header is what a cross-site form cannot send (registry/login.rs).
      const r = await fetch(url, { method: 'POST', credentials: 'same-origin', headers: { 'X-Molecule-Request': '1' } });
      const body = await r.json().catch(() => ({}));
      if (r.ok) showOutcome(node, 'ok', body.message || `${a.action}: done`);
      else if (r.status === 401) { showOutcome(node, 'err', 'not logged in'); loggedOut(); }
      else showOutcome(node, 'err', body.error || `${a.action} failed: HTTP ${r.status}`);
    } catch (e) {
      showOutcome(node, 'err', `${a.action} failed: ${e.message}`);
    } finally {
      delete b.dataset.busy;
      b.disabled = !node.data.declared;
    }
  });

  let filterTimer = 0;
  filter.addEventListener('input', () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(applyFilter, 120);
  });

  connect();
})();
