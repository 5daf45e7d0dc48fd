// The web application (/app) in Debian's headless chromium (playwright-core):
//   node app_ui.js SPEC.json
// SPEC: {base, playwright, chromium, shots, doctor, operator, admin ({user, password}),
//        study: {uid, family}, otherFamily, en, ru (the catalogs), newUser, newRole, newSite,
//        password, mrUid (a study without a report), template: {name, technique, findings}}
// Steps (each records its findings in the output object; a failed step stops the run):
//   doctor: sign-in page (redirected from /app/worklist), worklist filters, a report in Russian
//   (autosave survives a reload), sign, PDF (render, preview, download), amend + history diff,
//   language switch (every visible label changes; OHIF follows), OHIF's Report column and
//   header link; operator: no report editor; admin: every admin screen, a custom role (made,
//   then edited; a built-in one read-only) and a new user (made, then edited: roles and sites)
//   who then signs in and enrols a second factor (QR code); a report template made in the
//   Templates tab, which the doctor then picks for a new report; the worklist on a tablet.
// Prints one JSON object on the last line.
'use strict';
const fs = require('fs');
const path = require('path');
const { totp } = require('./totp');

const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = require(spec.playwright);
const T = 30000;
const out = { steps: [], console: [] };

async function shot(page, name) {
  await page.waitForTimeout(150);
  await page.screenshot({ path: path.join(spec.shots, name + '.png') });
}

async function newPage(browser, viewport = { width: 1280, height: 800 }) {
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport, acceptDownloads: true,
                                         locale: 'en-GB' });
  const page = await ctx.newPage();
  page.setDefaultTimeout(T);
  page.on('console', m => { if (m.type() === 'error') out.console.push(m.text().slice(0, 300)); });
  page.on('pageerror', e => out.console.push('pageerror: ' + String(e).slice(0, 300)));
  return page;
}

async function login(page, who, target = '/app/worklist') {
  await page.goto(spec.base + target, { waitUntil: 'domcontentloaded' });
  await page.waitForURL(u => String(u).includes('/app/login'));
  await page.fill('#username', who.user);
  await page.fill('#password', who.password);
  await Promise.all([page.waitForURL(u => !String(u).includes('/app/login')), page.click('#submit')]);
  await page.waitForSelector('#top:not(.hidden)');
}

// Visible leaf texts of the header and main area, without data cells and user input.
function visibleLabels() {
  const out = [];
  for (const el of document.querySelectorAll('header *, main *')) {
    if (el.children.length || el.closest('td') || el.closest('dd') || el.closest('option') ||
        el.matches('input, textarea, select, code, pre, #who')) continue;
    const r = el.getBoundingClientRect();
    const s = getComputedStyle(el);
    if (!r.width || !r.height || s.visibility === 'hidden' || s.display === 'none') continue;
    const t = el.textContent.trim();
    if (t) out.push(t);
  }
  return out;
}

async function step(name, fn) {
  const t0 = Date.now();
  const rec = { name };
  out.steps.push(rec);
  await fn(rec);
  rec.ms = Date.now() - t0;
}

(async () => {
  const browser = await chromium.launch({
    executablePath: spec.chromium, headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run'], timeout: T,
  });
  try {
    // ---- doctor -------------------------------------------------------------------------
    const page = await newPage(browser);
    let reportId = null;
    await step('login', async rec => {
      await page.goto(spec.base + '/app/worklist', { waitUntil: 'domcontentloaded' });
      await page.waitForURL(u => String(u).includes('/app/login'));
      rec.redirected = page.url().includes('/app/login?next=%2Fapp%2Fworklist');
      await page.fill('#username', spec.doctor.user);
      await shot(page, 'login');
      await page.fill('#password', spec.doctor.password);
      await Promise.all([page.waitForURL(u => String(u).endsWith('/app/worklist')), page.click('#submit')]);
      await page.waitForSelector('#worklist tbody tr[data-study]');
      rec.rows = await page.locator('#worklist tbody tr[data-study]').count();
    });
    await step('worklist', async rec => {
      rec.headers = await page.locator('#worklist thead th').allTextContents();
      await page.fill('#f-name', spec.study.prefix);
      await page.click('#search');
      await page.waitForFunction(() => location.search.includes('name='));
      await page.waitForSelector('#wl-summary:not(:empty)');
      rec.filteredRows = await page.locator('#worklist tbody tr[data-study]').count();
      rec.filteredText = await page.locator('#worklist tbody').innerText();
      await page.selectOption('#f-modality', 'PT');
      await page.click('#search');
      await page.waitForFunction(() => location.search.includes('modality=PT'));
      await page.waitForSelector('#wl-summary:not(:empty)');
      rec.ptRows = await page.locator('#worklist tbody tr[data-study]').count();
      await page.click('#reset');
      await page.waitForFunction(() => !location.search);
      await page.waitForSelector('#worklist tbody tr[data-study]');
      await page.selectOption('#f-report_status', 'none');
      await page.click('#search');
      await page.waitForFunction(() => location.search.includes('report_status=none'));
      await page.waitForSelector(`#worklist tbody tr[data-study="${spec.study.uid}"]`);
      rec.noneRows = await page.locator('#worklist tbody tr[data-study]').count();
      const row = page.locator(`#worklist tbody tr[data-study="${spec.study.uid}"]`);
      rec.viewerHref = await row.locator('a[data-action=viewer]').getAttribute('href');
      rec.statusText = await row.locator('.badge').innerText();
      await shot(page, 'worklist');
      rec.strayText = await page.evaluate(() => /\bnull\b|\bundefined\b|NaN/.test(document.querySelector('main').innerText));
      rec.overflow = await page.evaluate(() => {
        const s = document.querySelector('#worklist').parentElement;
        return s.scrollWidth - s.clientWidth;
      });
      await row.locator('a[data-action=report]').click();
      await page.waitForSelector('#rp-create');
    });
    await step('report', async rec => {
      await page.selectOption('#rp-language', 'ru');
      await Promise.all([page.waitForURL(/\/app\/reports\/\d+$/), page.click('#rp-create')]);
      reportId = Number(page.url().split('/').pop());
      rec.reportId = reportId;
      await page.waitForSelector('#rp-findings');
      await page.fill('#rp-findings', spec.russianFindings);
      await page.fill('#rp-impression', spec.russianImpression);
      await page.waitForSelector('#rp-save[data-saved]', { timeout: 15000 });
      rec.saveText = await page.locator('#rp-save').innerText();
      await page.reload({ waitUntil: 'domcontentloaded' });
      await page.waitForSelector('#rp-findings');
      await page.waitForFunction(() => document.querySelector('#rp-findings').value.length > 0);
      rec.afterReload = await page.inputValue('#rp-findings');
      rec.impressionAfterReload = await page.inputValue('#rp-impression');
      await shot(page, 'report');
      await page.click('#rp-sign');
      await page.waitForSelector('#rp-status [data-status=final]');
      rec.signed = true;
      rec.readonlyAfterSign = await page.locator('#rp-findings').evaluate(e => e.readOnly);
      await page.click('#rp-pdf-request');
      await page.waitForSelector('#rp-pdf-download', { timeout: 60000 });
      rec.preview = await page.locator('#rp-pdf-preview').getAttribute('src');
      const [dl] = await Promise.all([page.waitForEvent('download'), page.click('#rp-pdf-download')]);
      const file = path.join(spec.shots, 'report.pdf');
      await dl.saveAs(file);
      rec.pdfName = dl.suggestedFilename();
      const bytes = fs.readFileSync(file);
      rec.pdfMagic = bytes.slice(0, 5).toString('latin1');
      rec.pdfSize = bytes.length;
      await shot(page, 'report-pdf');
      // amend, change a line, compare the versions
      await page.click('#rp-amend');
      await page.waitForSelector('#rp-status [data-status=draft]');
      await page.fill('#rp-impression', spec.russianImpression + '\nДополнение.');
      await page.waitForFunction(() => document.querySelector('#rp-save').textContent &&
        document.querySelector('#rp-save').dataset.saved, null, { timeout: 15000 });
      await page.waitForFunction(() => !document.querySelector('#rp-save').textContent.includes('…'));
      await page.reload({ waitUntil: 'domcontentloaded' });
      await page.waitForSelector('#rp-diff-show');
      await page.click('#rp-diff-show');
      await page.waitForSelector('#rp-diff .add');
      rec.diffAdded = await page.locator('#rp-diff .add').allTextContents();
      rec.diffRemoved = await page.locator('#rp-diff .del').allTextContents();
      await shot(page, 'report-history');
      // someone else saves meanwhile (another window): the next autosave gets 409 and says so
      rec.otherSave = await page.evaluate(async id => {
        const csrf = (document.cookie.match(/(?:^|;\s*)__Host-kp_csrf=([^;]+)/) || [])[1] || '';
        const r = await (await fetch('/api/reports/' + id)).json();
        const put = await fetch('/api/reports/' + id, { method: 'PUT',
          headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf },
          body: JSON.stringify({ lock_version: r.lock_version, sections: { technique: 'CT' } }) });
        return put.status;
      }, reportId);
      await page.fill('#rp-recommendations', 'Контроль через год.');
      await page.waitForSelector('#rp-conflict', { timeout: 15000 });
      rec.conflictText = await page.locator('#rp-conflict').innerText();
      rec.readonlyAfterConflict = await page.locator('#rp-findings').evaluate(e => e.readOnly);
      rec.strayText = await page.evaluate(() => /\bnull\b|\bundefined\b|NaN/.test(document.querySelector('main').innerText));
    });
    await step('language', async rec => {
      await page.goto(spec.base + '/app/worklist', { waitUntil: 'domcontentloaded' });
      await page.waitForSelector('#worklist tbody tr[data-study]');
      const enOnly = new Set(Object.keys(spec.en).filter(k => spec.en[k] !== spec.ru[k])
        .map(k => spec.en[k]));
      const before = (await page.evaluate(visibleLabels)).filter(s => enOnly.has(s));
      await page.selectOption('#lang', 'ru');
      await page.waitForFunction(() => document.documentElement.lang === 'ru');
      await page.waitForSelector('#worklist tbody tr[data-study]');
      await page.waitForTimeout(300);
      const after = await page.evaluate(visibleLabels);
      rec.englishBefore = before.length;
      rec.englishAfter = after.filter(s => enOnly.has(s));
      rec.russianAfter = after.filter(s => Object.values(spec.ru).includes(s)).length;
      rec.i18nextLng = await page.evaluate(() => localStorage.getItem('i18nextLng'));
      rec.dateSample = await page.locator('#worklist tbody tr[data-study] td').nth(3).innerText();
      rec.viewerHref = await page.locator('#worklist a[data-action=viewer]').first().getAttribute('href');
      await shot(page, 'worklist-ru');
      // the account keeps the language: a new page load starts in Russian
      await page.reload({ waitUntil: 'domcontentloaded' });
      await page.waitForSelector('#worklist thead th');
      rec.afterReload = await page.locator('h1').first().innerText();
      // OHIF follows: its study list in Russian, with the Report column
      await page.goto(spec.base + '/', { waitUntil: 'domcontentloaded' });
      await page.waitForSelector(`a[data-kp-report="${spec.study.uid}"]`, { timeout: 60000 });
      rec.ohifReportLink = await page.locator(`a[data-kp-report="${spec.study.uid}"]`).getAttribute('href');
      rec.ohifReportText = await page.locator(`a[data-kp-report="${spec.study.uid}"]`).innerText();
      rec.ohifText = (await page.evaluate(() => document.body.innerText)).slice(0, 400);
      rec.ohifRussian = /Исследован|Модальность|Описание|Пациент/.test(rec.ohifText);
      rec.ohifLogo = await page.locator('#kp-app-link').getAttribute('href');
      await shot(page, 'ohif-study-list-ru');
      // the viewer, opened from the worklist's link (lng= as well): OHIF's own texts in Russian
      await page.goto(spec.base + rec.viewerHref, { waitUntil: 'domcontentloaded' });
      await page.waitForSelector('#kp-app-link', { timeout: 60000 });
      await page.waitForTimeout(4000);
      rec.viewerLogo = await page.locator('#kp-app-link').getAttribute('href');
      rec.viewerText = await page.evaluate(() => {
        const a = document.getElementById('kp-app-link');
        return document.body.innerText.replace(a ? a.innerText : '', '');
      });
      rec.viewerRussian = /[а-яА-Я]{3,}/.test(rec.viewerText);
      rec.viewerText = rec.viewerText.slice(0, 400);
      rec.viewerTitles = await page.evaluate(() => [...document.querySelectorAll('[title],[aria-label],[data-cy]')]
        .map(e => e.getAttribute('title') || e.getAttribute('aria-label') || '').filter(t => /[а-яА-Я]/.test(t)).slice(0, 10));
      rec.lngAfterOhif = await page.evaluate(() => localStorage.getItem('i18nextLng'));
      await shot(page, 'ohif-viewer-ru');
      await page.goto(spec.base + '/', { waitUntil: 'domcontentloaded' });
      await page.waitForSelector(`a[data-kp-report="${spec.study.uid}"]`, { timeout: 60000 });
      await Promise.all([page.waitForURL(/\/app\/reports\/\d+$/),
                         page.locator(`a[data-kp-report="${spec.study.uid}"]`).click()]);
      rec.fromOhif = page.url();
      await page.waitForSelector('#rp-findings');
      await page.selectOption('#lang', 'en');
      await page.waitForFunction(() => document.documentElement.lang === 'en');
    });
    await step('tablet', async rec => {
      const tab = await newPage(browser, { width: 820, height: 1180 });
      await login(tab, spec.doctor);
      await tab.waitForSelector('#worklist tbody tr[data-study]');
      rec.overflow = await tab.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      await shot(tab, 'worklist-tablet');
      await tab.goto(spec.base + '/app/reports/' + reportId, { waitUntil: 'domcontentloaded' });
      await tab.waitForSelector('#rp-findings');
      rec.reportOverflow = await tab.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      await shot(tab, 'report-tablet');
      await tab.context().close();
    });
    await page.context().close();

    // ---- operator -----------------------------------------------------------------------
    await step('operator', async rec => {
      const op = await newPage(browser);
      await login(op, spec.operator);
      await op.waitForSelector('#worklist tbody tr[data-study]');
      rec.rows = await op.locator('#worklist tbody tr[data-study]').count();
      rec.reportLinks = await op.locator('a[data-action=report]').count();
      rec.viewerLinks = await op.locator('a[data-action=viewer]').count();
      rec.headers = await op.locator('#worklist thead th').allTextContents();
      rec.statusFilter = await op.locator('#f-report_status').count();
      rec.adminNav = await op.locator('#nav a[href="/app/admin"]').count();
      await op.goto(spec.base + '/app/reports/' + reportId, { waitUntil: 'domcontentloaded' });
      await op.waitForSelector('main .error');
      rec.editor = await op.locator('#rp-findings').count();
      rec.message = await op.locator('main .error').innerText();
      await op.context().close();
    });

    // ---- admin --------------------------------------------------------------------------
    const ad = await newPage(browser);
    await step('admin', async rec => {
      await login(ad, spec.admin, '/app/admin/roles');
      await ad.waitForSelector('#ad-role-form');
      await ad.fill('#ad-r-name', spec.newRole);
      await ad.fill('#ad-r-description', 'Reads studies and reports');
      await ad.check('#ad-permissions input[value="study.read"]');
      await ad.check('#ad-permissions input[value="report.read"]');
      await ad.click('#ad-r-create');
      await ad.waitForSelector(`#ad-roles tr[data-role="${spec.newRole}"]`);
      rec.role = await ad.locator(`#ad-roles tr[data-role="${spec.newRole}"]`).innerText();
      await shot(ad, 'admin-roles');
      // edit the custom role: one more permission, another description
      await ad.click(`#ad-roles tr[data-role="${spec.newRole}"] button[data-action=edit]`);
      await ad.waitForSelector(`#ad-role-edit[data-role="${spec.newRole}"]`);
      await ad.fill('#ad-re-description', 'Reads studies and reports, exports PDFs');
      await ad.check('#ad-re-permissions input[value="report.export"]');
      await ad.click('#ad-re-save');
      await ad.waitForSelector('#ad-re-msg.ok');
      rec.roleSaved = await ad.locator('#ad-re-msg').innerText();
      rec.roleEdited = await ad.locator(`#ad-roles tr[data-role="${spec.newRole}"]`).innerText();
      // a built-in role opens read-only (only "requires 2FA" may change)
      await ad.click('#ad-roles tr[data-role="doctor"] button[data-action=edit]');
      await ad.waitForSelector('#ad-role-edit[data-role="doctor"]');
      rec.builtinNotice = await ad.locator('#ad-re-builtin').count();
      rec.builtinEditable = await ad.locator('#ad-re-permissions input:not([disabled]), #ad-re-description:not([disabled])').count();
      await ad.click('#tab-users');
      await ad.waitForSelector('#ad-user-form');
      await ad.fill('#ad-u-username', spec.newUser);
      await ad.fill('#ad-u-display', 'Dr. Nina Neu');
      await ad.fill('#ad-u-password', spec.password);
      await ad.selectOption('#ad-u-language', 'de');
      await ad.check(`#ad-roles input[value="${spec.newRole}"]`);
      await ad.check('#ad-sites input[value="default"]');
      await ad.click('#ad-u-create');
      await ad.waitForSelector(`#ad-users tr[data-user="${spec.newUser}"]`);
      rec.user = await ad.locator(`#ad-users tr[data-user="${spec.newUser}"]`).innerText();
      await shot(ad, 'admin-users');
      // edit the new user: another name and e-mail, one more role and one more site
      await ad.click(`#ad-users tr[data-user="${spec.newUser}"] button[data-action=edit]`);
      await ad.waitForSelector(`#ad-user-edit[data-user="${spec.newUser}"]`);
      await ad.fill('#ad-ue-display', 'Dr. Nina Neu-Meier');
      await ad.fill('#ad-ue-email', 'nina.neu@example.org');
      await ad.check('#ad-ue-roles input[value="operator"]');
      await ad.check(`#ad-ue-sites input[value="${spec.newSite}"]`);
      await ad.click('#ad-ue-save');
      await ad.waitForSelector('#ad-ue-msg.ok');
      rec.userSaved = await ad.locator('#ad-ue-msg').innerText();
      rec.userEdited = await ad.locator(`#ad-users tr[data-user="${spec.newUser}"]`).innerText();
      await shot(ad, 'admin-user-edit');
      // a refusal says why: the administrator cannot disable their own account
      await ad.click(`#ad-users tr[data-user="${spec.admin.user}"] button[data-action=edit]`);
      await ad.waitForSelector(`#ad-user-edit[data-user="${spec.admin.user}"]`);
      await ad.check('#ad-ue-disabled');
      await ad.click('#ad-ue-save');
      await ad.waitForSelector('#ad-ue-msg.error');
      rec.selfDisable = await ad.locator('#ad-ue-msg').innerText();
      // report templates: one made with the form, then changed; another made and deleted
      const saved = async () => {  // the form reopens, fresh from the server, saying "saved"
        await ad.evaluate(() => { document.querySelector('#ad-tpl-form').dataset.old = '1'; });
        await ad.click('#ad-tpl-save');
        await ad.waitForSelector('#ad-tpl-form:not([data-old]) #ad-tpl-msg.ok');
      };
      await ad.click('#tab-templates');
      await ad.waitForSelector('#ad-tpl-new');
      await ad.click('#ad-tpl-new');
      await ad.fill('#ad-tpl-name', spec.template.name);
      await ad.selectOption('#ad-tpl-language', 'en');
      await ad.fill('#ad-tpl-modality', 'mr');
      await ad.fill('#ad-tpl-technique', spec.template.technique);
      await saved();
      await ad.fill('#ad-tpl-findings', spec.template.findings);
      await saved();
      rec.templateSaved = await ad.locator('#ad-tpl-msg').innerText();
      await ad.click('#ad-tpl-new');
      await ad.fill('#ad-tpl-name', 'Throwaway');
      await saved();
      await ad.locator('#ad-templates tr', { hasText: 'Throwaway' }).locator('button[data-action=delete]').click();
      await ad.waitForFunction(() => {
        const list = document.querySelector('#ad-templates');  // absent while the tab redraws
        return list && !/Throwaway/.test(list.innerText);
      });
      rec.templateRows = await ad.locator('#ad-templates tbody').innerText();
      await ad.locator('#ad-templates tr', { hasText: spec.template.name }).locator('button[data-action=edit]').click();
      await ad.waitForSelector('#ad-tpl-findings');
      await ad.evaluate(() => window.scrollTo(0, 0));
      await shot(ad, 'admin-templates');
      for (const tab of ['sites', 'modalities', 'routes', 'audit', 'system']) {
        await ad.click('#tab-' + tab);
        await ad.waitForFunction(t => location.pathname.endsWith('/' + t), tab);
        await ad.waitForSelector('#ad-body > *');
        await ad.waitForTimeout(200);
        rec[tab] = (await ad.locator('#ad-body').innerText()).slice(0, 300);
        if (tab === 'routes') rec.routesUnavailable = await ad.locator('#ad-routes-unavailable').count();
        await shot(ad, 'admin-' + tab);
      }
      // the routing screen on the real API: a rule made with the form, shown, then disabled
      await ad.click('#tab-routes');
      await ad.waitForSelector('#ad-route-form');
      await ad.fill('#ad-rt-name', 'CT to archive');
      await ad.fill('#ad-rt-attr', 'Modality');
      await ad.fill('#ad-rt-value', 'CT');
      await ad.fill('#ad-rt-ae', spec.routeAe);
      await ad.click('#ad-route-form button[type=submit]');
      await ad.waitForSelector('#ad-routes tbody tr');
      rec.routeRow = await ad.locator('#ad-routes tbody tr').first().innerText();
      await ad.locator('#ad-routes tbody tr button').first().click();  // disable
      await ad.waitForFunction(() => /\b(no|nein|нет|non)\b/i.test(
        document.querySelector('#ad-routes tbody tr')?.innerText || ''));
      rec.routeRowDisabled = await ad.locator('#ad-routes tbody tr').first().innerText();
      await shot(ad, 'admin-routes-rules');
      // a failed delivery with its retry (answers supplied by the browser: making one for real
      // needs a router and a peer that refuses, which test_router does)
      const retried = [];
      await ad.route('**/api/routes/deliveries**', r => r.fulfill({ contentType: 'application/json',
        body: JSON.stringify({ total: 1, items: [{ id: 7, rule_id: 3, rule_name: 'CT to archive',
          destination: spec.routeAe, study_uid: '1.2.3', sop_uid: null,
          state: 'dead', attempts: 5, next_attempt_at: null, last_error: 'association rejected',
          created_at: '2026-11-28T08:00:00Z', delivered_at: null }] }) }));
      await ad.route('**/api/routes/deliveries/7/retry', r => { retried.push(r.request().method()); r.fulfill({ status: 200, contentType: 'application/json', body: '{}' }); });
      await ad.click('#tab-system');
      await ad.waitForSelector('#ad-workers');
      await ad.click('#tab-routes');
      await ad.waitForSelector('#ad-routes tbody tr');
      await ad.waitForSelector('#ad-deliveries tbody tr');
      rec.routeRow = await ad.locator('#ad-routes tbody tr').first().innerText();
      rec.deliveryRow = await ad.locator('#ad-deliveries tbody tr').first().innerText();
      await ad.locator('#ad-deliveries tbody tr button').first().click();
      await ad.waitForFunction(() => true);
      await ad.waitForTimeout(300);
      rec.retried = retried;
      await ad.unrouteAll({ behavior: 'ignoreErrors' }).catch(() => {});
      await ad.click('#tab-system');
      await ad.waitForSelector('#ad-workers');
      rec.workers = await ad.locator('#ad-workers tbody tr').count();
      rec.busOk = await ad.locator('#ad-bus-state.ok').count();
      await ad.click('#tab-audit');
      await ad.waitForSelector('#ad-audit-form');
      await ad.fill('#ad-a-action', 'report.sign');
      await ad.click('#ad-audit-form button[type=submit]');
      await ad.waitForFunction(() => location.search.includes('action=report.sign'));
      await ad.waitForSelector('#ad-audit tbody tr');
      rec.auditSign = await ad.locator('#ad-audit tbody').innerText();
    });
    await ad.context().close();

    // ---- the new user ---------------------------------------------------------------------
    await step('newuser', async rec => {
      const nu = await newPage(browser);
      await login(nu, { user: spec.newUser, password: spec.password });
      await nu.waitForSelector('#worklist tbody tr[data-study]');
      rec.lang = await nu.evaluate(() => document.documentElement.lang);
      rec.title = await nu.locator('h1').first().innerText();
      rec.rows = await nu.locator('#worklist tbody tr[data-study]').count();
      rec.writeLinks = await nu.locator('a[data-action=report]').count();
      await nu.click('#nav a[href="/app/account"]');
      await nu.waitForSelector('#ac-mfa-setup');
      await nu.click('#ac-mfa-setup');
      await nu.waitForSelector('#ac-qr');
      rec.qrLoaded = await nu.locator('#ac-qr').evaluate(i => i.complete && i.naturalWidth > 0);
      await shot(nu, 'account');
      rec.strayText = await nu.evaluate(() => /\bnull\b|\bundefined\b|NaN/.test(document.querySelector('main').innerText));
      const secret = await nu.locator('#ac-secret').innerText();
      let now = Date.now() / 1000;
      if (now % 30 > 25) { await nu.waitForTimeout((31 - (now % 30)) * 1000); now = Date.now() / 1000; }
      await nu.fill('#ac-mfa-code', totp(secret, now));
      await nu.click('#ac-mfa-confirm');
      await nu.waitForSelector('#ac-recovery li');
      rec.recoveryCodes = await nu.locator('#ac-recovery li').count();
      await nu.context().close();
    });

    // ---- the doctor picks the administrator's template for the study without a report ---
    await step('template', async rec => {
      const dr = await newPage(browser);
      await login(dr, spec.doctor, `/app/studies/${spec.mrUid}/report`);
      await dr.waitForFunction(n => [...document.querySelectorAll('#rp-template option')]
        .some(o => o.textContent.includes(n)), spec.template.name);
      rec.options = await dr.locator('#rp-template option').allTextContents();
      const value = await dr.locator('#rp-template option', { hasText: spec.template.name }).getAttribute('value');
      await dr.selectOption('#rp-template', value);
      await Promise.all([dr.waitForURL(/\/app\/reports\/\d+$/), dr.click('#rp-create')]);
      await dr.waitForSelector('#rp-findings');
      rec.technique = await dr.locator('#rp-technique').inputValue();
      rec.findings = await dr.locator('#rp-findings').inputValue();
      await dr.context().close();
    });
  } catch (e) {
    out.error = String(e && e.stack || e).slice(0, 1500);
  } finally {
    await browser.close().catch(() => {});
  }
  process.stdout.write(JSON.stringify(out) + '\n');
})().catch(e => {
  process.stdout.write(JSON.stringify({ error: String(e).slice(0, 1000) }) + '\n');
  process.exit(2);
});
