"""The page at GET /: type tags and see the matching images (with a minimum score, user and date
filters, paging, and "more like this" on every result); drop a photo and see its tags or the
indexed images like it.

Everything the server sends back (tags are unfiltered user input; image ids and error
messages quote it) is put on the page as text (`textContent`, element attributes set one by
one), never as HTML; the Content-Security-Policy allows only this page's own script and style
(by their SHA-256) and requests to its own origin, so even a missed spot could not run a script.
When the app requires API keys the page asks for one (kept in sessionStorage) and sends it with
every request; thumbnails are fetched with it and shown from blob: URLs.
"""

import base64
import hashlib

STYLE = """
 body { font-family: system-ui, sans-serif; margin: 1.5rem; max-width: 60rem; color: #222; }
 h1 { font-size: 1.4rem; margin: 0 0 1rem; } h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
 input[type=text] { width: 22rem; padding: .4rem; font-size: 1rem; }
 button { padding: .4rem .9rem; font-size: 1rem; }
 #results { display: flex; flex-wrap: wrap; gap: .6rem; margin-top: .8rem; }
 figure { margin: 0; width: 9rem; font-size: .8rem; overflow-wrap: anywhere; }
 figure img { width: 9rem; height: 9rem; object-fit: cover; background: #eee; }
 #drop { border: 2px dashed #999; padding: 1.2rem; text-align: center; border-radius: .5rem; }
 #drop.over { background: #eef; } .error { color: #b00; } table { border-collapse: collapse; margin-top: .6rem; }
 td, th { padding: .2rem .8rem; text-align: left; border-bottom: 1px solid #ddd; }
 td button { padding: .1rem .5rem; font-size: .85rem; margin-right: .3rem; } .saved { color: #070; }
 #filters { margin-top: .5rem; font-size: .9rem; } #filters input { width: 8rem; padding: .2rem; }
 figure button { font-size: .75rem; padding: .1rem .4rem; margin-top: .2rem; } .partial { color: #a60; }
"""

SCRIPT = """
const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem('tagray-key') || '';
async function api(url, options = {}) {  // every request carries the API key, when there is one
  const headers = new Headers(options.headers || {});
  if (key) headers.set('Authorization', 'Bearer ' + key);
  const r = await fetch(url, { ...options, headers });
  if (r.status === 401) $('key-form').hidden = false;
  return r;
}
$('key-form').addEventListener('submit', (e) => {
  e.preventDefault(); key = $('key').value.trim(); sessionStorage.setItem('tagray-key', key);
  $('key-form').hidden = true; loadModel();
});
function el(tag, props, ...children) {  // an element with text children only: never parsed as HTML
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === 'className') node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}
function showError(target, message) { target.replaceChildren(el('span', { className: 'error' }, message)); }
async function errorOf(r) {
  try { const e = (await r.json()).error; return (e && (e.message || e)) || r.statusText; } catch { return r.statusText; }
}
let feedback = false;
async function loadModel() {
  const r = await api('/v1/model');
  if (!r.ok) return;
  const m = await r.json(); feedback = !!m.feedback;
  $('model').textContent = `${m.head} · ${m.tags} tags` +
    (m.index ? ` · index v${m.index.version}, ${m.index.shards} shards` : '');
}
async function judge(upload, tag, verdict, cell) {  // a user's verdict on a suggested tag → POST /v1/feedback
  const request_id = Date.now().toString(36) + '-' + Math.random().toString(36).slice(2);
  const r = await api('/v1/feedback', { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ request_id, verdicts: [{ upload_sha256: upload, tag, verdict }] }) });
  cell.replaceChildren(r.ok ? el('span', { className: 'saved' }, verdict === 'present' ? 'confirmed' : 'rejected')
                            : el('span', { className: 'error' }, await errorOf(r)));
}
loadModel();
let last = null;  // the last search or similar request: {path, init, offset}, for the next page
function pageParams(offset) {  // k, offset, min_score and the filters of the form, as a query string
  const p = new URLSearchParams({ k: '12', offset: String(offset) });
  const fields = { min_score: 'min-score', user: 'user', taken_after: 'taken-after', taken_before: 'taken-before' };
  for (const [name, id] of Object.entries(fields)) { const v = $(id).value.trim(); if (v) p.set(name, v); }
  return p;
}
async function show(request, offset) {  // runs a search / similar request and shows one page of images
  last = { ...request, offset };
  $('results').replaceChildren(); $('next').hidden = true; $('search-status').textContent = 'searching…';
  const params = pageParams(offset);
  for (const [k, v] of Object.entries(request.params || {})) params.set(k, v);
  const r = await api(request.path + '?' + params.toString(), request.init || {});
  if (!r.ok) { showError($('search-status'), await errorOf(r)); return; }
  const body = await r.json();
  $('search-status').replaceChildren(`${request.label}: images ${offset + 1}–${offset + body.images.length}`);
  if (body.partial) $('search-status').append(el('span', { className: 'partial' },
    ` (partial: shards ${body.missing_shards.join(', ')} are being replaced)`));
  for (const im of body.images) {
    const img = el('img', { alt: im.image_id });  // fetched with the key, shown from a blob: URL
    api('/v1/images/' + encodeURIComponent(im.image_id)).then(r => r.ok ? r.blob() : null)
      .then(b => { if (b) img.src = URL.createObjectURL(b); });
    const like = el('button', { className: 'similar', type: 'button' }, 'more like this');
    like.addEventListener('click', () => show({ path: '/v1/similar', label: 'like ' + im.image_id,
      init: { method: 'POST', headers: { 'Content-Type': 'application/json' },
              body: JSON.stringify({ image_id: im.image_id }) } }, 0));
    $('results').append(el('figure', { className: 'result' }, img,
      el('figcaption', {}, im.image_id, el('br'), Number(im.score).toFixed(3), el('br'), like)));
  }
  $('next').hidden = body.next_offset === null || body.next_offset === undefined;
  last.next = body.next_offset;
}
$('search').addEventListener('submit', (e) => {
  e.preventDefault();
  const q = $('q').value;
  show({ path: '/v1/search', params: { q }, label: q }, 0);
});
$('next').addEventListener('click', () => { if (last && last.next !== null) show(last, last.next); });
let lastFile = null;
$('like-upload').addEventListener('click', () => {
  if (!lastFile) return;
  const data = new FormData(); data.append('file', lastFile);
  show({ path: '/v1/similar', init: { method: 'POST', body: data }, label: 'like ' + lastFile.name }, 0);
});
async function tagFile(file) {
  $('tags').replaceChildren(); $('tag-status').textContent = 'tagging…';
  const data = new FormData(); data.append('file', file);
  const r = await api('/v1/tag?k=8', { method: 'POST', body: data });
  if (!r.ok) { showError($('tag-status'), await errorOf(r)); return; }
  const body = await r.json(); $('tag-status').textContent = file.name;
  lastFile = file; $('like-upload').hidden = false;
  $('tags').append(el('tr', {}, el('th', {}, 'tag'), el('th', {}, 'P(in image)'), el('th', {}, 'P(user tags it)'),
    ...(feedback ? [el('th', {}, 'right?')] : [])));
  for (const t of body.tags) {
    const row = el('tr', { className: 'tag' }, el('td', {}, t.tag),
      el('td', {}, Number(t.p_true).toFixed(3)), el('td', {}, Number(t.p_user).toFixed(3)));
    if (feedback) {
      const cell = el('td', {});
      for (const [verdict, label] of [['present', 'yes'], ['absent', 'no']]) {
        const b = el('button', { className: 'verdict-' + verdict, type: 'button' }, label);
        b.addEventListener('click', () => judge(body.upload_sha256, t.tag, verdict, cell));
        cell.append(b);
      }
      row.append(cell);
    }
    $('tags').append(row);
  }
}
$('file').addEventListener('change', (e) => { if (e.target.files.length) tagFile(e.target.files[0]); });
const drop = $('drop');
drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => { e.preventDefault(); drop.classList.remove('over'); if (e.dataTransfer.files.length) tagFile(e.dataTransfer.files[0]); });
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CSP = (f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; img-src 'self' blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tagray</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{STYLE}</style></head><body>
<h1>tagray <small id="model"></small></h1>
<form id="key-form" hidden>This server needs an API key:
 <input id="key" type="password" autocomplete="off" placeholder="tgr_…"> <button type="submit">Use key</button></form>
<h2>Search by tags</h2>
<form id="search"><input id="q" type="text" placeholder="beach, sunset" autocomplete="off">
 <button type="submit">Search</button>
 <div id="filters"><label>min score <input id="min-score" type="number" min="0" step="any"
   title="linear models: the probability that an image shows every tag"></label>
 <label>user <input id="user" type="text" autocomplete="off"></label>
 <label>taken after <input id="taken-after" type="date"></label>
 <label>taken before <input id="taken-before" type="date"></label></div></form>
<div id="search-status"></div><div id="results"></div><button id="next" type="button" hidden>next page</button>
<h2>Tag a photo</h2>
<div id="drop">Drop a photo here, or <input id="file" type="file" accept="image/*"></div>
<div id="tag-status"></div><table id="tags"></table>
<button id="like-upload" type="button" hidden>indexed images like this photo</button>
<script>{SCRIPT}</script></body></html>
"""
