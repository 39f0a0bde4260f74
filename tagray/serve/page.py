"""The page at GET /: type tags and see the matching images; drop a photo and see its tags."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tagray</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; max-width: 60rem; color: #222; }
 h1 { font-size: 1.4rem; margin: 0 0 1rem; } h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
 input[type=text] { width: 22rem; padding: .4rem; font-size: 1rem; }
 button { padding: .4rem .9rem; font-size: 1rem; }
 #results { display: flex; flex-wrap: wrap; gap: .6rem; margin-top: .8rem; }
 figure { margin: 0; width: 9rem; font-size: .8rem; } figure img { width: 9rem; height: 9rem; object-fit: cover; background: #eee; }
 #drop { border: 2px dashed #999; padding: 1.2rem; text-align: center; border-radius: .5rem; }
 #drop.over { background: #eef; } .error { color: #b00; } table { border-collapse: collapse; margin-top: .6rem; }
 td, th { padding: .2rem .8rem; text-align: left; border-bottom: 1px solid #ddd; }
</style></head><body>
<h1>tagray <small id="model"></small></h1>
<h2>Search by tags</h2>
<form id="search"><input id="q" type="text" placeholder="beach, sunset" autocomplete="off">
 <button type="submit">Search</button></form>
<div id="search-status"></div><div id="results"></div>
<h2>Tag a photo</h2>
<div id="drop">Drop a photo here, or <input id="file" type="file" accept="image/*"></div>
<div id="tag-status"></div><table id="tags"></table>
<script>
const $ = (id) => document.getElementById(id);
fetch('/v1/model').then(r => r.json()).then(m => { $('model').textContent = `${m.head} · ${m.tags} tags`; });
async function errorOf(r) { try { return (await r.json()).error || r.statusText; } catch { return r.statusText; } }
$('search').addEventListener('submit', async (e) => {
  e.preventDefault();
  const q = $('q').value; $('results').innerHTML = ''; $('search-status').textContent = 'searching…';
  const r = await fetch('/v1/search?k=12&q=' + encodeURIComponent(q));
  if (!r.ok) { $('search-status').innerHTML = `<span class="error">${await errorOf(r)}</span>`; return; }
  const body = await r.json(); $('search-status').textContent = `${body.images.length} images`;
  for (const im of body.images) {
    const f = document.createElement('figure'); f.className = 'result';
    f.innerHTML = `<img alt="${im.image_id}" src="/v1/images/${encodeURIComponent(im.image_id)}"><figcaption>${im.image_id}<br>${im.score.toFixed(3)}</figcaption>`;
    $('results').appendChild(f);
  }
});
async function tagFile(file) {
  $('tags').innerHTML = ''; $('tag-status').textContent = 'tagging…';
  const data = new FormData(); data.append('file', file);
  const r = await fetch('/v1/tag?k=8', { method: 'POST', body: data });
  if (!r.ok) { $('tag-status').innerHTML = `<span class="error">${await errorOf(r)}</span>`; return; }
  const body = await r.json(); $('tag-status').textContent = file.name;
  $('tags').innerHTML = '<tr><th>tag</th><th>P(in image)</th><th>P(user tags it)</th></tr>' + body.tags.map(
    t => `<tr class="tag"><td>${t.tag}</td><td>${t.p_true.toFixed(3)}</td><td>${t.p_user.toFixed(3)}</td></tr>`).join('');
}
$('file').addEventListener('change', (e) => { if (e.target.files.length) tagFile(e.target.files[0]); });
const drop = $('drop');
drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => { e.preventDefault(); drop.classList.remove('over'); if (e.dataTransfer.files.length) tagFile(e.dataTransfer.files[0]); });
</script></body></html>
"""
