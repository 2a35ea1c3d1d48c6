// Drive OHIF 3.13.2 in Debian's headless Chromium with playwright-core (it downloads no browser),
// as a radiologist would: open the study, open the SR and track its measurements, open the SEG
// and load it onto the CT. Prints ONE JSON object (the last stdout line) with what OHIF shows,
// read from window.services (set by OHIF's cornerstone extension); saves screenshots in --out.
//
//   node drive.mjs --base http://127.0.0.1:PORT --study <StudyInstanceUID> --out DIR
//                  [--steps sr,seg] [--size 1280x800] [--chromium /usr/bin/chromium]
//                  [--orthanc URL --orthanc-instance ID]
//
// With --orthanc-instance, also Orthanc Explorer's page of that instance (Orthanc's id) with
// its preview open, as the PACS shows the image: orthanc-instance.png.
//
// JSON: displaySets (after opening), thumbnailWarnings (each warning triangle in the study
// browser: its series, OHIF's message ids and the tooltip's text), sr (how the SR opened: its
// outcome, the image it opened on, the image shown after tracking), viewport (the active one at
// the end: image, segmentation representations), measurements (measurementService),
// segmentations (segmentationService, with the CT images their labelmap marks), appErrors
// (page errors, console.error, the "Error Boundary" messages OHIF logs with console.debug,
// error toasts), toasts, externalRequests (any request not to 127.0.0.1: blocked, and listed),
// consoleWarnings, httpErrors, failedRequests, screenshots, steps (timings), error (why the
// drive stopped, when it did).
// Exit status 0 when every step ran, 1 otherwise (the JSON is printed either way).
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';

const { values: opt } = parseArgs({ options: {
  base: { type: 'string' }, study: { type: 'string' }, out: { type: 'string' },
  steps: { type: 'string', default: 'sr,seg' }, size: { type: 'string', default: '1280x800' },
  chromium: { type: 'string', default: '/usr/bin/chromium' },
  orthanc: { type: 'string' }, 'orthanc-instance': { type: 'string' },
  'step-timeout': { type: 'string', default: '60000' },
} });
if (!opt.base || !opt.study || !opt.out) {
  process.stderr.write('usage: node drive.mjs --base URL --study UID --out DIR [--steps sr,seg]\n');
  process.exit(2);
}
const T = Number(opt['step-timeout']);
const [width, height] = opt.size.split('x').map(Number);
fs.mkdirSync(opt.out, { recursive: true });
const t0 = Date.now();
const secs = () => +((Date.now() - t0) / 1000).toFixed(1);
const log = (...a) => process.stderr.write(a.join(' ') + '\n');

const result = { study: opt.study, browserVersion: null, steps: [], displaySets: [],
  thumbnailWarnings: [], sr: null, measurements: [], segmentations: [], appErrors: [],
  toasts: [], externalRequests: [], httpErrors: [], failedRequests: [], screenshots: [],
  viewport: null, error: null };
const consoleLines = [];
const step = (name, extra = {}) => {
  const s = { name, t: secs(), ...extra };
  result.steps.push(s);
  log('STEP', JSON.stringify(s));
};

const args = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-default-apps', '--disable-extensions', '--no-default-browser-check',
  // No host name resolves but loopback: nothing leaves the machine, even from the browser
  // process itself (Playwright sees only the pages' and workers' requests).
  '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1'];
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'lungsys-chromium-'));
const ctx = await chromium.launchPersistentContext(profile, {
  executablePath: opt.chromium, headless: true, args, viewport: { width, height },
  deviceScaleFactor: 1,
});
result.browserVersion = ctx.browser()?.version() ?? null;
const page = ctx.pages()[0] || await ctx.newPage();

const isLocal = (u) => /^(https?|wss?):\/\/127\.0\.0\.1(:\d+)?\//.test(u) ||
  /^(data|blob|about|chrome-extension|devtools):/.test(u);
page.on('console', (m) => consoleLines.push({ t: secs(), type: m.type(), text: m.text().slice(0, 3000) }));
page.on('pageerror', (e) => result.appErrors.push({ t: secs(), kind: 'pageerror',
  text: String(e.stack || e.message).slice(0, 2000) }));
ctx.on('request', (r) => { if (!isLocal(r.url())) result.externalRequests.push({ t: secs(), url: r.url() }); });
ctx.on('requestfailed', (r) => result.failedRequests.push({ t: secs(), url: r.url(), failure: r.failure()?.errorText }));
ctx.on('response', (r) => { if (r.status() >= 400) result.httpErrors.push({ t: secs(), url: r.url(), status: r.status() }); });
await ctx.route((u) => !isLocal(u.toString()), (route) => route.abort('blockedbyclient'));
await ctx.addInitScript(() => {
  // the first-run tour would cover the viewport
  localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
  // every toast OHIF shows (sonner), even those gone by the time anyone looks
  window.__toasts = [];
  const seen = new WeakSet();
  const record = () => document.querySelectorAll('[data-sonner-toast]').forEach((el) => {
    const text = el.innerText.trim();
    if (!text || seen.has(el)) return;
    seen.add(el);
    window.__toasts.push({ type: el.getAttribute('data-type') || null, text: text.slice(0, 1000) });
  });
  new MutationObserver(record).observe(document, { childList: true, subtree: true, characterData: true });
});

async function shot(name) {
  const p = path.join(opt.out, name);
  await page.screenshot({ path: p });
  result.screenshots.push(p);
}

// ---- OHIF state, read in the page (plain data) --------------------------------------------
const sopOf = (imageId) => (/\/instances\/([^/]+)/.exec(imageId || '') || [])[1] ?? null;
async function state() {
  const s = await page.evaluate(() => {
    const sv = window.services;
    const grid = sv.viewportGridService.getState();
    const vpId = grid.activeViewportId;
    const vp = sv.cornerstoneViewportService.getCornerstoneViewport(vpId);
    let currentImageId = null, imageIndex = null, images = null;
    try {
      currentImageId = vp?.getCurrentImageId?.() ?? null;
      imageIndex = vp?.getCurrentImageIdIndex?.() ?? null;
      images = vp?.getImageIds?.().length ?? null;
    } catch (e) { /* a volume viewport */ }
    const gridVp = grid.viewports.get(vpId);
    const displaySets = sv.displaySetService.getActiveDisplaySets().map((d) => ({
      displaySetInstanceUID: d.displaySetInstanceUID, Modality: d.Modality,
      SeriesDescription: d.SeriesDescription ?? null, SeriesInstanceUID: d.SeriesInstanceUID ?? null,
      SOPClassHandlerId: d.SOPClassHandlerId, SOPClassUID: d.SOPClassUID ?? d.instance?.SOPClassUID ?? null,
      images: d.numImageFrames ?? d.images?.length ?? d.instances?.length ?? null,
      unsupported: !!d.unsupported, isLoaded: d.isLoaded ?? null, isHydrated: d.isHydrated ?? null,
      isRehydratable: d.isRehydratable ?? null, excludeFromThumbnailBrowser: !!d.excludeFromThumbnailBrowser,
      messages: (d.messages?.messages || []).map((m) => m.id),
      srMeasurements: Array.isArray(d.measurements) ? d.measurements.map((m) => ({
        TrackingIdentifier: m.TrackingIdentifier ?? null, loaded: !!m.loaded,
        ReferencedSOPInstanceUID: m.ReferencedSOPInstanceUID ?? null })) : undefined }));
    const measurements = sv.measurementService.getMeasurements().map((m) => ({
      toolName: m.toolName, label: m.label ?? null, SOPInstanceUID: m.SOPInstanceUID ?? null,
      referencedImageId: m.referencedImageId ?? m.metadata?.referencedImageId ?? null,
      referenceSeriesUID: m.referenceSeriesUID ?? null,
      displayText: m.displayText ?? null }));
    const segmentations = sv.segmentationService.getSegmentations().map((g) => {
      // the CT images its labelmap marks: the labelmap images with a non-zero pixel
      const cache = window.cornerstone.cache;
      const labelled = [];
      for (const id of g.representationData?.Labelmap?.imageIds || []) {
        const image = cache.getImage(id);
        if (!image) continue;
        const px = image.getPixelData();
        let n = 0;
        for (let i = 0; i < px.length; i++) if (px[i]) n++;
        if (n) labelled.push({ referencedImageId: image.referencedImageId, pixels: n });
      }
      return { segmentationId: g.segmentationId, label: g.label ?? null,
        segments: Object.values(g.segments || {}).filter(Boolean)
          .map((x) => ({ segmentIndex: x.segmentIndex, label: x.label })),
        representations: Object.keys(g.representationData || {}), labelled };
    });
    const ctIds = vp?.getImageIds?.() || [];
    return {
      viewport: { viewportId: vpId, displaySetInstanceUIDs: gridVp?.displaySetInstanceUIDs ?? [],
        type: vp?.type ?? null, currentImageId, imageIndex, images,
        segmentations: (sv.segmentationService.getSegmentationRepresentations?.(vpId) || [])
          .map((r) => ({ segmentationId: r.segmentationId, type: r.type, visible: r.visible })) },
      displaySets, measurements,
      segmentations: segmentations.map((g) => ({ ...g, labelled: g.labelled.map((x) => ({
        ...x, index: ctIds.indexOf(x.referencedImageId) })) })),
      toasts: window.__toasts || [] };
  });
  s.viewport.sopInstanceUID = sopOf(s.viewport.currentImageId);
  for (const m of s.measurements) m.SOPInstanceUID = m.SOPInstanceUID || sopOf(m.referencedImageId);
  for (const g of s.segmentations) {
    g.labelled = g.labelled.map((x) => ({ index: x.index, sopInstanceUID: sopOf(x.referencedImageId), pixels: x.pixels }));
  }
  return s;
}

// the active viewport shows a decoded image, and has painted it
async function waitRendered(label) {
  await page.waitForFunction(() => {
    const sv = window.services;
    if (!sv) return false;
    const vp = sv.cornerstoneViewportService.getCornerstoneViewport(sv.viewportGridService.getActiveViewportId());
    if (!vp) return false;
    const imageId = vp.getCurrentImageId?.();
    if (imageId) return !!window.cornerstone.cache.getImage(imageId);
    return !!vp.getImageData?.();
  }, null, { timeout: T, polling: 200 });
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  await page.waitForTimeout(400);
  step(`rendered ${label}`);
}

// Toasts (e.g. OHIF's SEG import warning) cover the viewport: let them go before a picture
// (each is kept in window.__toasts, and reported).
async function toastsGone() {
  await page.waitForFunction(() => !document.querySelector('[data-sonner-toast]'), null,
    { timeout: 15000, polling: 250 }).catch(() => step('a toast stayed up'));
}

async function openPanel(dataCy) {
  const button = page.locator(`[data-cy="${dataCy}"]`);
  if (await button.count()) {
    await button.first().click();
    await page.waitForTimeout(700);
    step(`opened panel ${dataCy}`);
  } else {
    step(`no panel button ${dataCy}`);
  }
}

// Hover each series' warning icon in the study browser: what OHIF says (e.g. an unsupported
// SOP Class), as the user reads it.
async function thumbnailWarnings(displaySets) {
  const warnings = [];
  for (const d of displaySets) {
    const icon = page.locator(`#display-set-tooltip-${d.displaySetInstanceUID}`);
    if (!(await icon.count())) continue;
    for (let i = 0; i < 3; i++) {
      await icon.first().scrollIntoViewIfNeeded().catch(() => {});
      await icon.first().hover().catch(() => {});
      const shown = await page.locator('[role="tooltip"], [data-radix-popper-content-wrapper]').first()
        .waitFor({ timeout: 3000 }).then(() => true).catch(() => false);
      if (shown) break;
      await page.mouse.move(width / 2, height / 2);
    }
    // (radix renders the text twice in its popper: shown, and a copy for screen readers)
    const tooltip = await page.evaluate(() => {
      const el = document.querySelector('[role="tooltip"]') ||
        document.querySelector('[data-radix-popper-content-wrapper]');
      return el ? el.innerText.trim() : null;
    });
    await page.mouse.move(width / 2, height / 2);
    await page.waitForTimeout(300);
    warnings.push({ Modality: d.Modality, SeriesDescription: d.SeriesDescription, SOPClassUID: d.SOPClassUID,
      SOPClassHandlerId: d.SOPClassHandlerId, unsupported: d.unsupported, messages: d.messages, tooltip });
  }
  return warnings;
}

async function openSR(ds) {
  const sr = { outcome: null, openedOnSOPInstanceUID: null, afterTrackingSOPInstanceUID: null };
  result.sr = sr;
  await page.dblclick(`#thumbnail-${ds.displaySetInstanceUID}`);
  step('dblclick SR thumbnail');
  // the SR viewport (its measurements on the first one's image), then OHIF's "track?" prompt;
  // or an error boundary
  let outcome = await page.waitForFunction(() => {
    const sv = window.services;
    const toasts = (window.__toasts || []).map((x) => x.text).join('\n');
    if (/went wrong/i.test(toasts)) return 'error';
    if (document.querySelector('[data-cy="yes-hydrate-btn"]')) return 'prompt';
    const vp = sv.cornerstoneViewportService.getCornerstoneViewport(sv.viewportGridService.getActiveViewportId());
    const id = vp?.getCurrentImageId?.();
    return id && window.cornerstone.cache.getImage(id) ? 'rendered' : false;
  }, null, { timeout: T, polling: 200 }).then((h) => h.jsonValue()).catch(() => 'timeout');
  if (outcome === 'rendered') {
    outcome = await page.locator('[data-cy="yes-hydrate-btn"]').waitFor({ timeout: 5000 })
      .then(() => 'prompt').catch(() => 'rendered');
  }
  sr.outcome = outcome;
  step('SR opened', { outcome });
  if (outcome === 'prompt' || outcome === 'rendered') {
    await waitRendered('SR viewport');
    sr.openedOnSOPInstanceUID = (await state()).viewport.sopInstanceUID;
    await shot('sr-viewport.png');
  }
  if (outcome !== 'prompt') return;
  await page.locator('[data-cy="yes-hydrate-btn"]').click();
  step('clicked Yes (track the SR measurements)');
  await page.waitForFunction(() => window.services.measurementService.getMeasurements().length > 0,
    null, { timeout: T, polling: 200 });
  await page.waitForTimeout(800);
  await waitRendered('SR hydrated');
  sr.afterTrackingSOPInstanceUID = (await state()).viewport.sopInstanceUID;
  await openPanel('trackedMeasurements-btn');
  await page.mouse.move(140, height - 20);   // off the toolbar: no tooltip in the picture
  await toastsGone();
  await page.waitForTimeout(300);
  await shot('sr-boxes.png');
}

async function openSEG(ds) {
  await page.dblclick(`#thumbnail-${ds.displaySetInstanceUID}`);
  step('dblclick SEG thumbnail');
  // OHIF 3.13: a SEG viewport (preview on the CT) asking "Do you want to open this Segmentation?"
  const yes = page.locator('[data-cy="yes-hydrate-btn"]');
  await yes.waitFor({ timeout: T });
  await waitRendered('SEG preview');
  await yes.click();
  step('clicked Yes (load the SEG onto the CT)');
  // the display set's isHydrated stays false in 3.13.2: what changes is the viewport, back on
  // the referenced CT with the SEG as a labelmap representation
  await page.waitForFunction((segUid) => {
    const sv = window.services;
    const d = sv.displaySetService.getDisplaySetByUID(segUid);
    const vpId = sv.viewportGridService.getActiveViewportId();
    const vp = sv.viewportGridService.getState().viewports.get(vpId);
    return vp?.displaySetInstanceUIDs?.includes(d.referencedDisplaySetInstanceUID) &&
      (sv.segmentationService.getSegmentationRepresentations(vpId) || []).some((r) => r.segmentationId === segUid);
  }, ds.displaySetInstanceUID, { timeout: T, polling: 200 });
  await waitRendered('CT + SEG');
  // to the slice with the most labelled pixels, so that the overlay is in the picture
  await page.evaluate((segUid) => {
    const sv = window.services;
    const vp = sv.cornerstoneViewportService.getCornerstoneViewport(sv.viewportGridService.getActiveViewportId());
    const ids = vp.getImageIds();
    const seg = sv.segmentationService.getSegmentation(segUid);
    let best = null;
    for (const id of seg.representationData?.Labelmap?.imageIds || []) {
      const image = window.cornerstone.cache.getImage(id);
      if (!image) continue;
      const px = image.getPixelData();
      let n = 0;
      for (let i = 0; i < px.length; i++) if (px[i]) n++;
      if (n && (!best || n > best.n)) best = { n, index: ids.indexOf(image.referencedImageId) };
    }
    if (best && best.index >= 0) vp.setImageIdIndex(best.index);
  }, ds.displaySetInstanceUID);
  await page.waitForTimeout(500);
  await waitRendered('CT + SEG, most labelled slice');
  await openPanel('panelSegmentation-btn');
  await page.mouse.move(140, height - 20);   // off the toolbar: no tooltip in the picture
  await toastsGone();
  await page.waitForTimeout(300);
  await shot('seg-overlay.png');
}

// Orthanc Explorer (the PACS' own web page): the instance's page, its preview opened.
async function orthancPreview(orthanc, id) {
  const explorer = await ctx.newPage();
  try {
    await explorer.goto(`${orthanc}/app/explorer.html#instance?uuid=${id}`, { waitUntil: 'load', timeout: T });
    await explorer.locator('#instance-preview').waitFor({ state: 'attached', timeout: T });
    await explorer.waitForTimeout(800);
    // a click from script: the page stays at its top (a pointer click scrolls to the link)
    await explorer.evaluate(() => { window.scrollTo(0, 0); document.querySelector('#instance-preview').click(); });
    await explorer.waitForFunction(() => {
      const img = document.querySelector('#lbImage');
      const bg = img && getComputedStyle(img).backgroundImage;
      return img && img.offsetWidth > 0 && bg && bg !== 'none';
    }, null, { timeout: T, polling: 200 });
    await explorer.waitForTimeout(1200);   // the lightbox's opening animation
    const p = path.join(opt.out, 'orthanc-instance.png');
    await explorer.screenshot({ path: p });
    result.screenshots.push(p);
    step('Orthanc Explorer preview');
  } finally {
    await explorer.close();
  }
}

let exit = 0;
try {
  const url = `${opt.base}/viewer?StudyInstanceUIDs=${encodeURIComponent(opt.study)}`;
  await page.goto(url, { waitUntil: 'load', timeout: T });
  await page.waitForFunction(() => window.services?.displaySetService?.getActiveDisplaySets().length > 0,
    null, { timeout: T });
  step('study open');
  await waitRendered('first series');
  // thumbnails come as series metadata arrive: wait until the list stops growing
  let count = -1;
  for (let i = 0; i < 20; i++) {
    const n = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets().length);
    if (n === count) break;
    count = n;
    await page.waitForTimeout(500);
  }
  await shot('study.png');
  const opened = await state();
  result.displaySets = opened.displaySets;
  result.thumbnailWarnings = await thumbnailWarnings(opened.displaySets);
  for (const name of opt.steps.split(',').filter(Boolean)) {
    const modality = { sr: 'SR', seg: 'SEG' }[name];
    if (!modality) throw new Error(`unknown step ${name}`);
    const ds = opened.displaySets.find((d) => d.Modality === modality && !d.excludeFromThumbnailBrowser);
    if (!ds) { step(`no ${modality} series`); continue; }
    await (name === 'sr' ? openSR(ds) : openSEG(ds));
  }
  if (opt['orthanc-instance']) await orthancPreview(opt.orthanc, opt['orthanc-instance']);
} catch (e) {
  exit = 1;
  result.error = String(e.stack || e).slice(0, 3000);
  await shot('failure.png').catch(() => {});
} finally {
  try {
    const final = await state();
    result.viewport = final.viewport;
    result.measurements = final.measurements;
    result.segmentations = final.segmentations;
    result.toasts = final.toasts;
  } catch (e) {
    result.error = result.error || `no state: ${e}`;
  }
  // OHIF reports a route crash with console.debug ("Route viewer Error Boundary ...") and a
  // toast, not with console.error or a page error: collect all of them.
  result.appErrors.push(
    ...consoleLines.filter((c) => c.type === 'error' || /Error Boundary|Uncaught/.test(c.text))
      .map((c) => ({ t: c.t, kind: `console.${c.type}`, text: c.text })),
    ...result.toasts.filter((x) => x.type === 'error' || /went wrong/i.test(x.text))
      .map((x) => ({ t: null, kind: 'toast', text: x.text })));
  result.consoleWarnings = consoleLines.filter((c) => c.type === 'warning').slice(0, 50);
  result.elapsed_s = secs();
  await ctx.close().catch(() => {});
  fs.rmSync(profile, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(result) + '\n');
process.exit(exit);
