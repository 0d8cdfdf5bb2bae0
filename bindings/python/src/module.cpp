// drun's Python binding: the C++ API in the shape Python users expect. Every call that can block
// releases the GIL; callbacks run with it held; failures raise drun.Error subclasses that carry the
// code and what failed.
#include <drun/drun.hpp>

#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

namespace py = pybind11;

namespace {

const char* code_name(drun::errc c) {
  switch (c) {
    case drun::errc::invalid_argument: return "invalid_argument";
    case drun::errc::io_error: return "io_error";
    case drun::errc::not_found: return "not_found";
    case drun::errc::key_error: return "key_error";
    case drun::errc::unsafe_entry: return "unsafe_entry";
    case drun::errc::malformed_bundle: return "malformed_bundle";
    case drun::errc::unsupported: return "unsupported";
    case drun::errc::signature_invalid: return "signature_invalid";
    case drun::errc::untrusted_certificate: return "untrusted_certificate";
    case drun::errc::model_mismatch: return "model_mismatch";
    case drun::errc::digest_mismatch: return "digest_mismatch";
    case drun::errc::cancelled: return "cancelled";
    case drun::errc::permission_denied: return "permission_denied";
    case drun::errc::busy: return "busy";
  }
  return "unknown";
}

// Which exception class an error becomes depends on what the failing call was doing; the caller
// says which:
//   source: network and origin/peer failures             -> SourceError
//   store:  the store's disk, pieces not (yet) stored     -> StoreError
//   input:  files the caller named (a model, a bundle): missing -> ConfigError, unreadable ->
//           StoreError, not matching the signature -> VerificationError
//   config: configuration files (keys, policies, JWKS): anything wrong with them -> ConfigError
enum class io_kind { source, store, input, config };

[[noreturn]] void raise(const drun::error& e, io_kind io = io_kind::store) {
  const char* cls = "Error";
  switch (e.code()) {
    case drun::errc::invalid_argument:
    case drun::errc::key_error:
    case drun::errc::unsafe_entry: cls = "ConfigError"; break;
    case drun::errc::io_error:
    case drun::errc::busy: cls = io == io_kind::source ? "SourceError" : "StoreError"; break;
    case drun::errc::not_found:
      cls = io == io_kind::source ? "SourceError" : io == io_kind::store ? "StoreError" : "ConfigError";
      break;
    case drun::errc::permission_denied: cls = "AuthorizationError"; break;
    case drun::errc::malformed_bundle:
    case drun::errc::unsupported:
    case drun::errc::signature_invalid:
    case drun::errc::untrusted_certificate:
    case drun::errc::model_mismatch:
    case drun::errc::digest_mismatch: cls = "VerificationError"; break;
    case drun::errc::cancelled: cls = "Error"; break;
  }
  if (io == io_kind::config && e.code() != drun::errc::permission_denied) cls = "ConfigError";
  if (io == io_kind::store && e.code() == drun::errc::model_mismatch) cls = "StoreError";  // a piece not stored
  py::object type = py::module_::import("drun._errors").attr(cls);
  py::object range = py::none();
  if (auto r = e.range()) range = py::make_tuple(r->first, r->second);
  py::object path = e.path().empty() ? py::object(py::none()) : py::object(py::str(e.path()));
  py::object source = e.source().empty() ? py::object(py::none()) : py::object(py::str(e.source()));
  py::object exc = type(e.message(), code_name(e.code()), path, range, source);
  if (auto piece = e.piece()) exc.attr("piece") = *piece;
  PyErr_SetObject(type.ptr(), exc.ptr());
  throw py::error_already_set();
}

template <class T>
T take(drun::result<T>&& r, io_kind io = io_kind::store) {
  if (!r) raise(r.error(), io);
  return std::move(r).value();
}
inline void take(drun::result<void>&& r, io_kind io = io_kind::store) {
  if (!r) raise(r.error(), io);
}

// public_key=, ca_bundle= or trusted_root= (with identity= and identity_provider=: keyless).
drun::trust_store trust_from(const std::optional<std::string>& public_key, const std::optional<std::string>& ca_bundle,
                             const std::optional<std::string>& trusted_root, const std::optional<std::string>& identity,
                             const std::optional<std::string>& identity_provider) {
  if (public_key.has_value() + ca_bundle.has_value() + trusted_root.has_value() != 1)
    raise(drun::error(drun::errc::invalid_argument, "give exactly one of public_key=, ca_bundle= and trusted_root="));
  if (trusted_root) {
    if (!identity || !identity_provider)
      raise(drun::error(drun::errc::invalid_argument,
                        "trusted_root= needs identity= and identity_provider=: keyless verification never accepts any "
                        "identity"));
    return take(drun::trust_store::from_sigstore(*trusted_root, {*identity, *identity_provider}), io_kind::config);
  }
  if (identity || identity_provider)
    raise(drun::error(drun::errc::invalid_argument, "identity= and identity_provider= go with trusted_root="));
  if (public_key) return drun::trust_store::from_public_key(take(drun::public_key::load(*public_key), io_kind::config));
  return take(drun::trust_store::from_ca_bundle(*ca_bundle), io_kind::config);
}

// Runs work() on a helper thread with the GIL released, while this thread wakes every 100 ms to
// let Python's signal handlers run: Ctrl-C sets *cancel, work() winds down, and the
// KeyboardInterrupt is raised here once it has.
template <class T>
T interruptible(const std::function<T()>& work, std::atomic<bool>& cancel) {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  std::optional<T> out;
  std::exception_ptr failure;
  std::thread t([&] {
    try {
      out.emplace(work());
    } catch (...) {
      failure = std::current_exception();
    }
    std::lock_guard lock(m);
    done = true;
    cv.notify_all();
  });
  bool interrupted = false;
  for (;;) {
    {
      py::gil_scoped_release release;
      std::unique_lock lock(m);
      if (cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return done; })) break;
    }
    if (!interrupted && PyErr_CheckSignals() != 0) {
      interrupted = true;  // the KeyboardInterrupt stays set in Python until we return
      cancel.store(true);
      PyObject *type, *value, *trace;
      PyErr_Fetch(&type, &value, &trace);
      {
        py::gil_scoped_release release;
        std::unique_lock lock(m);
        cv.wait(lock, [&] { return done; });
      }
      PyErr_Restore(type, value, trace);
      break;
    }
  }
  t.join();
  if (interrupted) throw py::error_already_set();
  if (failure) std::rethrow_exception(failure);
  return std::move(*out);
}

// A Python progress callback called from worker threads: with the GIL, one call at a time; an
// exception it raises cancels the operation and is re-raised to the caller.
struct py_progress {
  py::object fn;
  std::atomic<bool>* cancel;
  std::mutex mutex;
  std::optional<py::error_already_set> raised;

  void call(const drun::fetch_progress& p) {
    if (fn.is_none() || cancel->load()) return;
    py::gil_scoped_acquire gil;
    std::lock_guard lock(mutex);
    try {
      py::dict d;
      d["bytes_done"] = p.bytes_done;
      d["bytes_total"] = p.bytes_total;
      d["pieces_done"] = p.pieces_done;
      d["pieces_total"] = p.pieces_total;
      d["bytes_per_second"] = p.bytes_per_second;
      d["seconds_left"] = p.seconds_left;
      fn(d);
    } catch (py::error_already_set& e) {
      if (!raised) raised.emplace(std::move(e));
      cancel->store(true);
    }
  }
};


class py_verified_manifest {
 public:
  explicit py_verified_manifest(drun::verified_manifest m) : m_(std::move(m)) {}
  const std::string& artifact_id() const { return m_.artifact_id(); }
  py::list files() const {
    py::list out;
    for (const auto& f : m_.files()) {
      py::dict d;
      d["name"] = f.name;
      d["size"] = f.size ? py::object(py::int_(*f.size)) : py::object(py::none());
      d["pieces"] = f.piece_count;
      out.append(d);
    }
    return out;
  }
  std::size_t piece_count() const { return m_.pieces().size(); }
  std::uint64_t piece_size() const { return m_.shard_size(); }
  std::string hash() const { return std::string(drun::to_string(m_.hash_type())); }
  std::string method() const { return std::string(drun::to_string(m_.method())); }
  py::dict signer() const {
    py::dict d;
    d["method"] = m_.signer().method;
    d["key_hint"] = m_.signer().key_hint;
    d["subject"] = m_.signer().subject;
    d["issuer"] = m_.signer().issuer;
    return d;
  }
  std::string subject_name() const { return m_.subject_name(); }
  const drun::verified_manifest& get() const { return m_; }

 private:
  drun::verified_manifest m_;
};

class py_store {
 public:
  py_store(const std::string& path, const std::string& key_source)
      : s_(std::make_shared<drun::store>(
            take(drun::store::open(path, take(drun::node_key::from_source(key_source), io_kind::config))))) {}

  drun::store& get() { return *s_; }
  std::shared_ptr<drun::store> shared() { return s_; }

  std::string import_model(const std::string& model, std::optional<std::string> signature,
                           std::optional<std::string> public_key, std::optional<std::string> ca_bundle,
      std::optional<std::string> trusted_root, std::optional<std::string> identity,
      std::optional<std::string> identity_provider, unsigned threads) {
    auto trust = trust_from(public_key, ca_bundle, trusted_root, identity, identity_provider);
    std::string sig = signature.value_or(drun::default_signature_path(model).string());
    py::gil_scoped_release release;
    auto text = take_nogil(drun::read_bundle_file(sig), io_kind::input);
    auto vm = take_nogil(drun::verify_bundle(text, trust), io_kind::input);
    take_nogil(drun::import_model(*s_, vm, text, model, threads), io_kind::input);
    return vm.artifact_id();
  }

  // The bytes of a writable, C-contiguous buffer. A strided view (every other element of an
  // array) has fewer bytes between its start and end than size * itemsize suggests: writing it as
  // one span would run past the end of its memory. ConfigError for anything else.
  static std::span<std::byte> writable_bytes(const py::buffer& buffer, py::buffer_info& info) {
    info = buffer.request();
    if (info.readonly) raise(drun::error(drun::errc::invalid_argument, "the buffer is read-only"));
    if (!PyBuffer_IsContiguous(info.view(), 'C'))
      raise(drun::error(drun::errc::invalid_argument, "the buffer is not C-contiguous (a strided view?): pass a "
                                                      "contiguous array"));
    return {static_cast<std::byte*>(info.ptr), static_cast<std::size_t>(info.size * info.itemsize)};
  }

  // Decrypts [offset, offset + len(buffer)) of a file into any writable buffer, without a copy.
  void read(const std::string& artifact, const std::string& file, std::uint64_t offset, py::buffer buffer) {
    py::buffer_info info;
    auto out = writable_bytes(buffer, info);
    auto id = take(s_->resolve(artifact));
    py::gil_scoped_release release;
    auto reader = take_nogil(s_->open_artifact(id));
    auto index = file_index(reader, file);
    take_nogil(reader.read(index, offset, out));
  }

  void materialize(const std::string& artifact, const std::string& dest, bool umask_modes) {
    auto id = take(s_->resolve(artifact));
    py::gil_scoped_release release;
    take_nogil(s_->materialize(id, dest, umask_modes ? drun::export_modes::umask : drun::export_modes::owner_only));
  }

  py::list list() {
    auto items = take(s_->list());
    py::list out;
    for (const auto& a : items) {
      py::dict d;
      d["id"] = a.id;
      d["subject"] = a.subject;
      d["bytes"] = a.bytes;
      d["pieces"] = a.pieces;
      d["stored_pieces"] = a.stored_pieces;
      d["pinned"] = a.pinned;
      d["last_access"] = a.last_access;
      out.append(d);
    }
    return out;
  }

  py::list files(const std::string& artifact) {
    auto d = take(s_->show(take(s_->resolve(artifact))));
    py::list out;
    for (const auto& f : d.files) {
      py::dict x;
      x["name"] = f.name;
      x["size"] = f.size;
      x["pieces"] = f.pieces;
      x["stored_pieces"] = f.stored_pieces;
      out.append(x);
    }
    return out;
  }

  py::list verify(std::optional<std::string> artifact) {
    std::optional<std::string> id;
    if (artifact) id = take(s_->resolve(*artifact));
    std::vector<drun::scrub_failure> failures;
    {
      py::gil_scoped_release release;
      failures = take_nogil(s_->scrub(id));
    }
    py::list out;
    for (const auto& f : failures) {
      py::dict d;
      d["artifact"] = f.artifact;
      d["file"] = f.file;
      d["piece"] = f.piece;
      d["range"] = py::make_tuple(f.range.begin, f.range.end);
      d["reason"] = f.reason;
      out.append(d);
    }
    return out;
  }

  py::list gc(std::optional<double> ttl_seconds, std::optional<std::uint64_t> high, std::uint64_t low) {
    drun::gc_options o;
    if (ttl_seconds) o.ttl = std::chrono::seconds(static_cast<std::int64_t>(*ttl_seconds));
    o.high_bytes = high;
    o.low_bytes = low;
    drun::gc_report r;
    {
      py::gil_scoped_release release;
      r = take_nogil(s_->gc(o));
    }
    return py::cast(r.removed);
  }

  void pin(const std::string& artifact, bool pinned) { take(s_->set_pinned(take(s_->resolve(artifact)), pinned)); }
  void remove(const std::string& artifact) { take(s_->remove(take(s_->resolve(artifact)))); }

  // Errors raised while the GIL is released are carried out of the released section first.
  template <class T>
  static T take_nogil(drun::result<T>&& r, io_kind io = io_kind::store) {
    if (!r) throw pending_error{r.error(), io};
    return std::move(r).value();
  }
  static void take_nogil(drun::result<void>&& r, io_kind io = io_kind::store) {
    if (!r) throw pending_error{r.error(), io};
  }
  struct pending_error {
    drun::error e;
    io_kind io;
  };

  static std::size_t file_index(const drun::artifact_reader& reader, const std::string& file) {
    const auto& files = reader.files();
    for (std::size_t i = 0; i < files.size(); ++i)
      if (files[i].name == file) return i;
    throw pending_error{drun::error(drun::errc::not_found, "the artifact has no such file").with_path(file),
                        io_kind::input};
  }

 private:
  std::shared_ptr<drun::store> s_;
};

// Translates a pending_error (thrown without the GIL) into the Python exception.
void translate_pending(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const py_store::pending_error& e) {
    raise(e.e, e.io);
  }
}

class py_peer_server {
 public:
  py_peer_server(py_store& store, const std::string& listen, const std::string& cert, const std::string& key,
                 const std::string& client_ca, std::optional<std::string> policy, std::optional<std::string> jwks,
                 const std::string& audience, bool allow_token_only, bool rdma, const std::string& token_issuer,
                 bool require_bound_tokens, const std::string& metrics_listen, unsigned max_connections)
      : store_(store.shared()) {
    drun::peer_server_options o;
    o.metrics_listen = metrics_listen;
    if (max_connections == 0) raise(drun::error(drun::errc::invalid_argument, "max_connections must be at least 1"));
    o.max_connections = max_connections;
    o.rdma.enabled = rdma;
    o.listen = listen;
    o.cert_file = cert;
    o.key_file = key;
    o.client_ca_file = client_ca;
    o.audience = audience;
    o.token_issuer = token_issuer;
    o.require_bound_tokens = require_bound_tokens;
    o.require_client_certificate = !allow_token_only;
    if (policy)
      o.policy = std::make_shared<const drun::access_policy>(take(drun::access_policy::load(*policy), io_kind::config));
    if (jwks) o.token_keys = std::make_shared<const drun::jwks>(take(drun::jwks::load(*jwks), io_kind::config));
    server_.emplace(take(drun::peer_server::start(*store_, std::move(o)), io_kind::config));
  }
  std::uint16_t port() const { return server_ ? server_->port() : 0; }
  std::uint16_t metrics_port() const { return server_ ? server_->metrics_port() : 0; }
  py::dict stats() const {
    auto s = server_ ? server_->stats() : drun::peer_server_stats{};
    py::dict d;
    d["connections"] = s.connections;
    d["active"] = s.active;
    d["handshake_failures"] = s.handshake_failures;
    d["busy"] = s.busy;
    d["requests"] = s.requests;
    d["denied"] = s.denied;
    d["protocol_errors"] = s.protocol_errors;
    d["pieces_served"] = s.pieces_served;
    d["bytes_served"] = s.bytes_served;
    d["rdma_connections"] = s.rdma_connections;
    d["pieces_served_rdma"] = s.pieces_served_rdma;
    return d;
  }
  void stop() {
    if (!server_) return;
    py::gil_scoped_release release;
    server_->stop();
  }

 private:
  std::shared_ptr<drun::store> store_;  // outlives the server
  std::optional<drun::peer_server> server_;
};

std::string do_fetch(py_store& store, std::optional<std::string> signature, std::optional<std::string> artifact,
                     std::optional<std::string> public_key, std::optional<std::string> ca_bundle,
      std::optional<std::string> trusted_root, std::optional<std::string> identity,
      std::optional<std::string> identity_provider,
                     std::vector<std::string> origins, std::vector<std::string> peers, py::object progress,
                     std::optional<std::string> out, unsigned connections, std::optional<std::string> ca_cert,
                     std::optional<std::string> tls_cert, std::optional<std::string> tls_key,
                     std::optional<std::string> token, std::uint64_t limit_rate, std::vector<std::string> headers,
                     std::optional<std::string> credentials_origin, bool rdma, std::optional<std::string> traceparent,
                     std::optional<std::string> origin_cert, std::optional<std::string> origin_key,
                     std::optional<std::string> local_address, std::optional<std::string> registry_auth,
                     std::optional<std::string> peer_server_name) {
  if (signature.has_value() == artifact.has_value())
    raise(drun::error(drun::errc::invalid_argument, "give signature= (a URL or file), or artifact= with peers="));
  // One trace for the whole call (the bundle from a peer included): traceparent=, else new.
  auto trace = traceparent ? take(drun::trace_context::parse(*traceparent), io_kind::config)
                           : drun::trace_context::fresh();
  if (origins.empty() && peers.empty()) raise(drun::error(drun::errc::invalid_argument, "give origins= and/or peers="));
  auto trust = trust_from(public_key, ca_bundle, trusted_root, identity, identity_provider);
  drun::source_options so;
  so.ca_file = ca_cert.value_or("");
  if (origin_cert.has_value() != origin_key.has_value())
    raise(drun::error(drun::errc::invalid_argument, "give origin_cert= and origin_key= together"));
  so.client_cert_file = origin_cert.value_or("");
  so.client_key_file = origin_key.value_or("");
  so.local_address = local_address.value_or("");
  so.registry_auth_file = registry_auth.value_or("");  // oci:// credentials: a config.json or auth.json
  so.headers = std::move(headers);
  // headers= are for one origin (scheme, host, port), as on the command line: credentials_origin=,
  // else the first of origins= (else a signature= URL). Other origins and a bundle host elsewhere
  // never see them.
  if (!so.headers.empty()) {
    auto target = credentials_origin;
    if (!target && !origins.empty()) target = origins.front();
    if (!target && signature) target = *signature;
    auto scope = target ? drun::url_origin(*target) : std::string();
    if (scope.empty())
      raise(drun::error(drun::errc::invalid_argument, "headers= are for one http(s) origin" +
                                                          (target ? ", and " + *target + " is not one" : std::string()) +
                                                          ": give credentials_origin="));
    bool used = signature && drun::url_origin(*signature) == scope;
    for (const auto& o : origins) used = used || drun::url_origin(o) == scope;
    if (!used)
      raise(drun::error(drun::errc::invalid_argument,
                        "credentials_origin= " + scope + " is the origin of no origins= or signature= URL"));
    so.credentials_origin = scope;
  } else if (credentials_origin) {
    raise(drun::error(drun::errc::invalid_argument, "credentials_origin= says where headers= go: give headers="));
  }
  drun::peer_client_options po;
  po.ca_file = so.ca_file;
  po.cert_file = tls_cert.value_or("");
  po.key_file = tls_key.value_or("");
  po.local_address = so.local_address;
  po.server_name = peer_server_name.value_or("");
  po.token = token.value_or("");
  po.rdma.enabled = rdma;
  std::vector<std::unique_ptr<drun::source>> sources;
  for (const auto& p : peers) sources.push_back(take(drun::make_peer_source(p, po), io_kind::source));
  std::size_t peer_count = sources.size();
  for (const auto& o : origins) sources.push_back(take(drun::make_source(o, so), io_kind::source));

  std::atomic<bool> cancel{false};
  py_progress cb{progress, &cancel, {}, {}};
  drun::fetch_options fo;
  if (connections) fo.connections = connections;
  fo.max_bytes_per_second = limit_rate;
  fo.cancel = &cancel;

  if (!progress.is_none()) fo.progress = [&cb](const drun::fetch_progress& p) { cb.call(p); };
  auto& s = store.get();
  std::function<std::string()> work = [&]() -> std::string {
    drun::trace_scope in_trace(trace);  // on the thread that does the work
    std::string text;
    std::string name = signature.value_or("");
    if (artifact) {
      drun::result<std::string> got = drun::error(drun::errc::not_found, "no peer serves this artifact's bundle");
      for (std::size_t k = 0; k < peer_count && !got; ++k) got = sources[k]->bundle(*artifact);
      text = py_store::take_nogil(std::move(got), io_kind::source);
    } else {
      text = drun::is_remote_document(*signature) ? py_store::take_nogil(drun::fetch_document(*signature, drun::max_bundle_size, so), io_kind::source)
                    : py_store::take_nogil(drun::read_bundle_file(*signature), io_kind::input);
    }
    auto verified = drun::verify_bundle(text, trust);
    if (!verified) throw py_store::pending_error{std::move(verified).error().with_path(name), io_kind::source};
    auto vm = std::move(verified).value();
    if (artifact && vm.artifact_id() != *artifact)
      throw py_store::pending_error{drun::error(drun::errc::signature_invalid, "a peer sent another artifact's bundle"),
                                    io_kind::source};
    if (out) fo.out = *out;  // written as the pieces verify, moved into place at the end
    py_store::take_nogil(drun::fetch(s, vm, text, sources, fo), io_kind::source);
    return vm.artifact_id();
  };
  std::string id;
  try {
    id = interruptible(work, cancel);
  } catch (const py_store::pending_error& e) {
    if (cb.raised) throw std::move(*cb.raised);  // the progress callback's own exception
    raise(e.e, e.io);
  }
  return id;
}

}  // namespace

PYBIND11_MODULE(_drun, m) {
  m.doc() = "drun: verified, encrypted, fast distribution of AI models (compiled core)";
  py::register_exception_translator(translate_pending);

  m.def(
      "keygen",
      [](const std::string& type, const std::string& path) {
        auto t = drun::parse_key_type(type);
        if (!t) raise(drun::error(drun::errc::invalid_argument, "unknown key type (ed25519, ecdsa-p256, ecdsa-p384, ecdsa-p521)"));
        std::error_code ec;
        for (const auto& p : {std::filesystem::path(path), std::filesystem::path(path + ".pub")})
          if (std::filesystem::symlink_status(p, ec).type() != std::filesystem::file_type::not_found)
            raise(drun::error(drun::errc::invalid_argument, "already exists; refusing to overwrite it").with_path(p.string()));
        auto key = take(drun::private_key::generate(*t));
        take(key.save(path));
        if (auto r = drun::save_public_key(key.public_key(), path + ".pub"); !r) {
          std::filesystem::remove(path, ec);
          raise(r.error());
        }
      },
      py::arg("type"), py::arg("path"));

  m.def(
      "sign",
      [](const std::string& model, const std::string& key, std::optional<std::string> signature,
         std::uint64_t piece_size, const std::string& method, const std::string& hash, std::vector<std::string> ignore,
         unsigned threads) {
        drun::manifest_options o;
        if (method == "files") o.method = drun::serialization_method::files;
        else if (method != "shards") raise(drun::error(drun::errc::invalid_argument, "method must be \"shards\" or \"files\""));
        auto alg = drun::parse_hash_algorithm(hash);
        if (!alg) raise(drun::error(drun::errc::invalid_argument, "hash must be \"sha256\", \"blake3\" or \"blake2b\""));
        o.hash = *alg;
        o.piece_size = piece_size;
        o.threads = threads;
        o.policy.ignore_paths = std::move(ignore);
        std::string sig = signature.value_or(drun::default_signature_path(model).string());
        if (auto rel = drun::signature_inside(model, sig)) o.policy.ignore_paths.push_back(*rel);
        auto k = take(drun::private_key::load(key), io_kind::config);
        std::vector<std::string> uncovered;
        {
          py::gil_scoped_release release;
          auto man = py_store::take_nogil(drun::build_manifest(model, o), io_kind::input);
          auto bundle = py_store::take_nogil(drun::sign_manifest(man, k));
          py_store::take_nogil(drun::write_file_atomically(sig, bundle));
          uncovered = man.unsigned_empty_files();
        }
        // As `drun sign` does: the signer hears which empty files the shards format left out.
        if (!uncovered.empty()) {
          std::string names;
          for (std::size_t i = 0; i < uncovered.size() && i < 10; ++i) names += (i ? ", " : "") + uncovered[i];
          if (uncovered.size() > 10) names += " and " + std::to_string(uncovered.size() - 10) + " more";
          std::string text = "the shards format cannot sign empty files; not covered: " + names +
                             " (verifiers refuse them unless given allow_unsigned_empty_files=True; method=\"files\" "
                             "covers them)";
          if (PyErr_WarnEx(PyExc_UserWarning, text.c_str(), 1) < 0) throw py::error_already_set();
        }
        return sig;
      },
      py::arg("model"), py::arg("key"), py::kw_only(), py::arg("signature") = py::none(), py::arg("piece_size") = 0,
      py::arg("method") = "shards", py::arg("hash") = "sha256", py::arg("ignore") = std::vector<std::string>{},
      py::arg("threads") = 0);

  py::class_<py_verified_manifest>(m, "VerifiedManifest")
      .def_property_readonly("artifact_id", &py_verified_manifest::artifact_id)
      .def_property_readonly("files", &py_verified_manifest::files)
      .def_property_readonly("piece_count", &py_verified_manifest::piece_count)
      .def_property_readonly("piece_size", &py_verified_manifest::piece_size)
      .def_property_readonly("hash", &py_verified_manifest::hash)
      .def_property_readonly("method", &py_verified_manifest::method)
      .def_property_readonly("signer", &py_verified_manifest::signer)
      .def_property_readonly("subject", &py_verified_manifest::subject_name)
      .def("__repr__", [](const py_verified_manifest& v) {
        return "<drun.VerifiedManifest " + v.artifact_id().substr(0, 16) + "...>";
      });

  m.def(
      "verify",
      [](const std::string& model, std::optional<std::string> signature, std::optional<std::string> public_key,
         std::optional<std::string> ca_bundle,
      std::optional<std::string> trusted_root, std::optional<std::string> identity,
      std::optional<std::string> identity_provider, unsigned threads, bool allow_unsigned_empty_files) {
        auto trust = trust_from(public_key, ca_bundle, trusted_root, identity, identity_provider);
        std::string sig = signature.value_or(drun::default_signature_path(model).string());
        drun::verify_options o;
        o.threads = threads;
        o.allow_unsigned_empty_files = allow_unsigned_empty_files;
        if (allow_unsigned_empty_files)
          // Under -W error the warning is an exception, which must propagate, not be left pending.
          if (PyErr_WarnEx(PyExc_UserWarning, "allow_unsigned_empty_files: empty files the signature does not cover "
                                              "are accepted", 1) < 0)
            throw py::error_already_set();
        if (auto rel = drun::signature_inside(model, sig)) o.ignore_paths.push_back(*rel);
        py::gil_scoped_release release;
        auto text = py_store::take_nogil(drun::read_bundle_file(sig), io_kind::input);
        auto vm = py_store::take_nogil(drun::verify_bundle(text, trust), io_kind::input);
        py_store::take_nogil(drun::verify_model(vm, model, o), io_kind::input);
        return py_verified_manifest(std::move(vm));
      },
      py::arg("model"), py::kw_only(), py::arg("signature") = py::none(), py::arg("public_key") = py::none(),
      py::arg("ca_bundle") = py::none(),
        py::arg("trusted_root") = py::none(), py::arg("identity") = py::none(), py::arg("identity_provider") = py::none(), py::arg("threads") = 0,
        py::arg("allow_unsigned_empty_files") = false);

  py::class_<py_store>(m, "Store")
      .def(py::init<const std::string&, const std::string&>(), py::arg("path"), py::kw_only(), py::arg("key_source"))
      .def("import_model", &py_store::import_model, py::arg("model"), py::kw_only(), py::arg("signature") = py::none(),
           py::arg("public_key") = py::none(), py::arg("ca_bundle") = py::none(),
        py::arg("trusted_root") = py::none(), py::arg("identity") = py::none(), py::arg("identity_provider") = py::none(), py::arg("threads") = 0)
      .def("read", &py_store::read, py::arg("artifact"), py::arg("file"), py::arg("offset"), py::arg("buffer"))
      .def("materialize", &py_store::materialize, py::arg("artifact"), py::arg("dest"), py::kw_only(),
           py::arg("umask_modes") = false)
      .def("list", &py_store::list)
      .def("files", &py_store::files, py::arg("artifact"))
      .def("verify", &py_store::verify, py::arg("artifact") = py::none())
      .def("gc", &py_store::gc, py::kw_only(), py::arg("ttl_seconds") = py::none(), py::arg("high") = py::none(),
           py::arg("low") = 0)
      .def("pin", [](py_store& s, const std::string& a) { s.pin(a, true); }, py::arg("artifact"))
      .def("unpin", [](py_store& s, const std::string& a) { s.pin(a, false); }, py::arg("artifact"))
      .def("remove", &py_store::remove, py::arg("artifact"));

  m.def("fetch", &do_fetch, py::kw_only(), py::arg("store"), py::arg("signature") = py::none(),
        py::arg("artifact") = py::none(), py::arg("public_key") = py::none(), py::arg("ca_bundle") = py::none(),
        py::arg("trusted_root") = py::none(), py::arg("identity") = py::none(), py::arg("identity_provider") = py::none(),
        py::arg("origins") = std::vector<std::string>{}, py::arg("peers") = std::vector<std::string>{},
        py::arg("progress") = py::none(), py::arg("out") = py::none(), py::arg("connections") = 0,
        py::arg("ca_cert") = py::none(), py::arg("tls_cert") = py::none(), py::arg("tls_key") = py::none(),
        py::arg("token") = py::none(), py::arg("limit_rate") = 0, py::arg("headers") = std::vector<std::string>{},
        py::arg("credentials_origin") = py::none(), py::arg("rdma") = false, py::arg("traceparent") = py::none(),
        py::arg("origin_cert") = py::none(), py::arg("origin_key") = py::none(), py::arg("local_address") = py::none(),
        py::arg("registry_auth") = py::none(), py::arg("peer_server_name") = py::none());

  py::class_<py_peer_server>(m, "PeerServer")
      .def(py::init<py_store&, const std::string&, const std::string&, const std::string&, const std::string&,
                    std::optional<std::string>, std::optional<std::string>, const std::string&, bool, bool,
                    const std::string&, bool, const std::string&, unsigned>(),
           py::arg("store"), py::kw_only(), py::arg("listen") = "127.0.0.1:0", py::arg("cert"), py::arg("key"),
           py::arg("client_ca") = "", py::arg("policy") = py::none(), py::arg("jwks") = py::none(),
           py::arg("audience") = "drun", py::arg("allow_token_only") = false, py::arg("rdma") = false,
           py::arg("token_issuer") = "", py::arg("require_bound_tokens") = false, py::arg("metrics_listen") = "",
           py::arg("max_connections") = 256)
      .def_property_readonly("port", &py_peer_server::port)
      .def_property_readonly("metrics_port", &py_peer_server::metrics_port)
      .def("stats", &py_peer_server::stats)
      .def("stop", &py_peer_server::stop)
      .def("__enter__", [](py_peer_server& s) -> py_peer_server& { return s; }, py::return_value_policy::reference)
      .def("__exit__", [](py_peer_server& s, py::object, py::object, py::object) { s.stop(); });

  m.def(
      "issue_token",
      [](const std::string& key, const std::string& subject, const std::string& audience,
         std::vector<std::string> artifacts, double ttl_seconds, std::optional<std::string> bind_cert) {
        auto k = take(drun::private_key::load(key), io_kind::config);
        drun::token_request r;
        if (bind_cert)
          r.certificate_thumbprint =
              take(drun::certificate_thumbprint(std::filesystem::path(*bind_cert)), io_kind::config);
        r.subject = subject;
        r.audience = audience;
        r.artifacts = std::move(artifacts);
        r.ttl = std::chrono::seconds(static_cast<std::int64_t>(ttl_seconds));
        return take(drun::issue_token(k, r));
      },
      py::arg("key"), py::kw_only(), py::arg("subject"), py::arg("audience"), py::arg("artifacts"),
      py::arg("ttl_seconds") = 900.0, py::arg("bind_cert") = py::none());
  m.def("metrics", [] { return drun::metrics_text(); });
  m.def(
      "configure_logging",
      [](const std::string& level, const std::string& format, const std::string& service_name) {
        drun::log_settings ls;
        static const std::map<std::string, drun::log_level> levels = {{"debug", drun::log_level::debug},
                                                                      {"info", drun::log_level::info},
                                                                      {"warning", drun::log_level::warning},
                                                                      {"error", drun::log_level::error}};
        auto l = levels.find(level);
        if (l == levels.end()) raise(drun::error(drun::errc::invalid_argument, "level is debug, info, warning or error"));
        if (format != "text" && format != "json") raise(drun::error(drun::errc::invalid_argument, "format is text or json"));
        ls.level = l->second;
        ls.format = format == "json" ? drun::log_format::json : drun::log_format::text;
        ls.service_name = service_name;
        drun::configure_logging(ls);
      },
      py::kw_only(), py::arg("level") = "warning", py::arg("format") = "text", py::arg("service_name") = "drun");
  py::class_<drun::audit_log, std::shared_ptr<drun::audit_log>>(m, "AuditLog")
      .def(py::init([](const std::string& file, std::optional<std::string> key, std::size_t checkpoint_every) {
             drun::audit_options o;
             o.file = file;
             o.checkpoint_every = checkpoint_every;
             if (key) o.key = std::make_shared<const drun::private_key>(take(drun::private_key::load(*key), io_kind::config));
             return take(drun::audit_log::open(std::move(o)), io_kind::config);
           }),
           py::arg("file"), py::kw_only(), py::arg("key") = py::none(), py::arg("checkpoint_every") = 64)
      .def(
          "append",
          [](drun::audit_log& a, const std::string& event, const py::dict& fields) {
            // Keys and values are held here for the call: log_attribute refers to its key.
            std::vector<std::string> keys;
            keys.reserve(fields.size());
            std::vector<drun::log_attribute> attrs;
            attrs.reserve(fields.size());
            for (auto [k, v] : fields) {
              keys.push_back(py::str(k));
              if (py::isinstance<py::bool_>(v)) attrs.emplace_back(keys.back(), v.cast<bool>() ? "true" : "false");
              else if (py::isinstance<py::int_>(v)) attrs.emplace_back(keys.back(), v.cast<long long>());
              else if (py::isinstance<py::float_>(v)) attrs.emplace_back(keys.back(), v.cast<double>());
              else attrs.emplace_back(keys.back(), std::string(py::str(v)));
            }
            take(a.append(event, attrs), io_kind::store);
          },
          py::arg("event"), py::arg("fields") = py::dict())
      .def("checkpoint", [](drun::audit_log& a) { take(a.checkpoint(), io_kind::store); })
      .def("close", [](drun::audit_log& a) { take(a.close(), io_kind::store); })
      .def_property_readonly("file", [](const drun::audit_log& a) { return a.file().string(); })
      .def("__enter__", [](std::shared_ptr<drun::audit_log> a) { return a; })
      .def("__exit__", [](drun::audit_log& a, py::object, py::object, py::object) { take(a.close(), io_kind::store); });
  m.def(
      "set_audit_log", [](std::shared_ptr<drun::audit_log> log) { drun::set_audit_log(std::move(log)); },
      py::arg("log").none(true));
  m.def(
      "audit_verify",
      [](const std::string& file, const std::string& public_key) {
        auto key = take(drun::public_key::load(public_key), io_kind::config);
        auto rep = take(drun::audit_verify(file, key), io_kind::input);
        py::dict d;
        d["records"] = rep.records;
        d["checkpoints"] = rep.checkpoints;
        d["last_checkpoint"] = rep.last_checkpoint;
        d["unsealed"] = rep.unsealed;
        d["torn_lines"] = rep.torn_lines;
        d["torn_tail"] = rep.torn_tail;
        return d;
      },
      py::arg("file"), py::arg("public_key"));
  m.def(
      "write_metrics_file",
      [](const std::string& file) { take(drun::write_metrics_file(file)); },
      py::arg("file"));
  m.def("rdma_status", [] {
    auto st = drun::rdma_probe();
    py::dict d;
    d["available"] = st.available;
    d["reason"] = st.reason;
    d["library"] = st.library;
    d["devices"] = st.devices;
    return d;
  });
  m.def(
      "jwks_for", [](const std::string& public_key) { return take(drun::jwks_for(take(drun::public_key::load(public_key), io_kind::config))); },
      py::arg("public_key"));

  // The safetensors pieces load_safetensors (drun/__init__.py) is built from.
  m.def(
      "_safetensors_layout",
      [](py_store& store, const std::string& artifact, const std::string& file) {
        auto& s = store.get();
        auto id = take(s.resolve(artifact));
        std::optional<drun::safetensors_header> header;
        {
          py::gil_scoped_release release;
          auto reader = py_store::take_nogil(s.open_artifact(id));
          header = py_store::take_nogil(drun::read_safetensors_header(reader, py_store::file_index(reader, file)));
        }
        const auto& h = *header;
        py::list tensors;
        for (const auto& t : h.tensors)
          tensors.append(py::make_tuple(t.name, std::string(drun::to_string(t.dtype)), py::cast(t.shape), t.begin, t.end));
        return py::make_tuple(h.data_size, tensors, py::cast(h.metadata));
      },
      py::arg("store"), py::arg("artifact"), py::arg("file"));
  m.def(
      "_safetensors_read",
      [](py_store& store, const std::string& artifact, const std::string& file, py::buffer buffer) {
        py::buffer_info info;
        auto out = py_store::writable_bytes(buffer, info);
        auto& s = store.get();
        auto id = take(s.resolve(artifact));
        py::gil_scoped_release release;
        auto reader = py_store::take_nogil(s.open_artifact(id));
        auto index = py_store::file_index(reader, file);
        auto h = py_store::take_nogil(drun::read_safetensors_header(reader, index));
        py_store::take_nogil(drun::read_safetensors_data(reader, index, h, out));
      },
      py::arg("store"), py::arg("artifact"), py::arg("file"), py::arg("buffer"));
}
