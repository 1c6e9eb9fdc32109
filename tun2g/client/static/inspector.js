// tun2g inspector page. Everything shown comes from the tunnel (attacker-controlled headers, paths,
// bodies), so text only ever goes in through textContent: no innerHTML anywhere.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const rows = $("requests").tBodies[0];
  const MAX_ROWS = 500;
  let selected = null;
  let current = null;

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function size(n) {
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
    return (n / 1024 / 1024).toFixed(1) + " MiB";
  }

  function matches(r) {
    const path = $("filter-path").value;
    const status = $("filter-status").value;
    if (path && !(r.path || "").includes(path)) return false;
    if (status && String(r.status)[0] !== status[0]) return false;
    return true;
  }

  function row(r) {
    const tr = el("tr", null, "row");
    tr.dataset.id = r.id;
    tr.summary = r;
    tr.appendChild(el("td", new Date(r.time * 1000).toLocaleTimeString()));
    const method = el("td", r.method);
    if (r.replay_of) method.appendChild(el("span", "replay", "badge"));
    tr.appendChild(method);
    const path = el("td", r.path, "path");
    path.title = r.path;
    tr.appendChild(path);
    tr.appendChild(el("td", r.status || "—", "s" + String(r.status || 0)[0]));
    tr.appendChild(el("td", r.duration_ms + " ms"));
    tr.appendChild(el("td", size(r.response_size)));
    tr.addEventListener("click", () => show(r.id));
    if (r.id === selected) tr.classList.add("selected");
    return tr;
  }

  function add(r) {
    if (!matches(r)) return;
    rows.insertBefore(row(r), rows.firstChild);
    while (rows.rows.length > MAX_ROWS) rows.deleteRow(rows.rows.length - 1);
    $("empty").hidden = rows.rows.length > 0;
  }

  let generation = 0;
  async function reload() {
    const mine = ++generation;
    const query = new URLSearchParams({ path: $("filter-path").value, status: $("filter-status").value });
    const answer = await (await fetch("/api/requests?" + query)).json();
    if (mine !== generation) return;  // a later reload (another filter) is on its way
    // Rows the live stream added after this answer was made stay (reloads race with events).
    const newest = answer.requests.length ? answer.requests[0].id : 0;
    const later = [...rows.rows].filter((tr) => Number(tr.dataset.id) > newest && matches(tr.summary));
    rows.replaceChildren(...later, ...answer.requests.slice(0, MAX_ROWS).map(row));
    $("empty").hidden = rows.rows.length > 0;
    counts(answer);
  }

  function counts(answer) {
    // "dropped": exchanges not pushed live (the page fell behind); a reload lists them.
    $("counts").textContent = answer.captured + " captured" +
      (answer.dropped ? ", " + answer.dropped + " not shown live" : "");
  }

  function headers(table, list) {
    table.replaceChildren(...list.map(([name, value]) => {
      const tr = el("tr");
      tr.appendChild(el("td", name));
      tr.appendChild(el("td", value));
      return tr;
    }));
  }

  function body(pre, note, b) {
    pre.textContent = b.text;
    const parts = [b.kind, size(b.size)];
    if (b.kind === "binary") parts.push("first " + b.hex_bytes + " bytes as hex");
    if (b.truncated) parts.push("captured " + size(b.captured) + " (cap)");
    note.textContent = b.kind === "empty" ? "no body" : parts.join(" · ");
  }

  async function show(id) {
    const answer = await fetch("/api/requests/" + id);
    if (!answer.ok) return;
    const r = await answer.json();
    selected = id;
    current = r;
    for (const tr of rows.rows) tr.classList.toggle("selected", Number(tr.dataset.id) === id);
    $("nothing").hidden = true;
    $("shown").hidden = false;
    $("d-title").textContent = r.method + " " + r.path;
    const meta = [(r.status || "no response") + " " + (r.reason || ""), r.duration_ms + " ms",
                  "request " + size(r.request_size), "response " + size(r.response_size)];
    if (r.replay_of) meta.push("replay of #" + r.replay_of);
    if (r.error) meta.push("error: " + r.error);
    $("d-meta").textContent = meta.join(" · ");
    $("replay").disabled = !r.replayable;
    $("replay").title = r.replayable ? "Send this request to the backend again" : "The body was not captured whole";
    $("replay-error").textContent = "";
    headers($("d-request-headers"), r.request_headers);
    headers($("d-response-headers"), r.response_headers);
    body($("d-request-body"), $("d-request-note"), r.request_body);
    body($("d-response-body"), $("d-response-note"), r.response_body);
    const form = $("edit");
    form.method.value = r.method;
    form.path.value = r.path;
    form.headers.value = r.request_headers.map(([n, v]) => n + ": " + v).join("\n");
    form.body.value = r.request_body.kind === "binary" ? "" : r.request_body.text;
  }

  async function replay(edits) {
    $("replay-error").textContent = "";
    const answer = await fetch("/api/requests/" + selected + "/replay", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(edits || {}),
    });
    const r = await answer.json();
    if (!answer.ok) { $("replay-error").textContent = r.error; return; }
    await show(r.id);
  }

  $("replay").addEventListener("click", () => replay({}));
  $("edit-toggle").addEventListener("click", () => $("edit").classList.toggle("open"));
  $("edit").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = $("edit");
    const hs = form.headers.value.split("\n").filter((l) => l.includes(":")).map((l) => {
      const at = l.indexOf(":");
      return [l.slice(0, at).trim(), l.slice(at + 1).trim()];
    });
    replay({ method: form.method.value, path: form.path.value, headers: hs, body: form.body.value });
  });
  $("filter-path").addEventListener("input", reload);
  $("filter-status").addEventListener("change", reload);

  async function status() {
    try {
      const s = await (await fetch("/api/status")).json();
      const box = $("tunnel");
      box.replaceChildren();
      box.appendChild(el("span", (s.state || "?") + " · "));
      for (const url of s.public_urls || []) {
        const a = el("a", url);
        if (/^https?:\/\//.test(url)) a.href = url;
        a.rel = "noreferrer";
        a.target = "_blank";
        box.appendChild(a);
        box.appendChild(el("span", " "));
      }
      box.appendChild(el("span", "→ " + (s.backend || "")));
      counts(s);
    } catch (e) { /* the client is restarting */ }
  }

  const events = new EventSource("/api/events");
  events.addEventListener("request", (event) => { add(JSON.parse(event.data)); status(); });
  events.addEventListener("hello", () => { reload(); status(); });
  reload();
  status();
  setInterval(status, 5000);
})();
