// Everything drun offers, in one include.
#pragma once

#include <drun/audit.hpp>
#include <drun/error.hpp>
#include <drun/fetch.hpp>
#include <drun/hash.hpp>
#include <drun/keys.hpp>
#include <drun/log.hpp>
#include <drun/manifest.hpp>
#include <drun/metrics.hpp>
#include <drun/node_key.hpp>
#include <drun/peer.hpp>
#include <drun/piece.hpp>
#include <drun/policy.hpp>
#include <drun/registry.hpp>
#include <drun/safetensors.hpp>
#include <drun/sign.hpp>
#include <drun/source.hpp>
#include <drun/store.hpp>
#include <drun/token.hpp>
#include <drun/trace.hpp>
#include <drun/transport.hpp>
#include <drun/trust.hpp>
#include <drun/verify.hpp>
