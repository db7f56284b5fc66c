// Live worklist: polls the page's JSON feed and rebuilds the rows when the list changed
// (the server answers 304 otherwise). Patient data only ever goes into textContent.
"use strict";

(function () {
  const table = document.getElementById("worklist");
  if (!table) {
    return;
  }
  const tbody = document.getElementById("rows");
  const feed = table.dataset.feed;
  const pollMs = parseInt(table.dataset.pollMs, 10) || 3000;
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";
  const liveStatus = document.getElementById("live-status");
  const count = document.getElementById("count");
  let etag = null;
  let timer = null;
  let stopped = false;
  let renderedAt = Date.now();
  let lastRows = [];
  let known = new Set(Array.from(tbody.querySelectorAll("tr[data-study-uid]"), (tr) => tr.dataset.studyUid));

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    return node;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) {
      return "";
    }
    let minutes = Math.floor(seconds / 60);
    if (minutes < 1) {
      return "<1 min";
    }
    if (minutes < 60) {
      return minutes + " min";
    }
    let hours = Math.floor(minutes / 60);
    minutes = minutes % 60;
    if (hours < 48) {
      return hours + " h " + String(minutes).padStart(2, "0") + " min";
    }
    const days = Math.floor(hours / 24);
    hours = hours % 24;
    return days + " d " + hours + " h";
  }

  function studyPath(uid) {
    return "/studies/" + encodeURIComponent(uid);
  }

  function buildRow(r, openWhy) {
    const tr = el("tr", "row prio-" + r.priority + " read-" + r.read_status);
    tr.dataset.studyUid = r.study_uid;
    tr.dataset.priority = r.priority;
    tr.dataset.rank = String(r.rank);

    const prio = el("td", "c-prio");
    prio.append(el("span", "badge badge-" + r.priority, r.priority.replace("_", " ")));
    if (r.priority_override) {
      prio.append(" ", el("span", "tag", "override"));
    } else if (r.aged) {
      prio.append(" ", el("span", "tag", "aged"));
    }
    const why = el("details", "why");
    why.append(el("summary", null, "why?"), el("p", null, r.why));
    why.open = openWhy;
    prio.append(why);
    tr.append(prio);

    const score = el("td", "c-score");
    if (r.abnormality_score === null) {
      score.append(el("span", "muted", "\u2013"));
    } else {
      const meter = el("meter");
      meter.min = 0;
      meter.max = 1;
      meter.low = 0.3;
      meter.high = 0.5;
      meter.optimum = 0;
      meter.value = r.abnormality_score;
      score.append(meter, " ", el("span", "num", r.abnormality_score.toFixed(2)));
    }
    tr.append(score);

    const findings = el("td", "c-findings");
    const list = el("ul", "findings");
    for (const f of r.top_findings) {
      const li = el("li");
      li.append(el("span", "f-label", f.label), " ", el("span", "num", f.probability.toFixed(2)));
      list.append(li);
    }
    findings.append(list);
    tr.append(findings);

    const patient = el("td", "c-patient");
    const link = el("a", "patient", r.patient_name_display);
    link.href = studyPath(r.study_uid);
    patient.append(link, el("div", "sub", r.study_description));
    tr.append(patient);

    tr.append(el("td", "c-pid", r.patient_id));
    tr.append(el("td", "c-acc", r.accession_number));
    tr.append(el("td", "c-mod", r.modalities.join(", ")));
    tr.append(el("td", "c-time", r.study_datetime || ""));
    const wait = el("td", "c-wait", duration(r.waiting_s));
    tr.append(wait);

    const status = el("td", "c-status");
    const notAnalysed = !r.analysed || r.state !== "analysed";
    status.append(el("span", notAnalysed ? "state not-analysed" : "state", r.status_text), " ");
    status.append(el("span", "read-status read-status-" + r.read_status, r.read_status));
    tr.append(status);

    const actions = el("td", "c-actions");
    const read = r.read_status === "read";
    const button = el("button", null, read ? "Mark unread" : "Mark read");
    button.type = "submit";
    button.setAttribute("form", "row-action");
    button.formAction = studyPath(r.study_uid) + "/status";
    button.name = "status";
    button.value = read ? "unread" : "read";
    actions.append(button);
    tr.append(actions);
    return tr;
  }

  function render(page) {
    const open = new Set(
      Array.from(tbody.querySelectorAll("details.why[open]"), (d) => d.closest("tr").dataset.studyUid)
    );
    const fragment = document.createDocumentFragment();
    for (const r of page.rows) {
      const tr = buildRow(r, open.has(r.study_uid));
      if (!known.has(r.study_uid)) {
        tr.classList.add("fresh");
      }
      fragment.append(tr);
    }
    if (page.rows.length === 0) {
      const tr = el("tr", "empty");
      const td = el("td", null, "No studies match these filters.");
      td.colSpan = 11;
      tr.append(td);
      fragment.append(tr);
    }
    tbody.replaceChildren(fragment);
    known = new Set(page.rows.map((r) => r.study_uid));
    lastRows = page.rows;
    renderedAt = Date.now();
    if (count) {
      count.textContent = String(page.total) + (page.total_exact ? "" : "+");
    }
  }

  function tickWaiting() {
    const elapsed = (Date.now() - renderedAt) / 1000;
    const cells = tbody.querySelectorAll("tr[data-study-uid] td.c-wait");
    cells.forEach((cell, i) => {
      const r = lastRows[i];
      if (r && r.waiting_s !== null) {
        cell.textContent = duration(r.waiting_s + elapsed);
      }
    });
  }

  function setLive(text) {
    if (liveStatus) {
      liveStatus.textContent = text;
    }
  }

  function schedule(ms) {
    if (!stopped) {
      clearTimeout(timer);
      timer = setTimeout(poll, ms);
    }
  }

  async function poll() {
    const headers = { Accept: "application/json" };
    if (etag) {
      headers["If-None-Match"] = etag;
    }
    try {
      const response = await fetch(feed + window.location.search, {
        headers: headers,
        credentials: "same-origin",
        cache: "no-store",
      });
      if (response.status === 401) {
        stopped = true;
        setLive("session ended: reload the page to log in again");
        return;
      }
      if (response.status === 304) {
        tickWaiting();
      } else if (response.ok) {
        etag = response.headers.get("ETag");
        render(await response.json());
      } else {
        throw new Error("HTTP " + response.status);
      }
      setLive("live, updated " + new Date().toLocaleTimeString());
      table.dataset.liveAt = String(Date.now());
    } catch (err) {
      setLive("live updates paused: " + err.message);
    }
    schedule(document.hidden ? pollMs * 5 : pollMs);
  }

  // Row buttons submit the shared form #row-action (CSRF token) to their study's URL.
  const actionForm = document.getElementById("row-action");
  if (actionForm) {
    actionForm.addEventListener("submit", async (event) => {
      const button = event.submitter;
      if (!(button instanceof HTMLButtonElement)) {
        return;
      }
      event.preventDefault();
      const data = new URLSearchParams(new FormData(actionForm));
      data.set(button.name, button.value);
      button.disabled = true;
      try {
        const response = await fetch(button.formAction, {
          method: "POST",
          body: data,
          headers: { "X-CSRF-Token": csrf, "X-Requested-With": "fetch" },
          credentials: "same-origin",
        });
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        etag = null;
        clearTimeout(timer);
        await poll();
      } catch (err) {
        setLive("could not change the study: " + err.message);
        button.disabled = false;
      }
    });
  }

  const filters = document.getElementById("filters");
  if (filters) {
    filters.addEventListener("change", () => filters.requestSubmit());
  }
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      schedule(0);
    }
  });

  poll();
})();
