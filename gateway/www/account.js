// Account page (/app/account): who I am, my language (PUT /api/auth/me; the whole application
// and the viewer follow it), my password, and the second factor (enrolment with a QR code from
// POST /api/auth/mfa/setup, confirmation with a code, which shows the recovery codes once).
import { t, formatDateTime, LANGUAGES, language } from './i18n.js';
import { api, h, session, switchLanguage, errorText, toast, setChildren } from './app.js';

export async function render(view) {
  const me = session.me;
  const lang = h('select#ac-language', LANGUAGES.map(l => h('option', { value: l }, t('language.' + l))));
  lang.value = language();
  lang.addEventListener('change', () => switchLanguage(lang.value));

  const pw = h('form.card#ac-password-form', h('h2', t('account.password')),
    h('div.field', h('label', { for: 'ac-current' }, t('account.current_password')),
      h('input#ac-current', { type: 'password', name: 'current', autocomplete: 'current-password', required: true })),
    h('div.field', h('label', { for: 'ac-new' }, t('account.new_password')),
      h('input#ac-new', { type: 'password', name: 'new1', autocomplete: 'new-password', required: true, minLength: 12 })),
    h('div.field', h('label', { for: 'ac-new2' }, t('account.repeat_password')),
      h('input#ac-new2', { type: 'password', name: 'new2', autocomplete: 'new-password', required: true })),
    h('p.hint', t('account.password_rules')),
    h('div.buttons', h('button', { type: 'submit' }, t('account.change_password'))));
  pw.addEventListener('submit', async ev => {
    ev.preventDefault();
    if (pw.new1.value !== pw.new2.value) return toast(t('account.passwords_differ'), 'error');
    try {
      await api('POST', '/api/auth/password', { current_password: pw.current.value, new_password: pw.new1.value });
      pw.reset();
      toast(t('account.password_changed'));
    } catch (e) { toast(errorText(e), 'error'); }
  });

  const mfaBox = h('div#ac-mfa-body');
  const mfa = h('section.card#ac-mfa', h('h2', t('account.mfa')), mfaBox);
  function mfaIdle() {
    setChildren(mfaBox,
      h('p#ac-mfa-state', me.mfa_enrolled ? t('account.mfa_on') : t('account.mfa_off')),
      me.mfa_enrolled ? null : h('button#ac-mfa-setup', { type: 'button', on: { click: setup } }, t('account.mfa_enrol')));
  }
  async function setup() {
    let s;
    try { s = await api('POST', '/api/auth/mfa/setup'); } catch (e) { return toast(errorText(e), 'error'); }
    const img = h('img.qr#ac-qr', { alt: t('account.mfa_qr'), width: 200, height: 200,
      src: 'data:image/svg+xml;base64,' + btoa(unescape(encodeURIComponent(s.qr_svg || ''))) });
    const code = h('input#ac-mfa-code', { inputmode: 'numeric', autocomplete: 'one-time-code', pattern: '[0-9 ]{6,7}', required: true });
    const form = h('form',
      h('p', t('account.mfa_scan')), img,
      h('p.small', t('account.mfa_secret'), ' ', h('code#ac-secret', s.secret)),
      h('div.field', h('label', { for: 'ac-mfa-code' }, t('account.mfa_code')), code),
      h('div.buttons', h('button#ac-mfa-confirm', { type: 'submit' }, t('account.mfa_confirm'))));
    form.addEventListener('submit', async ev => {
      ev.preventDefault();
      try {
        const r = await api('POST', '/api/auth/mfa/confirm', { code: code.value.replace(/\s/g, '') });
        me.mfa_enrolled = true;
        mfaBox.replaceChildren(h('p', t('account.mfa_done')),
          h('p', t('account.recovery_codes')),
          h('ul.codes#ac-recovery', (r.recovery_codes || []).map(c => h('li', h('code', c)))),
          h('button.secondary', { type: 'button', on: { click: mfaIdle } }, t('account.done')));
      } catch (e) { toast(errorText(e), 'error'); }
    });
    mfaBox.replaceChildren(form);
  }
  mfaIdle();

  view.append(h('div.grid2',
    h('section.card#ac-profile', h('h1', t('account.title')),
      h('dl.study',
        h('dt', t('admin.username')), h('dd#ac-username', me.username),
        h('dt', t('admin.display_name')), h('dd', me.display_name || ''),
        h('dt', t('admin.email')), h('dd', me.email || ''),
        h('dt', t('admin.roles')), h('dd', (me.roles || []).join(', ')),
        h('dt', t('admin.sites')), h('dd', me.site_all ? t('account.all_sites') : (me.sites || []).join(', ')),
        h('dt', t('admin.last_login')), h('dd', formatDateTime(me.last_login_at))),
      h('div.field', h('label', { for: 'ac-language' }, t('account.language')), lang),
      h('p.hint', t('account.language_hint'))),
    pw, mfa));
}
