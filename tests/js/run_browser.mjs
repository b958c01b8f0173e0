// Browser runner for the JS loader tests: headless Chromium (WebGPU on SwiftShader) driven by
// playwright-core opens the example page on a 127.0.0.1 server and waits for its results.
// Usage: node run_browser.mjs PAGE_URL OUT_JSON [CHROMIUM]   (one browser start for all cases)
import {mkdtemp, rm, writeFile} from 'node:fs/promises';
import {createRequire} from 'node:module';
import {tmpdir} from 'node:os';
import {join} from 'node:path';

const [pageUrl, outPath, executablePath = '/usr/lib/chromium/chromium'] = process.argv.slice(2);
const require = createRequire(new URL('../../js/package.json', import.meta.url));
const {chromium} = require('playwright-core');

// BROWSER.md's flags; the fresh --user-data-dir is the persistent context's folder.
const FLAGS = ['--headless=new', '--no-sandbox', '--enable-unsafe-webgpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'];

const profile = await mkdtemp(join(tmpdir(), 'attnc-chromium-'));
let code = 0;
let context;
try {
  context = await chromium.launchPersistentContext(profile, {executablePath, headless: false, args: FLAGS, timeout: 60000});
  const page = context.pages()[0] || await context.newPage();
  const console_ = [];
  page.on('console', (m) => console_.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => console_.push(`pageerror: ${e.message}`));
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.__attncDone === true, null, {timeout: Number(process.env.ATTNC_PAGE_TIMEOUT_MS) || 120000});
  const out = await page.evaluate(() => window.__attncResults);
  out.console = console_;
  out.browser_version = context.browser()?.version() ?? null;
  await writeFile(outPath, JSON.stringify(out));
  if (process.env.ATTNC_SCREENSHOT) await page.screenshot({path: process.env.ATTNC_SCREENSHOT, fullPage: true});
} catch (e) {
  console.error(e?.stack || e);
  code = 1;
} finally {
  if (context) await context.close().catch(() => {});
  await rm(profile, {recursive: true, force: true}).catch(() => {});
}
process.exit(code);
