// The Node client of the mlsidecar protocol: ESM, no dependencies.

export { SidecarClient } from "./client.js";
export { Call } from "./call.js";
export { SidecarError, CancelledError, CLIENT_ERROR_KINDS } from "./errors.js";
export { LineSplitter } from "./lines.js";
export { PROTOCOL_VERSION, METHODS, ErrorCode, ERROR_KINDS, SidecarMethods } from "./methods.js";
