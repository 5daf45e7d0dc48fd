// Worklist screen (/app/worklist): studies of the user's sites with their report status, from
// GET /api/worklist. Filters (name, Patient ID, accession, date range, modality, report status)
// live in the URL, so a reload or a bookmark keeps them; paging by 50. Each row opens the study
// in OHIF and, for users who may read reports, the report editor.
import { t, formatDicomDate, formatDicomTime, formatPersonName, formatDateTime, formatNumber }
  from './i18n.js';
import { api, h, can, navigate, viewerUrl, errorText } from './app.js';

const PAGE = 50;
const FIELDS = ['name', 'patient_id', 'accession', 'date_from', 'date_to', 'modality',
                'report_status'];
const MODALITIES = ['CT', 'MR', 'CR', 'DX', 'US', 'NM', 'PT', 'XA', 'MG', 'OT'];

function statusBadge(report) {
  const s = report ? report.status : 'none';
  return h('span.badge.st-' + s, { dataset: { status: s } }, t('status.' + s));
}

export async function render(view, { query }) {
  const reports = can('report.read');
  const offset = Math.max(0, parseInt(query.get('offset') || '0', 10) || 0);
  const input = (name, type = 'text', extra = {}) =>
    h('input', { id: 'f-' + name, name, type, value: query.get(name) || '', ...extra });
  const field = (name, label, el) => h('div.field', h('label', { for: 'f-' + name }, t(label)), el);
  const modSel = h('select', { id: 'f-modality', name: 'modality' },
                   h('option', { value: '' }, t('worklist.any')),
                   ...MODALITIES.map(m => h('option', { value: m }, m)));
  modSel.value = query.get('modality') || '';
  const stSel = reports ? h('select', { id: 'f-report_status', name: 'report_status' },
                            h('option', { value: '' }, t('worklist.any')),
                            ...['none', 'draft', 'final', 'amended'].map(s =>
                              h('option', { value: s }, t('status.' + s)))) : null;
  if (stSel) stSel.value = query.get('report_status') || '';
  const form = h('form.filters', { id: 'filters', role: 'search' },
    field('name', 'worklist.patient_name', input('name', 'search', { autofocus: true })),
    field('patient_id', 'worklist.patient_id', input('patient_id')),
    field('accession', 'worklist.accession', input('accession')),
    field('date_from', 'worklist.date_from', input('date_from', 'date')),
    field('date_to', 'worklist.date_to', input('date_to', 'date')),
    field('modality', 'worklist.modality', modSel),
    reports ? field('report_status', 'worklist.report_status', stSel) : null,
    h('div.field.buttons',
      h('button', { type: 'submit', id: 'search' }, t('worklist.search')),
      h('button.secondary', { type: 'button', id: 'reset', on: { click: () => navigate('/app/worklist') } },
        t('worklist.reset'))));
  form.addEventListener('submit', ev => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const f of FIELDS) {
      const el = form.elements[f];
      if (el && el.value.trim()) q.set(f, el.value.trim());
    }
    navigate('/app/worklist' + (q.toString() ? '?' + q : ''));
  });

  const table = h('table.grid', { id: 'worklist' });
  const summary = h('p.summary', { id: 'wl-summary' });
  const pager = h('div.pager');
  view.append(h('section.card', h('h1', t('worklist.title')), form),
              h('section.card', summary, h('div.scroll', table), pager));

  const q = new URLSearchParams();
  for (const f of FIELDS) if (query.get(f)) q.set(f, query.get(f));
  q.set('limit', PAGE);
  q.set('offset', offset);
  let res;
  try {
    res = await api('GET', '/api/worklist?' + q);
  } catch (e) {
    summary.textContent = errorText(e);
    summary.classList.add('error');
    return;
  }
  const cols = ['worklist.patient_name', 'worklist.patient_id', 'worklist.birth_date',
                'worklist.study_date', 'worklist.modality', 'worklist.description',
                'worklist.accession', 'worklist.images', 'worklist.site'];
  if (reports) cols.push('worklist.report');
  cols.push('worklist.actions');
  table.append(h('thead', h('tr', cols.map(c => h('th', { scope: 'col' }, t(c))))));
  const tbody = h('tbody');
  for (const it of res.items) {
    const actions = h('td.actions',
      h('a.button.small', { href: viewerUrl(it.study_uid), dataset: { action: 'viewer' } },
        t('worklist.open_viewer')));
    if (reports) {
      const href = it.report ? `/app/reports/${it.report.id}`
                             : `/app/studies/${it.study_uid}/report`;
      const label = it.report ? t('worklist.open_report')
                              : (can('report.write') ? t('worklist.new_report') : null);
      if (label) actions.append(h('a.button.small.secondary', { href, dataset: { action: 'report' } }, label));
    }
    const row = h('tr', { dataset: { study: it.study_uid } },
      h('td.name', formatPersonName(it.patient_name)),
      h('td', it.patient_id),
      h('td', formatDicomDate(it.patient_birth_date), it.patient_sex ? ` (${it.patient_sex})` : ''),
      h('td', formatDicomDate(it.study_date), ' ', h('span.muted', formatDicomTime(it.study_time))),
      h('td', (it.modalities || []).join(', ')),
      h('td', it.description),
      h('td', it.accession),
      h('td.num', `${it.series} / ${it.instances}`),
      h('td', it.site || ''),
      reports ? h('td', statusBadge(it.report),
                  it.report ? h('div.muted.small', formatDateTime(it.report.updated_at)) : null) : null,
      actions);
    tbody.append(row);
  }
  table.append(tbody);
  if (!res.items.length) {
    summary.textContent = t('worklist.empty');
  } else {
    summary.textContent = t('worklist.showing', {
      from: formatNumber(offset + 1), to: formatNumber(offset + res.items.length),
      total: formatNumber(res.total) });
  }
  const page = off => {
    const p = new URLSearchParams(query);
    p.set('offset', off);
    return '/app/worklist?' + p;
  };
  if (offset > 0)
    pager.append(h('a.button.secondary', { href: page(Math.max(0, offset - PAGE)), id: 'prev' },
                   t('worklist.previous')));
  if (offset + res.items.length < res.total)
    pager.append(h('a.button.secondary', { href: page(offset + PAGE), id: 'next' }, t('worklist.next')));
}
