// Klinika PACS sign-in page: password, then the second factor when the account has one, then a
// forced password change when the account must; comes back to ?next= (a path on this server).
// Texts come from the web application's catalogs (/app/i18n/<lang>.json): the language last used
// in this browser, else the browser's own; English is in the page itself.
'use strict';
(function () {
  const $ = id => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  let next = params.get('next') || '/';
  let texts = {};
  const tr = (key, fallback) => texts[key] || fallback;
  (function translate() {
    const langs = ['en', 'ru', 'es', 'fr', 'de'];
    const cands = [localStorage.getItem('kp.lang'), ...(navigator.languages || [])];
    const lang = cands.map(c => String(c || '').slice(0, 2).toLowerCase())
      .find(l => langs.includes(l)) || 'en';
    document.documentElement.lang = lang;
    if (lang === 'en') return;
    fetch('/app/i18n/' + lang + '.json').then(r => (r.ok ? r.json() : {})).then(j => {
      texts = j;
      for (const el of document.querySelectorAll('[data-i18n]'))
        if (j[el.dataset.i18n]) el.textContent = j[el.dataset.i18n];
    }).catch(() => {});
  })();
  // only a path on this origin: never //host or a scheme
  if (!next.startsWith('/') || next.startsWith('//') || next.startsWith('/\\')) next = '/';

  function csrf() {
    const m = document.cookie.match(/(?:^|;\s*)__Host-kp_csrf=([^;]+)/);
    return m ? m[1] : '';
  }
  async function post(url, body) {
    const r = await fetch(url, {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf() },
      body: JSON.stringify(body || {}),
    });
    let j = {};
    try { j = await r.json(); } catch (e) { /* 204 */ }
    return { status: r.status, json: j };
  }
  function fail(j, fallback) {
    const e = (j && j.error) || {};
    $('error').textContent = e.message || fallback;
  }
  function done() { location.replace(next); }

  let password = '';
  $('login').addEventListener('submit', async ev => {
    ev.preventDefault();
    $('error').textContent = '';
    password = $('password').value;
    const body = { username: $('username').value.trim(), password, session: 'cookie' };
    const code = $('totp').value.replace(/\s/g, ''), rec = $('recovery').value.trim();
    if (code) body.totp = code; else if (rec) body.recovery_code = rec;
    const r = await post('/api/auth/login', body);
    if (r.status === 200) {
      if (r.json.must_change_password) {
        $('login').classList.add('hidden');
        $('change').classList.remove('hidden');
        $('newpw').focus();
        return;
      }
      return done();
    }
    if (r.json.error && r.json.error.code === 'mfa_required') {
      $('mfa').classList.remove('hidden');
      if (code || rec) fail(r.json, tr('login.wrong_code', 'wrong code')); else $('totp').focus();
      return;
    }
    fail(r.json, tr('login.failed', 'sign-in failed'));
  });
  $('change').addEventListener('submit', async ev => {
    ev.preventDefault();
    if ($('newpw').value !== $('newpw2').value) {
      $('error').textContent = tr('login.passwords_differ', 'the two passwords differ');
      return;
    }
    const r = await post('/api/auth/password',
                         { current_password: password, new_password: $('newpw').value });
    if (r.status !== 200) return fail(r.json, tr('login.not_changed', 'password not changed'));
    const t = await post('/api/auth/refresh');
    if (t.status === 200) return done();
    fail(t.json, tr('login.again', 'please sign in again'));
  });
  // Already signed in (a valid refresh cookie)? Then go straight back.
  if (csrf()) post('/api/auth/refresh').then(r => {
    if (r.status === 200 && !r.json.must_change_password) done();
  });
})();
