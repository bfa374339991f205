/**
 * @baffle-edge/client: a BAFFLE device client on ONNX Runtime's JavaScript API.
 *
 *     import * as ort from "onnxruntime-node";     // or onnxruntime-web, onnxruntime-react-native
 *     const bundle = await loadBundle(source, { formats: ["onnx-int8"] });
 *     const rs = await RoundSession.open(ort, bundle, "onnx-int8", { intraOpNumThreads: 1 });
 *     const report = await runTask(taskJson, weights, batches, rs);
 *     upload(reportToJson(report));
 */
export { BlockError, BlockTable, checkBlockWeights, FlatSteps, MAX_DRAW_TOTAL, moduleOf, type ParameterSpec } from "./blocks.js";
export { checkPlan, REST_ELEMENTS, ROWS_PER_CALL, SegmentForward, segmentRoles, type BlockPlan, type GraphSegment, type SegmentSessions } from "./segments.js";
export { Bundle, BundleError, loadBundle, SCHEMA_VERSION, utf8, type BundleSource, type Parameter, type TrainFormat } from "./bundle.js";
export { crossEntropy, modelVersion, RoundSession, runTask, type Batch, type OrtModule, type RunOptions, type SessionFactory,
  type TensorConstructor } from "./client.js";
export { COMPACT_MEDIA_TYPE, decodeReport, encodeReport } from "./compact.js";
export { clipInf, leaveOneOut, lossDifferences, pairwiseSum } from "./estimator.js";
export { exp, log } from "./libm.js";
export { adler32, inflate, InflateError, type Inflate, type InflateOptions } from "./inflate.js";
export { applyDelta, decodeIntegers, intPayload, payloadSize, runtimeFiles, splitPayload, type IntSpec } from "./lean.js";
export { parseJson, stringifyJson, type Json } from "./json.js";
export { boxMuller, GAUSSIAN_CHUNK, negativeSigns, noise, NOISE_SPEC_VERSION, philox4x32, seedWords, SHARED_CLIENT, words,
  type NoiseKind, type Seed } from "./noise.js";
export { lossesPerStep, MAX_K, noiseClient, parseTask, PROTOCOL_VERSIONS, ProtocolError, reportToJson, taskToJson,
  type ClientReport, type RoundTask, type TaskNoise } from "./protocol.js";
export { quantize, rint, shifted, steps, StepSelector, type IntArray, type QTensor } from "./quant.js";
export { sha256Hex } from "./sha256.js";
