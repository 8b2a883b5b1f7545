// The review pass: verdicts in memory and localStorage (keyed by the output), radio
// buttons and keys to set them, a button that saves them as the JSON review.py reads.
// (pipeline/results/report.py inlines it into the page.)
(function () {
  const data = JSON.parse(document.getElementById('review-data').textContent);
  const key = 'maskface-review:' + data.output;
  let verdicts = Object.assign({}, data.verdicts);
  try { Object.assign(verdicts, JSON.parse(localStorage.getItem(key) || '{}')); } catch (e) {}
  const edits = Array.from(document.querySelectorAll('figure.edit'));
  const letters = {a: 'accept', r: 'reject', u: 'unsure'};
  function show() {
    const counts = {accept: 0, reject: 0, unsure: 0};
    for (const f of edits) {
      const v = verdicts[f.dataset.id];
      f.dataset.verdict = v || '';
      for (const r of f.querySelectorAll('input[type=radio]')) r.checked = (r.value === v);
      if (v) counts[v] += 1;
    }
    document.getElementById('review-count').textContent =
      `${counts.accept + counts.reject + counts.unsure} of ${edits.length} reviewed: ` +
      `${counts.accept} accepted, ${counts.reject} rejected, ${counts.unsure} unsure.`;
  }
  function set(id, v) {
    verdicts[id] = v;
    try { localStorage.setItem(key, JSON.stringify(verdicts)); } catch (e) {}
    show();
  }
  document.addEventListener('change', e => {
    const f = e.target.closest('figure.edit');
    if (f && e.target.type === 'radio') set(f.dataset.id, e.target.value);
  });
  document.addEventListener('keydown', e => {
    const f = document.activeElement && document.activeElement.closest('figure.edit');
    if (!f || e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key.toLowerCase(), i = edits.indexOf(f);
    if (letters[k]) { set(f.dataset.id, letters[k]); (edits[i + 1] || f).focus(); }
    else if (k === 'j' || k === 'arrowright') (edits[i + 1] || f).focus();
    else if (k === 'k' || k === 'arrowleft') (edits[i - 1] || f).focus();
    else return;
    e.preventDefault();
  });
  document.getElementById('save-verdicts').addEventListener('click', () => {
    const body = JSON.stringify({output: data.output, verdicts: verdicts}, null, 1);
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([body], {type: 'application/json'}));
    a.download = 'review.json';
    document.body.appendChild(a);
    a.click();
    a.remove();
  });
  show();
})();
