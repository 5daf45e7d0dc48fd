// The sign-in page with the second factor, in Debian's headless chromium (playwright-core):
//   node auth_ui.js SPEC.json
// SPEC: {base, playwright, chromium, userDataDir, user, password, secret (base32), family, frameUrl}
// Opens the viewer, is sent to /app/login, signs in with the password, then the TOTP step (the
// code computed here, RFC 6238), comes back to the OHIF study list and waits for the patient;
// fetches a frame with the session cookie; logs out; fetches again.
// Prints one JSON object: {redirected, mfaAsked, back, listed, frameBefore, logout, frameAfter}.
'use strict';
const fs = require('fs');
const { totp } = require('./totp');

const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = require(spec.playwright);
const T = 60000;

(async () => {
  const out = {};
  const ctx = await chromium.launchPersistentContext(spec.userDataDir, {
    executablePath: spec.chromium, headless: true, ignoreHTTPSErrors: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run'], timeout: T,
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  page.setDefaultTimeout(T);
  try {
    await page.goto(spec.base + '/', { waitUntil: 'domcontentloaded' });
    out.redirected = page.url().includes('/app/login');
    await page.fill('#username', spec.user);
    await page.fill('#password', spec.password);
    await page.click('#submit');
    await page.waitForSelector('#mfa:not(.hidden)', { timeout: T });
    out.mfaAsked = true;
    // a code well inside its 30-second step
    let now = Date.now() / 1000;
    if (now % 30 > 24) { await page.waitForTimeout((31 - (now % 30)) * 1000); now = Date.now() / 1000; }
    await page.fill('#totp', totp(spec.secret, now));
    await Promise.all([
      page.waitForURL(u => !String(u).includes('/app/login'), { timeout: T }),
      page.click('#submit'),
    ]);
    out.back = page.url();
    await page.waitForFunction(f => document.body.innerText.includes(f), spec.family, { timeout: T });
    out.listed = true;
    const fetchStatus = url => page.evaluate(async u => (await fetch(u, {
      credentials: 'same-origin',
      headers: { Accept: 'multipart/related; type="application/octet-stream"; transfer-syntax=*' },
    })).status, url);
    out.frameBefore = await fetchStatus(spec.frameUrl);
    out.logout = await page.evaluate(async () => {
      const m = document.cookie.match(/(?:^|;\s*)__Host-kp_csrf=([^;]+)/);
      const r = await fetch('/api/auth/logout', { method: 'POST', credentials: 'same-origin',
        headers: { 'X-CSRF-Token': m ? m[1] : '' } });
      return r.status;
    });
    out.frameAfter = await fetchStatus(spec.frameUrl);
  } catch (e) {
    out.error = String(e).slice(0, 800);
  } finally {
    await ctx.close().catch(() => {});
  }
  process.stdout.write(JSON.stringify(out) + '\n');
})();
