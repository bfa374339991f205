/** Node-only helpers (file system); the rest of the package runs anywhere ORT's JS API does. */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { loadBundle, type Bundle, type BundleSource, type TrainFormat } from "./bundle.js";

/** A BundleSource reading files of a bundle folder. */
export function directorySource(dir: string): BundleSource {
  return async (name) => new Uint8Array(await readFile(join(dir, name)));
}

/** loadBundle of a folder on disk. */
export function readBundleDir(dir: string, options: { formats?: TrainFormat[] } = {}): Promise<Bundle> {
  return loadBundle(directorySource(dir), options);
}

/** A raw little-endian float32 file (e.g. a round's weights) as a Float32Array. */
export async function readF32(path: string): Promise<Float32Array> {
  const b = await readFile(path);
  return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
}

/** A raw little-endian int32 file as an Int32Array. */
export async function readI32(path: string): Promise<Int32Array> {
  const b = await readFile(path);
  return new Int32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
}
