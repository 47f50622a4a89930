// Starting the real sidecar from the tests: the repository root on PYTHONPATH, a fresh home per
// test run, offline, and one thread (the test machines are shared).

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { SidecarClient } from "../src/index.js";

export const REPO = fileURLToPath(new URL("../../../", import.meta.url)).replace(/\/$/, "");
export const PYTHON = process.env.MLSIDECAR_PYTHON ?? "python3";

/** A fresh MLSIDECAR_HOME and a function that removes it. */
export function freshHome() {
  const home = mkdtempSync(join(tmpdir(), "mlsidecar-node-test-"));
  return { home, remove: () => rmSync(home, { recursive: true, force: true }) };
}

export function sidecarOptions(home, { args = [], env = {}, ...rest } = {}) {
  return {
    command: PYTHON,
    args: ["-m", "sidecar", "--debug", ...args],
    cwd: REPO,
    env: {
      PYTHONPATH: REPO,
      MLSIDECAR_HOME: home,
      HF_HUB_OFFLINE: "1",
      OMP_NUM_THREADS: "1",
      OMP_WAIT_POLICY: "PASSIVE",
      ...env,
    },
    ...rest,
  };
}

export function startSidecar(home, options) {
  return SidecarClient.start(sidecarOptions(home, options));
}
