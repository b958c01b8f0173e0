// The example page: runs the cases file (?cases=URL, default data/cases.json) with the
// attnc JS loader on this browser's WebGPU adapter and shows timing and errors. Results also
// land in window.__attncResults (window.__attncDone = true when finished) for the tests.
import {describeAdapter, deviceRequest, runCases} from './harness.js';

const params = new URLSearchParams(location.search);
const casesUrl = params.get('cases') || 'data/cases.json';
const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
$('cases').textContent = casesUrl;

/** @param {number | null | undefined} x @param {number} [digits] */
const fmt = (x, digits = 3) => (x === null || x === undefined ? '' : Number.isFinite(x) ? x.toPrecision(digits) : String(x));

/** @param {any} r */
function addRow(r) {
  const tr = document.createElement('tr');
  const m = r.metrics ? Object.values(r.metrics) : [];
  const maxAbs = m.length ? Math.max(...m.map((/** @type {any} */ x) => x.max_abs)) : null;
  const rel = m.length ? Math.max(...m.map((/** @type {any} */ x) => x.rel_err)) : null;
  const grid = (r.dispatches || []).map((/** @type {any} */ d) => `${d.program}: ${d.n ? `${d.x}×${d.y}` : 'skipped'}`).join(', ');
  const cells = [r.name, r.variant || '', JSON.stringify(r.shapes), grid, fmt(r.ms), fmt(maxAbs), fmt(rel),
    r.status + (r.expected_error ? ' (expected error)' : '') + (r.error ? `: ${r.error}` : '')];
  for (const c of cells) {
    const td = document.createElement('td');
    td.textContent = String(c);
    tr.appendChild(td);
  }
  /** @type {HTMLElement} */ (tr.lastChild).className = r.status;
  $('results').querySelector('tbody')?.appendChild(tr);
}

async function main() {
  const w = /** @type {any} */ (window);
  try {
    if (!('gpu' in navigator)) throw new Error('this browser has no WebGPU (navigator.gpu is missing)');
    const adapter = await /** @type {any} */ (navigator).gpu.requestAdapter();
    if (!adapter) throw new Error('no WebGPU adapter (Chromium needs --enable-unsafe-webgpu on this machine)');
    const a = describeAdapter(adapter);
    $('adapter').textContent = `Adapter: ${a.description || a.device || a.vendor} (${a.architecture}), ` +
      `features: ${a.features.join(', ') || 'none'}, subgroup size ${a.subgroupMinSize}–${a.subgroupMaxSize}`;
    const device = await adapter.requestDevice(deviceRequest(adapter));
    const fetchText = async (/** @type {string} */ u) => {
      const r = await fetch(u);
      if (!r.ok) throw new Error(`${u}: HTTP ${r.status}`);
      return r.text();
    };
    const fetchBytes = async (/** @type {string} */ u) => {
      const r = await fetch(u);
      if (!r.ok) throw new Error(`${u}: HTTP ${r.status}`);
      return r.arrayBuffer();
    };
    const out = await runCases(adapter, device, casesUrl, {
      text: fetchText, bytes: fetchBytes, onResult: addRow,
      returnOutputs: params.get('outputs') === '1', repeat: Number(params.get('repeat') || 3),
    });
    out.runtime = navigator.userAgent;
    const bad = out.results.filter((/** @type {any} */ r) => r.status === 'error').length;
    $('status').textContent = `Done: ${out.results.length} cases, ${bad} errors.`;
    w.__attncResults = out;
  } catch (e) {
    $('status').textContent = `Failed: ${/** @type {any} */ (e).message || e}`;
    $('status').className = 'error';
    w.__attncResults = {fatal: String(/** @type {any} */ (e).message || e)};
  }
  w.__attncDone = true;
}

main();
