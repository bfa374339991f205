/**
 * zlib (RFC 1950) inflate with a preset dictionary and a size cap, in plain TypeScript: the decoder of
 * the gateway's lean downloads (docs/gateway.md, "Lean downloads") on every platform — Node, a browser
 * (DecompressionStream has no dictionary) and React Native (no zlib at all). Pure: bytes in, bytes out.
 *
 *     inflate(stream, { size, dictionary })   exactly `size` bytes, or an InflateError
 *
 * Refused: a bad header, a dictionary id other than the given dictionary's Adler-32, a corrupt deflate
 * stream (RFC 1951), output other than `size` bytes (never more than `size` are written: a small body
 * cannot become a huge buffer), a wrong Adler-32 trailer, bytes after the trailer.
 */

export class InflateError extends Error {
  constructor(message: string) {
    super(`download: ${message}`);
    this.name = "InflateError";
  }
}

export interface InflateOptions {
  /** The exact number of bytes the stream must hold (the offer's `bytes`). */
  size: number;
  /** The preset dictionary (the same file of the generation the device holds), if the stream names one. */
  dictionary?: Uint8Array;
}

/** The inflate a platform supplies (Node: node:zlib, see node.ts); the default is `inflate` below. */
export type Inflate = (data: Uint8Array, options: InflateOptions) => Uint8Array;

export function adler32(b: Uint8Array): number {
  let a = 1, s = 0;
  for (let i = 0; i < b.length;) {
    const end = Math.min(b.length, i + 5552);
    for (; i < end; i++) { a += b[i]; s += a; }
    a %= 65521; s %= 65521;
  }
  return ((s << 16) | a) >>> 0;
}

const LEN_BASE = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258];
const LEN_EXTRA = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
const DIST_BASE = [1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073,
  4097, 6145, 8193, 12289, 16385, 24577];
const DIST_EXTRA = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];
const CL_ORDER = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];

/** A canonical Huffman code: counts per length and symbols in code order (RFC 1951 3.2.2). */
interface Huffman { counts: Uint16Array; symbols: Uint16Array }

function huffman(lengths: ArrayLike<number>): Huffman {
  const counts = new Uint16Array(16), offs = new Uint16Array(16), symbols = new Uint16Array(lengths.length);
  for (let i = 0; i < lengths.length; i++) counts[lengths[i]]++;
  counts[0] = 0;
  let left = 1;
  for (let len = 1; len < 16; len++) {
    left = 2 * left - counts[len];
    if (left < 0) throw new InflateError("not a valid zlib stream (over-subscribed Huffman code)");
  }
  for (let len = 1; len < 15; len++) offs[len + 1] = offs[len] + counts[len];
  for (let i = 0; i < lengths.length; i++) if (lengths[i]) symbols[offs[lengths[i]]++] = i;
  return { counts, symbols };
}

const FIXED_LIT = huffman(Array.from({ length: 288 }, (_, i) => (i < 144 ? 8 : i < 256 ? 9 : i < 280 ? 7 : 8)));
const FIXED_DIST = huffman(new Array(30).fill(5));

class Reader {
  pos = 0;
  private bit = 0;
  private bits = 0;
  constructor(readonly b: Uint8Array) {}

  need(n: number): number {
    while (this.bits < n) {
      if (this.pos >= this.b.length) throw new InflateError("not a valid zlib stream (truncated)");
      this.bit |= this.b[this.pos++] << this.bits;
      this.bits += 8;
    }
    const v = this.bit & ((1 << n) - 1);
    this.bit >>>= n;
    this.bits -= n;
    return v;
  }

  align(): void {
    this.bit = 0;
    this.bits = 0;
  }

  decode(h: Huffman): number {
    let code = 0, first = 0, index = 0;
    for (let len = 1; len < 16; len++) {
      code |= this.need(1);
      const count = h.counts[len];
      if (code - count < first) return h.symbols[index + (code - first)];
      index += count;
      first = (first + count) << 1;
      code <<= 1;
    }
    throw new InflateError("not a valid zlib stream (bad Huffman code)");
  }
}

function dynamicCodes(r: Reader): [Huffman, Huffman] {
  const nlen = r.need(5) + 257, ndist = r.need(5) + 1, ncode = r.need(4) + 4;
  if (nlen > 286 || ndist > 30) throw new InflateError("not a valid zlib stream (bad code counts)");
  const cl = new Uint8Array(19);
  for (let i = 0; i < ncode; i++) cl[CL_ORDER[i]] = r.need(3);
  const clCode = huffman(cl);
  const lengths = new Uint8Array(nlen + ndist);
  for (let i = 0; i < nlen + ndist;) {
    const sym = r.decode(clCode);
    if (sym < 16) { lengths[i++] = sym; continue; }
    let rep: number, val = 0;
    if (sym === 16) {
      if (i === 0) throw new InflateError("not a valid zlib stream (repeat with no length)");
      val = lengths[i - 1];
      rep = 3 + r.need(2);
    } else rep = sym === 17 ? 3 + r.need(3) : 11 + r.need(7);
    if (i + rep > nlen + ndist) throw new InflateError("not a valid zlib stream (too many code lengths)");
    lengths.fill(val, i, i + rep);
    i += rep;
  }
  return [huffman(lengths.subarray(0, nlen)), huffman(lengths.subarray(nlen))];
}

/** The `size` bytes a zlib stream holds (see the module comment for what is refused). */
export function inflate(data: Uint8Array, options: InflateOptions): Uint8Array {
  const { size, dictionary } = options;
  if (!Number.isSafeInteger(size) || size < 0) throw new InflateError(`bad expected size ${size}`);
  if (data.length < 6) throw new InflateError("not a valid zlib stream (too short)");
  const cmf = data[0], flg = data[1];
  if ((cmf & 15) !== 8 || cmf >> 4 > 7 || ((cmf << 8) | flg) % 31 !== 0) throw new InflateError("not a valid zlib stream (bad header)");
  const pre = dictionary?.length ?? 0;
  const out = new Uint8Array(pre + size);  // the dictionary first: back-references reach into it
  if (dictionary) out.set(dictionary);
  const r = new Reader(data);
  r.pos = 2;
  if (flg & 0x20) {
    if (!dictionary) throw new InflateError("the zlib stream needs a preset dictionary and none is held");
    const id = ((data[2] << 24) | (data[3] << 16) | (data[4] << 8) | data[5]) >>> 0;
    if (id !== adler32(dictionary)) throw new InflateError("the zlib stream was made with another dictionary than the file held");
    r.pos = 6;
  } else if (dictionary) {
    throw new InflateError("the zlib stream has no preset dictionary, one was expected");
  }
  let n = pre;
  const full = () => new InflateError(`the zlib stream holds more than ${size} bytes`);
  for (let last = 0; !last;) {
    last = r.need(1);
    const type = r.need(2);
    if (type === 0) {
      r.align();
      if (r.pos + 4 > data.length) throw new InflateError("not a valid zlib stream (truncated)");
      const len = data[r.pos] | (data[r.pos + 1] << 8), nlen = data[r.pos + 2] | (data[r.pos + 3] << 8);
      if ((len ^ 0xffff) !== nlen) throw new InflateError("not a valid zlib stream (bad stored block)");
      r.pos += 4;
      if (r.pos + len > data.length) throw new InflateError("not a valid zlib stream (truncated)");
      if (n + len > out.length) throw full();
      out.set(data.subarray(r.pos, r.pos + len), n);
      n += len;
      r.pos += len;
      continue;
    }
    if (type === 3) throw new InflateError("not a valid zlib stream (bad block type)");
    const [lit, dist] = type === 1 ? [FIXED_LIT, FIXED_DIST] : dynamicCodes(r);
    for (;;) {
      const sym = r.decode(lit);
      if (sym < 256) {
        if (n >= out.length) throw full();
        out[n++] = sym;
      } else if (sym === 256) {
        break;
      } else {
        const li = sym - 257;
        if (li >= 29) throw new InflateError("not a valid zlib stream (bad length code)");
        const len = LEN_BASE[li] + r.need(LEN_EXTRA[li]);
        const di = r.decode(dist);
        if (di >= 30) throw new InflateError("not a valid zlib stream (bad distance code)");
        const d = DIST_BASE[di] + r.need(DIST_EXTRA[di]);
        if (d > n) throw new InflateError("not a valid zlib stream (distance too far back)");
        if (n + len > out.length) throw full();
        for (let i = 0; i < len; i++, n++) out[n] = out[n - d];
      }
    }
  }
  r.align();
  if (r.pos + 4 !== data.length) {
    throw new InflateError(r.pos + 4 > data.length ? "not a valid zlib stream (no checksum)" : "bytes after the zlib stream");
  }
  if (n !== out.length) throw new InflateError(`the zlib stream holds ${n - pre} bytes, ${size} expected`);
  const body = out.subarray(pre);
  const want = ((data[r.pos] << 24) | (data[r.pos + 1] << 16) | (data[r.pos + 2] << 8) | data[r.pos + 3]) >>> 0;
  if (adler32(body) !== want) throw new InflateError("the zlib stream's Adler-32 checksum does not match (corrupt download)");
  return pre ? out.slice(pre) : out;
}
