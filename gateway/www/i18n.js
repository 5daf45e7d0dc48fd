// Klinika PACS web application: message catalogs (i18n/<lang>.json, one per language, all with
// the same keys), the current language, and locale-aware formatting of dates, times and DICOM
// person names. Every visible text goes through t('key'); elements of static HTML carry
// data-i18n="key" (text) or data-i18n-placeholder / data-i18n-title / data-i18n-aria.
export const LANGUAGES = ['en', 'ru', 'es', 'fr', 'de'];
const LOCALES = { en: 'en-GB', ru: 'ru-RU', es: 'es-ES', fr: 'fr-FR', de: 'de-DE' };
let lang = 'en';
let catalog = {};
let fallback = {};

async function fetchCatalog(l) {
  const r = await fetch(`/app/i18n/${l}.json`, { credentials: 'same-origin' });
  if (!r.ok) throw new Error(`catalog ${l}: ${r.status}`);
  return r.json();
}

// Picks a language: the account's, else the one stored in this browser, else the browser's.
export function guessLanguage(account) {
  const cands = [account, localStorage.getItem('kp.lang'),
                 ...(navigator.languages || [navigator.language || 'en'])];
  for (const c of cands) {
    const l = String(c || '').slice(0, 2).toLowerCase();
    if (LANGUAGES.includes(l)) return l;
  }
  return 'en';
}

export async function setLanguage(l) {
  if (!LANGUAGES.includes(l)) l = 'en';
  if (!Object.keys(fallback).length) fallback = await fetchCatalog('en');
  catalog = l === 'en' ? fallback : await fetchCatalog(l);
  lang = l;
  localStorage.setItem('kp.lang', l);
  // OHIF (i18next) reads its language from here: the viewer follows the user's language
  localStorage.setItem('i18nextLng', l);
  // ...and, before localStorage, from its own cookie, which it writes: keep that in step too
  document.cookie = `i18next=${l}; path=/; max-age=31536000; SameSite=Lax; Secure`;
  document.documentElement.lang = l;
}

export function language() { return lang; }
export function locale() { return LOCALES[lang] || 'en-GB'; }

// The text of key in the current language, with {name} placeholders filled from vars.
export function t(key, vars) {
  let s = catalog[key];
  if (s === undefined) s = fallback[key];
  if (s === undefined) {
    console.warn('i18n: missing key', key);
    s = key;
  }
  if (vars) s = s.replace(/\{(\w+)\}/g, (m, k) => (k in vars ? String(vars[k]) : m));
  return s;
}

// Translates the data-i18n* attributes below root.
export function applyTranslations(root = document) {
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll('[data-i18n-placeholder]'))
    el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of root.querySelectorAll('[data-i18n-title]')) el.title = t(el.dataset.i18nTitle);
  for (const el of root.querySelectorAll('[data-i18n-aria]'))
    el.setAttribute('aria-label', t(el.dataset.i18nAria));
}

// A DICOM date (YYYYMMDD) in the user's locale; '' stays ''.
export function formatDicomDate(d) {
  const m = /^(\d{4})(\d{2})(\d{2})$/.exec(d || '');
  if (!m) return d || '';
  const dt = new Date(Date.UTC(+m[1], +m[2] - 1, +m[3]));
  return new Intl.DateTimeFormat(locale(), { dateStyle: 'medium', timeZone: 'UTC' }).format(dt);
}

// A DICOM time (HHMMSS.frac) as HH:MM.
export function formatDicomTime(tm) {
  const m = /^(\d{2})(\d{2})/.exec(tm || '');
  return m ? `${m[1]}:${m[2]}` : '';
}

// An ISO 8601 time of the API (UTC) in the user's locale and time zone.
export function formatDateTime(iso) {
  if (!iso) return '';
  const dt = new Date(iso);
  if (isNaN(dt)) return iso;
  return new Intl.DateTimeFormat(locale(), { dateStyle: 'medium', timeStyle: 'short' }).format(dt);
}

// A DICOM person name (Family^Given^Middle^Prefix^Suffix) for display: "Family, Given Middle"
// (every language of the catalogs writes the family name first in lists).
export function formatPersonName(pn) {
  if (!pn) return '';
  const alpha = String(pn).split('=')[0];
  const [family = '', given = '', middle = '', prefix = '', suffix = ''] = alpha.split('^');
  const rest = [prefix, given, middle].filter(Boolean).join(' ');
  let s = family && rest ? `${family}, ${rest}` : family || rest;
  if (suffix) s += `, ${suffix}`;
  return s;
}

export function formatNumber(n) {
  return new Intl.NumberFormat(locale()).format(n);
}
