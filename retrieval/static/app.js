// The search page. Every text from the server is put in with textContent or as an attribute value, never
// parsed as HTML: file names and captions can hold anything.
"use strict";
const $ = (id) => document.getElementById(id);
let health = null;
let pending = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function play(hit) {
  const video = $("video");
  $("player").hidden = false;
  video.src = hit.media + "#t=" + Number(hit.second).toFixed(3);  // the media fragment seeks to the second
  $("now-playing").textContent = hit.file + " from " + Number(hit.second).toFixed(1) + " s";
  video.dataset.expected = String(hit.second);
  delete video.dataset.start;
  // where playback starts, for people who wonder and for the browser test
  video.addEventListener("loadeddata", () => { video.dataset.start = String(video.currentTime); }, {once: true});
  video.play().catch(() => {});  // autoplay may be refused; the video still shows the second
}

function show(answer) {
  const results = $("results");
  results.replaceChildren();
  for (const hit of answer.hits) {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.rank = String(hit.rank);
    card.dataset.file = hit.file;
    card.dataset.second = String(hit.second);
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.alt = hit.file + " at " + Number(hit.second).toFixed(1) + " s";
      img.src = hit.thumbnail;
      card.append(img);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = "#" + hit.rank + "  score " + Number(hit.score).toFixed(4) + "  at " +
      Number(hit.second).toFixed(1) + " s  " + hit.file;
    card.append(meta);
    if (hit.caption !== null && hit.caption !== undefined) {
      const caption = document.createElement("div");
      caption.className = "caption";
      caption.textContent = hit.caption;
      card.append(caption);
    }
    if (hit.media) card.addEventListener("click", () => play(hit));
    results.append(card);
  }
  const ms = Object.values(answer.timings_ms).reduce((a, b) => a + b, 0);
  setStatus(answer.hits.length + " " + answer.target + " for \u201c" + answer.query + "\u201d in " + ms.toFixed(0) +
            " ms (" + answer.candidates + " of " + answer.gallery + " candidates)", false);
  document.body.dataset.results = String(answer.hits.length);
}

async function call(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({error: "the server sent no JSON (" + response.status + ")"}));
  if (!response.ok) throw new Error(body.error || ("error " + response.status));
  return body;
}

async function searchText() {
  const q = $("q").value.trim();
  if (!q) return;
  if (pending) pending.abort();
  pending = new AbortController();
  try {
    show(await call("/api/search?top=24&q=" + encodeURIComponent(q), {signal: pending.signal}));
  } catch (e) {
    if (e.name !== "AbortError") setStatus(e.message, true);
  }
}

async function searchClip() {
  const file = $("clip").files[0];
  if (!file) { setStatus("choose a video file first", true); return; }
  const form = new FormData();
  form.append("file", file);
  form.append("target", $("target").value);
  form.append("top", "24");
  setStatus("searching with " + file.name + " ...", false);
  try { show(await call("/api/search_video", {method: "POST", body: form})); }
  catch (e) { setStatus(e.message, true); }
}

let typing = null;
$("q").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(searchText, 300); });
$("text-form").addEventListener("submit", (e) => { e.preventDefault(); clearTimeout(typing); searchText(); });
$("video-form").addEventListener("submit", (e) => { e.preventDefault(); searchClip(); });

call("/api/health").then((h) => {
  health = h;
  if (h.has_captions) {
    const option = document.createElement("option");
    option.value = "captions";
    option.textContent = "captions (video to text)";
    $("target").append(option);
  }
  setStatus(h.videos + " videos, " + h.captions + " captions; " + h.scorer, false);
  document.body.dataset.ready = "1";
}).catch((e) => setStatus(e.message, true));
