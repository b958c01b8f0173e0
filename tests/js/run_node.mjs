// Node runner for the JS loader tests: Dawn (npm `webgpu`) on the local adapter (lavapipe
// here), the same harness as the example page. Usage: node run_node.mjs CASES_JSON OUT_JSON
import {readFile, writeFile} from 'node:fs/promises';
import {createRequire} from 'node:module';
import {pathToFileURL} from 'node:url';

import {deviceRequest, runCases} from '../../examples/browser/harness.js';

const [casesPath, outPath] = process.argv.slice(2);
const require = createRequire(new URL('../../js/package.json', import.meta.url));
const {create, globals} = await import(pathToFileURL(require.resolve('webgpu')).href);
Object.assign(globalThis, globals);

let code = 0;
try {
  const gpu = create([]);
  const adapter = await gpu.requestAdapter();
  if (!adapter) throw new Error('Dawn found no WebGPU adapter');
  const device = await adapter.requestDevice(deviceRequest(adapter));
  device.addEventListener?.('uncapturederror', (e) => console.error('uncaptured WebGPU error:', e.error?.message));
  const out = await runCases(adapter, device, casesPath, {
    text: (p) => readFile(p, 'utf8'),
    bytes: async (p) => {
      const b = await readFile(p);
      return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
    },
    returnOutputs: true,
    repeat: 1,
  });
  out.runtime = `node ${process.version}`;
  await writeFile(outPath, JSON.stringify(out));
} catch (e) {
  console.error(e?.stack || e);
  code = 1;
}
process.exit(code);
