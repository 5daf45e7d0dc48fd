// Drives the OHIF viewer served by pacs-gateway in Debian's headless chromium (playwright-core,
// no downloaded browser). Called by test_ui_ohif.py:
//   node ohif_ui.js SPEC.json
// SPEC: {base, playwright, chromium, userDataDir, shots, studies: [{uid, patientId, family}]}
// Prints one JSON object: {list: {...}, viewers: [...], failed: [{url, status}], console: [...]}.
'use strict';
const fs = require('fs');
const path = require('path');

const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = require(spec.playwright);
const PAGE_TIMEOUT = 60000;

async function canvasStats(page) {
  // The viewport canvas copied onto a scratch 2D canvas: luminance mean/stddev and how many
  // distinct grey levels, to tell an image from a blank (black or uniform) viewport.
  return page.evaluate(() => {
    const cs = Array.from(document.querySelectorAll('canvas.cornerstone-canvas, .viewport-element canvas'));
    const best = { found: cs.length, w: 0, h: 0, mean: 0, sd: 0, levels: 0 };
    for (const c of cs) {
      if (!c.width || !c.height) continue;
      const t = document.createElement('canvas');
      t.width = c.width;
      t.height = c.height;
      const g = t.getContext('2d');
      g.drawImage(c, 0, 0);
      const d = g.getImageData(0, 0, t.width, t.height).data;
      let n = 0, s = 0, s2 = 0;
      const seen = new Set();
      for (let i = 0; i < d.length; i += 4) {
        const y = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2];
        s += y; s2 += y * y; n++;
        seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
      }
      const mean = s / n, sd = Math.sqrt(Math.max(0, s2 / n - mean * mean));
      if (sd > best.sd) Object.assign(best, { w: t.width, h: t.height, mean, sd, levels: seen.size });
    }
    return best;
  });
}

(async () => {
  const out = { list: {}, viewers: [], failed: [], console: [], thumbnails: 0 };
  const ctx = await chromium.launchPersistentContext(spec.userDataDir, {
    executablePath: spec.chromium,
    headless: true,
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: PAGE_TIMEOUT,
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  page.setDefaultTimeout(PAGE_TIMEOUT);
  page.on('response', r => {
    if (r.url().startsWith(spec.base) && r.status() >= 400)
      out.failed.push({ url: r.url(), status: r.status() });
    // server-side thumbnails (thumbnailRendering: 'thumbnail'): JPEGs from .../thumbnail
    if (r.url().startsWith(spec.base) && r.url().includes('/thumbnail') && r.status() === 200 &&
        (r.headers()['content-type'] || '').startsWith('image/'))
      out.thumbnails++;
  });
  page.on('requestfailed', r => {
    if (r.url().startsWith(spec.base))
      out.failed.push({ url: r.url(), status: 0, error: (r.failure() || {}).errorText });
  });
  page.on('console', m => {
    if (m.type() === 'error') out.console.push(m.text().slice(0, 300));
  });
  page.on('pageerror', e => out.console.push('pageerror: ' + String(e).slice(0, 300)));
  try {
    // 0. without a session the viewer sends the browser to the sign-in page, which brings it
    //    back after login (the session then lives in HttpOnly cookies)
    await page.goto(spec.base + '/', { waitUntil: 'domcontentloaded', timeout: PAGE_TIMEOUT });
    out.login = { redirected: page.url().includes('/app/login') };
    await page.fill('#username', spec.user);
    await page.fill('#password', spec.password);
    await Promise.all([
      page.waitForURL(u => !String(u).includes('/app/login'), { timeout: PAGE_TIMEOUT }),
      page.click('#submit'),
    ]);
    out.login.back = page.url();
    // 1. the study list shows every patient
    const t0 = Date.now();
    // The worklist shows names ("Family, Given") but, at this width, no MRN column: count the
    // rows per family name (two CompressedSamples patients) and wait for all of them.
    const want = {};
    for (const s of spec.studies) want[s.family] = (want[s.family] || 0) + 1;
    const count = want => {
      const t = document.body.innerText;
      const got = {};
      for (const f of Object.keys(want)) got[f] = t.split(f).length - 1;
      return got;
    };
    try {
      await page.waitForFunction(([want, src]) => {
        const got = (0, eval)(src)(want);
        return Object.keys(want).every(f => got[f] >= want[f]);
      }, [want, count.toString()], { timeout: PAGE_TIMEOUT, polling: 250 });
    } catch (e) { /* reported below */ }
    const got = await page.evaluate(([want, src]) => (0, eval)(src)(want), [want, count.toString()]);
    out.list = { ms: Date.now() - t0, want, got,
      ok: Object.keys(want).every(f => got[f] >= want[f]) };
    await page.screenshot({ path: path.join(spec.shots, 'ohif-study-list.png') });

    // 2. each study in the viewer: the viewport canvas gets a non-blank image
    for (const s of spec.studies) {
      const t1 = Date.now();
      const v = { uid: s.uid, patientId: s.patientId, stats: null, error: null };
      try {
        await page.goto(spec.base + '/viewer?StudyInstanceUIDs=' + s.uid,
          { waitUntil: 'domcontentloaded', timeout: PAGE_TIMEOUT });
        const deadline = Date.now() + PAGE_TIMEOUT;
        let st = null;
        while (Date.now() < deadline) {
          st = await canvasStats(page).catch(e => ({ error: String(e) }));
          if (st && st.sd > 2 && st.levels > 8) break;
          await page.waitForTimeout(500);
        }
        await page.waitForTimeout(500);
        v.stats = await canvasStats(page).catch(() => st);
      } catch (e) {
        v.error = String(e).slice(0, 500);
      }
      v.ms = Date.now() - t1;
      const shot = path.join(spec.shots, 'ohif-viewer-' + s.patientId + '.png');
      await page.screenshot({ path: shot }).catch(() => {});
      v.screenshot = shot;
      out.viewers.push(v);
    }
  } catch (e) {
    out.error = String(e).slice(0, 1000);
  } finally {
    await ctx.close().catch(() => {});
  }
  process.stdout.write(JSON.stringify(out) + '\n');
})().catch(e => {
  process.stdout.write(JSON.stringify({ error: String(e).slice(0, 1000) }) + '\n');
  process.exit(2);
});
