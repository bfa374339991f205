#!/usr/bin/env node
/**
 * Stage the browser demo: copy the compiled client (dist/src/*.js, `npm run build` first) and
 * onnxruntime-web's WASM build into web/dist/, which `baffle-edge serve --web clients/js/web`
 * serves under /web/. Usage: node web/build.mjs (from clients/js).
 */
import { copyFile, mkdir, readdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const web = dirname(fileURLToPath(import.meta.url));
const pkg = join(web, "..");
const src = join(pkg, "dist", "src");
const ort = join(pkg, "node_modules", "onnxruntime-web", "dist");
await mkdir(join(web, "dist", "pkg"), { recursive: true });
await mkdir(join(web, "dist", "ort"), { recursive: true });
let files;
try {
  files = (await readdir(src)).filter((f) => f.endsWith(".js"));
} catch {
  console.error(`${src} is missing: run \`npm run build\` in clients/js first`);
  process.exit(1);
}
for (const f of files) await copyFile(join(src, f), join(web, "dist", "pkg", f));
for (const f of ["ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"]) {
  await copyFile(join(ort, f), join(web, "dist", "ort", f));
}
console.log(`staged ${files.length} client modules and onnxruntime-web into ${join(web, "dist")}`);
