#!/usr/bin/env node
// verify.mjs: test-only; verifies Sigstore bundles offline with sigstore-js (@sigstore/verify), as an
// independent check of the test Sigstore instance (tests/python/sigstore_ref.py) and of drun.
//
//   node verify.mjs --bundle B.json --trusted-root TR.json --identity ID --issuer URL [--artifact FILE]
//       exit 0 and print OK when the bundle verifies; exit 1 and print "FAIL <code>: <message>" (to
//       stdout; the same line to stderr) when it does not; exit 2 on a usage error.
//   node verify.mjs --batch < JOBS.json
//       JOBS.json: [{"bundle": PATH|OBJECT, "trustedRoot": PATH|OBJECT, "identity": ID, "issuer": URL,
//                    "artifact": PATH (optional)}, ...]
//       prints one JSON line per job, in order: {"job": i, "ok": true} or
//       {"job": i, "ok": false, "error": "<code>: <message>"}; exit 0 once all jobs ran.
//
// Policy: at least 1 transparency-log timestamp (tlogThreshold 1), at least 1 verified SCT
// (ctlogThreshold 1), no TSA timestamp required (tsaThreshold 0; any present must verify), the
// certificate's SAN equal to ID and its OIDC issuer extension equal to URL. DSSE bundles need no artifact.
//
// Plain ESM for Node >= 18; the @sigstore packages are CommonJS, so they are imported as defaults.
import fs from 'node:fs';
import bundlePkg from '@sigstore/bundle';
import specsPkg from '@sigstore/protobuf-specs';
import verifyPkg from '@sigstore/verify';

const { bundleFromJSON } = bundlePkg;
const { TrustedRoot } = specsPkg;
const { Verifier, toSignedEntity, toTrustMaterial } = verifyPkg;

function escapeRegExp(s) {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function loadJSON(x, what) {
  if (typeof x === 'string') {
    return JSON.parse(fs.readFileSync(x, 'utf8'));
  }
  if (x && typeof x === 'object') {
    return x;
  }
  throw new Error(`${what}: expected a path or a JSON object`);
}

const trustCache = new Map();

function trustMaterial(tr) {
  if (typeof tr === 'string' && trustCache.has(tr)) {
    return trustCache.get(tr);
  }
  const tm = toTrustMaterial(TrustedRoot.fromJSON(loadJSON(tr, 'trusted root')));
  if (typeof tr === 'string') {
    trustCache.set(tr, tm);
  }
  return tm;
}

function verifyJob(job) {
  for (const k of ['bundle', 'trustedRoot', 'identity', 'issuer']) {
    if (job[k] === undefined || job[k] === null || job[k] === '') {
      throw new Error(`job lacks ${k}`);
    }
  }
  const bundle = bundleFromJSON(loadJSON(job.bundle, 'bundle'));
  const artifact = job.artifact ? fs.readFileSync(job.artifact) : undefined;
  const entity = toSignedEntity(bundle, artifact);
  const verifier = new Verifier(trustMaterial(job.trustedRoot), {
    tlogThreshold: 1,
    ctlogThreshold: 1,
    tsaThreshold: 0,
  });
  // The SAN policy is matched with String.prototype.match, i.e. as a regular expression: anchor and
  // escape it so that it means "equal".
  verifier.verify(entity, {
    subjectAlternativeName: '^' + escapeRegExp(job.identity) + '$',
    extensions: { issuer: job.issuer },
  });
}

function describe(err) {
  const ctor = err && err.constructor ? err.constructor.name : undefined;
  const name = ctor && ctor !== 'Error' ? ctor : err && err.name;
  const code = err && err.code ? err.code : name || 'Error';
  let msg = err && err.message ? err.message : String(err);
  if (err && Array.isArray(err.fields)) {
    msg += ` [${err.fields.join(', ')}]`;
  }
  if (err && err.cause && err.cause.message) {
    msg += ` (cause: ${err.cause.code ? err.cause.code + ': ' : ''}${err.cause.message})`;
  }
  return `${code}: ${msg}`.replace(/\s*\n\s*/g, ' ');
}

function runOne(job) {
  try {
    verifyJob(job);
    return { ok: true };
  } catch (err) {
    return { ok: false, error: describe(err) };
  }
}

function usage(msg) {
  process.stderr.write(`verify.mjs: ${msg}\n` +
    'usage: node verify.mjs --bundle B.json --trusted-root TR.json --identity ID --issuer URL ' +
    '[--artifact FILE]\n       node verify.mjs --batch < JOBS.json\n');
  process.exit(2);
}

function main(argv) {
  const flags = { '--bundle': 'bundle', '--trusted-root': 'trustedRoot', '--identity': 'identity',
                  '--issuer': 'issuer', '--artifact': 'artifact' };
  const job = {};
  let batch = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--batch') {
      batch = true;
    } else if (Object.prototype.hasOwnProperty.call(flags, a)) {
      if (i + 1 >= argv.length) {
        usage(`${a} needs a value`);
      }
      job[flags[a]] = argv[++i];
    } else {
      usage(`unknown argument ${a}`);
    }
  }
  if (batch) {
    if (Object.keys(job).length > 0) {
      usage('--batch takes its jobs on stdin only');
    }
    let jobs;
    try {
      jobs = JSON.parse(fs.readFileSync(0, 'utf8'));
    } catch (err) {
      usage(`stdin is not JSON: ${err.message}`);
    }
    if (!Array.isArray(jobs)) {
      usage('stdin must hold a JSON list of jobs');
    }
    const lines = jobs.map((j, i) => JSON.stringify({ job: i, ...runOne(j || {}) }));
    process.stdout.write(lines.join('\n') + (lines.length ? '\n' : ''));
    return 0;
  }
  for (const k of ['bundle', 'trustedRoot', 'identity', 'issuer']) {
    if (!job[k]) {
      usage(`missing --${k === 'trustedRoot' ? 'trusted-root' : k}`);
    }
  }
  const r = runOne(job);
  if (r.ok) {
    process.stdout.write('OK\n');
    return 0;
  }
  process.stdout.write(`FAIL ${r.error}\n`);
  process.stderr.write(`verify.mjs: FAIL ${r.error}\n`);
  return 1;
}

process.exitCode = main(process.argv.slice(2));
