// The lienthong broker dashboard: plain JavaScript, no build step, no dependencies.
// It reads the broker's /api every 2 seconds. With an operator token, open the page as
// /#token=TOKEN: the fragment never leaves the browser; every /api call sends it as
// `Authorization: Bearer TOKEN`. `?q=ID` runs a search, `?agency=CODE` opens an agency.
"use strict";

(function () {
  const REFRESH_MS = 2000;
  const params = new URLSearchParams(location.search);
  const token = new URLSearchParams(location.hash.replace(/^#/, "")).get("token");
  let selected = params.get("agency");
  let refreshing = false;

  const STATES = {
    queued: "Đang chờ / Queued",
    delivered: "Đã nhận / Delivered",
    expired: "Hết hạn / Expired",
    refused: "Bị từ chối / Refused",
    unknown: "Không rõ / Unknown",
  };
  const EVENTS = {
    accepted: "Tiếp nhận / Accepted",
    pushed: "Đã gửi / Pushed",
    redriven: "Gửi lại / Redriven",
    delivered: "Đã nhận / Delivered",
    expired: "Hết hạn / Expired",
    refused: "Bị từ chối / Refused",
  };

  // Builds an element; children are nodes or strings (always inserted as text).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // "Vietnamese / English" as a main label and a muted English part.
  function bilingual(text) {
    const [vi, en] = text.split(" / ");
    return en ? [vi + " ", el("span", { class: "en" }, "/ " + en)] : [vi];
  }

  async function api(path, options) {
    const headers = Object.assign({ Accept: "application/json" }, (options || {}).headers);
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      const detail = body && body.error ? body.error : response.status + " " + response.statusText;
      const error = new Error(detail);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function duration(seconds, zero) {
    if (!seconds) return zero || "—";
    const d = Math.floor(seconds / 86400);
    const h = Math.floor((seconds % 86400) / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    const s = seconds % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }

  function bytes(n) {
    if (!n) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }

  function when(ms) {
    if (!ms) return "—";
    const t = new Date(ms);
    const pad = (x, w) => String(x).padStart(w || 2, "0");
    return t.getFullYear() + "-" + pad(t.getMonth() + 1) + "-" + pad(t.getDate()) + " " +
      pad(t.getHours()) + ":" + pad(t.getMinutes()) + ":" + pad(t.getSeconds());
  }

  function badge(state) {
    return el("span", { class: "badge " + state }, STATES[state] || state);
  }

  // Worst first: offline with pending documents, then the oldest pending, then depth,
  // then dead letters, then the code.
  function worstFirst(a, b) {
    const stuck = (q) => (!q.connected && q.pending > 0 ? 1 : 0);
    return stuck(b) - stuck(a) ||
      b.oldest_pending_seconds - a.oldest_pending_seconds ||
      b.pending - a.pending ||
      b.dead_letters - a.dead_letters ||
      a.agency.localeCompare(b.agency);
  }

  function setStatus(text, isError) {
    const status = document.getElementById("status");
    status.className = "status" + (isError ? " error" : "");
    status.replaceChildren(...bilingual(text));
  }

  function renderQueues(view) {
    const rows = view.queues.slice().sort(worstFirst).map((q) => {
      let rowClass = "";
      if (!q.connected && q.pending > 0) rowClass = "offline-pending";
      else if (q.pending > 0) rowClass = "waiting";
      if (q.agency === selected) rowClass += " selected";
      return el("tr", { class: rowClass, "data-agency": q.agency, onclick: () => select(q.agency) },
        el("td", {},
          el("div", { class: "mono agency" }, q.agency),
          q.name && q.name !== q.agency ? el("div", { class: "en" }, q.name) : null),
        el("td", { class: "connection" },
          el("span", { class: "badge " + (q.connected ? "online" : "offline") },
            q.connected ? "Trực tuyến / Online" : "Ngoại tuyến / Offline")),
        el("td", { class: "num pending" }, q.pending),
        el("td", { class: "num" }, bytes(q.pending_bytes)),
        el("td", { class: "num oldest" }, duration(q.oldest_pending_seconds)),
        el("td", { class: "num" }, q.in_flight),
        el("td", { class: "num dead" }, q.dead_letters));
    });
    const body = document.querySelector("#queues tbody");
    if (rows.length === 0) {
      rows.push(el("tr", {}, el("td", { colSpan: 7, class: "empty" },
        "Chưa có cơ quan nào / No agency registered yet")));
    }
    body.replaceChildren(...rows);
  }

  function renderDetail(code, pending, dead) {
    document.getElementById("detail").hidden = false;
    document.getElementById("detail-title").replaceChildren(
      ...bilingual("Cơ quan / Agency"), " ", el("span", { class: "mono" }, code));
    const pendingRows = pending.pending.map((p) =>
      el("tr", { "data-message-id": p.message_id },
        el("td", { class: "mono" }, el("a", { href: "#", onclick: (e) => { e.preventDefault(); search(p.message_id); } }, p.message_id)),
        el("td", {}, p.business_id),
        el("td", { class: "mono" }, p.sender),
        el("td", {}, p.subject),
        el("td", { class: "num" }, duration(Math.max(0, Math.floor((Date.now() - p.enqueued_at_ms) / 1000)), "0s")),
        el("td", { class: "num" }, p.attempts)));
    if (pendingRows.length === 0) {
      pendingRows.push(el("tr", {}, el("td", { colSpan: 6, class: "empty" }, "Không có / None")));
    } else if (pending.truncated) {
      pendingRows.push(el("tr", {}, el("td", { colSpan: 6, class: "empty" },
        "Hiển thị " + pending.pending.length + " / " + pending.total +
        " — showing the first " + pending.pending.length + " of " + pending.total)));
    }
    document.querySelector("#pending tbody").replaceChildren(...pendingRows);

    const deadRows = dead.dead_letters.map((d) =>
      el("tr", { "data-message-id": d.message_id },
        el("td", { class: "mono" }, el("a", { href: "#", onclick: (e) => { e.preventDefault(); search(d.message_id); } }, d.message_id)),
        el("td", {}, d.business_id),
        el("td", { class: "mono" }, d.sender),
        el("td", {}, badge(d.state)),
        el("td", {}, d.reason),
        el("td", {}, when(d.at_ms)),
        el("td", {}, el("button", {
          type: "button", class: "redrive", "data-message-id": d.message_id,
          onclick: (e) => redrive(e.currentTarget, d.message_id, code),
        }, ...bilingual("Gửi lại / Redrive")))));
    if (deadRows.length === 0) {
      deadRows.push(el("tr", {}, el("td", { colSpan: 7, class: "empty" }, "Không có / None")));
    }
    document.querySelector("#dead-letters tbody").replaceChildren(...deadRows);
    const all = document.getElementById("redrive-all");
    all.hidden = dead.dead_letters.length < 2;
    all.onclick = (e) => redrive(e.currentTarget, "", code);
  }

  function showMessage(text, isError) {
    const box = document.getElementById("detail-message");
    box.hidden = false;
    box.className = "message" + (isError ? " error" : "");
    box.textContent = text;
  }

  async function refreshDetail() {
    if (!selected) return;
    const code = encodeURIComponent(selected);
    const [pending, dead] = await Promise.all([
      api("api/agencies/" + code + "/pending"),
      api("api/agencies/" + code + "/dead-letters"),
    ]);
    renderDetail(selected, pending, dead);
  }

  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    try {
      renderQueues(await api("api/queues"));
      await refreshDetail();
      setStatus("Cập nhật lúc / Updated at " + when(Date.now()), false);
    } catch (error) {
      const text = error.status === 401
        ? "Cần mã truy cập của người vận hành (#token=…) / Operator token required (#token=…)"
        : "Lỗi / Error: " + error.message;
      setStatus(text, true);
    } finally {
      refreshing = false;
    }
  }

  function updateUrl() {
    const query = new URLSearchParams();
    const q = document.getElementById("search-input").value.trim();
    if (q) query.set("q", q);
    if (selected) query.set("agency", selected);
    const search = query.toString();
    history.replaceState(null, "", location.pathname + (search ? "?" + search : "") + location.hash);
  }

  function select(code) {
    selected = code;
    document.getElementById("detail-message").hidden = true;
    updateUrl();
    refresh();
  }

  async function redrive(button, messageId, agency) {
    button.disabled = true;
    try {
      const result = await api("api/redrive", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ message_id: messageId, agency: agency }),
      });
      const n = result.redriven.length;
      showMessage("Đã đưa lại " + n + " văn bản vào hàng đợi / " + n + " document(s) queued again", false);
    } catch (error) {
      showMessage("Không gửi lại được / Redrive failed: " + error.message, true);
      button.disabled = false;
    }
    await refresh();
    const q = document.getElementById("search-input").value.trim();
    if (q) search(q);
  }

  function renderTimeline(m) {
    const summary = el("dl", { class: "summary" },
      el("dt", {}, "Mã thông điệp / Message id"), el("dd", { class: "mono message-id" }, m.message_id),
      el("dt", {}, "Số hiệu / Business id"), el("dd", { class: "business-id" }, m.business_id || "—"),
      el("dt", {}, "Trích yếu / Subject"), el("dd", {}, m.subject || "—"),
      el("dt", {}, "Số, ký hiệu / Number, notation"), el("dd", {}, [m.number, m.notation].filter(Boolean).join("/") || "—"),
      el("dt", {}, "Nơi gửi / Sender"), el("dd", { class: "mono" }, m.sender),
      el("dt", {}, "Tiếp nhận / Accepted"), el("dd", {}, when(m.accepted_at_ms)),
      el("dt", {}, "Hết hạn ban đầu / Original expiry"), el("dd", {}, when(m.expires_at_ms)));
    const recipients = m.recipients.map((r) =>
      el("div", { class: "recipient", "data-agency": r.agency, "data-state": r.state },
        el("div", {}, el("strong", { class: "mono" }, r.agency), " ", badge(r.state),
          r.attempts ? el("span", { class: "en" }, " · " + r.attempts + " lần gửi / attempts") : null,
          r.state === "queued" && r.expires_at_ms
            ? el("span", { class: "en" }, " · hết hạn / expires " + when(r.expires_at_ms)) : null),
        el("ol", {}, r.events.map((e) =>
          el("li", { "data-event": e.event },
            el("time", {}, when(e.at_ms)),
            el("strong", {}, EVENTS[e.event] || e.event),
            e.detail ? " — " + e.detail : ""))),
        r.state === "expired" || r.state === "refused"
          ? el("button", {
            type: "button", class: "redrive", "data-message-id": m.message_id,
            onclick: (e) => redrive(e.currentTarget, m.message_id, r.agency),
          }, ...bilingual("Gửi lại / Redrive"))
          : null));
    const box = document.getElementById("timeline");
    box.hidden = false;
    box.replaceChildren(el("h2", {}, ...bilingual("Diễn biến / Timeline")), summary, ...recipients);
  }

  async function search(id) {
    id = (id || "").trim();
    const input = document.getElementById("search-input");
    input.value = id;
    updateUrl();
    const box = document.getElementById("timeline");
    if (!id) {
      box.hidden = true;
      return;
    }
    try {
      renderTimeline(await api("api/messages/" + encodeURIComponent(id)));
    } catch (error) {
      box.hidden = false;
      box.replaceChildren(el("p", { class: "message error not-found" },
        error.status === 404
          ? "Không tìm thấy văn bản / No such document: " + id
          : "Lỗi / Error: " + error.message));
    }
  }

  document.getElementById("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    search(document.getElementById("search-input").value);
  });

  refresh();
  setInterval(refresh, REFRESH_MS);
  if (params.get("q")) search(params.get("q"));
})();
