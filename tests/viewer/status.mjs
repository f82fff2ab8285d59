// Drives dicomnode's status page in headless Chromium as a PACS administrator would, and prints
// one JSON object on stdout (log lines go to stderr).
//
// Request (JSON on stdin):
//   { chromium, url, outDir, name, timeoutMs,
//     steps: [ {kind: "goto", path, shot}
//            | {kind: "waitFor", selector, shot}   (reloads the page until the selector appears)
//            | {kind: "click", selector, shot}     (and waits for the page it leads to)
//            | {kind: "text", selector, as} ] }    (the element's text, into result.texts[as])
// Result:
//   { screenshots: [...], texts: {...}, steps: [...], pageErrors: [...], consoleErrors: [...] }
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';

const request = JSON.parse(fs.readFileSync(0, 'utf8'));
const timeoutMs = request.timeoutMs ?? 60000;
const started = Date.now();
const log = (...args) => console.error(`[status ${((Date.now() - started) / 1000).toFixed(1)} s]`, ...args);
const result = { screenshots: [], texts: {}, steps: [], pageErrors: [], consoleErrors: [] };

const browser = await chromium.launch({
  executablePath: request.chromium,
  headless: true,
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run', '--disable-quic'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(timeoutMs);
  page.on('pageerror', error => result.pageErrors.push(String(error.message)));
  page.on('console', message => {
    if (message.type() === 'error') result.consoleErrors.push(message.text().slice(0, 2000));
  });
  const shot = async name => {
    if (!name) return;
    const file = path.join(request.outDir, `${request.name}-${name}.png`);
    await page.screenshot({ path: file, fullPage: true });
    result.screenshots.push(file);
  };
  for (const step of request.steps) {
    const began = Date.now();
    log(step.kind, step.path ?? step.selector ?? '');
    if (step.kind === 'goto') {
      await page.goto(new URL(step.path, request.url).href);
    } else if (step.kind === 'waitFor') {
      // The list page reloads itself every few seconds; reload here too, so that the wait
      // does not depend on that interval.
      const deadline = Date.now() + timeoutMs;
      while (!(await page.$(step.selector))) {
        if (Date.now() > deadline) throw new Error(`${step.selector} did not appear within ${timeoutMs} ms`);
        await page.waitForTimeout(500);
        await page.reload();
      }
    } else if (step.kind === 'click') {
      await Promise.all([page.waitForNavigation(), page.click(step.selector)]);
    } else if (step.kind === 'text') {
      result.texts[step.as] = (await page.textContent(step.selector)) ?? '';
    } else {
      throw new Error(`unknown step ${step.kind}`);
    }
    await shot(step.shot);
    result.steps.push({ kind: step.kind, target: step.path ?? step.selector, url: page.url(),
      seconds: (Date.now() - began) / 1000 });
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
