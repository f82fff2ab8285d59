// Opens one study in OHIF (served by tests/viewer.py) in headless Chromium, does the steps the
// request asks for, and prints one JSON object on stdout (log lines go to stderr).
//
// Request (JSON on stdin):
//   { chromium, url, outDir, name, expectSeries, timeoutMs,
//     steps: [ {kind: "seg" | "sr" | "open", series: SeriesInstanceUID, name} ] }
// Result:
//   { displaySets: [...], thumbnails: [...], screenshots: [...], steps: [...],
//     pageErrors: [...], consoleErrors: [...] }
//
// "seg": double-clicks the SEG's thumbnail as a user would, accepts "open this Segmentation?",
//   then reads the labelmap OHIF decoded and renders (cornerstone3D's per-image labelmaps of the
//   segmentation in cornerstoneTools' segmentation state) as per-slice runs, keyed by the SOP
//   Instance UID of the CT image each labelmap image belongs to.
// "sr": double-clicks the SR's thumbnail (OHIF's SR viewport) and reports the SR annotations
//   (cornerstoneTools annotation state, tool DICOMSRDisplay), what the viewport's SVG layer drew,
//   and whether OHIF shows its error page.
// "open": double-clicks any series' thumbnail and takes a screenshot.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';

const request = JSON.parse(fs.readFileSync(0, 'utf8'));
const timeoutMs = request.timeoutMs ?? 60000;
const log = (...args) => console.error(`[probe ${((Date.now() - started) / 1000).toFixed(1)} s]`, ...args);
const started = Date.now();

const result = { displaySets: [], thumbnails: [], screenshots: [], steps: [], pageErrors: [], consoleErrors: [] };
let currentStep = 'open study';

const browser = await chromium.launch({
  executablePath: request.chromium,
  headless: true,
  // As root and without a GPU; no background traffic (the machine has no network).
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--no-first-run', '--disable-quic', '--disable-features=Translate,OptimizationHints'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(timeoutMs);
  // OHIF's first-visit tour would cover the viewport.
  // (Init scripts run in every frame; the PDF's has no storage.)
  await page.addInitScript(() => {
    try { window.localStorage?.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch { /* no storage */ }
  });
  page.on('pageerror', error => {
    result.pageErrors.push({ step: currentStep, message: String(error.message), stack: String(error.stack || '').slice(0, 2000) });
    log('page error:', error.message);
  });
  page.on('console', message => {
    if (message.type() === 'error') {
      result.consoleErrors.push({ step: currentStep, text: message.text().slice(0, 2000) });
    }
  });

  const shot = async name => {
    const file = path.join(request.outDir, `${request.name}-${name}.png`);
    await page.screenshot({ path: file });
    result.screenshots.push(file);
    return file;
  };

  await page.goto(request.url);
  // The study browser lists one thumbnail per display set; wait for all series to be there.
  await page.waitForFunction(n => {
    const services = window.services;
    if (!services?.displaySetService) return false;
    const thumbnails = document.querySelectorAll('[data-cy^="study-browser-thumbnail"]');
    return services.displaySetService.getActiveDisplaySets().length >= n && thumbnails.length >= n;
  }, request.expectSeries ?? 1);
  await waitForViewportImage(page);
  log('study open');
  result.displaySets = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets().map(d => ({
    displaySetInstanceUID: d.displaySetInstanceUID,
    Modality: d.Modality,
    SOPClassUID: d.SOPClassUID,
    SeriesInstanceUID: d.SeriesInstanceUID,
    SeriesDescription: d.SeriesDescription,
    SOPClassHandlerId: d.SOPClassHandlerId,
    numInstances: d.instances?.length ?? 0,
    unsupported: Boolean(d.unsupported),
  })));
  result.thumbnails = await page.evaluate(() => [...document.querySelectorAll('[data-cy^="study-browser-thumbnail"]')].map(e => ({
    id: e.id, kind: e.getAttribute('data-cy'), series: e.getAttribute('data-series'), text: e.innerText,
  })));
  await shot('study');

  for (const step of request.steps ?? []) {
    currentStep = `${step.kind} ${step.name}`;
    const outcome = { kind: step.kind, name: step.name, series: step.series };
    result.steps.push(outcome);
    try {
      const displaySet = result.displaySets.find(d => d.SeriesInstanceUID === step.series);
      if (!displaySet) throw new Error(`OHIF lists no display set for series ${step.series}`);
      await page.dblclick(`[id="thumbnail-${displaySet.displaySetInstanceUID}"]`);
      if (step.kind === 'seg') {
        Object.assign(outcome, await segStep(page, displaySet.displaySetInstanceUID));
        await shot(`${step.name}-largest-slice`);
        if (outcome.nextSliceIndex !== null) {
          await showSlice(page, outcome.nextSliceIndex);
          await shot(`${step.name}-next-slice`);
        }
      } else if (step.kind === 'sr') {
        Object.assign(outcome, await srStep(page, displaySet.displaySetInstanceUID));
        await shot(step.name);
      } else {
        await page.waitForTimeout(2500);
        outcome.viewportDisplaySets = await viewportDisplaySets(page);
        outcome.errorPage = await errorPageShown(page);
        await shot(step.name);
      }
    } catch (error) {
      outcome.error = String(error?.stack || error);
      log(`step ${currentStep} failed:`, error?.message);
      await shot(`${step.name}-failed`).catch(() => {});
    }
    log(`step ${currentStep} done`);
  }
} finally {
  await browser.close();
}
result.seconds = (Date.now() - started) / 1000;
process.stdout.write(JSON.stringify(result) + '\n');

async function waitForViewportImage(page) {
  await page.waitForFunction(() => {
    const engine = window.cornerstone?.getRenderingEngines?.()[0];
    const viewport = engine?.getViewports?.()[0];
    return Boolean(viewport?.getCurrentImageId?.()) && Boolean(viewport.getImageData?.());
  });
}

async function viewportDisplaySets(page) {
  return page.evaluate(() => [...window.services.viewportGridService.getState().viewports.values()]
    .map(v => v.displaySetInstanceUIDs));
}

async function errorPageShown(page) {
  return page.evaluate(() => document.body.innerText.includes('Something went wrong'));
}

// OHIF catches a viewport's exception and says "Something went wrong" with a "Show Details"
// button: the details are the exception, which reaches neither pageerror nor the console.
async function errorDetails(page) {
  if (!(await errorPageShown(page))) return null;
  const toast = await page.evaluate(() => {
    const text = document.body.innerText;
    const at = text.indexOf('Something went wrong');
    return text.slice(at, at + 300);
  });
  const button = page.getByRole('button', { name: 'Show Details' }).first();
  if (!(await button.isVisible().catch(() => false))) return toast;
  await button.click().catch(() => {});
  const dialog = page.getByRole('dialog').first();
  const details = await dialog.innerText({ timeout: 3000 }).catch(() => null);
  return details ? details.slice(0, 3000) : toast;
}

async function segStep(page, segDisplaySetUID) {
  // OHIF overlays the SEG on its CT and asks whether to load it as an editable segmentation.
  const yes = page.getByRole('button', { name: 'Yes', exact: true });
  try {
    await yes.waitFor({ state: 'visible', timeout: 15000 });
    await yes.click();
  } catch (error) {
    log('no "open this Segmentation?" prompt:', error.message);
  }
  await page.waitForFunction(uid => {
    const displaySet = window.services.displaySetService.getDisplaySetByUID(uid);
    const segmentations = window.services.segmentationService.getSegmentations();
    return displaySet?.isLoaded && segmentations.length > 0;
  }, segDisplaySetUID);
  await page.waitForTimeout(1000);
  const decoded = await page.evaluate(uid => {
    const cs = window.cornerstone;
    const tools = window.cornerstoneTools;
    const segmentations = window.services.segmentationService.getSegmentations();
    const segmentation = segmentations.find(s => s.segmentationId === uid) ?? segmentations[0];
    const state = tools.segmentation.state.getSegmentation(segmentation.segmentationId);
    const labelmap = state.representationData.Labelmap;
    const sopOf = imageId => cs.metaData.get('instance', imageId)?.SOPInstanceUID
      ?? /\/instances\/([^/]+)/.exec(imageId)?.[1];
    const slices = {};
    for (const imageId of labelmap.imageIds) {
      const image = cs.cache.getImage(imageId);
      if (!image) { slices[`missing:${imageId}`] = null; continue; }
      const pixels = image.voxelManager?.getScalarData?.() ?? image.getPixelData();
      // Runs of equal non-zero labels in row-major order: [start, length, label, ...].
      const runs = [];
      for (let i = 0; i < pixels.length;) {
        const value = pixels[i];
        let j = i + 1;
        while (j < pixels.length && pixels[j] === value) j++;
        if (value !== 0) runs.push(i, j - i, value);
        i = j;
      }
      slices[sopOf(image.referencedImageId)] = { rows: image.rows, columns: image.columns, runs };
    }
    const segments = Object.values(state.segments ?? {}).map(s => ({ index: s.segmentIndex, label: s.label }));
    return { segmentationId: segmentation.segmentationId, label: segmentation.label, segments, slices };
  }, segDisplaySetUID);
  // Show the CT slice with the most labelled pixels (and say which one follows it).
  const counts = Object.entries(decoded.slices).map(([sop, s]) => [sop, s ? s.runs.filter((_, k) => k % 3 === 1).reduce((a, b) => a + b, 0) : 0]);
  counts.sort((a, b) => b[1] - a[1]);
  const largest = counts[0]?.[1] > 0 ? counts[0][0] : null;
  let sliceIndex = null;
  let nextSliceIndex = null;
  if (largest) {
    const indices = await page.evaluate(sop => {
      const viewport = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
      const ids = viewport.getImageIds();
      const index = ids.findIndex(id => id.includes(`/instances/${sop}/`));
      return { index, count: ids.length };
    }, largest);
    sliceIndex = indices.index;
    nextSliceIndex = indices.index >= 0 ? (indices.index + 1 < indices.count ? indices.index + 1 : indices.index - 1) : null;
    await showSlice(page, sliceIndex);
  }
  return { ...decoded, largestSlice: largest, sliceIndex, nextSliceIndex, errorPage: await errorPageShown(page) };
}

async function showSlice(page, index) {
  await page.evaluate(async i => {
    const viewport = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
    await viewport.setImageIdIndex(i);
    viewport.render();
  }, index);
  await page.waitForTimeout(700);
}

async function srStep(page, srDisplaySetUID) {
  // The SR viewport draws each measurement on the image it references; wait for the drawing,
  // or for OHIF's error page, whichever comes first.
  try {
    await page.waitForFunction(() => {
      const drawn = window.cornerstoneTools.annotation.state.getAllAnnotations()
        .some(a => a.metadata?.toolName === 'DICOMSRDisplay');
      return (drawn && document.querySelector('svg text')) || document.body.innerText.includes('Something went wrong');
    }, null, { timeout: 20000 });
  } catch (error) {
    log('the SR drew nothing:', error.message);
  }
  await page.waitForTimeout(1000);
  return page.evaluate(uid => {
    const cs = window.cornerstone;
    const annotations = window.cornerstoneTools.annotation.state.getAllAnnotations()
      .filter(a => a.metadata?.toolName === 'DICOMSRDisplay')
      .map(a => ({
        graphicType: a.metadata.graphicType,
        valueType: a.metadata.valueType,
        points: (a.data.handles?.points ?? []).length,
        referencedSOPInstanceUID: a.metadata.referencedImageId
          ? (cs.metaData.get('instance', a.metadata.referencedImageId)?.SOPInstanceUID
            ?? /\/instances\/([^/]+)/.exec(a.metadata.referencedImageId)?.[1])
          : null,
        label: a.data.label ?? null,
        labels: a.data.labels ?? [],
        trackingUniqueIdentifier: a.data.TrackingUniqueIdentifier ?? null,
      }));
    const viewport = window.cornerstone.getRenderingEngines()[0]?.getViewports()[0];
    const element = viewport?.element;
    const svg = element?.querySelector('svg');
    const displaySet = window.services.displaySetService.getDisplaySetByUID(uid);
    return {
      annotations,
      measurements: (displaySet?.measurements ?? []).map(m => ({
        trackingIdentifier: m.TrackingIdentifier ?? null, loaded: Boolean(m.loaded),
        labels: m.labels ?? [], coords: (m.coords ?? []).length,
      })),
      drawn: {
        shapes: svg ? svg.querySelectorAll('polyline, path, polygon, line, circle, ellipse').length : 0,
        // One <text> per text box, one <tspan> per line.
        text: svg ? [...svg.querySelectorAll('text')].flatMap(t => {
          const lines = [...t.querySelectorAll('tspan')].map(s => s.textContent);
          return lines.length ? lines : [t.textContent];
        }) : [],
      },
      currentImage: viewport?.getCurrentImageId?.() ?? null,
      currentSOPInstanceUID: viewport?.getCurrentImageId?.()
        ? /\/instances\/([^/]+)/.exec(viewport.getCurrentImageId())?.[1] ?? null : null,
      errorPage: document.body.innerText.includes('Something went wrong'),
      viewportText: element?.closest('[data-cy="viewport-pane"]')?.innerText ?? element?.innerText ?? '',
    };
  }, srDisplaySetUID).then(async outcome => ({ ...outcome, errorDetails: await errorDetails(page) }));
}
