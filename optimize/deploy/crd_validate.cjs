#!/usr/bin/env node
// Validates Istio, Argo Rollouts and Prometheus Operator objects against the schemas the @kubernetes-models npm
// packages publish (ci/tools/package.json pins them), for `optimize deploy validate` (optimize/deploy/validate.py).
//
//   node crd_validate.cjs NODE_MODULES < objects.json
//
// stdin: a JSON list of objects. stdout: {"checked": N, "findings": [{"index": I, "message": "..."}]}, one finding
// per schema violation and per field the schema does not know (the published CRD schemas accept unknown fields,
// the API server's strict field validation does not: a typo would only fail at `kubectl apply`).
// Exit 0 when it ran (findings or not), 3 when a package is not installed in NODE_MODULES, 2 on bad input.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { pathToFileURL } = require("node:url");

const PACKAGES = {
  "networking.istio.io": "@kubernetes-models/istio",
  "argoproj.io": "@kubernetes-models/argo-rollouts",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};
// A value no JSON schema type accepts: put in place of a field, it fails validation wherever the schema knows it.
const PROBE = Symbol("probe");

class Missing extends Error {}

async function loadVersion(nodeModules, apiVersion, cache) {
  if (cache.has(apiVersion)) return cache.get(apiVersion);
  const [group, version] = apiVersion.split("/");
  const pkg = PACKAGES[group];
  let mod = null;
  if (pkg && version) {
    const root = path.join(nodeModules, pkg);
    if (!fs.existsSync(path.join(root, "package.json"))) {
      throw new Missing(`${pkg} is not installed in ${nodeModules} (npm ci --prefix ci/tools)`);
    }
    const index = path.join(root, group, version, "index.js");
    if (fs.existsSync(index)) mod = await import(pathToFileURL(index).href);
  }
  cache.set(apiVersion, mod);
  return mod;
}

function schemaErrors(Model, data) {
  try {
    new Model(data).validate();
    return [];
  } catch (err) {
    if (Array.isArray(err.errors)) return err.errors;
    // a validator that throws on a probe value has looked at the field: it knows it
    return [{ instancePath: "", message: String(err && err.message) }];
  }
}

function pointer(segments) {
  return segments.map((s) => "/" + String(s).replace(/~/g, "~0").replace(/\//g, "~1")).join("");
}

// The fields of a valid object that its schema does not describe: each key is replaced by PROBE in turn; a key
// the schema knows then fails validation, an unknown one passes.
function unknownFields(Model, data) {
  const unknown = [];
  const visit = (node, segments) => {
    if (Array.isArray(node)) {
      node.forEach((item, i) => visit(item, [...segments, i]));
      return;
    }
    if (!node || typeof node !== "object") return;
    for (const key of Object.keys(node)) {
      const at = [...segments, key];
      const value = node[key];
      node[key] = PROBE; // in place (the model copies what it validates), put back at once
      const errors = schemaErrors(Model, data);
      node[key] = value;
      // the object is valid without the probe: any error now (at the field, or at a parent's oneOf) is the schema
      // looking at the field
      if (errors.length > 0) visit(value, at);
      else unknown.push(pointer(at));
    }
  };
  visit(data, []);
  return unknown;
}

function describe(error) {
  return `${error.instancePath || "/"}: ${error.message}`;
}

async function main() {
  const nodeModules = process.argv[2];
  if (!nodeModules) {
    process.stderr.write("usage: node crd_validate.cjs NODE_MODULES < objects.json\n");
    return 2;
  }
  let objects;
  try {
    objects = JSON.parse(fs.readFileSync(0, "utf8"));
  } catch (err) {
    process.stderr.write(`crd_validate: stdin is not JSON: ${err.message}\n`);
    return 2;
  }
  if (!Array.isArray(objects)) {
    process.stderr.write("crd_validate: stdin must be a JSON list of objects\n");
    return 2;
  }
  const cache = new Map();
  const findings = [];
  for (const [index, obj] of objects.entries()) {
    const { apiVersion, kind } = obj || {};
    let mod;
    try {
      mod = await loadVersion(nodeModules, String(apiVersion), cache);
    } catch (err) {
      if (err instanceof Missing) {
        process.stderr.write(`crd_validate: ${err.message}\n`);
        return 3;
      }
      throw err;
    }
    const Model = mod && mod[kind];
    if (!Model || Model.apiVersion !== apiVersion || Model.kind !== kind) {
      findings.push({ index, message: `no published schema for ${kind} in ${apiVersion}` });
      continue;
    }
    const errors = schemaErrors(Model, obj);
    // a field under several alternatives (anyOf) fails each the same way: one finding per message
    for (const message of new Set(errors.map(describe))) findings.push({ index, message });
    if (errors.length === 0) {
      for (const where of unknownFields(Model, obj)) {
        findings.push({ index, message: `${where}: unknown field (not in the ${kind} schema)` });
      }
    }
  }
  process.stdout.write(JSON.stringify({ checked: objects.length, findings }) + "\n");
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`crd_validate: ${err && err.stack ? err.stack : err}\n`);
    process.exit(2);
  },
);
