// The V-Hub web page: sessions, and a terminal in one (xterm.js, served by the
// daemon). Talks only to this daemon's API: REST with the bearer token, the
// WebSocket attach with ?token= (a browser cannot set headers on a WebSocket),
// seq framing on, and a reconnect with ?after=<last seq> when the socket drops.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("vhub-token", fromHash);
    history.replaceState(null, "", location.pathname);  // the token leaves the address bar
  }
  const token = sessionStorage.getItem("vhub-token") || "";
  const state = { term: null, fit: null, ws: null, session: null, exec: null, attachUrl: null,
                  lastSeq: 0, ended: false, retries: 0, received: "" };
  window.vhub = state;  // for tests and the curious

  function status(text, bad) {
    $("status").textContent = text;
    $("status").className = bad ? "bad" : "";
  }

  async function api(method, path, body) {
    const headers = { "Authorization": "Bearer " + token };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await r.json().catch(() => ({ error: r.statusText }));
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  }

  async function refresh() {
    try {
      const { sessions } = await api("GET", "/api/sessions");
      const ul = $("sessions");
      ul.replaceChildren();
      for (const s of sessions) {
        const li = document.createElement("li");
        li.dataset.name = s.name;
        if (s.name === state.session) li.className = "current";
        const name = document.createElement("span");
        name.textContent = s.name;
        const st = document.createElement("span");
        st.className = "state " + s.state;
        st.textContent = s.state;
        li.append(name, st);
        li.onclick = () => { $("name").value = s.name; resumeOrOpen(s.name); };
        ul.append(li);
      }
      if (!state.ws) status(sessions.length + " session" + (sessions.length === 1 ? "" : "s"));
    } catch (e) {
      status(e.message, true);
      $("token-hint").hidden = !!token;
    }
  }

  function ensureTerm() {
    if (state.term) return;
    state.term = new Terminal({ cursorBlink: true, convertEol: false, scrollback: 5000,
                                fontFamily: "ui-monospace, Menlo, Consolas, monospace", fontSize: 14 });
    state.fit = new FitAddon.FitAddon();
    state.term.loadAddon(state.fit);
    state.term.open($("terminal"));
    state.fit.fit();
    state.term.onData((d) => send(new TextEncoder().encode(d)));
    state.term.onResize(({ rows, cols }) => sendControl({ type: "resize", rows, cols }));
    new ResizeObserver(() => state.fit.fit()).observe($("terminal"));
  }

  function send(bytes) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(bytes);
  }

  function sendControl(msg) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
  }

  async function openTerminal(name) {
    ensureTerm();
    if (state.ws) { state.ended = true; state.ws.close(); }
    const argv = $("cmd").value.trim().split(/\s+/).filter(Boolean);
    status("opening " + name + " (booting it if needed)…");
    try {
      await api("POST", "/api/sessions", { name });
      const { rows, cols } = state.term;
      const r = await api("POST", "/api/sessions/" + encodeURIComponent(name) + "/spawn",
                          { command: argv[0] || "sh", args: argv.slice(1), tty: true, rows, cols });
      Object.assign(state, { session: name, exec: r.execution_id, attachUrl: r.attach_url, lastSeq: 0,
                             ended: false, retries: 0 });
      state.term.reset();
      $("term-title").textContent = name + " · " + argv.join(" ") + " · execution " + r.execution_id;
      attach();
      refresh();
    } catch (e) {
      status(e.message, true);
    }
  }

  // A session's own terminal, if one still runs (a reload, another tab): back to it,
  // its output replayed from the daemon's buffer; otherwise a new one.
  async function resumeOrOpen(name) {
    try {
      const { executions } = await api("GET", "/api/sessions/" + encodeURIComponent(name) + "/executions");
      const live = executions.filter((e) => e.tty && !e.exited)
                             .sort((a, b) => Number(b.execution_id) - Number(a.execution_id));
      if (!live.length) return openTerminal(name);
      ensureTerm();
      if (state.ws) { state.ended = true; state.ws.close(); }
      const e = live[0];
      Object.assign(state, { session: name, exec: e.execution_id, lastSeq: 0, ended: false, retries: 0,
                             attachUrl: "/api/sessions/" + encodeURIComponent(name) + "/executions/" +
                                        e.execution_id + "/attach" });
      state.term.reset();
      $("term-title").textContent = name + " · " + e.command + " · execution " + e.execution_id + " (resumed)";
      attach();
      refresh();
    } catch (err) {
      status(err.message, true);
    }
  }

  function attach() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const url = proto + "//" + location.host + state.attachUrl + "?seq=1&after=" + state.lastSeq +
                "&token=" + encodeURIComponent(token);
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    ws.onopen = () => {
      state.retries = 0;
      status("attached to " + state.session + ", execution " + state.exec);
      sendControl({ type: "resize", rows: state.term.rows, cols: state.term.cols });
      state.term.focus();
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        const msg = JSON.parse(ev.data);
        if (msg.type === "exit") {
          state.ended = true;
          status("exited with code " + msg.exit_code);
          state.term.write("\r\n[exited with code " + msg.exit_code + "]\r\n");
        } else if (msg.type === "error") {
          status(msg.message, true);
        }
        return;
      }
      const buf = new Uint8Array(ev.data);
      const view = new DataView(ev.data);
      const seq = Number(view.getBigUint64(1, false));
      if (seq <= state.lastSeq) return;  // already shown
      state.lastSeq = seq;
      state.term.write(buf.subarray(9));
    };
    ws.onclose = () => {
      if (state.ws !== ws) return;
      state.ws = null;
      if (state.ended) return;
      const delay = Math.min(5000, 250 * 2 ** state.retries++);
      status("connection lost; reconnecting from seq " + state.lastSeq + "…", true);
      setTimeout(() => { if (!state.ended && !state.ws) attach(); }, delay);
    };
  }

  $("open").onsubmit = (e) => { e.preventDefault(); openTerminal($("name").value.trim()); };
  $("refresh").onclick = refresh;
  refresh();
  setInterval(refresh, 5000);
})();
