// Checks Kubernetes manifests without a cluster, the way the API server would read them:
//   node validate.mjs [--render] PATH...
// PATH is a YAML file (every document in it) or a directory with a kustomization.yaml. For a
// kustomization, the fields drun's deployment uses are applied (resources, namespace, images) and
// any other field is an error, so what is checked is what `kubectl apply -k` would send.
// Each document is checked
//   - against the Kubernetes API schema (kubernetes-models, generated from the OpenAPI): types,
//     required fields, enums, formats;
//   - field by field against the API's own type map (@kubernetes/client-node's generated models),
//     which the schemas leave open: a misspelt field (securityContxt) is an error here, where the
//     API server would drop it without a word.
// Custom resources (cert-manager's Certificate) get only a shape check, and are named as such.
// --render prints the checked documents as one JSON array on stdout. Exit 0 when everything
// holds; 1 with one line per finding otherwise.
import { readFileSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { parseAllDocuments } from "yaml";

const findings = [];
const note = (where, what) => findings.push(`${where}: ${what}`);

function loadYaml(file) {
  const docs = [];
  // YAML 1.1, as Kubernetes reads manifests (sigs.k8s.io/yaml): 0400 is octal there, 400 in 1.2.
  for (const d of parseAllDocuments(readFileSync(file, "utf8"), { version: "1.1" })) {
    if (d.errors.length) note(file, `YAML: ${d.errors[0].message}`);
    else if (d.contents !== null) docs.push({ file, obj: d.toJS() });
  }
  return docs;
}

const CLUSTER_SCOPED = new Set(["Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass"]);

function renderKustomization(dir) {
  const file = join(dir, "kustomization.yaml");
  const k = loadYaml(file)[0]?.obj ?? {};
  for (const key of Object.keys(k))
    if (!["namespace", "resources", "images", "apiVersion", "kind"].includes(key))
      note(file, `kustomization field "${key}" is not one this checker applies`);
  let docs = [];
  for (const r of k.resources ?? []) {
    const p = join(dir, r);
    docs = docs.concat(statSync(p).isDirectory() ? renderKustomization(p) : loadYaml(p));
  }
  for (const { obj } of docs) {
    if (k.namespace && !CLUSTER_SCOPED.has(obj.kind)) obj.metadata = { ...obj.metadata, namespace: k.namespace };
    const spec = obj.spec?.template?.spec ?? obj.spec;
    for (const c of [...(spec?.containers ?? []), ...(spec?.initContainers ?? [])]) {
      for (const img of k.images ?? []) {
        const [name, tag] = String(c.image).split(":");
        if (name === img.name) c.image = `${img.newName ?? name}:${img.newTag ?? tag ?? "latest"}`;
      }
    }
  }
  return docs;
}

async function schemaModel(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : [null, apiVersion];
  const path = group ? `kubernetes-models/${group}/${version}` : `kubernetes-models/${version}`;
  try {
    return (await import(path))[kind];
  } catch {
    return undefined;
  }
}

const typeMaps = new Map();
async function typeMap(type) {
  if (!typeMaps.has(type)) {
    let map = null;
    if (/^[A-Z]\w+$/.test(type)) {
      try {
        const m = await import(`@kubernetes/client-node/dist/gen/models/${type}.js`);
        map = m[type]?.getAttributeTypeMap?.() ?? null;
      } catch {
        map = null;
      }
    }
    typeMaps.set(type, map);
  }
  return typeMaps.get(type);
}

// Every field name of obj must be one the API's type has; recurses into nested types, arrays and
// maps of them.
async function checkFields(obj, type, where) {
  const array = /^Array<(.+)>$/.exec(type);
  if (array) {
    if (Array.isArray(obj)) for (const [i, v] of obj.entries()) await checkFields(v, array[1], `${where}[${i}]`);
    return;
  }
  const dict = /^\{ \[key: string\]: (.+); \}$/.exec(type);
  if (dict) {
    if (obj && typeof obj === "object") for (const [k, v] of Object.entries(obj)) await checkFields(v, dict[1], `${where}.${k}`);
    return;
  }
  const map = await typeMap(type);
  if (!map || obj === null || typeof obj !== "object" || Array.isArray(obj)) return;
  const known = new Map(map.map((a) => [a.baseName, a.type]));
  for (const [k, v] of Object.entries(obj)) {
    if (!known.has(k)) note(where, `unknown field "${k}" (not in ${type})`);
    else await checkFields(v, known.get(k), `${where}.${k}`);
  }
}

async function check({ file, obj }) {
  const where = `${file}: ${obj?.kind ?? "?"}/${obj?.metadata?.name ?? "?"}`;
  if (!obj || typeof obj !== "object" || !obj.apiVersion || !obj.kind) return note(file, "a document without apiVersion and kind");
  const Model = await schemaModel(obj.apiVersion, obj.kind);
  if (!Model) {
    if (obj.apiVersion.includes(".") && !obj.apiVersion.endsWith(".k8s.io/" + obj.apiVersion.split("/")[1])) {
      // A custom resource: its schema is its CRD's, which is not here.
      if (!obj.metadata?.name || typeof obj.spec !== "object") note(where, "a custom resource without metadata.name and spec");
      return;
    }
    return note(where, `${obj.apiVersion} ${obj.kind} is not a Kubernetes API type`);
  }
  try {
    new Model(obj).validate();
  } catch (e) {
    note(where, `schema: ${e.message}`);
  }
  const version = obj.apiVersion.split("/").pop();
  await checkFields(obj, `${version[0].toUpperCase()}${version.slice(1)}${obj.kind}`, where);
}

const args = process.argv.slice(2);
const render = args[0] === "--render";
const paths = render ? args.slice(1) : args;
if (!paths.length) {
  console.error("usage: node validate.mjs [--render] PATH...");
  process.exit(2);
}
let docs = [];
for (const p of paths) docs = docs.concat(statSync(p).isDirectory() ? renderKustomization(p) : loadYaml(p));
for (const d of docs) await check(d);
if (render) console.log(JSON.stringify(docs.map((d) => d.obj), null, 1));
for (const f of findings) console.error(f);
console.error(findings.length ? `${findings.length} finding(s) in ${docs.length} documents` : `ok: ${docs.length} documents`);
process.exit(findings.length ? 1 : 0);
