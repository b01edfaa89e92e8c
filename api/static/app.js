// The job page: live progress over Server-Sent Events, a throughput chart, stage times,
// failures, samples and webhook deliveries. Plain JS, no build step.
(function () {
  "use strict";
  for (const el of document.querySelectorAll(".age[data-ts]")) {  // jobs list: "3 min ago"
    const s = (Date.now() - Date.parse(el.dataset.ts)) / 1000;
    el.textContent = s < 90 ? `${Math.round(s)} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago`
      : s < 172800 ? `${Math.round(s / 3600)} h ago` : `${Math.round(s / 86400)} days ago`;
  }
  const root = document.getElementById("job");
  if (!root) return;
  const jobId = root.dataset.jobId;
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g,
    (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

  function chart(points) {
    const svg = $("chart"), W = 400, H = 140;
    if (!points.length) { svg.innerHTML = '<text x="8" y="20" class="muted">no finished items yet</text>'; return; }
    const maxT = points[points.length - 1].t || 1, maxR = Math.max(...points.map((p) => p.rate), 1e-9);
    const xy = points.map((p) => [(p.t / maxT) * (W - 40) + 35, H - 18 - (p.rate / maxR) * (H - 30)]);
    const line = xy.map((p, i) => (i ? "L" : "M") + p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ");
    svg.innerHTML = `<path d="${line}" class="line"/>` +
      `<line x1="35" y1="${H - 18}" x2="${W - 5}" y2="${H - 18}" class="axis"/>` +
      `<text x="2" y="14">${maxR.toFixed(1)}/s</text><text x="${W - 60}" y="${H - 4}">${maxT.toFixed(0)} s</text>`;
  }

  function stages(s) {
    const names = Object.keys(s);
    if (!names.length) { $("stages").innerHTML = '<p class="muted">No outputs yet.</p>'; return; }
    const max = Math.max(...Object.values(s), 1e-9);
    $("stages").innerHTML = names.map((n) => `<div class="stage"><span>${n}</span>` +
      `<div class="sbar" style="width:${(80 * s[n] / max).toFixed(1)}%"></div><em>${s[n].toFixed(1)}</em></div>`).join("");
  }

  function failures(groups) {
    if (!groups.length) { $("failures").innerHTML = '<p class="muted">None.</p>'; return; }
    $("failures").innerHTML = "<table><tr><th>Code</th><th>Items</th><th>Examples</th></tr>" + groups.map((g) =>
      `<tr><td><code>${esc(g.code)}</code></td><td>${g.count}</td><td>` + g.examples.map((e) =>
        `<a href="/ui/items/${e.item_id}">#${e.index}</a> ${esc(e.message)}`).join("<br>") + "</td></tr>").join("") + "</table>";
  }

  function samples(rows) {
    if (!rows.length) return;
    $("samples").innerHTML = rows.map((r) => {
      const img = r.kind === "image" ? `<img src="/ui/items/${r.item_id}/thumb?which=output" alt="output ${r.index}">`
        : (r.has_input ? `<img src="/ui/items/${r.item_id}/thumb" alt="input ${r.index}">` : "");
      const text = r.kind === "image" ? `${esc(r.prompt)} · seed ${esc(r.seed)}`
        : (r.prompt ? esc(r.prompt) + " → " : "") + esc(r.text);
      return `<a class="sample" href="/ui/items/${r.item_id}">${img}<span>${text}</span></a>`;
    }).join("");
  }

  function hooks(rows) {
    $("webhooks").querySelector("tbody").innerHTML = rows.length ? rows.map((d) =>
      `<tr><td>${esc(d.event)}</td><td>${esc(d.status)}</td><td>${d.attempts}</td>` +
      `<td>${esc(d.last_status_code)}</td><td>${esc(d.last_error)}</td></tr>`).join("")
      : '<tr><td colspan="5" class="muted">No webhook deliveries.</td></tr>';
  }

  function render(data) {
    chart(data.throughput || []); stages(data.stages || {}); failures(data.failures || []);
    hooks(data.webhooks || []); if (data.samples) samples(data.samples);
  }

  let pending = null, lastFetch = 0;
  function refresh(now) {
    const wait = now ? 0 : Math.max(0, 2000 - (Date.now() - lastFetch));
    if (pending) return;
    pending = setTimeout(() => {
      pending = null; lastFetch = Date.now();
      fetch(`/ui/jobs/${jobId}/data`, {credentials: "same-origin"})
        .then((r) => r.ok ? r.json() : null).then((d) => d && render(d));
    }, wait);
  }

  function progress(p) {
    const total = p.total || 1;
    for (const s of ["succeeded", "failed", "cancelled", "running"]) {
      $("seg-" + s).style.width = (100 * (p.counts[s] || 0) / total) + "%";
    }
    $("progress-text").textContent = Math.round(100 * p.progress) + "%";
    $("counts").textContent = ["queued", "running", "succeeded", "failed", "cancelled"]
      .map((s) => `${s} ${p.counts[s] || 0}`).join(" · ");
    $("rate").textContent = p.items_per_second ? p.items_per_second.toFixed(1) : "–";
    $("status").textContent = p.status; $("status").className = "status s-" + p.status;
  }

  render(JSON.parse($("initial-data").textContent));
  const source = new EventSource(`/v1/jobs/${jobId}/events`);
  source.onopen = () => { $("live").textContent = "live"; };
  source.addEventListener("started", () => { $("live").textContent = "live · started"; });
  source.addEventListener("progress", (e) => { progress(JSON.parse(e.data)); refresh(false); });
  source.addEventListener("item_failed", (e) => {
    const f = JSON.parse(e.data), li = document.createElement("li");
    li.innerHTML = `<a href="/ui/items/${f.item_id}">#${f.index}</a> <code>${esc(f.code)}</code> ${esc(f.message)}`;
    const list = $("live-failures"); if (list.children.length < 50) list.appendChild(li);
  });
  source.addEventListener("finished", (e) => {
    const j = JSON.parse(e.data);
    $("status").textContent = j.status; $("status").className = "status s-" + j.status;
    $("live").textContent = "finished"; source.close(); refresh(true);
  });
  source.onerror = () => { if (source.readyState !== 2) $("live").textContent = "reconnecting…"; };
})();
