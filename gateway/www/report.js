// Report editor (/app/reports/{id}, and /app/studies/{uid}/report to start one): the five
// sections of docs/reports.md with autosave (every few seconds, with lock_version; a 409 says
// someone else changed the report), sign, amend, the version history with a line diff between
// two versions, and the PDF (request, wait for the render, preview, download). The study opens
// in OHIF beside it (a link: the viewer needs the whole window). Text is set as text, never as
// HTML (the markup of docs/reports.md is the server's to render).
import { t, formatDicomDate, formatPersonName, formatDateTime, language } from './i18n.js';
import { api, h, can, navigate, viewerUrl, errorText, toast, ApiError, setChildren } from './app.js';

const SECTIONS = ['clinical_information', 'technique', 'findings', 'impression',
                  'recommendations'];
const AUTOSAVE_MS = 3000;

function studyHeader(st, uid) {
  if (!st) return h('p.muted', uid);
  return h('dl.study',
    h('dt', t('worklist.patient_name')), h('dd#rp-patient', formatPersonName(st.patient_name)),
    h('dt', t('worklist.patient_id')), h('dd', st.patient_id || ''),
    h('dt', t('worklist.birth_date')), h('dd', formatDicomDate(st.patient_birth_date)),
    h('dt', t('worklist.study_date')), h('dd', formatDicomDate(st.study_date)),
    h('dt', t('worklist.modality')), h('dd', (st.modalities || []).join(', ')),
    h('dt', t('worklist.description')), h('dd', st.study_description || ''),
    h('dt', t('worklist.accession')), h('dd', st.accession_number || ''));
}

// Start page of a study without a report: pick a template and a language, then create.
async function renderNew(view, uid) {
  let existing;
  try {
    existing = await api('GET', `/api/studies/${uid}/reports`);
  } catch (e) {
    view.append(h('section.card', h('p.error', errorText(e))));
    return;
  }
  if (existing.reports && existing.reports.length) {
    const newest = existing.reports.reduce((a, b) => (a.updated_at > b.updated_at ? a : b));
    return navigate(`/app/reports/${newest.id}`, true);
  }
  if (!can('report.write')) {
    view.append(h('section.card', h('p', t('report.none'))));
    return;
  }
  const lang = h('select#rp-language', ...['en', 'ru', 'es', 'fr', 'de'].map(l =>
    h('option', { value: l }, t('language.' + l))));
  lang.value = language();
  const tpl = h('select#rp-template', h('option', { value: '' }, t('report.no_template')));
  const loadTemplates = async () => {
    tpl.replaceChildren(h('option', { value: '' }, t('report.no_template')));
    try {
      const r = await api('GET', `/api/report-templates?language=${lang.value}`);
      for (const x of r.templates || [])
        tpl.append(h('option', { value: x.id },
                     x.name + (x.modality ? ` (${x.modality}${x.body_part ? ' ' + x.body_part : ''})` : '')));
    } catch (e) { toast(errorText(e), 'error'); }
  };
  lang.addEventListener('change', loadTemplates);
  await loadTemplates();
  const create = h('button#rp-create', { type: 'submit' }, t('report.create'));
  const form = h('form.card',
    h('h1', t('report.new_title')),
    h('div.field', h('label', { for: 'rp-language' }, t('report.language')), lang),
    h('div.field', h('label', { for: 'rp-template' }, t('report.template')), tpl),
    h('div.buttons', create,
      h('a.button.secondary', { href: viewerUrl(uid) }, t('worklist.open_viewer'))));
  form.addEventListener('submit', async ev => {
    ev.preventDefault();
    create.disabled = true;
    const body = { language: lang.value };
    if (tpl.value) body.template_id = Number(tpl.value);
    try {
      const r = await api('POST', `/api/studies/${uid}/reports`, body);
      navigate(`/app/reports/${r.id}`, true);
    } catch (e) {
      toast(errorText(e), 'error');
      create.disabled = false;
    }
  });
  view.append(form);
}

// ---- line diff (longest common subsequence over lines) -------------------------------------
export function lineDiff(a, b) {
  const x = a.split('\n'), y = b.split('\n');
  const n = x.length, m = y.length;
  const L = Array.from({ length: n + 1 }, () => new Uint16Array(m + 1));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--)
      L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (x[i] === y[j]) { out.push([' ', x[i]]); i++; j++; }
    else if (L[i + 1][j] >= L[i][j + 1]) out.push(['-', x[i++]]);
    else out.push(['+', y[j++]]);
  }
  while (i < n) out.push(['-', x[i++]]);
  while (j < m) out.push(['+', y[j++]]);
  return out;
}

function asText(sections) {
  return SECTIONS.map(s => `## ${t('section.' + s)}\n${(sections && sections[s]) || ''}`).join('\n\n');
}

export async function render(view, { match, kind }) {
  if (!can('report.read')) {
    view.append(h('section.card', h('p.error', t('error.forbidden'))));
    return;
  }
  if (kind === 'study') return renderNew(view, match[1]);
  const id = match[1];
  let rep;
  try {
    rep = await api('GET', `/api/reports/${id}`);
  } catch (e) {
    view.append(h('section.card', h('p.error', errorText(e))));
    return;
  }
  let lock = rep.lock_version;
  let dirty = new Set();
  let saving = false, conflict = false, timer = null;
  const editable = () => rep.current.status === 'draft' && can('report.write') && !conflict;

  const status = h('span#rp-status');
  const saveState = h('span#rp-save.muted', { 'aria-live': 'polite' });
  const areas = {};
  const sectionEls = SECTIONS.map(s => {
    areas[s] = h('textarea', { id: 'rp-' + s, name: s, rows: s === 'findings' ? 8 : 4,
                               spellcheck: true, lang: rep.language });
    areas[s].addEventListener('input', () => { dirty.add(s); saveState.textContent = t('report.unsaved'); });
    return h('div.section', h('label', { for: 'rp-' + s }, t('section.' + s)), areas[s]);
  });
  const buttons = h('div.buttons#rp-actions');
  const history = h('div#rp-history');
  const pdfBox = h('div#rp-pdf');

  function fill() {
    for (const s of SECTIONS) {
      areas[s].value = (rep.current.sections && rep.current.sections[s]) || '';
      areas[s].readOnly = !editable();
    }
    status.replaceChildren(h('span.badge.st-' + rep.status, { dataset: { status: rep.status } },
                             t('status.' + rep.status)),
                           ' ', t('report.version_n', { n: rep.current.version }));
    setChildren(buttons,
      can('report.sign') && rep.current.status === 'draft'
        ? h('button#rp-sign', { type: 'button', on: { click: sign } }, t('report.sign')) : null,
      can('report.sign') && rep.current.status !== 'draft'
        ? h('button#rp-amend', { type: 'button', on: { click: amend } }, t('report.amend')) : null,
      can('report.export') && rep.final_version
        ? h('button#rp-pdf-request.secondary', { type: 'button', on: { click: requestPdf } }, t('report.pdf')) : null,
      h('a.button.secondary#rp-viewer', { href: viewerUrl(rep.study_uid) }, t('worklist.open_viewer')));
    renderHistory();
  }

  async function save() {
    if (!dirty.size || saving || !editable()) return;
    saving = true;
    const sent = [...dirty];
    dirty = new Set();
    const sections = {};
    for (const s of sent) sections[s] = areas[s].value;
    saveState.textContent = t('report.saving');
    try {
      const r = await api('PUT', `/api/reports/${rep.id}`, { lock_version: lock, sections });
      lock = r.lock_version;
      rep.lock_version = r.lock_version;
      rep.current = { ...rep.current, ...r.current, sections: { ...rep.current.sections, ...sections } };
      saveState.textContent = t('report.saved_at', { time: new Date().toLocaleTimeString() });
      saveState.dataset.saved = String(lock);
    } catch (e) {
      for (const s of sent) dirty.add(s);
      if (e instanceof ApiError && e.status === 409) {
        conflict = true;
        saveState.textContent = '';
        showConflict();
      } else {
        saveState.textContent = errorText(e);
      }
    } finally {
      saving = false;
    }
  }

  function showConflict() {
    for (const s of SECTIONS) areas[s].readOnly = true;
    view.prepend(h('div.alert#rp-conflict', { role: 'alert' }, t('report.conflict'), ' ',
      h('button.small', { type: 'button', on: { click: () => navigate(location.pathname, true) } },
        t('report.reload'))));
  }

  async function reload() {
    rep = await api('GET', `/api/reports/${rep.id}`);
    lock = rep.lock_version;
    fill();
  }

  async function sign() {
    await save();
    if (conflict) return;
    try {
      await api('POST', `/api/reports/${rep.id}/sign`, { lock_version: lock });
      toast(t('report.signed'));
      await reload();
    } catch (e) {
      if (e instanceof ApiError && e.status === 409) { conflict = true; showConflict(); }
      else toast(errorText(e), 'error');
    }
  }

  async function amend() {
    try {
      await api('POST', `/api/reports/${rep.id}/amend`, { lock_version: lock });
      await reload();
    } catch (e) { toast(errorText(e), 'error'); }
  }

  async function requestPdf() {
    pdfBox.replaceChildren(h('p.muted#rp-pdf-state', t('report.pdf_rendering')));
    try {
      const r = await api('POST', `/api/reports/${rep.id}/pdf`);
      let state = r.state;
      for (let i = 0; i < 120 && state === 'pending'; i++) {
        await new Promise(res => setTimeout(res, 1000));
        const s = await api('GET', `/api/report-pdfs/${r.pdf_id}`);
        state = s.state;
        if (state === 'failed') throw new Error(s.error || 'failed');
      }
      if (state !== 'done') throw new Error(t('report.pdf_timeout'));
      const url = `/api/reports/${rep.id}/pdf?version=${r.version}`;
      const blob = await (await api('GET', url, undefined, { raw: true })).blob();
      const obj = URL.createObjectURL(blob);
      pdfBox.replaceChildren(
        h('div.buttons',
          h('a.button#rp-pdf-download', { href: url, download: `report-${rep.id}-v${r.version}.pdf` },
            t('report.pdf_download'))),
        h('iframe.pdf#rp-pdf-preview', { src: obj, title: t('report.pdf_preview') }));
    } catch (e) {
      pdfBox.replaceChildren(h('p.error', t('report.pdf_failed'), ' ', e.message || ''));
    }
  }

  function renderHistory() {
    const vs = rep.versions || [];
    const a = h('select#rp-diff-a'), b = h('select#rp-diff-b');
    for (const v of vs) {
      const label = `${t('report.version_n', { n: v.version })} · ${t('status.' + v.status)} · ${formatDateTime(v.updated_at)}`;
      a.append(h('option', { value: v.version }, label));
      b.append(h('option', { value: v.version }, label));
    }
    if (vs.length > 1) a.value = vs[vs.length - 2].version;
    if (vs.length) b.value = vs[vs.length - 1].version;
    const out = h('pre.diff#rp-diff');
    const show = async () => {
      try {
        const [va, vb] = await Promise.all([a.value, b.value].map(n =>
          api('GET', `/api/reports/${rep.id}/versions/${n}`)));
        out.replaceChildren(...lineDiff(asText(va.sections), asText(vb.sections)).map(([k, line]) =>
          h('span.' + (k === '+' ? 'add' : k === '-' ? 'del' : 'same'), `${k} ${line}\n`)));
      } catch (e) { out.textContent = errorText(e); }
    };
    setChildren(history,
      h('h2', t('report.history')),
      h('ol.versions', vs.map(v => h('li',
        h('strong', t('report.version_n', { n: v.version })), ' ',
        h('span.badge.st-' + v.status, t('status.' + v.status)), ' ',
        v.author_name || v.author || '', ' · ', formatDateTime(v.updated_at),
        v.signed_at ? ` · ${t('report.signed_by', { name: v.signed_name || v.signed_by, time: formatDateTime(v.signed_at) })}` : ''))),
      vs.length > 1 ? h('div.diffbar', h('label', { for: 'rp-diff-a' }, t('report.compare')), a, b,
        h('button.secondary#rp-diff-show', { type: 'button', on: { click: show } }, t('report.show_diff'))) : null,
      out);
  }

  view.append(
    h('div.report-layout',
      h('section.card.report-main',
        h('div.titlebar', h('h1', t('report.title')), status, saveState),
        studyHeader(rep.study, rep.study_uid),
        h('form#rp-form', { on: { submit: ev => ev.preventDefault() } }, sectionEls),
        buttons, pdfBox),
      h('aside.card.report-side', history)));
  fill();
  timer = setInterval(save, AUTOSAVE_MS);
  const flush = () => { if (dirty.size) save(); };
  window.addEventListener('beforeunload', flush);
  return { leave() { clearInterval(timer); window.removeEventListener('beforeunload', flush); flush(); } };
}
