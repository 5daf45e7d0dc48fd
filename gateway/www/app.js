// Klinika PACS web application (served at /app by the gateway; plain ES modules, no build step).
// This module is the shell: the session (GET /api/auth/me), the API client (the session cookie,
// the X-CSRF-Token header on mutations, 401 -> one refresh -> the sign-in page), the router
// (history API; /app/<screen>/...), the header with its navigation and language switcher, and
// small DOM helpers the screens share. Each screen is a module exporting render(view, params).
import { t, setLanguage, guessLanguage, applyTranslations, LANGUAGES, language } from './i18n.js';

export const session = { me: null };

export function can(perm) {
  return !!(session.me && (session.me.permissions || []).includes(perm));
}

function csrf() {
  const m = document.cookie.match(/(?:^|;\s*)__Host-kp_csrf=([^;]+)/);
  return m ? m[1] : '';
}

function toLogin() {
  const next = location.pathname + location.search;
  location.replace('/app/login?next=' + encodeURIComponent(next));
}

let refreshing = null;
async function refresh() {
  if (!refreshing) {
    refreshing = fetch('/api/auth/refresh', {
      method: 'POST', credentials: 'same-origin', headers: { 'X-CSRF-Token': csrf() },
    }).then(r => r.ok).catch(() => false).finally(() => { setTimeout(() => { refreshing = null; }, 0); });
  }
  return refreshing;
}

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code;
    this.detail = e.detail;
    this.body = body;
  }
}

// fetch() of the API: JSON in and out. Returns the parsed body (null for 204); throws ApiError.
export async function api(method, url, body, { raw = false, retry = true } = {}) {
  const headers = {};
  if (method !== 'GET' && method !== 'HEAD') headers['X-CSRF-Token'] = csrf();
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(url, {
    method, credentials: 'same-origin', headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401 && retry && url !== '/api/auth/refresh') {
    if (await refresh()) return api(method, url, body, { raw, retry: false });
    toLogin();
    throw new ApiError(401, null);
  }
  if (raw) return r;
  let j = null;
  if (r.status !== 204) {
    try { j = await r.json(); } catch (e) { j = null; }
  }
  if (!r.ok) throw new ApiError(r.status, j);
  return j;
}

// Keeps the session alive while the application is open (the access cookie is short-lived).
setInterval(() => { if (csrf()) refresh(); }, 4 * 60 * 1000);

// h('tag.class#id', {attrs, on: {event: fn}}, children...): a DOM element. Text is always set
// as text (never HTML): reports and names may contain '<' and '&'.
export function h(spec, attrs, ...children) {
  const m = /^([a-z0-9]+)((?:[.#][\w-]+)*)$/i.exec(spec);
  const el = document.createElement(m ? m[1] : 'div');
  if (m && m[2]) for (const part of m[2].match(/[.#][\w-]+/g)) {
    if (part[0] === '.') el.classList.add(part.slice(1)); else el.id = part.slice(1);
  }
  if (attrs !== undefined && attrs !== null &&
      (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'on') for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'text') el.textContent = v;
    else if (k in el && k !== 'list' && k !== 'form') el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Replaces el's children, leaving out null / false (a control the user may not use).
export function setChildren(el, ...children) {
  el.replaceChildren(...children.flat().filter(c => c !== null && c !== undefined && c !== false));
}

export function toast(msg, kind = 'info') {
  const el = document.getElementById('toast');
  el.textContent = msg;
  el.className = 'show ' + kind;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.className = ''; }, 4000);
}

export function errorText(e) {
  if (e instanceof ApiError) {
    if (e.status === 403) return t('error.forbidden');
    if (e.status === 404) return t('error.not_found');
    if (e.status === 409) return t('error.conflict');
    if (e.status >= 500) return t('error.server');
    return e.message + (e.detail ? ` (${e.detail})` : '');
  }
  return t('error.network');
}

// The OHIF viewer's URL for a study; OHIF's own interface language follows the user's
// (i18next reads localStorage 'i18nextLng', set by setLanguage, and ?lng=).
export function viewerUrl(studyUid) {
  return `/viewer?StudyInstanceUIDs=${encodeURIComponent(studyUid)}&lng=${language()}`;
}

// ---- router ---------------------------------------------------------------------------------
const ROUTES = [
  [/^\/app\/?$/, null],
  [/^\/app\/worklist$/, () => import('./worklist.js')],
  [/^\/app\/studies\/([0-9.]+)\/report$/, () => import('./report.js'), 'study'],
  [/^\/app\/reports\/(\d+)$/, () => import('./report.js'), 'report'],
  [/^\/app\/admin(?:\/(\w+))?$/, () => import('./admin.js'), 'tab'],
  [/^\/app\/account$/, () => import('./account.js')],
];

export function navigate(url, replace = false) {
  if (replace) history.replaceState(null, '', url); else history.pushState(null, '', url);
  route();
}

let current = null;
async function route() {
  const path = location.pathname;
  const view = document.getElementById('view');
  if (current && current.leave) {
    try { current.leave(); } catch (e) { /* ignore */ }
  }
  current = null;
  for (const [re, load, kind] of ROUTES) {
    const m = re.exec(path);
    if (!m) continue;
    if (!load) return navigate('/app/worklist', true);
    const mod = await load();
    view.replaceChildren();
    markNav(path);
    current = (await mod.render(view, { match: m, kind, query: new URLSearchParams(location.search) })) || null;
    return;
  }
  view.replaceChildren(h('section.card', h('h1', t('error.not_found')),
                         h('p', h('a', { href: '/app/worklist' }, t('nav.worklist')))));
}

// Links inside the application are handled by the router (no page load).
document.addEventListener('click', ev => {
  const a = ev.target.closest && ev.target.closest('a[href^="/app/"]');
  if (!a || a.target || a.hasAttribute('download') || ev.ctrlKey || ev.metaKey || ev.shiftKey ||
      ev.button !== 0 || a.getAttribute('href').startsWith('/app/login'))
    return;
  ev.preventDefault();
  navigate(a.getAttribute('href'));
});
window.addEventListener('popstate', route);

// ---- header ---------------------------------------------------------------------------------
function buildNav() {
  const nav = document.getElementById('nav');
  const items = [['/app/worklist', 'nav.worklist', can('study.read')],
                 ['/app/admin', 'nav.admin', ['user.manage', 'role.manage', 'site.manage',
                   'system.configure', 'audit.read'].some(can)],
                 ['/app/account', 'nav.account', true],
                 ['/', 'nav.viewer', can('study.read')]];
  nav.replaceChildren(...items.filter(i => i[2]).map(([href, key]) =>
    h('a', { href, dataset: { i18n: key }, target: href === '/' ? '_self' : undefined }, t(key))));
}

function markNav(path) {
  for (const a of document.querySelectorAll('#nav a')) {
    const href = a.getAttribute('href');
    a.classList.toggle('active', href !== '/' && path.startsWith(href));
  }
}

export async function switchLanguage(l, save = true) {
  await setLanguage(l);
  if (save && session.me && session.me.language !== l) {
    try {
      session.me = await api('PUT', '/api/auth/me', { language: l });
    } catch (e) { toast(errorText(e), 'error'); }
  }
  document.getElementById('lang').value = l;
  applyTranslations(document);
  buildNav();
  markNav(location.pathname);
  await route(); // screens re-render in the new language
}

async function start() {
  let me;
  try {
    me = await api('GET', '/api/auth/me');
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return; // sent to the sign-in page
    document.getElementById('view').textContent = 'Klinika PACS: ' + e.message;
    return;
  }
  if (me.must_change_password) return toLogin();
  session.me = me;
  await setLanguage(guessLanguage(me.language));
  const sel = document.getElementById('lang');
  sel.replaceChildren(...LANGUAGES.map(l => h('option', { value: l }, t('language.' + l))));
  sel.value = language();
  sel.addEventListener('change', () => switchLanguage(sel.value));
  document.getElementById('who').textContent = me.display_name || me.username;
  document.getElementById('logout').addEventListener('click', async () => {
    try { await api('POST', '/api/auth/logout'); } catch (e) { /* gone anyway */ }
    location.replace('/app/login');
  });
  applyTranslations(document);
  buildNav();
  document.getElementById('top').classList.remove('hidden');
  await route();
}

start();
