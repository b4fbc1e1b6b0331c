// The page of `vtr-index serve`: search, results, player, the score explorer, the index's
// state. Every element is
// built with textContent and attributes, never from markup, so names and messages from the
// index are shown as text. Every URL is relative, so the page works behind a path prefix.
"use strict";

const PAGE = 20;
const TABLE_PAGE = 20;
const MAX_STRIP = 64;
const QUERY_PAGE = 10;

const $ = (id) => document.getElementById(id);

// How many times a frame's thumbnail is asked for before it is left broken. The service
// refuses a thumbnail at once (503) while its decoders' queue is full, and a page of results or
// queries asks for dozens at once: a refused one is asked for again after a growing, jittered
// pause (0.4 s, then 0.8, 1.6, 3.2, 6.4).
const THUMBNAIL_TRIES = 6;

// The thumbnail of video `id` at `t` seconds, as an <img> with `attrs`.
function frameImage(id, t, attrs) {
  const src = api("thumbnail", { id, t: t.toFixed(3) });
  const img = el("img", { ...attrs, src });
  let failures = 0;
  img.addEventListener("error", () => {
    failures += 1;
    if (failures < THUMBNAIL_TRIES) {
      setTimeout(() => { img.src = src; }, 200 * 2 ** failures + Math.random() * 200);
    }
  });
  return img;
}

function el(tag, props, children) {
  const e = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "text") e.textContent = value;
    else if (key === "class") e.className = value;
    else e.setAttribute(key, value);
  }
  for (const child of children || []) e.append(child);
  return e;
}

function api(path, params) {
  const query = new URLSearchParams(params || {}).toString();
  return "api/v1/" + path + (query ? "?" + query : "");
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    throw new Error(response.status + " " + response.statusText);
  }
  if (!response.ok) throw new Error(body && body.error ? body.error.message : response.statusText);
  return body;
}

function status(text) {
  $("status").textContent = text;
}

function seconds(t) {
  return t === null || t === undefined ? "-" : t.toFixed(2) + " s";
}

// The ranking on screen (a text query or "more like" a video) with its page, and the number of
// the latest request: an answer to an earlier one, arriving late, is dropped.
let ranking = null;
let rankingAsked = 0;

async function showRanking(next, offset) {
  const asked = ++rankingAsked;
  const byText = next.q !== undefined;
  status(byText ? "Searching…" : "Finding similar videos…");
  try {
    const params = byText ? { q: next.q } : { id: next.id };
    params.offset = offset;
    params.limit = PAGE;
    const data = await getJSON(api(byText ? "search" : "similar", params));
    if (asked !== rankingAsked) return;
    ranking = { q: next.q, id: next.id, page: data.page };
    renderResults(data.page);
    status("");
  } catch (e) {
    if (asked === rankingAsked) status("Search failed: " + e.message);
  }
}

function renderResults(page) {
  const title = ranking.q !== undefined ? "Results for “" + ranking.q + "”" : "Videos like " + ranking.id;
  $("results-title").textContent = title;
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of page.items) {
    const time = hit.best_frame_s === null ? 0 : hit.best_frame_s;
    const thumb = frameImage(hit.video_id, time, { class: "thumb", alt: hit.video_id, loading: "lazy" });
    thumb.addEventListener("click", () => openPlayer(hit.video_id, time));
    const more = el("button", { type: "button", class: "similar", text: "More like this" });
    more.addEventListener("click", () => showRanking({ id: hit.video_id }, 0));
    const card = el("article", { class: "result", "data-video-id": hit.video_id }, [
      thumb,
      el("div", { class: "meta" }, [
        el("span", { class: "video-id", text: hit.video_id }),
        el("span", { class: "numbers" }, [
          el("span", { class: "rank", text: "#" + hit.rank }),
          " · score ",
          el("span", { class: "score", text: hit.score.toFixed(2) }),
          " · at ",
          el("span", { class: "time", text: seconds(hit.best_frame_s) }),
        ]),
        more,
      ]),
    ]);
    grid.append(card);
  }
  const shown = page.items.length;
  $("page-info").textContent = shown
    ? page.offset + 1 + "–" + (page.offset + shown) + " of " + page.total
    : "nothing found";
  $("prev").disabled = page.offset === 0;
  $("next").disabled = page.next_offset === null;
  $("results-section").hidden = false;
}

let playerAsked = 0;

async function openPlayer(id, time) {
  const asked = ++playerAsked;
  const player = $("player");
  const video = $("player-video");
  const strip = $("strip");
  video.pause();
  video.removeAttribute("src");
  video.hidden = true;
  strip.hidden = true;
  strip.replaceChildren();
  $("player-title").textContent = id;
  $("player-note").textContent = "";
  player.hidden = false;
  player.scrollIntoView({ block: "nearest" });
  let info;
  try {
    info = await getJSON(api("video", { id }));
  } catch (e) {
    if (asked === playerAsked) $("player-note").textContent = e.message;
    return;
  }
  if (asked !== playerAsked) return;
  if (info.file !== "unchanged") {
    $("player-note").textContent =
      info.file === "changed" ? "The file has changed since it was indexed." : "The file is no longer there.";
    return;
  }
  if (video.canPlayType(info.media_type) === "") {
    showStrip(info, "This browser cannot play " + info.media_type + ": its sampled frames instead.");
    return;
  }
  video.dataset.start = String(time);
  video.onloadedmetadata = () => {
    video.currentTime = time;
  };
  video.onerror = () => {
    video.hidden = true;
    showStrip(info, "This browser cannot play this file: its sampled frames instead.");
  };
  video.src = api("media", { id });
  video.hidden = false;
  $("player-note").textContent = "From " + seconds(time) + ".";
}

function showStrip(info, note) {
  const strip = $("strip");
  strip.replaceChildren();
  $("player-note").textContent = note;
  for (const t of info.frame_times.slice(0, MAX_STRIP)) {
    const img = frameImage(info.video_id, t, { alt: info.video_id + " at " + seconds(t) });
    strip.append(el("figure", {}, [img, el("figcaption", { text: seconds(t) })]));
  }
  strip.hidden = false;
}

// A time in microseconds since 1970 as "YYYY-MM-DD hh:mm:ss" (UTC), or "-" if it is none.
function when(us) {
  const date = new Date(us / 1000);
  return Number.isNaN(date.getTime()) ? "-" : date.toISOString().replace("T", " ").slice(0, 19);
}

function fact(dl, name, value) {
  dl.append(el("dt", { text: name }), el("dd", { text: String(value) }));
}

async function loadState() {
  try {
    const state = await getJSON(api("index"));
    const dl = $("facts");
    dl.replaceChildren();
    fact(dl, "videos", state.videos);
    fact(dl, "frames", state.frames);
    fact(dl, "failures", state.failures);
    fact(dl, "text sets", state.text_sets.map((s) => s.name + " (" + s.texts + ")").join(", ") || "none");
    fact(dl, "model", state.model.id + " (" + state.model.source + ")");
    fact(dl, "sampling", state.sampling.fps + " frames/s, at most " + state.sampling.max_frames + " a video");
    fact(dl, "last commit", when(state.committed_at_us));
    if (state.merged) fact(dl, "merged from", state.merged.count + " parts");
    for (const img of document.querySelectorAll("#plots img")) {
      img.src = api("plots/runs.svg", { metric: img.dataset.metric });
    }
  } catch (e) {
    status("Cannot read the index's state: " + e.message);
  }
  loadRuns(0);
  loadFailures(0);
}

function pager(prefix, page, load) {
  const shown = page.items.length;
  $(prefix + "-info").textContent = shown ? page.offset + 1 + "–" + (page.offset + shown) + " of " + page.total : "none";
  const prev = $(prefix + "-prev");
  const next = $(prefix + "-next");
  prev.disabled = page.offset === 0;
  next.disabled = page.next_offset === null;
  prev.onclick = () => load(Math.max(0, page.offset - page.limit));
  next.onclick = () => load(page.next_offset);
}

async function loadRuns(offset) {
  try {
    const data = await getJSON(api("runs", { offset, limit: TABLE_PAGE }));
    $("runs-note").textContent = data.note || "";
    const body = $("runs").tBodies[0];
    body.replaceChildren();
    for (const run of data.page.items) {
      const started = when(run.started_at_us);
      const state = run.interrupted ? "interrupted by " + run.interrupted : run.committed ? "committed" : "not committed";
      const cells = [started, run.videos, run.failures, run.frames, run.frames_per_s.toFixed(1), run.wall_s.toFixed(1), state];
      body.append(el("tr", {}, cells.map((c) => el("td", { text: String(c) }))));
    }
    pager("runs", data.page, loadRuns);
  } catch (e) {
    $("runs-note").textContent = "Cannot read the runs: " + e.message;
  }
}

async function loadFailures(offset) {
  try {
    const data = await getJSON(api("failures", { offset, limit: TABLE_PAGE }));
    const body = $("failures").tBodies[0];
    body.replaceChildren();
    for (const f of data.page.items) {
      body.append(
        el("tr", {}, [
          el("td", { class: "file", text: f.root + "/" + f.path }),
          el("td", { text: f.stage }),
          el("td", { text: f.kind }),
          el("td", { class: "message", text: f.message }),
          el("td", { text: String(f.attempts) }),
        ]),
      );
    }
    pager("failures", data.page, loadFailures);
  } catch (e) {
    status("Cannot read the failures: " + e.message);
  }
}

// The score explorer: the folders `serve --scores` was given, their queries, and the
// comparison of two of them.
let scoreFolders = [];
let queriesAsked = 0;
let changesAsked = 0;
// The comparison on screen: its folders and which changes it lists, as chosen when Compare was
// pressed (its pages keep them, whatever the selects show since).
let comparing = null;

function fixed(x, digits) {
  return x === null || x === undefined ? "-" : Number(x).toFixed(digits);
}

// A video's thumbnail at `time`, which opens the player there.
function thumbnail(id, time) {
  const t = time === null || time === undefined ? 0 : time;
  const img = frameImage(id, t, { alt: id, title: id, loading: "lazy" });
  img.addEventListener("click", () => openPlayer(id, t));
  return img;
}

function captionText(item) {
  return item.text === null ? "(text " + item.text_id + " is not in the index's text set as it was scored)" : item.text;
}

async function loadScores() {
  let data;
  try {
    data = await getJSON(api("scores"));
  } catch (e) {
    status("Cannot read the scores: " + e.message);
    return;
  }
  scoreFolders = data.folders;
  if (!scoreFolders.length) return;
  const body = $("score-folders").tBodies[0];
  body.replaceChildren();
  const metrics = (m) =>
    m ? [fixed(m.r1, 1), fixed(m.r5, 1), fixed(m.r10, 1), fixed(m.mdr, 1), fixed(m.mnr, 2)] : ["-", "-", "-", "-", "-"];
  for (const f of scoreFolders) {
    const notes = [];
    if (!f.texts_current) notes.push("the index's text set " + f.texts + " has changed since this score");
    if (!f.videos_current) notes.push("the index's videos have changed since this score");
    const cells = [f.name, f.revise, f.texts + " (" + f.n_texts + ")", f.n_videos]
      .concat(metrics(f.metrics && f.metrics.t2v), metrics(f.metrics && f.metrics.v2t))
      .map((c) => el("td", { text: String(c) }));
    cells.push(el("td", { class: "note", text: notes.join("; ") }));
    body.append(el("tr", { "data-folder": String(f.folder) }, cells));
  }
  for (const select of [$("queries-folder"), $("compare-a"), $("compare-b")]) {
    const options = scoreFolders.map((f) => el("option", { value: String(f.folder), text: f.name + " (" + f.revise + ")" }));
    select.replaceChildren(...options);
  }
  const pair = scoreFolders.find((f) => f.comparable_with.length);
  if (scoreFolders.length > 1) {
    $("compare-area").hidden = false;
    if (pair) {
      $("compare-a").value = String(pair.folder);
      $("compare-b").value = String(pair.comparable_with[0]);
      compareChosen();
    }
  }
  $("explorer").hidden = false;
  loadQueries(0);
}

function compareChosen() {
  comparing = { a: $("compare-a").value, b: $("compare-b").value, change: $("change-kind").value };
  showComparison(0);
}

async function showComparison(offset) {
  const { a, b, change } = comparing;
  const asked = ++changesAsked;
  $("compare-note").textContent = "";
  try {
    const data = await getJSON(api("scores/changes", { a, b, change, offset, limit: TABLE_PAGE }));
    if (asked !== changesAsked) return;
    $("comparison-summary").textContent =
      data.b.name + " (" + data.b.revise + ") against " + data.a.name + " (" + data.a.revise + "): " + data.improved +
      " captions ranked their video higher, " + data.worsened + " lower, " + data.unchanged + " the same.";
    const plot = api("plots/changes.svg", { a, b });
    if ($("changes-plot").getAttribute("src") !== plot) $("changes-plot").src = plot;
    const rows = $("changes").tBodies[0];
    rows.replaceChildren();
    for (const item of data.page.items) {
      rows.append(
        el("tr", { "data-text-id": String(item.text_id) }, [
          el("td", {}, [thumbnail(item.video_id, item.best_frame_s)]),
          el("td", { class: "caption", text: captionText(item) }),
          el("td", { text: String(item.rank_a) }),
          el("td", { text: String(item.rank_b) }),
          el("td", {
            class: "change " + (item.change > 0 ? "up" : "down"),
            text: (item.change > 0 ? "+" : "") + item.change,
          }),
        ]),
      );
    }
    pager("changes", data.page, showComparison);
    $("comparison").hidden = false;
  } catch (e) {
    if (asked !== changesAsked) return;
    $("comparison").hidden = true;
    $("compare-note").textContent = e.message;
  }
}

function topFigure(id, time, label, isTrue) {
  return el("figure", { class: isTrue ? "true" : "", "data-video-id": id }, [
    thumbnail(id, time),
    el("figcaption", {}, [el("span", { class: "label", text: label }), el("br"), el("span", { text: id })]),
  ]);
}

async function loadQueries(offset) {
  const params = {
    folder: $("queries-folder").value,
    outcome: $("queries-outcome").value,
    sort: $("queries-sort").value,
  };
  const asked = ++queriesAsked;
  try {
    const data = await getJSON(api("scores/queries", Object.assign(params, { offset, limit: QUERY_PAGE })));
    if (asked !== queriesAsked) return;
    const list = $("queries");
    list.replaceChildren();
    for (const q of data.page.items) {
      const figures = q.top.map((e) =>
        topFigure(e.video_id, e.best_frame_s, "#" + e.rank + " · " + e.score.toFixed(2), e.true),
      );
      if (q.video_id !== null && !q.top.some((e) => e.true)) {
        figures.push(topFigure(q.video_id, q.best_frame_s, "true video, #" + q.rank, true));
      }
      const numbers =
        "text " + q.text_id + " · its video " + q.video_id + " at rank " + q.rank +
        (q.score === null ? "" : " · score " + q.score.toFixed(2));
      list.append(
        el("article", { class: "query", "data-text-id": String(q.text_id) }, [
          el("div", { class: "caption", text: captionText(q) }),
          el("div", { class: "numbers", text: numbers }),
          el("div", { class: "top" }, figures),
        ]),
      );
    }
    pager("queries", data.page, loadQueries);
  } catch (e) {
    if (asked === queriesAsked) status("Cannot read the queries: " + e.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = $("query").value.trim();
    if (q) showRanking({ q }, 0);
  });
  $("prev").addEventListener("click", () => {
    if (ranking) showRanking(ranking, Math.max(0, ranking.page.offset - PAGE));
  });
  $("next").addEventListener("click", () => {
    if (ranking && ranking.page.next_offset !== null) showRanking(ranking, ranking.page.next_offset);
  });
  $("player-close").addEventListener("click", () => {
    $("player-video").pause();
    $("player").hidden = true;
  });
  $("queries-form").addEventListener("change", () => loadQueries(0));
  $("compare-form").addEventListener("submit", (event) => {
    event.preventDefault();
    compareChosen();
  });
  $("change-kind").addEventListener("change", compareChosen);
  loadScores();
  loadState();
});
