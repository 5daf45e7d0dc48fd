// Administration (/app/admin/<tab>): users and roles (create, edit), sites, modalities, report
// templates, routing rules and their deliveries, the audit log with filters, and queue/worker
// status. Each tab shows only when the user holds its permission (the server checks again).
// Routing rules come from another part of the server (/api/routes); where it is not installed
// the tab says so.
import { t, formatDateTime, formatNumber, LANGUAGES } from './i18n.js';
import { api, h, can, navigate, errorText, toast, ApiError } from './app.js';

const TABS = [
  ['users', 'user.manage'], ['roles', 'role.manage'], ['sites', 'site.manage'],
  ['modalities', 'system.configure'], ['templates', 'system.configure'], ['routes', 'route.manage'],
  ['audit', 'audit.read'], ['system', 'system.configure'],
];
const SECTIONS = ['clinical_information', 'technique', 'findings', 'impression', 'recommendations'];

const field = (id, label, el) => h('div.field', h('label', { for: id }, t(label)), el);
const yes = v => (v ? t('admin.yes') : t('admin.no'));

function table(cols, rows, id) {
  return h('div.scroll', h('table.grid', { id },
    h('thead', h('tr', cols.map(c => h('th', { scope: 'col' }, t(c))))),
    h('tbody', rows.length ? rows : h('tr', h('td', { colSpan: cols.length }, t('admin.none'))))));
}

function checks(name, items, selected = []) {
  return h('div.checks', { id: 'ad-' + name }, items.map(([value, label]) =>
    h('label.check', h('input', { type: 'checkbox', name, value, checked: selected.includes(value) }),
      ' ', label)));
}
const checked = (form, name) => [...form.querySelectorAll(`input[name="${name}"]:checked`)].map(i => i.value);

// An API refusal with the server's own reason: {"error": {"code", "message", "detail"}}.
// A 409 here is a rule, not a race (e.g. "you cannot disable your own account"): its reason alone.
function refusal(e) {
  if (!(e instanceof ApiError) || !(e.body && e.body.error) || e.status >= 500) return errorText(e);
  const why = e.message + (e.detail ? ` (${e.detail})` : '');
  return e.status === 400 || e.status === 409 ? why : `${errorText(e)} ${why}`;
}

function guard(fn) {
  return async ev => {
    if (ev) ev.preventDefault();
    try { await fn(ev); } catch (e) { toast(refusal(e), 'error'); }
  };
}

// An edit form's outcome, shown in the form (role=status) and as a toast.
function say(el, text, kind) {
  el.textContent = text;
  el.className = 'msg ' + (kind === 'error' ? 'error' : 'ok');
  toast(text, kind);
}

// Saves an edit form: fn() does the request. A refusal is shown in the form; after a success
// the tab is drawn again (fresh from the server) and the form of `name` (a value, or a function
// giving it once saved) reopens saying so (`flash`).
let flash = null;
function saver(msg, tab, name, fn, refresh) {
  return async ev => {
    ev.preventDefault();
    msg.textContent = '';
    try { await fn(); } catch (e) { say(msg, refusal(e), 'error'); return; }
    flash = { tab, name: typeof name === 'function' ? name() : name, text: t('admin.saved') };
    await refresh();
  };
}
function takeFlash(tab) {
  const f = flash && flash.tab === tab ? flash : null;
  if (f) flash = null;
  return f;
}

const editButton = open => h('button.small.secondary', { type: 'button', dataset: { action: 'edit' },
  on: { click: open } }, t('admin.edit'));
const langSelect = (id, value) => {
  const el = h('select', { id }, LANGUAGES.map(l => h('option', { value: l }, t('language.' + l))));
  if (value) el.value = value;
  return el;
};
const union = (a, b) => [...new Set([...a, ...(b || [])])];

// Shows the edit form made by make(f) in holder; f is the success message to show, if any.
function opener(holder, make) {
  return f => {
    holder.replaceChildren(make(f));
    holder.scrollIntoView({ block: 'nearest' });
    const first = holder.querySelector('input:not([disabled]), textarea, select');
    if (first && !f) first.focus();
  };
}

// ---- users ----------------------------------------------------------------------------------
async function users(box, refresh) {
  const [u, r, s] = await Promise.all([api('GET', '/api/users?limit=1000'),
    can('role.manage') ? api('GET', '/api/roles') : { roles: [] },
    can('site.manage') ? api('GET', '/api/sites') : { sites: [] }]);
  const roleNames = r.roles.length ? r.roles.map(x => x.name) : ['admin', 'doctor', 'operator'];
  const siteNames = s.sites.length ? s.sites.map(x => x.name) : ['default'];
  const editBox = h('div#ad-user-edit-box');
  const edit = x => opener(editBox, f => userEditForm(x, roleNames, siteNames, refresh, f));
  const rows = u.users.map(x => h('tr', { dataset: { user: x.username } },
    h('td', x.username), h('td', x.display_name || ''), h('td', (x.roles || []).join(', ')),
    h('td', (x.sites || []).join(', ')), h('td', t('language.' + x.language)),
    h('td', t('user_state.' + x.state)), h('td', yes(x.mfa_enrolled)),
    h('td', formatDateTime(x.last_login_at)),
    h('td.actions', editButton(() => edit(x)()),
      x.locked ? h('button.small.secondary', { type: 'button', on: { click: guard(async () => {
        await api('POST', `/api/users/${x.username}/unlock`); refresh(); }) } }, t('admin.unlock')) : null,
      h('button.small.secondary', { type: 'button', on: { click: guard(async () => {
        await api('PUT', `/api/users/${x.username}`, { disabled: !x.disabled }); refresh(); }) } },
        x.disabled ? t('admin.enable') : t('admin.disable')),
      h('button.small.secondary', { type: 'button', on: { click: guard(async () => {
        const j = await api('POST', `/api/users/${x.username}/password`, {});
        toast(t('admin.temp_password', { password: j.password || '' }));
      }) } }, t('admin.reset_password')))));
  const lang = langSelect('ad-u-language');
  const form = h('form.card.inline#ad-user-form',
    h('h2', t('admin.new_user')),
    field('ad-u-username', 'admin.username', h('input#ad-u-username', { name: 'username', required: true })),
    field('ad-u-display', 'admin.display_name', h('input#ad-u-display', { name: 'display_name' })),
    field('ad-u-email', 'admin.email', h('input#ad-u-email', { name: 'email', type: 'email' })),
    field('ad-u-password', 'admin.password', h('input#ad-u-password', { name: 'password', type: 'password', autocomplete: 'new-password' })),
    field('ad-u-language', 'admin.language', lang),
    h('fieldset', h('legend', t('admin.roles')), checks('roles', roleNames.map(n => [n, n]))),
    h('fieldset', h('legend', t('admin.sites')), checks('sites', siteNames.map(n => [n, n]))),
    h('label.check', h('input#ad-u-temporary', { type: 'checkbox', name: 'temporary' }), ' ', t('admin.temporary')),
    h('div.buttons', h('button#ad-u-create', { type: 'submit' }, t('admin.create'))));
  form.addEventListener('submit', guard(async () => {
    const body = { username: form.username.value.trim(), language: lang.value,
                   roles: checked(form, 'roles'), sites: checked(form, 'sites') };
    if (form.display_name.value.trim()) body.display_name = form.display_name.value.trim();
    if (form.email.value.trim()) body.email = form.email.value.trim();
    if (form.password.value) body.password = form.password.value;
    if (form.temporary.checked) body.temporary = true;
    const j = await api('POST', '/api/users', body);
    toast(j.password ? t('admin.temp_password', { password: j.password }) : t('admin.created'));
    refresh();
  }));
  box.append(table(['admin.username', 'admin.display_name', 'admin.roles', 'admin.sites',
                    'admin.language', 'admin.state', 'admin.mfa', 'admin.last_login', 'admin.actions'],
                   rows, 'ad-users'), editBox, form);
  const f = takeFlash('users');
  const again = f && u.users.find(x => x.username === f.name);
  if (again) edit(again)(f);
}

// The edit form of an existing user: PUT /api/users/{name} with every field of the form (roles
// and sites replace the user's; the sessions of a user whose roles, sites or state change end).
function userEditForm(x, roleNames, siteNames, refresh, f) {
  const msg = h('p.msg#ad-ue-msg', { role: 'status' });
  const lang = langSelect('ad-ue-language', x.language);
  const form = h('form.card.inline#ad-user-edit', { dataset: { user: x.username } },
    h('h2', t('admin.edit_user', { name: x.username })),
    field('ad-ue-display', 'admin.display_name', h('input#ad-ue-display', { name: 'display_name', value: x.display_name || '' })),
    field('ad-ue-email', 'admin.email', h('input#ad-ue-email', { name: 'email', type: 'email', value: x.email || '' })),
    field('ad-ue-language', 'admin.language', lang),
    h('fieldset', h('legend', t('admin.roles')),
      checks('ue-roles', union(roleNames, x.roles).map(n => [n, n]), x.roles || [])),
    h('fieldset', h('legend', t('admin.sites')),
      checks('ue-sites', union(siteNames, x.sites).map(n => [n, n]), x.sites || [])),
    h('label.check', h('input#ad-ue-disabled', { type: 'checkbox', name: 'disabled', checked: !!x.disabled }),
      ' ', t('admin.account_disabled')),
    msg,
    h('div.buttons', h('button#ad-ue-save', { type: 'submit' }, t('admin.save')),
      h('button.secondary#ad-ue-cancel', { type: 'button', on: { click: () => form.remove() } }, t('admin.close'))));
  if (f) say(msg, f.text, 'ok');
  form.addEventListener('submit', saver(msg, 'users', x.username, () =>
    api('PUT', `/api/users/${encodeURIComponent(x.username)}`, {
      display_name: form.display_name.value.trim(), email: form.email.value.trim(), language: lang.value,
      roles: checked(form, 'ue-roles'), sites: checked(form, 'ue-sites'), disabled: form.disabled.checked,
    }), refresh));
  return form;
}

// ---- roles ----------------------------------------------------------------------------------
async function roles(box, refresh) {
  const [r, p] = await Promise.all([api('GET', '/api/roles'), api('GET', '/api/permissions')]);
  const editBox = h('div#ad-role-edit-box');
  const edit = x => opener(editBox, f => roleEditForm(x, p.permissions, refresh, f));
  const rows = r.roles.map(x => h('tr', { dataset: { role: x.name } },
    h('td', x.name), h('td', x.description || ''), h('td.small', (x.permissions || []).join(', ')),
    h('td', yes(x.builtin)), h('td', yes(x.require_mfa)), h('td.num', x.users ?? ''),
    h('td.actions', editButton(() => edit(x)()),
      x.builtin ? null : h('button.small.secondary', { type: 'button', on: { click: guard(async () => {
        await api('DELETE', `/api/roles/${x.name}`); refresh(); }) } }, t('admin.delete')))));
  const form = h('form.card.inline#ad-role-form',
    h('h2', t('admin.new_role')),
    field('ad-r-name', 'admin.name', h('input#ad-r-name', { name: 'name', required: true, pattern: '[a-z][a-z0-9_.\\-]*' })),
    field('ad-r-description', 'admin.description', h('input#ad-r-description', { name: 'description' })),
    h('fieldset', h('legend', t('admin.permissions')),
      checks('permissions', p.permissions.map(x => [x.name, `${x.name} — ${x.description}`]))),
    h('label.check', h('input', { type: 'checkbox', name: 'require_mfa' }), ' ', t('admin.require_mfa')),
    h('div.buttons', h('button#ad-r-create', { type: 'submit' }, t('admin.create'))));
  form.addEventListener('submit', guard(async () => {
    await api('POST', '/api/roles', { name: form.elements.name.value.trim(),
      description: form.description.value, permissions: checked(form, 'permissions'),
      require_mfa: form.require_mfa.checked });
    toast(t('admin.created'));
    refresh();
  }));
  box.append(table(['admin.name', 'admin.description', 'admin.permissions', 'admin.builtin',
                    'admin.require_mfa', 'admin.users', 'admin.actions'], rows, 'ad-roles'), editBox, form);
  const f = takeFlash('roles');
  const again = f && r.roles.find(x => x.name === f.name);
  if (again) edit(again)(f);
}

// The edit form of a role: PUT /api/roles/{name}. A built-in role keeps its permissions and
// description (the server refuses a change): they are shown read-only, only "requires 2FA" changes.
function roleEditForm(x, perms, refresh, f) {
  const msg = h('p.msg#ad-re-msg', { role: 'status' });
  const ro = !!x.builtin;
  const list = checks('re-permissions', perms.map(p => [p.name, `${p.name} — ${p.description}`]), x.permissions || []);
  if (ro) for (const i of list.querySelectorAll('input')) i.disabled = true;
  const form = h('form.card.inline#ad-role-edit', { dataset: { role: x.name } },
    h('h2', t('admin.edit_role', { name: x.name })),
    ro ? h('p.notice#ad-re-builtin', t('admin.builtin_readonly')) : null,
    field('ad-re-description', 'admin.description',
      h('input#ad-re-description', { name: 'description', value: x.description || '', disabled: ro })),
    h('fieldset', h('legend', t('admin.permissions')), list),
    h('label.check', h('input#ad-re-mfa', { type: 'checkbox', name: 'require_mfa', checked: !!x.require_mfa }),
      ' ', t('admin.require_mfa')),
    msg,
    h('div.buttons', h('button#ad-re-save', { type: 'submit' }, t('admin.save')),
      h('button.secondary', { type: 'button', on: { click: () => form.remove() } }, t('admin.close'))));
  if (f) say(msg, f.text, 'ok');
  form.addEventListener('submit', saver(msg, 'roles', x.name, () =>
    api('PUT', `/api/roles/${encodeURIComponent(x.name)}`, ro ? { require_mfa: form.require_mfa.checked } : {
      description: form.description.value, permissions: checked(form, 're-permissions'),
      require_mfa: form.require_mfa.checked,
    }), refresh));
  return form;
}

// ---- sites ----------------------------------------------------------------------------------
async function sites(box, refresh) {
  const s = await api('GET', '/api/sites');
  const rows = s.sites.map(x => h('tr', h('td', x.name), h('td', x.description || ''),
    h('td.num', formatNumber(x.studies || 0)), h('td.num', formatNumber(x.users || 0)),
    h('td', formatDateTime(x.created_at)),
    h('td.actions', x.name === 'default' ? null : h('button.small.secondary', { type: 'button', on: {
      click: guard(async () => { await api('DELETE', `/api/sites/${x.name}`); refresh(); }) } }, t('admin.delete')))));
  const form = h('form.card.inline#ad-site-form', h('h2', t('admin.new_site')),
    field('ad-s-name', 'admin.name', h('input#ad-s-name', { name: 'name', required: true })),
    field('ad-s-description', 'admin.description', h('input#ad-s-description', { name: 'description' })),
    h('div.buttons', h('button', { type: 'submit' }, t('admin.create'))));
  form.addEventListener('submit', guard(async () => {
    await api('POST', '/api/sites', { name: form.elements.name.value.trim(), description: form.description.value });
    toast(t('admin.created'));
    refresh();
  }));
  box.append(table(['admin.name', 'admin.description', 'admin.studies', 'admin.users',
                    'admin.created_at'], rows, 'ad-sites'), form);
}

// ---- modalities -----------------------------------------------------------------------------
async function modalities(box, refresh) {
  const m = await api('GET', '/api/modalities');
  const list = m.modalities || m.items || [];
  const rows = list.map(x => h('tr', h('td', x.ae_title), h('td', x.host), h('td.num', x.port),
    h('td', x.description || ''), h('td', x.site || ''),
    h('td', [x.allow_store && 'C-STORE', x.allow_find && 'C-FIND', x.allow_retrieve && 'C-MOVE'].filter(Boolean).join(', ')),
    h('td', yes(x.tls)), h('td.num', x.move_associations || 1),
    h('td.actions',
      h('button.small.secondary', { type: 'button', on: { click: guard(async () => {
        const r = await api('POST', `/api/modalities/${encodeURIComponent(x.ae_title)}/echo`);
        toast((r.ok ? t('admin.echo_ok') : t('admin.echo_failed')) + (r.detail ? ': ' + r.detail : ''), r.ok ? 'info' : 'error');
      }) } }, t('admin.echo')),
      h('button.small.secondary', { type: 'button', on: { click: guard(async () => {
        await api('DELETE', `/api/modalities/${encodeURIComponent(x.ae_title)}`); refresh(); }) } }, t('admin.delete')))));
  const form = h('form.card.inline#ad-mod-form', h('h2', t('admin.new_modality')),
    field('ad-m-ae', 'admin.ae_title', h('input#ad-m-ae', { name: 'ae_title', required: true, maxLength: 16 })),
    field('ad-m-host', 'admin.host', h('input#ad-m-host', { name: 'host', required: true })),
    field('ad-m-port', 'admin.port', h('input#ad-m-port', { name: 'port', type: 'number', min: 1, max: 65535, required: true })),
    field('ad-m-description', 'admin.description', h('input#ad-m-description', { name: 'description' })),
    field('ad-m-moves', 'admin.move_associations', h('input#ad-m-moves', { name: 'move_associations', type: 'number', min: 1, max: 16, value: 1, required: true })),
    h('div.buttons', h('button', { type: 'submit' }, t('admin.create'))));
  form.addEventListener('submit', guard(async () => {
    await api('POST', '/api/modalities', { ae_title: form.ae_title.value.trim(), host: form.host.value.trim(),
      port: Number(form.port.value), description: form.description.value,
      move_associations: Number(form.move_associations.value) });
    toast(t('admin.created'));
    refresh();
  }));
  box.append(table(['admin.ae_title', 'admin.host', 'admin.port', 'admin.description', 'admin.site',
                    'admin.allowed', 'admin.tls', 'admin.move_associations', 'admin.actions'], rows, 'ad-modalities'), form);
}

// ---- report templates -----------------------------------------------------------------------
// The templates the report editor offers (GET /api/report-templates): name, language, modality
// and body part ("" for any), and the starting text of the five sections.
async function templates(box, refresh) {
  const r = await api('GET', '/api/report-templates');
  const list = r.templates || [];
  const editBox = h('div#ad-tpl-edit-box');
  const edit = x => opener(editBox, f => templateForm(x, refresh, f));
  const rows = list.map(x => h('tr', { dataset: { template: x.id } },
    h('td', x.name), h('td', t('language.' + x.language)), h('td', x.modality || t('admin.any')),
    h('td', x.body_part || t('admin.any')), h('td', formatDateTime(x.updated_at || x.created_at)),
    h('td.actions', editButton(() => edit(x)()),
      h('button.small.secondary', { type: 'button', dataset: { action: 'delete' }, on: { click: guard(async () => {
        await api('DELETE', `/api/report-templates/${x.id}`); toast(t('admin.deleted')); refresh(); }) } },
        t('admin.delete')))));
  box.append(table(['admin.name', 'admin.language', 'admin.modality', 'admin.body_part', 'admin.updated_at',
                    'admin.actions'], rows, 'ad-templates'),
             h('div.buttons', h('button#ad-tpl-new', { type: 'button', on: { click: () => edit(null)() } },
               t('admin.new_template'))),
             editBox);
  const f = takeFlash('templates');
  const again = f && list.find(x => x.id === f.name);
  if (again) edit(again)(f);
}

function templateForm(x, refresh, f) {
  const msg = h('p.msg#ad-tpl-msg', { role: 'status' });
  const lang = langSelect('ad-tpl-language', x ? x.language : undefined);
  const code = { pattern: '[A-Za-z0-9 _]{0,16}', maxLength: 16, placeholder: t('admin.any') };
  const areas = Object.fromEntries(SECTIONS.map(k => [k, h('textarea', { id: 'ad-tpl-' + k, name: k, rows: 2,
    value: (x && x.sections && x.sections[k]) || '' })]));
  const form = h('form.card.inline#ad-tpl-form', { dataset: { template: x ? x.id : '' } },
    h('h2', x ? t('admin.edit_template', { name: x.name }) : t('admin.new_template')),
    h('div.grid4',
      field('ad-tpl-name', 'admin.name', h('input#ad-tpl-name', { name: 'name', required: true, maxLength: 200, value: x ? x.name : '' })),
      field('ad-tpl-language', 'admin.language', lang),
      field('ad-tpl-modality', 'admin.modality', h('input#ad-tpl-modality', { name: 'modality', ...code, value: x ? x.modality : '' })),
      field('ad-tpl-body', 'admin.body_part', h('input#ad-tpl-body', { name: 'body_part', ...code, value: x ? x.body_part : '' }))),
    SECTIONS.map(k => h('div.section', h('label', { for: 'ad-tpl-' + k }, t('section.' + k)), areas[k])),
    msg,
    h('div.buttons', h('button#ad-tpl-save', { type: 'submit' }, x ? t('admin.save') : t('admin.create')),
      h('button.secondary', { type: 'button', on: { click: () => form.remove() } }, t('admin.close'))));
  if (f) say(msg, f.text, 'ok');
  let id = x && x.id;
  form.addEventListener('submit', saver(msg, 'templates', () => id, async () => {
    const body = { name: form.elements.name.value.trim(), language: lang.value,
      modality: form.modality.value.trim().toUpperCase(), body_part: form.body_part.value.trim().toUpperCase(),
      sections: Object.fromEntries(SECTIONS.map(k => [k, areas[k].value])) };
    const j = id ? await api('PUT', `/api/report-templates/${id}`, body) : await api('POST', '/api/report-templates', body);
    id = (j && j.id) || id;
  }, refresh));
  return form;
}

// ---- routing rules and deliveries -----------------------------------------------------------
async function routes(box, refresh) {
  let rules;
  try {
    rules = await api('GET', '/api/routes');
  } catch (e) {
    if (e instanceof ApiError && (e.status === 404 || e.status === 405)) {
      box.append(h('p.notice#ad-routes-unavailable', t('admin.routes_unavailable')));
      return;
    }
    throw e;
  }
  const dest = d => (d.type === 'dicom' ? `DICOM ${d.ae}` : `STOW ${d.url}`);
  const rows = (rules.items || []).map(x => h('tr',
    h('td', x.name), h('td', yes(x.enabled)), h('td', t('routes.trigger_' + x.trigger)),
    h('td.small', (x.conditions || []).map(c => `${c.attribute} ${c.op} ${c.value ?? ''}`).join('; ')),
    h('td.small', (x.destinations || []).map(dest).join(', ')), h('td.num', x.max_attempts ?? ''),
    h('td.actions',
      h('button.small.secondary', { type: 'button', on: { click: guard(async () => {
        await api('PUT', `/api/routes/${x.id}`, { ...x, enabled: !x.enabled }); refresh(); }) } },
        x.enabled ? t('admin.disable') : t('admin.enable')),
      h('button.small.secondary', { type: 'button', on: { click: guard(async () => {
        await api('DELETE', `/api/routes/${x.id}`); refresh(); }) } }, t('admin.delete')))));
  const form = h('form.card.inline#ad-route-form', h('h2', t('routes.new_rule')),
    field('ad-rt-name', 'admin.name', h('input#ad-rt-name', { name: 'name', required: true })),
    field('ad-rt-attr', 'routes.attribute', h('input#ad-rt-attr', { name: 'attribute', placeholder: 'Modality' })),
    field('ad-rt-value', 'routes.value', h('input#ad-rt-value', { name: 'value', placeholder: 'CT' })),
    field('ad-rt-ae', 'routes.destination_ae', h('input#ad-rt-ae', { name: 'ae', required: true })),
    h('div.buttons', h('button', { type: 'submit' }, t('admin.create'))));
  form.addEventListener('submit', guard(async () => {
    const conditions = form.attribute.value.trim()
      ? [{ attribute: form.attribute.value.trim(), op: form.value.value.includes('*') ? 'wildcard' : 'equals', value: form.value.value }] : [];
    await api('POST', '/api/routes', { name: form.elements.name.value.trim(), enabled: true, trigger: 'study',
      conditions, destinations: [{ type: 'dicom', ae: form.ae.value.trim() }] });
    refresh();
  }));
  const stateSel = h('select#ad-dl-state', h('option', { value: '' }, t('worklist.any')),
    ['pending', 'sending', 'delivered', 'dead'].map(s => h('option', { value: s }, t('routes.state_' + s))));
  const dbox = h('div');
  const loadDeliveries = guard(async () => {
    const d = await api('GET', '/api/routes/deliveries?limit=100' + (stateSel.value ? '&state=' + stateSel.value : ''));
    dbox.replaceChildren(table(['routes.rule', 'routes.destination', 'routes.study', 'routes.state',
      'routes.attempts', 'routes.next_attempt', 'routes.last_error', 'admin.actions'],
    (d.items || []).map(x => h('tr', h('td', x.rule_name), h('td', typeof x.destination === 'string' ? x.destination : dest(x.destination || {})),
      h('td.small', x.study_uid), h('td', t('routes.state_' + x.state)), h('td.num', x.attempts),
      h('td', formatDateTime(x.next_attempt_at)), h('td.small', x.last_error || ''),
      h('td.actions', x.state === 'dead' ? h('button.small.secondary', { type: 'button', on: { click: guard(async () => {
        await api('POST', `/api/routes/deliveries/${x.id}/retry`); loadDeliveries(); }) } }, t('routes.retry')) : null))),
    'ad-deliveries'));
  });
  stateSel.addEventListener('change', loadDeliveries);
  box.append(table(['admin.name', 'routes.enabled', 'routes.trigger', 'routes.conditions',
                    'routes.destinations', 'routes.max_attempts', 'admin.actions'], rows, 'ad-routes'),
             form, h('h2', t('routes.deliveries')),
             h('div.field', h('label', { for: 'ad-dl-state' }, t('routes.state')), stateSel), dbox);
  await loadDeliveries();
}

// ---- audit ----------------------------------------------------------------------------------
async function audit(box, refresh, query) {
  const keys = ['user', 'action', 'patient', 'study', 'from', 'to'];
  const form = h('form.filters#ad-audit-form',
    keys.map(k => field('ad-a-' + k, 'audit.' + k,
      h('input', { id: 'ad-a-' + k, name: k, type: k === 'from' || k === 'to' ? 'date' : 'text', value: query.get(k) || '' }))),
    h('div.field.buttons', h('button', { type: 'submit' }, t('worklist.search'))));
  form.addEventListener('submit', ev => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const k of keys) if (form.elements[k].value.trim()) q.set(k, form.elements[k].value.trim());
    navigate('/app/admin/audit?' + q);
  });
  const offset = parseInt(query.get('offset') || '0', 10) || 0;
  const q = new URLSearchParams();
  for (const k of keys) if (query.get(k)) q.set(k, query.get(k));
  q.set('limit', 50);
  q.set('offset', offset);
  const a = await api('GET', '/api/audit?' + q);
  const rows = a.items.map(x => h('tr', h('td', formatDateTime(x.at)), h('td', x.actor), h('td', x.action),
    h('td', t('audit.outcome_' + x.outcome)), h('td', x.client || ''), h('td', x.patient_id || ''),
    h('td.small', x.study_uid || ''), h('td.small', JSON.stringify(x.detail || {}))));
  const pager = h('div.pager', h('span.muted', t('worklist.showing', { from: formatNumber(a.items.length ? offset + 1 : 0),
    to: formatNumber(offset + a.items.length), total: formatNumber(a.total) })));
  const link = off => { const p = new URLSearchParams(query); p.set('offset', off); return '/app/admin/audit?' + p; };
  if (offset > 0) pager.append(h('a.button.secondary', { href: link(Math.max(0, offset - 50)) }, t('worklist.previous')));
  if (offset + a.items.length < a.total) pager.append(h('a.button.secondary', { href: link(offset + 50) }, t('worklist.next')));
  box.append(form, table(['audit.at', 'audit.user', 'audit.action', 'audit.outcome', 'audit.client',
                          'audit.patient', 'audit.study', 'audit.detail'], rows, 'ad-audit'), pager);
}

// ---- queues and workers ---------------------------------------------------------------------
async function system(box, refresh) {
  const s = await api('GET', '/api/system/status');
  const queues = Object.entries(s.bus.queues || {}).map(([type, q]) =>
    h('tr', h('td', type), h('td.num', q.queued), h('td.num', q.inflight)));
  const workers = (s.bus.workers || []).map(w => h('tr', h('td', w.name), h('td', (w.types || []).join(', ')),
    h('td.num', w.credit), h('td.num', w.inflight), h('td.num', w.last_seen_ms)));
  const jobs = (s.jobs || []).map(j => h('tr', h('td', j.type), h('td', j.state),
    h('td.num', formatNumber(j.count)), h('td.num', j.oldest_pending_s)));
  box.append(
    h('p', { id: 'ad-bus-state', className: s.bus.ok ? 'ok' : 'error' }, s.bus.ok ? t('system.bus_ok') : t('system.bus_down')),
    h('div.buttons', h('button.secondary', { type: 'button', on: { click: refresh } }, t('system.refresh'))),
    h('h2', t('system.queues')), table(['system.type', 'system.queued', 'system.inflight'], queues, 'ad-queues'),
    h('h2', t('system.workers')), table(['system.worker', 'system.types', 'system.credit', 'system.inflight',
                                         'system.last_seen'], workers, 'ad-workers'),
    h('h2', t('system.jobs')), table(['system.type', 'system.state', 'system.count', 'system.oldest'], jobs, 'ad-jobs'));
}

const SCREENS = { users, roles, sites, modalities, templates, routes, audit, system };

export async function render(view, { match, query }) {
  const allowed = TABS.filter(([, perm]) => can(perm));
  if (!allowed.length) {
    view.append(h('section.card', h('p.error', t('error.forbidden'))));
    return;
  }
  let tab = match[1] || allowed[0][0];
  if (!allowed.some(([n]) => n === tab)) tab = allowed[0][0];
  const box = h('div.tabbody#ad-body');
  view.append(h('section.card',
    h('h1', t('admin.title')),
    h('nav.tabs', { 'aria-label': t('admin.title') }, allowed.map(([n]) =>
      h('a', { href: '/app/admin/' + n, className: n === tab ? 'active' : '', id: 'tab-' + n }, t('admin.tab_' + n)))),
    box));
  const refresh = async () => {
    box.replaceChildren();
    try { await SCREENS[tab](box, refresh, query); } catch (e) { box.append(h('p.error', errorText(e))); }
  };
  await refresh();
}
