// NetKV live congestion view: draws the oracle's map as it changes (Server-Sent Events from
// /view/events), and the scheduler's recent decisions (?scheduler=URL). No dependencies.
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const scheduler = params.get("scheduler");
  const svgNS = "http://www.w3.org/2000/svg";
  const fabric = document.getElementById("fabric");
  const status = document.getElementById("status");
  let layoutKey = null, lastEvent = 0, last = null, source = null;

  function colour(share) {  // green -> amber -> red as the share of capacity in use grows
    const s = Math.max(0, Math.min(1, share));
    const stops = [[0, [46, 157, 79]], [0.5, [224, 176, 0]], [0.8, [215, 48, 31]], [1, [150, 20, 10]]];
    for (let i = 1; i < stops.length; i++) {
      if (s <= stops[i][0]) {
        const [a, ca] = stops[i - 1], [b, cb] = stops[i], t = (s - a) / (b - a);
        return "rgb(" + ca.map((c, k) => Math.round(c + t * (cb[k] - c))).join(",") + ")";
      }
    }
    return "rgb(150,20,10)";
  }

  function el(name, attrs, parent) {
    const e = document.createElementNS(svgNS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }

  function layout(topo) {  // core on top, then pods, leaves, hosts; returns node positions
    fabric.innerHTML = "";
    const W = fabric.clientWidth || 800, H = 360;
    fabric.setAttribute("viewBox", "0 0 " + W + " " + H);
    const hosts = topo.hosts, leaves = [], pods = [];
    hosts.forEach(h => { if (!leaves.includes(h.leaf)) leaves.push(h.leaf);
                         if (!pods.includes(h.pod)) pods.push(h.pod); });
    const pos = {}, rows = {core: 30, pod: 110, leaf: 200, host: 300};
    const place = (names, y) => names.forEach((n, i) => pos[n] = [W * (i + 0.5) / names.length, y]);
    pos.core = [W / 2, rows.core]; place(pods, rows.pod); place(leaves, rows.leaf);
    place(hosts.map(h => h.name), rows.host);
    const parent = {};
    hosts.forEach(h => { parent[h.name] = h.leaf; parent[h.leaf] = h.pod; parent[h.pod] = "core"; });
    const links = el("g", {}, fabric), nodes = el("g", {}, fabric);
    topo.links.forEach(l => {
      const owner = l.owner;
      if (l.kind === "host_fabric" || !parent[owner]) return;
      const [x1, y1] = pos[owner], [x2, y2] = pos[parent[owner]];
      const down = l.kind.endsWith("_down"), off = down ? 5 : -5;
      el("line", {x1: x1 + off, y1: y1 - 12, x2: x2 + off, y2: y2 + 12, class: "link",
                  "data-link": l.name, "data-state": "nodata"}, links)
        .appendChild(document.createElementNS(svgNS, "title"));
    });
    Object.keys(pos).forEach(n => {
      const g = el("g", {class: "node", "data-node": n}, nodes), [x, y] = pos[n];
      el("rect", {x: x - 34, y: y - 12, width: 68, height: 24, rx: 4}, g);
      el("text", {x: x, y: y + 4}, g).textContent = n;
    });
  }

  function drawLinks(state) {
    state.links.forEach(l => {
      const line = fabric.querySelector('[data-link="' + CSS.escape(l.name) + '"]');
      if (!line) return;
      const measured = l.confidence !== null && l.confidence > 0 && l.share !== null;
      const hot = measured && l.share >= state.hot_share;
      line.setAttribute("data-state", !measured ? "nodata" : hot ? "hot" : "ok");
      line.setAttribute("data-share", measured ? l.share.toFixed(3) : "");
      line.style.stroke = measured ? colour(l.share) : "";
      line.firstChild.textContent = l.name + ": " + (measured
        ? Math.round(100 * l.share) + "% used, " + l.available_gbps.toFixed(1) + " of " +
          l.capacity_gbps.toFixed(0) + " Gb/s available"
        : "no measurement; tier prior");
    });
  }

  function drawHeat(state) {
    const names = state.topology.hosts.map(h => h.name), t = document.getElementById("heat");
    const ms = state.transfer_ms.flat().filter(x => x !== null && x > 0);
    const lo = Math.log(Math.min(...ms)), hi = Math.log(Math.max(...ms));
    let html = "<tr><th></th>" + names.map(n => "<th>" + n + "</th>").join("") + "</tr>";
    state.transfer_ms.forEach((row, i) => {
      html += "<tr><th>" + names[i] + "</th>" + row.map((v, j) => {
        const s = v === null || hi <= lo ? 0 : (Math.log(Math.max(v, 1e-6)) - lo) / (hi - lo);
        return '<td data-src="' + names[i] + '" data-dst="' + names[j] + '" style="background:' +
          colour(0.8 * s) + ';color:#fff">' + (v === null ? "-" : v < 100 ? v.toFixed(1) : Math.round(v)) + "</td>";
      }).join("") + "</tr>";
    });
    t.innerHTML = html;
    document.getElementById("kvbytes").textContent = (state.kv_bytes / 1e9).toFixed(1) + " GB";
    document.getElementById("hot-share").textContent = Math.round(100 * state.hot_share);
  }

  function showStatus() {
    const live = Date.now() - lastEvent < 3000;
    const age = last && last.age_s !== null ? last.age_s + (Date.now() - lastEvent) / 1000 : null;
    const stale = !live || !last || last.stale || age === null || age > last.stale_after_s;
    status.setAttribute("data-stale", String(stale));
    status.setAttribute("data-version", last ? String(last.version) : "");
    const hot = last ? last.links.filter(l => l.confidence > 0 && l.share >= last.hot_share).map(l => l.name) : [];
    status.textContent = !last ? "waiting for the first map ..." :
      "map version " + last.version + " · age " + (age === null ? "-" : age.toFixed(1) + " s") +
      (stale ? " · STALE" + (live ? "" : " (stream lost)") : "") +
      " · hot links: " + (hot.length ? hot.join(", ") : "none");
    document.body.setAttribute("data-hot-links", hot.join(" "));
  }

  function onMap(ev) {
    const state = JSON.parse(ev.data);
    const key = JSON.stringify(state.topology);
    if (key !== layoutKey) { layout(state.topology); layoutKey = key; }
    lastEvent = Date.now(); last = state;
    drawLinks(state); drawHeat(state); showStatus();
    document.body.setAttribute("data-updates", String(Number(document.body.getAttribute("data-updates") || 0) + 1));
  }

  function connect() {
    if (source) source.close();
    const tokens = document.getElementById("tokens").value || "12000";
    source = new EventSource("/view/events?tokens=" + encodeURIComponent(tokens));
    source.addEventListener("map", onMap);
    source.addEventListener("nomap", () => { lastEvent = Date.now(); showStatus(); });
  }

  async function pollDecisions() {
    const note = document.getElementById("decisions-note");
    if (!scheduler) { note.textContent = "Open this page with ?scheduler=http://127.0.0.1:8090 to see decisions."; return; }
    document.getElementById("scheduler-url").textContent = "(" + scheduler + ")";
    try {
      const r = await fetch(scheduler.replace(/\/$/, "") + "/v1/decisions/recent?limit=15");
      const body = await r.json();
      const rows = body.decisions.map(d => "<tr><td>" + (body.now - d.at).toFixed(1) + " s</td><td>" +
        d.request_id + "</td><td>" + d.prefill + "</td><td>&rarr;</td><td>" + d.decode + "</td><td>" + d.tier +
        "</td><td>" + (d.transfer_ms === null ? "-" : d.transfer_ms.toFixed(1)) + "</td><td>" +
        d.predicted_ttft_ms.toFixed(1) + "</td><td>" + d.policy + "</td></tr>");
      document.querySelector("#decisions tbody").innerHTML = rows.join("");
      note.textContent = rows.length ? "" : "no decisions yet";
    } catch (e) {
      note.textContent = "cannot reach the scheduler at " + scheduler + " (" + e + ")";
    }
  }

  document.getElementById("tokens").addEventListener("change", connect);
  connect();
  setInterval(showStatus, 500);
  setInterval(pollDecisions, 1000);
  pollDecisions();
})();
