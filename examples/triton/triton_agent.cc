// The drun repository agent for Triton Inference Server. When Triton loads a model whose
// config.pbtxt names the agent "drun", the agent reads drun.json from the model's repository
// directory, verifies the signed bundle, fetches what the node's encrypted store lacks, and
// materializes the verified model into a private directory that Triton acquired for it, then
// points Triton at that directory. The plaintext is released when the model is gone (or, on
// request, as soon as the backend has loaded it). Built from Triton's documented repository
// agent API (triton/core/tritonrepoagent.h); the work itself is drun_localize::localize().
#include "drun_localize.hpp"

#include "triton/core/tritonrepoagent.h"
#include "triton/core/tritonserver.h"

#include <cstdint>
#include <exception>
#include <filesystem>
#include <string>
#include <system_error>

namespace {

#define DRUN_AGENT_LOG(level, message) drun_agent_log((level), __LINE__, (message))

void drun_agent_log(TRITONSERVER_LogLevel level, int line, const std::string& message) {
  std::string text = "drun repository agent: " + message;
  if (TRITONSERVER_Error* err = TRITONSERVER_LogMessage(level, __FILE__, line, text.c_str()))
    TRITONSERVER_ErrorDelete(err);
}

TRITONSERVER_Error* agent_error(TRITONSERVER_Error_Code code, const std::string& message) {
  return TRITONSERVER_ErrorNew(code, ("drun repository agent: " + message).c_str());
}

// drun's errors in Triton's coarser terms; the message keeps the step, file and cause.
TRITONSERVER_Error_Code triton_code(drun::errc code) {
  switch (code) {
    case drun::errc::not_found:
      return TRITONSERVER_ERROR_NOT_FOUND;
    case drun::errc::unsupported:
      return TRITONSERVER_ERROR_UNSUPPORTED;
    case drun::errc::io_error:
    case drun::errc::permission_denied:
    case drun::errc::cancelled:
      return TRITONSERVER_ERROR_UNAVAILABLE;
    default:
      return TRITONSERVER_ERROR_INVALID_ARG;  // configuration, or a model that does not verify
  }
}

// The agent's state for one model load (Triton makes a new agent model for every load).
struct model_state {
  std::string location;             // the directory acquired from Triton; empty once released
  bool release_after_load = false;  // the "release_after_load" agent parameter
};

model_state* state_of(TRITONREPOAGENT_AgentModel* model) {
  void* state = nullptr;
  if (TRITONSERVER_Error* err = TRITONREPOAGENT_ModelState(model, &state)) {
    TRITONSERVER_ErrorDelete(err);
    return nullptr;
  }
  return static_cast<model_state*>(state);
}

// Gives the acquired directory (and the plaintext in it) back to Triton, which deletes it.
void release(TRITONREPOAGENT_Agent* agent, TRITONREPOAGENT_AgentModel* model, model_state& state) {
  if (state.location.empty()) return;
  if (TRITONSERVER_Error* err = TRITONREPOAGENT_ModelRepositoryLocationRelease(agent, model, state.location.c_str())) {
    DRUN_AGENT_LOG(TRITONSERVER_LOG_ERROR, "cannot release " + state.location + ": " + TRITONSERVER_ErrorMessage(err));
    TRITONSERVER_ErrorDelete(err);
  } else {
    DRUN_AGENT_LOG(TRITONSERVER_LOG_VERBOSE, "released " + state.location);
  }
  state.location.clear();
}

// The agent's parameters from config.pbtxt (model_repository_agents { agents [{ name: "drun",
// parameters { key: ... value: ... } }] }), refused when unknown, like drun.json's fields.
TRITONSERVER_Error* read_parameters(TRITONREPOAGENT_Agent* agent, TRITONREPOAGENT_AgentModel* model,
                                    model_state& state) {
  std::uint32_t count = 0;
  if (TRITONSERVER_Error* err = TRITONREPOAGENT_ModelParameterCount(agent, model, &count)) return err;
  for (std::uint32_t i = 0; i < count; ++i) {
    const char* name = nullptr;
    const char* value = nullptr;
    if (TRITONSERVER_Error* err = TRITONREPOAGENT_ModelParameter(agent, model, i, &name, &value)) return err;
    std::string key = name ? name : "", text = value ? value : "";
    if (key != "release_after_load")
      return agent_error(TRITONSERVER_ERROR_INVALID_ARG,
                         "unknown parameter \"" + key + "\" (the agent knows release_after_load)");
    if (text != "true" && text != "false")
      return agent_error(TRITONSERVER_ERROR_INVALID_ARG,
                         "parameter \"release_after_load\" must be true or false, not \"" + text + "\"");
    state.release_after_load = text == "true";
  }
  return nullptr;
}

// Triton reads the model's configuration from the original repository, but an agent that runs
// after this one reads config.pbtxt from the location this one reports: give it the same file,
// unless the signed model brought its own.
TRITONSERVER_Error* carry_config(const std::filesystem::path& repository, const std::filesystem::path& localized) {
  const auto source = repository / "config.pbtxt", target = localized / "config.pbtxt";
  std::error_code ec;
  if (!std::filesystem::is_regular_file(source, ec) || std::filesystem::exists(target, ec)) return nullptr;
  if (!std::filesystem::copy_file(source, target, ec) || ec)
    return agent_error(TRITONSERVER_ERROR_INTERNAL,
                       "cannot copy " + source.string() + " to " + target.string() + ": " + ec.message());
  return nullptr;
}

TRITONSERVER_Error* load(TRITONREPOAGENT_Agent* agent, TRITONREPOAGENT_AgentModel* model, model_state& state) {
  TRITONREPOAGENT_ArtifactType type = TRITONREPOAGENT_ARTIFACT_FILESYSTEM;
  const char* location = nullptr;
  if (TRITONSERVER_Error* err = TRITONREPOAGENT_ModelRepositoryLocation(agent, model, &type, &location)) return err;
  if (type != TRITONREPOAGENT_ARTIFACT_FILESYSTEM || location == nullptr)
    return agent_error(TRITONSERVER_ERROR_UNSUPPORTED,
                       "the model repository must be on a local filesystem (drun.json is read from it; the "
                       "model itself comes from drun's origins and peers)");
  const std::filesystem::path repository = location;
  if (TRITONSERVER_Error* err = read_parameters(agent, model, state)) return err;

  release(agent, model, state);  // a second LOAD of the same agent model: never leak the first copy
  const char* acquired = nullptr;
  if (TRITONSERVER_Error* err =
          TRITONREPOAGENT_ModelRepositoryLocationAcquire(agent, model, TRITONREPOAGENT_ARTIFACT_FILESYSTEM, &acquired))
    return err;
  state.location = acquired;

  DRUN_AGENT_LOG(TRITONSERVER_LOG_INFO, "localizing " + repository.string() + " into " + state.location);
  auto localized = drun_localize::localize(repository, state.location);
  if (!localized) {
    const auto& e = localized.error();
    release(agent, model, state);
    return agent_error(triton_code(e.code()), repository.string() + ": " + e.message());
  }
  TRITONSERVER_Error* err = carry_config(repository, *localized);
  if (err == nullptr)
    err = TRITONREPOAGENT_ModelRepositoryUpdate(agent, model, TRITONREPOAGENT_ARTIFACT_FILESYSTEM,
                                                state.location.c_str());
  if (err != nullptr) {
    release(agent, model, state);
    return err;
  }
  DRUN_AGENT_LOG(TRITONSERVER_LOG_INFO, "verified model of " + repository.string() + " is at " + state.location);
  return nullptr;
}

TRITONSERVER_Error* model_action(TRITONREPOAGENT_Agent* agent, TRITONREPOAGENT_AgentModel* model,
                                 TRITONREPOAGENT_ActionType action) {
  model_state* state = state_of(model);
  if (state == nullptr) return agent_error(TRITONSERVER_ERROR_INTERNAL, "no state for this model");
  switch (action) {
    case TRITONREPOAGENT_ACTION_LOAD:
      return load(agent, model, *state);
    case TRITONREPOAGENT_ACTION_LOAD_COMPLETE:
      // The backend has read the files. Most (ONNX Runtime, TensorRT, PyTorch) never read them
      // again, but Triton's contract keeps the location until the model is finalized, and the
      // Python backend re-reads model.py when it restarts a stub: opt in per model.
      if (state->release_after_load) release(agent, model, *state);
      return nullptr;
    case TRITONREPOAGENT_ACTION_LOAD_FAIL:
    case TRITONREPOAGENT_ACTION_UNLOAD_COMPLETE:
      release(agent, model, *state);
      return nullptr;
    case TRITONREPOAGENT_ACTION_UNLOAD:
      // Requests in flight may still be running on the model: release once it is unloaded.
      return nullptr;
  }
  return nullptr;
}

}  // namespace

extern "C" {

TRITONSERVER_Error* TRITONREPOAGENT_Initialize(TRITONREPOAGENT_Agent* agent) {
  (void)agent;
  std::uint32_t major = 0, minor = 0;
  if (TRITONSERVER_Error* err = TRITONREPOAGENT_ApiVersion(&major, &minor)) return err;
  if (major != TRITONREPOAGENT_API_VERSION_MAJOR || minor < TRITONREPOAGENT_API_VERSION_MINOR)
    return agent_error(TRITONSERVER_ERROR_UNSUPPORTED,
                       "built for repository agent API " + std::to_string(TRITONREPOAGENT_API_VERSION_MAJOR) + "." +
                           std::to_string(TRITONREPOAGENT_API_VERSION_MINOR) + ", but this Triton offers " +
                           std::to_string(major) + "." + std::to_string(minor));
  return nullptr;
}

TRITONSERVER_Error* TRITONREPOAGENT_ModelInitialize(TRITONREPOAGENT_Agent* agent, TRITONREPOAGENT_AgentModel* model) {
  (void)agent;
  try {
    auto* state = new model_state();
    if (TRITONSERVER_Error* err = TRITONREPOAGENT_ModelSetState(model, state)) {
      delete state;
      return err;
    }
    return nullptr;
  } catch (const std::exception& e) {
    return agent_error(TRITONSERVER_ERROR_INTERNAL, e.what());
  }
}

TRITONSERVER_Error* TRITONREPOAGENT_ModelFinalize(TRITONREPOAGENT_Agent* agent, TRITONREPOAGENT_AgentModel* model) {
  model_state* state = state_of(model);
  if (state == nullptr) return nullptr;
  release(agent, model, *state);  // whatever path the lifecycle took, the plaintext goes
  if (TRITONSERVER_Error* err = TRITONREPOAGENT_ModelSetState(model, nullptr)) TRITONSERVER_ErrorDelete(err);
  delete state;
  return nullptr;
}

TRITONSERVER_Error* TRITONREPOAGENT_ModelAction(TRITONREPOAGENT_Agent* agent, TRITONREPOAGENT_AgentModel* model,
                                                const TRITONREPOAGENT_ActionType action_type) {
  try {
    return model_action(agent, model, action_type);
  } catch (const std::exception& e) {  // no exception crosses into Triton
    return agent_error(TRITONSERVER_ERROR_INTERNAL, e.what());
  } catch (...) {
    return agent_error(TRITONSERVER_ERROR_INTERNAL, "unknown exception");
  }
}

}  // extern "C"
